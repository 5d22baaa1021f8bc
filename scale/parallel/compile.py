"""Regional compilation: `torch.compile` applied to repeated blocks (and small heads) one by one,
from outside the model, instead of to the whole model.

Every transformer block has the same code, so dynamo traces one graph and reuses it for all of them
(parameters are graph inputs: `torch._dynamo.config.inline_inbuilt_nn_modules`, on by default):
compile time is that of one block, not of the network. `nn.Module.compile` compiles in place, so
parameter names and state dicts are unchanged (no `_orig_mod.` prefixes), and wrappers applied
afterwards (FSDP2's `fully_shard`, DeepSpeed's engine, DDP) see the same modules.

Order, as torch's FSDP2 users (torchtitan) apply it: activation checkpointing, then compilation,
then sharding. The collective hooks of FSDP2 run outside the compiled graphs
(`torch._dynamo.config.skip_fsdp_hooks`).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def compile_regions(modules: Iterable[nn.Module], **options) -> int:
    """`module.compile(**options)` on each of `modules` (in place); returns how many. Idempotent."""
    n = 0
    for m in modules:
        if getattr(m, "_compiled_call_impl", None) is not None:
            continue
        m.compile(**options)
        n += 1
    return n
