"""What every loader shares (`EpochLoader`: equal batches per epoch on every rank, the position in
the run, the lost-sample counts) and the torchvision loader over a `TwoViewStream`
(`TwoViewLoader`): workers, pinned memory, one copy of both views to the device, normalisation,
and exact resume (`state_dict` / `load_state_dict`)."""

from __future__ import annotations

import abc
import logging
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from scale.data.augment import Normalize
from scale.data.stream import TwoViewStream, worker_init
from scale.errors import DataError

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class EpochLoader(abc.ABC):
    """What every loader shares: `len()` batches per epoch on every rank, the position (epoch and
    batches handed out), the corrupt-sample count. Subclasses yield one epoch's batches from the
    current position in `_epoch_batches`."""

    batches_per_epoch: int

    def __init__(self) -> None:
        self.epoch, self.batches_done, self.num_skipped = 0, 0, 0
        self.num_read = 0  # samples handed out over the run (resumed from the checkpoint)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches_done = epoch, 0

    def position(self) -> tuple[int, int]:
        """(epoch, batches handed out in it), with a finished epoch reported as (epoch + 1, 0)."""
        if self.batches_done >= len(self):
            return self.epoch + 1, 0
        return self.epoch, self.batches_done

    @abc.abstractmethod
    def _epoch_batches(self) -> Iterator[Batch]:
        """The batches of the current epoch from the current position (`batches_done`)."""

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch (all of it unless resumed mid-epoch)."""
        if self.batches_done >= len(self):
            self.epoch, self.batches_done = self.epoch + 1, 0
        for batch in self._epoch_batches():
            self.batches_done += 1
            self.num_read += len(batch[0])
            yield batch
        if self.batches_done >= len(self):
            self.epoch, self.batches_done = self.epoch + 1, 0

    def metrics(self) -> dict[str, float]:
        return {"data/skipped": float(self.num_skipped)}


class TwoViewLoader(EpochLoader):
    """Iterate one epoch at a time: `for view1, view2, labels in loader: ...`.

    `len(loader)` is the number of batches per epoch (equal on every rank). The position advances
    as batches are handed out; `state_dict()` / `load_state_dict()` save and restore it.
    """

    def __init__(
        self,
        stream: TwoViewStream,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        device: str | torch.device | None = None,
    ):
        super().__init__()
        self.stream = stream
        self.batches_per_epoch, self.batch_size = stream.batches_per_epoch, stream.batch_size
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        # Workers hand over uint8 views (a quarter of the bytes); normalised here, on `device`.
        self.device = torch.device(device) if device is not None else None
        cfg = stream.transform.cfg
        self.normalize = Normalize(cfg.mean, cfg.std)

    def _epoch_batches(self) -> Iterator[Batch]:
        self.stream.configure(self.epoch, self.batches_done)
        workers = self.stream.num_workers
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if workers else None,
            worker_init_fn=worker_init if workers else None,
        )
        for views, labels, meta in loader:  # views: (2, B, 3, S, S) uint8, pinned for a GPU
            if meta["skipped"]:
                self.num_skipped += len(meta["skipped"])
                log.warning(
                    "%d corrupt sample(s) skipped in epoch %d (%d in all): %s",
                    len(meta["skipped"]),
                    self.epoch,
                    self.num_skipped,
                    ", ".join(meta["skipped"][:5]),
                )
            if self.device is not None:  # both views in one non-blocking copy
                views = views.to(self.device, non_blocking=True)
            views = self.normalize(views)
            yield views[0], views[1], labels  # adjacent halves of one tensor: joint forwards need no copy

    def state_dict(self) -> dict:
        s = self.stream
        epoch, done = self.position()
        return {
            "epoch": epoch,
            "batches_done": done,
            "num_skipped": self.num_skipped,
            "num_read": self.num_read,
            "seed": s.seed,
            "world_size": s.world_size,
            "batch_size": s.batch_size,
            "num_workers": s.num_workers,
            "num_samples": s.num_samples,
            "resampled": s.resampled,
            "backend": "torchvision",
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a position. A mid-epoch position needs the same layout (world size, batch size,
        workers, data, seed), else the remaining batches would not be the ones that were left; at an
        epoch boundary anything may change (elastic resume)."""
        s = self.stream
        layout = {
            "backend": "torchvision",
            "seed": s.seed,
            "world_size": s.world_size,
            "batch_size": s.batch_size,
            "num_samples": s.num_samples,
            "resampled": s.resampled,
            "num_workers": s.num_workers,
        }
        check_resume_layout(state, layout)
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
        self.num_skipped = int(state.get("num_skipped", 0))
        self.num_read = int(state.get("num_read", 0))


def check_resume_layout(state: dict, layout: dict) -> None:
    """Refuse a mid-epoch resume whose layout differs; log the differences at an epoch boundary."""
    diff = {k: (state.get(k), v) for k, v in layout.items() if state.get(k) != v}
    if not diff:
        return
    changes = ", ".join(f"{k}: saved {a} vs now {b}" for k, (a, b) in diff.items())
    if state.get("batches_done", 0):
        raise DataError(
            f"cannot resume mid-epoch (batch {state['batches_done']} of epoch {state['epoch']}) exactly: {changes}; "
            "resume with the saved settings, or from a checkpoint taken at an epoch boundary"
        )
    log.info("resuming at the start of epoch %s with a changed data layout: %s", state.get("epoch"), changes)
