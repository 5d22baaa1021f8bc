"""One rank's epoch as a stream over DataLoader workers (`TwoViewStream`): each worker reads the
samples its plan gives it (`scale.data.epoch_plan`), through a seeded shuffle buffer, decodes and
augments them (each sample seeded by its position in the epoch), replaces corrupt ones, and hands
over uint8 batches of every view. A resume replays the shuffle buffer on positions alone.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image

from scale.data.augment import TwoViews
from scale.data.epoch_plan import EpochPlan, batches_before, batches_per_rank, plan_epoch
from scale.data.sources import FolderSource, ShardSource
from scale.errors import DataError

log = logging.getLogger(__name__)


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Shuffle buffer: fill to `size`, then emit a random element for every new one."""
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


class TwoViewStream(IterableDataset):
    """One epoch of `(views, labels, meta)` batches of one rank, split over DataLoader workers:
    `views` is one uint8 (V, B, 3, S, S) tensor of the V views the transform returns (2 for MoCo v3;
    `scale.data.labelled` uses one), so that a batch is pinned and copied to the device at once."""

    def __init__(
        self,
        source: ShardSource | FolderSource,
        transform: TwoViews,
        *,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        repeats: int = 1,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if resampled and source.kind != "shards":
            raise DataError("resampled mode draws whole shards; it needs shards, not an image folder")
        self.source, self.transform = source, transform
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.num_workers, self.seed, self.shuffle = num_workers, seed, shuffle
        self.shuffle_buffer = shuffle_buffer if shuffle else 0
        self.resampled = resampled
        if repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {repeats}")
        self.repeats = repeats
        """Repeated augmentation (Hoffer et al.; DeiT's 3): each sample read is handed out this many
        times in a row, each time augmented anew, and an epoch reads 1 / repeats of the samples
        (its length is unchanged, as timm's RASampler)."""
        self.num_samples = int(sum(source.counts))
        self.batches_per_epoch = batches_per_rank(self.num_samples, world_size, batch_size)
        self.epoch, self.skip_batches = 0, 0
        self._replaying = False

    def configure(self, epoch: int, skip_batches: int) -> None:
        """Set the epoch and the batches already consumed in it (before creating the iterator)."""
        self.epoch, self.skip_batches = epoch, skip_batches

    def _raw(self, plan: EpochPlan, k: int) -> Iterator[tuple[int, int, int, tuple | None]]:
        """(uid, unit, index in unit, (key, image bytes, label)) of logical worker k, unshuffled.

        While `self._replaying`, the payload is None and nothing is read: a resume replays the
        shuffle buffer on positions alone and fetches only the samples left in it.
        """
        if not self.resampled:
            for seg in plan.worker_segments[k]:
                reader = None
                for i in range(seg.start, seg.stop):
                    uid = seg.position + i - seg.start
                    if self._replaying:
                        yield uid, seg.unit, i, None
                        continue
                    reader = reader or self.source.read(seg.unit, i, seg.stop)
                    yield uid, seg.unit, i, next(reader)
            return
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, k, 1])
        uid = ((self.rank * max(1, self.num_workers) + k) << 40) + (1 << 62)  # never equal to a position
        while True:
            unit = int(rng.integers(len(self.source.counts)))
            reader = None
            for i in range(self.source.counts[unit]):
                if self._replaying:
                    yield uid, unit, i, None
                else:
                    reader = reader or self.source.read(unit, i, self.source.counts[unit])
                    yield uid, unit, i, next(reader)
                uid += 1

    def _decode(self, data: bytes | None) -> torch.Tensor | None:
        if data is None:
            return None
        try:
            return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except Exception:
            return None

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        K = max(1, self.num_workers)
        k = ((info.id if info else 0) + self.skip_batches) % K  # logical worker: keeps batch i on worker i % K
        plan = plan_epoch(
            self.source.counts,
            world_size=self.world_size,
            rank=self.rank,
            num_workers=K,
            batch_size=self.batch_size,
            epoch=self.epoch,
            seed=self.seed,
            shuffle=self.shuffle,
            worker=k,
        )
        skip = batches_before(self.skip_batches, k, K)
        stream = self._raw(plan, k)
        if self.shuffle_buffer > 1:
            stream = _shuffled(stream, self.shuffle_buffer, random.Random(hash((self.seed, self.epoch, self.rank, k))))
        if self.repeats > 1:
            stream = _repeated(stream, self.repeats)
        self._replaying = True  # to the resume position: positions only, no reading, no decoding
        for _ in range(skip * self.batch_size):
            next(stream)
        self._replaying = False
        last_good: tuple[torch.Tensor, int] | None = None
        pending: list[int] = []  # uids of corrupt samples met before any good one
        ready: deque[tuple[torch.Tensor, int, int]] = deque()  # (image, label, uid), one per raw sample
        for _ in range(plan.worker_batches[k] - skip):
            skipped = []
            while len(ready) < self.batch_size:
                try:
                    uid, unit, i, payload = next(stream)
                except StopIteration:
                    raise DataError(f"every sample of a worker's range was corrupt (last: {skipped[-1:]})") from None
                key, data, label = payload or self.source.read_one(unit, i)  # None: in the buffer at resume
                image = self._decode(data)
                if image is None:
                    log.warning("skipping corrupt or undecodable sample %s", key)
                    skipped.append(key)
                    if last_good is None:
                        pending.append(uid)
                        continue
                    image, label = last_good
                else:
                    last_good = (image, label)
                ready.extend((image, label, u) for u in [*pending, uid])
                pending = []
            items = [ready.popleft() for _ in range(self.batch_size)]
            views = [self._augment(image, uid) for image, _, uid in items]  # B x V x (3, S, S)
            batch = torch.empty((len(views[0]), len(views), *views[0][0].shape), dtype=views[0][0].dtype)
            for i, sample_views in enumerate(views):
                for j, view in enumerate(sample_views):
                    batch[j, i] = view
            yield batch, torch.tensor([label for _, label, _ in items], dtype=torch.int64), {"skipped": skipped}

    def _augment(self, image: torch.Tensor, uid: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample_seed = int(np.random.SeedSequence([self.seed, self.epoch, uid]).generate_state(1)[0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            return self.transform(image)


def _repeated(items: Iterator, repeats: int) -> Iterator:
    """Each (uid, unit, index, payload) `repeats` times in a row, as uids uid * repeats + r (each copy
    seeded on its own). A copy handed out after a resume's replay has no payload: it is read again."""
    for uid, unit, i, payload in items:
        for r in range(repeats):
            yield uid * repeats + r, unit, i, payload


def worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode and augment one image at a time
