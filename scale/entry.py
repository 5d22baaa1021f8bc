"""What the entry points share: rank-aware logging, and for the evaluation CLIs one-line errors and
the process group ended on the way out."""

from __future__ import annotations

import contextlib
import logging
import sys

from scale.errors import USER_ERRORS, ConfigError, LaunchError
from scale.parallel.placement import detect_launch


def launch_rank() -> int:
    """This process's rank as the launcher says (srun's tasks have no RANK before start-up)."""
    try:
        return detect_launch().rank
    except LaunchError:
        return 0


class _MainRankOnly(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.WARNING


def setup_logging() -> None:
    """INFO on rank 0, warnings and errors on every rank, each line naming its rank."""
    handler = logging.StreamHandler()
    rank = launch_rank()
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    handler.addFilter(_MainRankOnly(rank))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def strip_debug(argv: list[str] | None) -> tuple[list[str], bool]:
    """`argv` (default sys.argv[1:]) without `--debug`, and whether it was there."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return [a for a in argv if a != "--debug"], "--debug" in argv


@contextlib.contextmanager
def user_errors(debug: bool = False, prefix: str = "error"):
    """Turn a user error (`scale.errors.USER_ERRORS`) into one line on stderr and exit status 1; with
    `debug` (the `--debug` flag of every command) the traceback is shown instead. The process group
    is destroyed on the way out in any case."""
    try:
        yield
    except USER_ERRORS as e:
        if debug:
            raise
        kind = "config error" if isinstance(e, ConfigError) else prefix
        text = str(e)
        if "Original Traceback" in text:  # re-raised from a DataLoader worker: its last line says it
            text = [line for line in text.splitlines() if line.strip()][-1]
        text = " ".join(text.split()) or type(e).__name__
        hint = "" if isinstance(e, ConfigError) else " (--debug shows the traceback)"
        raise SystemExit(f"{kind}: {text}{hint}") from None
    finally:
        # Looked up, not imported: a command that stopped before importing torch has no process
        # group, and its wrong arguments are answered without torch's start-up.
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def run_cli(main, argv: list[str] | None = None):
    """Run a command's `main(argv)` with one-line errors; `--debug` anywhere shows tracebacks."""
    argv, debug = strip_debug(argv)
    with user_errors(debug):
        return main(argv)


@contextlib.contextmanager
def evaluation_entry(debug: bool | None = None):
    """A user's mistake (a missing file, another architecture, bad data or flags, a launch that
    cannot work) ends the command with one line; the process group is destroyed in any case."""
    with user_errors("--debug" in sys.argv if debug is None else debug):
        yield
