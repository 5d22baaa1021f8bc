"""Every error a user (or the machine) can cause, in one leaf module: each layer raises its own, the
entry points turn any of them into one line (`scale.entry.user_errors`). Nothing here imports torch.

The messages say what to change; the types say where the mistake was found.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration a user got wrong: the message says what to change."""


class DataError(ValueError):
    """Data that cannot be used as given: missing or unreadable shards, too few samples, no labels."""


class CheckpointError(ValueError):
    """A model checkpoint of another architecture or format, or one that cannot be read."""


class BackendError(ValueError):
    """A parallel/precision setting that cannot work here: the message says what to change."""


class LaunchError(ValueError):
    """A launch environment that cannot work (half-set variables, a rank outside the world)."""


class RunDirInUseError(ValueError):
    """Another live job holds the run directory (`scale.train.run_owner`)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, I/O error); the previous one is intact."""


class TrainingError(RuntimeError):
    """Training cannot go on (too many non-finite losses in a row, too much data lost)."""


class StalledRankError(RuntimeError):
    """A collective timed out because another rank stopped responding; the message names it."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, DataError, CheckpointError, BackendError, LaunchError, CheckpointWriteError, StalledRankError,
    TrainingError, OSError, ValueError,
)  # fmt: skip
"""What a user's mistake or the machine raises (a wrong field, a missing or corrupt file, bad data, a
launch that cannot work, a full disk, a stalled rank): reported by the commands in one line."""


def is_write_failure(e: BaseException) -> bool:
    """Whether `e` is a failed file write: an OSError (ENOSPC, EIO...), DCP's CheckpointException,
    or the RuntimeError torch.save's zip writer raises when the disk is full."""
    if isinstance(e, OSError) or type(e).__name__ == "CheckpointException":
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text)
