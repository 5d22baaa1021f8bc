"""Activation recompute ("activation checkpointing", `--parallel.activation_checkpointing`) applied
from outside the model: each given module recomputes its forward during the backward pass instead of
storing activations. Parameter names are unchanged
(the forward is wrapped on the instance, the module tree is not touched)."""

from __future__ import annotations

import functools
from collections.abc import Iterable

from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(modules: Iterable[nn.Module]) -> int:
    """Checkpoint every module in `modules` (e.g. the transformer blocks); returns how many."""
    n = 0
    for m in modules:
        if getattr(m, "_scale_checkpointed", False):
            continue
        m.forward = functools.partial(_checkpointed, m.forward)
        m._scale_checkpointed = True
        n += 1
    return n
