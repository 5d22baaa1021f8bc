"""Synthetic input for benchmarks: fixed random batches of the right shape, no decoding."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from scale.data.epoch_loader import Batch, EpochLoader
from scale.data.epoch_plan import batches_per_rank


class SyntheticLoader(EpochLoader):
    """Fixed random batches of the right shape for benchmarks: no decoding, no augmentation cost.

    The batch is generated once (seeded) and handed out `len(loader)` times per epoch. With
    `pin_memory` it lives in page-locked memory, so its copy to the GPU is asynchronous as a real
    loader's pinned batches are (a copy from pageable memory would synchronise the host).
    """

    def __init__(
        self,
        batch_size: int,
        crop_size: int = 224,
        num_samples: int = 1_281_167,
        world_size: int = 1,
        seed: int = 0,
        pin_memory: bool = False,
    ):
        super().__init__()
        self.batches_per_epoch = batches_per_rank(num_samples, world_size, batch_size)
        g = torch.Generator().manual_seed(seed)
        views = torch.randn(2, batch_size, 3, crop_size, crop_size, generator=g)  # both views in one buffer
        labels = torch.full((batch_size,), -1, dtype=torch.int64)
        if pin_memory:
            views, labels = views.pin_memory(), labels.pin_memory()
        self._batch = (views[0], views[1], labels)
        self.batch_size = batch_size

    def _epoch_batches(self) -> Iterator[Batch]:
        for _ in range(len(self) - self.batches_done):
            yield self._batch

    def state_dict(self) -> dict:
        epoch, done = self.position()
        return {"epoch": epoch, "batches_done": done}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
