"""Activation recompute ("activation checkpointing", `--parallel.activation_checkpointing`) applied
from outside the model: each given module recomputes its forward during the backward pass instead of
storing activations (`true`), or only its cheap operations (`selective`: torch's selective
checkpoint policy keeps the outputs of the matmuls and attention, `SAVED_OPS`, and recomputes the
normalisations, GELU, casts and adds). Parameter names are unchanged (the forward is wrapped on the
instance, the module tree is not touched).

BatchNorm inside a recomputed module (ViT-BN's blocks) must not see the recompute as a second
forward: its running statistics and `num_batches_tracked` move once per forward, as without
recompute. torch's non-reentrant checkpoint runs two contexts of ours (`context_fn`), one around
the forward and one around its recompute: the forward's records the sums over the ranks of every
cross-rank BatchNorm, the recompute's replays them (the same output, no second collective: only
the backward's all-reduce of the statistics' gradients) and then puts every BatchNorm's running
statistics and counter back as the forward left them.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_state = threading.local()


class Recorded:
    """What the cross-rank BatchNorms of one recomputed forward computed, in call order per module:
    appended during the forward, read back in the same order by its recompute."""

    def __init__(self) -> None:
        self.saved: dict[int, list] = {}
        self.replayed: dict[int, int] = {}

    def record(self, module: nn.Module, value) -> None:
        self.saved.setdefault(id(module), []).append(value)

    def replay(self, module: nn.Module):
        i = self.replayed.get(id(module), 0)
        self.replayed[id(module)] = i + 1
        return self.saved[id(module)][i]


def recompute_phase() -> tuple[str, Recorded] | None:
    """('forward' | 'recompute', the record) inside a recomputed module's forward or its recompute;
    None elsewhere (`CrossRankBatchNorm` asks)."""
    return getattr(_state, "phase", None)


@contextlib.contextmanager
def _phase(phase: str, recorded: Recorded, batchnorms: list[_BatchNorm]) -> Iterator[None]:
    previous = recompute_phase()
    _state.phase = (phase, recorded)
    # The recompute runs BatchNorm as the forward did (the same saved tensors), then its running
    # statistics and counters are put back: they moved in the forward already.
    saved = [[b.clone() for b in m.buffers()] for m in batchnorms] if phase == "recompute" else None
    try:
        yield
    finally:
        if saved is not None:
            with torch.no_grad():
                for m, buffers in zip(batchnorms, saved, strict=True):
                    for b, s in zip(m.buffers(), buffers, strict=True):
                        b.copy_(s)
        _state.phase = previous


_aten = torch.ops.aten
SAVED_OPS = {
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default, _aten.linear.default,
    _aten._scaled_dot_product_flash_attention.default, _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default, _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten.convolution.default,
}  # fmt: skip
"""Selective recompute keeps the outputs of these (the matmuls and attention: the FLOPs) and
recomputes everything else (normalisations, GELU, casts, residual adds, copies) in the backward."""


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


class _Both:
    """Two context managers entered as one (the BatchNorm record and selective recompute's mode)."""

    def __init__(self, first, second) -> None:
        self.first, self.second, self.stack = first, second, None

    def __enter__(self):
        self.stack = contextlib.ExitStack()
        self.stack.enter_context(self.first)
        self.stack.enter_context(self.second)
        return self

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)


def _selective_contexts():
    """Selective recompute's own pair of dispatch modes (a module-level function: what torch.compile
    can trace as a `context_fn`)."""
    return create_selective_checkpoint_contexts(_selective_policy)


def _contexts(batchnorms: list[_BatchNorm], selective: bool):
    recorded = Recorded()
    forward, recompute = _phase("forward", recorded, batchnorms), _phase("recompute", recorded, batchnorms)
    if selective:
        saving, recomputing = create_selective_checkpoint_contexts(_selective_policy)
        return _Both(forward, saving), _Both(recompute, recomputing)
    return forward, recompute


def _checkpointed(forward, batchnorms: list[_BatchNorm], selective: bool, *args, **kwargs):
    if not batchnorms:
        if selective:
            return checkpoint(forward, *args, use_reentrant=False, context_fn=_selective_contexts, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=lambda: _contexts(batchnorms, selective),
                      **kwargs)  # fmt: skip


def apply_activation_checkpointing(modules: Iterable[nn.Module], selective: bool = False) -> int:
    """Checkpoint every module in `modules` (e.g. the transformer blocks); returns how many.
    `selective`: keep the matmul and attention outputs (`SAVED_OPS`), recompute only the rest.

    The BatchNorms inside a module are looked up when it runs (a later conversion to cross-rank
    BatchNorm is seen)."""
    n = 0
    for m in modules:
        if getattr(m, "_scale_checkpointed", False):
            continue
        m.forward = functools.partial(_run_checkpointed, m, m.forward, selective)
        m._scale_checkpointed = True
        n += 1
    return n


def _run_checkpointed(module: nn.Module, forward, selective: bool, *args, **kwargs):
    batchnorms = [b for b in module.modules() if isinstance(b, _BatchNorm)]
    return _checkpointed(forward, batchnorms, selective, *args, **kwargs)


def recompute_mode(value: bool | str) -> str:
    """`parallel.activation_checkpointing` as 'none', 'full' or 'selective'."""
    if value == "selective":
        return "selective"
    return "full" if value is True else "none"
