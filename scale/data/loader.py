"""The training input: `build_loader` gives `(view1, view2, label)` batches for every rank, from
webdataset shards, an ImageFolder tree, the demo set or synthetic tensors, augmented by torchvision
or DALI. The pieces: `sources` (where samples come from), `epoch_plan` (who reads what),
`stream` (a rank's workers), `epoch_loader` (position, resume, the device copy), `synthetic`,
`dali`; this module is the factory, and the only one that imports DALI.

How an epoch is laid out (torchvision path; `plan_epoch` is the pure function behind it):
- The data is a list of units (shards, or single files of an ImageFolder tree) with known sample
  counts (from the shard set's manifest: start-up opens no shard; `sources`). Each epoch the unit
  order is shuffled with a seed that depends on (seed, epoch) only, the same on every rank, and
  the samples are concatenated.
- Every rank gets `num_samples // (world_size * batch_size)` batches, the same number on every
  rank (no rank runs out first and hangs a collective); the remainder, under one global batch, is
  dropped (`drop_last`), a different remainder each epoch.
- Rank r reads a contiguous range of that sequence; within it, DataLoader worker k gets the samples
  of exactly the batches it will produce (the DataLoader takes batches round-robin from its
  workers). Ranges are disjoint, so no sample is seen twice in an epoch, and reads are sequential
  within a shard (seeking by the index where a range starts mid-shard).
- Each worker passes its samples through a seeded shuffle buffer, then decodes and augments.
  Every sample's augmentation is seeded by (seed, epoch, its position in the epoch), so it does not
  depend on which worker or process handled it.
- `resampled=True` (for very large runs): every worker draws whole shards at random with
  replacement instead; batch counts are still equal, samples may repeat within an "epoch".

Position and resume: `state_dict()` records the epoch and the batches handed out in it. Resuming
with the same world size, batch size, worker count and data yields exactly the same next batch,
mid-epoch included: each worker replays its shuffle buffer up to the position on sample positions
alone (no reading, no decoding) and then reads only the samples still in the buffer. At an epoch
boundary the layout may change (elastic resume). One caveat: a corrupt sample is replaced by the
previous good sample of the same worker, and right after a resume point that may be another one.

Workers hand over uint8 views (a quarter of the bytes of float32 through shared memory); the
loader normalises them in the main process, or on `device` after the copy.

Corrupt or undecodable samples are skipped: replaced (so batch counts stay equal), counted in
`num_skipped` and the `data/skipped` metric, and logged with their keys.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from scale.data.augment import AugmentConfig, TwoViews
from scale.data.epoch_loader import EpochLoader, TwoViewLoader
from scale.data.sources import resolve_source
from scale.data.stream import TwoViewStream
from scale.data.synthetic import SyntheticLoader
from scale.errors import DataError

log = logging.getLogger(__name__)


def build_loader(
    source: str,
    *,
    batch_size: int,
    world_size: int | None = None,
    rank: int | None = None,
    augment: AugmentConfig | None = None,
    backend: str = "torchvision",
    num_workers: int = 4,
    seed: int = 0,
    shuffle: bool = True,
    shuffle_buffer: int = 1000,
    resampled: bool = False,
    pin_memory: bool = False,
    device: str | torch.device | None = None,
    device_id: int | None = None,
    synthetic_samples: int = 1_281_167,
) -> EpochLoader:
    """The training input of one rank.

    Args:
        source: `demo` / `demo:val`, `synthetic`, a shard pattern (`/data/in1k/train-{000000..000146}.tar`
            or a glob), a directory of shards, or an ImageFolder tree.
        batch_size: per rank (per device).
        world_size, rank: default: from torch.distributed when initialised, else 1 and 0.
        backend: `torchvision` (CPU workers) or `dali` (on GPU `device_id`, by default the current CUDA
            device when there is one, else DALI's CPU-only mode).
        num_workers: DataLoader worker processes (torchvision) or DALI CPU threads.
        shuffle_buffer: samples per worker shuffle buffer (after the per-epoch shard shuffle).
        resampled: draw shards with replacement (very large runs; see the module docstring).
        device: torchvision path: move the uint8 views there before normalising (e.g. the GPU).
    """
    if world_size is None or rank is None:
        initialised = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if initialised else 1
        rank = dist.get_rank() if initialised else 0
    augment = augment or AugmentConfig()
    if source == "synthetic":
        return SyntheticLoader(batch_size, augment.crop_size, synthetic_samples, world_size, seed, pin_memory)
    if backend not in ("torchvision", "dali"):
        raise ValueError(f"data backend {backend!r} is not one of: torchvision, dali")
    src = resolve_source(source)
    log.info("data: %s, %s augmentation, rank %d of %d", src, backend, rank, world_size)
    if backend == "dali":
        from scale.data.dali import DaliLoader  # optional: NVIDIA DALI is imported only for DALI runs

        if resampled:
            raise DataError("resampled mode exists for the torchvision path only; use --data.backend=torchvision")
        if device_id is None and torch.cuda.is_available():
            device_id = torch.cuda.current_device()
            log.info("DALI on GPU %d (pass device_id to choose another)", device_id)

        return DaliLoader(
            src,
            augment,
            batch_size=batch_size,
            world_size=world_size,
            rank=rank,
            num_threads=max(1, num_workers),
            seed=seed,
            shuffle=shuffle,
            shuffle_buffer=shuffle_buffer,
            device_id=device_id,
        )
    stream = TwoViewStream(
        src,
        TwoViews(augment, normalize=False),
        batch_size=batch_size,
        world_size=world_size,
        rank=rank,
        num_workers=num_workers,
        seed=seed,
        shuffle=shuffle,
        shuffle_buffer=shuffle_buffer,
        resampled=resampled,
    )
    return TwoViewLoader(stream, pin_memory=pin_memory, device=device)
