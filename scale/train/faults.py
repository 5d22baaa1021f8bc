"""The errors of faults a long run meets (a checkpoint write that fails, a rank that stops
responding), and the named points inside a checkpoint write at which tests inject faults.

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


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, I/O error); the previous one is intact."""


class TrainingError(RuntimeError):
    """Training cannot go on (too many non-finite losses in a row, too much data lost)."""


class StalledRankError(RuntimeError):
    """A collective timed out because another rank stopped responding; the message names it."""


def on_fault_point(hook: Callable[[str, int], None]) -> None:
    """Call `hook(point, step)` at every named point (tests only)."""
    _hooks.append(hook)


def fault_point(name: str, step: int) -> None:
    for hook in _hooks:
        hook(name, step)
