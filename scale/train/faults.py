"""The named points inside a checkpoint write (and after each step) at which tests inject faults
(the errors those faults raise are in `scale.errors`).

`fault_point(name)` is a no-op unless a hook is registered (`on_fault_point`): the fault tests
register one that kills the process or raises ENOSPC at exactly that point, in a real run
(`tests/faults/inject.py`). Production code registers nothing.
"""

from __future__ import annotations

from collections.abc import Callable

# The points of `scale.train.checkpoint.save_checkpoint`, in order.
CHECKPOINT_POINTS = (
    "before-model",  # the temporary directory exists, nothing written in it yet
    "after-model",  # the backend's files (model.pt, DCP shards, the DeepSpeed engine) are written
    "before-client",  # this rank's RNG state written, the client state (client.pt) not yet
    "before-rename",  # every rank's files written and the manifest too, not yet renamed to step-N
    "after-rename",  # step-N is complete, older checkpoints not yet pruned
)

_hooks: list[Callable[[str, int], None]] = []


def on_fault_point(hook: Callable[[str, int], None]) -> None:
    """Call `hook(point, step)` at every named point (tests only)."""
    _hooks.append(hook)


def fault_point(name: str, step: int) -> None:
    for hook in _hooks:
        hook(name, step)
