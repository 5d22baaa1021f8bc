"""What the entry points share: rank-aware logging, and for the evaluation CLIs one-line errors and
the process group ended on the way out."""

from __future__ import annotations

import contextlib
import logging


def launch_rank() -> int:
    """This process's rank as the launcher says (srun's tasks have no RANK before start-up)."""
    from scale.parallel.placement import LaunchError, detect_launch

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


@contextlib.contextmanager
def evaluation_entry():
    """A user's mistake (a missing file, another architecture, bad data or flags, a launch that
    cannot work) ends the command with one line; the process group is destroyed in any case."""
    import torch.distributed as dist

    from scale.data.shards import DataError
    from scale.models.checkpoints import CheckpointError
    from scale.parallel.base import BackendError
    from scale.parallel.placement import LaunchError

    try:
        yield
    except (FileNotFoundError, CheckpointError, DataError, BackendError, LaunchError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
