"""Activation recompute ("activation checkpointing", `--parallel.activation_checkpointing`) applied
from outside the model: each given module recomputes its forward during the backward pass instead of
storing activations. Parameter names are unchanged (the forward is wrapped on the instance, the
module tree is not touched).

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
from torch.utils.checkpoint import checkpoint

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


def _contexts(batchnorms: list[_BatchNorm]):
    recorded = Recorded()
    return _phase("forward", recorded, batchnorms), _phase("recompute", recorded, batchnorms)


def _checkpointed(forward, batchnorms: list[_BatchNorm], *args, **kwargs):
    if not batchnorms:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=lambda: _contexts(batchnorms), **kwargs)


def apply_activation_checkpointing(modules: Iterable[nn.Module]) -> int:
    """Checkpoint every module in `modules` (e.g. the transformer blocks); returns how many.

    The BatchNorms inside a module are looked up when it runs (a later conversion to cross-rank
    BatchNorm is seen)."""
    n = 0
    for m in modules:
        if getattr(m, "_scale_checkpointed", False):
            continue
        m.forward = functools.partial(_run_checkpointed, m, m.forward)
        m._scale_checkpointed = True
        n += 1
    return n


def _run_checkpointed(module: nn.Module, forward, *args, **kwargs):
    batchnorms = [b for b in module.modules() if isinstance(b, _BatchNorm)]
    return _checkpointed(forward, batchnorms, *args, **kwargs)
