"""The training input: `(view1, view2, label)` batches for every rank, from webdataset shards, an
ImageFolder tree, the demo set or synthetic tensors, augmented by torchvision or DALI.

How an epoch is laid out (torchvision path; `plan_epoch` is the pure function behind it):
- The data is a list of units (shards, or single files of an ImageFolder tree) with known sample
  counts (from the shards' DALI index files). Each epoch the unit order is shuffled with a seed
  that depends on (seed, epoch) only, the same on every rank, and the samples are concatenated.
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

import abc
import glob
import itertools
import logging
import os
import random
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from scale.data.augment import AugmentConfig, Normalize, TwoViews
from scale.data.shards import (
    IMAGE_EXTS,
    LABEL_BIN_EXT,
    LABEL_TEXT_EXT,
    DataError,
    find_images,
    index_path,
    iter_shard,
    read_index,
    read_index_count,
)

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


# ----------------------------------------------------------------------------- sources


class ShardSource:
    """Webdataset tar shards with DALI index files beside them (`scale-make-shards` writes both)."""

    kind = "shards"

    def __init__(self, tars: list[Path]):
        if not tars:
            raise DataError("no shards given")
        missing = [str(t) for t in tars if not t.is_file()]
        if missing:
            raise DataError(f"shard files not found: {', '.join(missing[:5])}")
        no_index = [str(t) for t in tars if not index_path(t).is_file()]
        if no_index:
            raise DataError(
                f"{len(no_index)} shard(s) have no .idx index beside them (e.g. {no_index[0]}); write them with "
                f"`scale-make-shards --index-only {Path(no_index[0]).parent}`"
            )
        self.tars = list(tars)
        self.counts = [read_index_count(index_path(t)) for t in self.tars]
        self._index: tuple[int, list] | None = None  # the last shard's index, per process
        self._unreadable: set[Path] = set()  # shards already reported unreadable, per process

    def __repr__(self) -> str:
        return f"{len(self.tars)} shards ({sum(self.counts)} samples) in {self.tars[0].parent}"

    def read(self, unit: int, start: int, stop: int) -> Iterator[tuple[str, bytes | None, int]]:
        """(key, image bytes, label) of samples [start, stop) of shard `unit`, read sequentially.

        A shard (or its index) that cannot be read, deleted or damaged after the run started, gives
        its samples as lost (no bytes): they are skipped and counted like corrupt images, and the
        run stops only past `data.max_lost_fraction`."""
        tar = self.tars[unit]
        try:
            if self._index is None or self._index[0] != unit:
                self._index = (unit, read_index(index_path(tar)))
            samples = iter_shard(tar, self._index[1], start, stop)
            first = next(samples, None)
        except (OSError, DataError, ValueError) as e:
            if tar not in self._unreadable:
                self._unreadable.add(tar)
                log.warning("shard %s cannot be read (%s): its samples are skipped as lost", tar, e)
            for i in range(start, stop):
                yield f"{tar.name}/#{i}", None, -1
            return
        if first is None:
            return
        for key, comps in itertools.chain([first], samples):
            image = next((comps[e] for e in IMAGE_EXTS if e in comps), None)
            try:
                if LABEL_BIN_EXT in comps:
                    label = int(np.frombuffer(comps[LABEL_BIN_EXT], dtype=np.int32)[0])
                elif LABEL_TEXT_EXT in comps:
                    label = int(comps[LABEL_TEXT_EXT])
                else:
                    label = -1
            except (IndexError, ValueError):  # a truncated shard: the label's bytes are gone
                image, label = None, -1
            yield f"{tar.name}/{key}", image, label

    def read_one(self, unit: int, i: int) -> tuple[str, bytes | None, int]:
        return next(self.read(unit, i, i + 1))


class FolderSource:
    """An ImageFolder tree (root/CLASS/IMAGE); each file is a unit of one sample."""

    kind = "folder"

    def __init__(self, root: Path):
        self.root = root
        self.samples, self.classes = find_images(root)
        self.counts = [1] * len(self.samples)

    def __repr__(self) -> str:
        return f"image folder {self.root} ({len(self.samples)} images, {len(self.classes)} classes)"

    def read(self, unit: int, start: int, stop: int) -> Iterator[tuple[str, bytes | None, int]]:
        yield self.read_one(unit, 0)

    def read_one(self, unit: int, i: int) -> tuple[str, bytes | None, int]:
        path, label = self.samples[unit]
        try:
            data = path.read_bytes()
        except OSError:
            data = None
        return str(path), data, label


def expand_pattern(spec: str) -> list[Path]:
    """Brace (`train-{000000..000146}.tar`) and glob patterns -> sorted paths. Every name a brace
    range spells out must exist: a missing shard is an error, not a silently smaller dataset."""
    import braceexpand

    paths, missing = set(), []
    for part in braceexpand.braceexpand(os.path.expanduser(spec)):
        if any(c in part for c in "*?["):
            paths.update(glob.glob(part))
        elif os.path.exists(part):
            paths.add(part)
        else:
            missing.append(part)
    if missing and paths:
        raise DataError(
            f"{len(missing)} file(s) of {spec!r} do not exist, e.g. {missing[0]}; fix the range or the files"
        )
    return [Path(p) for p in sorted(paths)]


def resolve_source(spec: str) -> ShardSource | FolderSource:
    """`demo`, `demo:train`, `demo:val`, a shard pattern, a directory of shards, or an ImageFolder tree."""
    if spec in ("demo", "demo:train", "demo:val"):
        from scale.data.demo import ensure_demo_shards

        split = spec.split(":")[1] if ":" in spec else "train"
        return ShardSource(sorted(ensure_demo_shards().glob(f"{split}-*.tar")))
    if any(c in spec for c in "*?[{"):
        tars = expand_pattern(spec)
        if not tars:
            raise DataError(f"shard pattern {spec!r} matches no files; check the path and the brace range")
        return ShardSource(tars)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".tar":
        return ShardSource([path])
    if not path.exists():
        raise DataError(
            f"data path {spec!r} does not exist; give a shard pattern, a shard directory or an image folder"
        )
    if path.is_dir():
        tars = sorted(path.glob("*.tar"))
        if tars:
            prefixes = sorted({t.name.rsplit("-", 1)[0] for t in tars})
            if len(prefixes) > 1:
                raise DataError(
                    f"{spec!r} holds shards of several sets ({', '.join(prefixes)}); "
                    f"pass one of them, e.g. {path / (prefixes[0] + '-*.tar')}"
                )
            return ShardSource(tars)
        return FolderSource(path)
    raise DataError(f"data path {spec!r} is neither a .tar shard nor a directory")


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of unit `unit`, and the position of `start` in the epoch's order."""

    unit: int
    start: int
    stop: int
    position: int


@dataclass(frozen=True)
class EpochPlan:
    batches_per_rank: int
    worker_batches: list[int]
    """Batches produced by each logical worker (batch i of the rank comes from worker i % K)."""
    worker_segments: list[list[Segment]]


def batches_per_rank(num_samples: int, world_size: int, batch_size: int) -> int:
    n = num_samples // (world_size * batch_size)
    if n == 0:
        raise DataError(
            f"{num_samples} samples do not fill one global batch of {world_size} ranks x {batch_size} per rank; "
            "lower the batch size or use more data"
        )
    return n


def epoch_order(num_units: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The order of the units (shards or files) in `epoch`: a permutation seeded by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_units) if shuffle else np.arange(num_units)


def plan_epoch(
    counts: list[int],
    *,
    world_size: int,
    rank: int,
    num_workers: int,
    batch_size: int,
    epoch: int,
    seed: int,
    shuffle: bool,
    worker: int | None = None,
) -> EpochPlan:
    """Which samples every logical worker of `rank` reads in `epoch` (see the module docstring).

    With `worker`, only that worker's segments are listed (the others are left empty): each
    DataLoader worker plans for itself, and an ImageFolder source has one unit per file.
    """
    K = max(1, num_workers)
    counts_arr = np.asarray(counts, dtype=np.int64)
    nb = batches_per_rank(int(counts_arr.sum()), world_size, batch_size)
    order = epoch_order(len(counts_arr), seed, epoch, shuffle)
    ends = np.cumsum(counts_arr[order])
    starts = ends - counts_arr[order]
    worker_batches = [max(0, (nb - k + K - 1) // K) for k in range(K)]
    segments, a = [], rank * nb * batch_size
    for k in range(K):
        b = a + worker_batches[k] * batch_size
        segs, pos = [], a
        i = int(np.searchsorted(ends, pos, side="right"))
        while pos < b and (worker is None or worker == k):
            lo, hi = pos - int(starts[i]), min(b, int(ends[i])) - int(starts[i])
            segs.append(Segment(int(order[i]), lo, hi, pos))
            pos = int(starts[i]) + hi
            i += 1
        segments.append(segs)
        a = b
    return EpochPlan(nb, worker_batches, segments)


def _batches_before(n: int, k: int, K: int) -> int:
    """How many of the first n batches (round-robin over K workers) worker k produced."""
    return max(0, (n - k + K - 1) // K)


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


# ----------------------------------------------------------------------------- the dataset


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
        from torchvision.io import ImageReadMode, decode_image

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
        skip = _batches_before(self.skip_batches, k, K)
        stream = self._raw(plan, k)
        if self.shuffle_buffer > 1:
            stream = _shuffled(stream, self.shuffle_buffer, random.Random(hash((self.seed, self.epoch, self.rank, k))))
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


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode and augment one image at a time


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
            worker_init_fn=_worker_init if workers else None,
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


# ----------------------------------------------------------------------------- synthetic


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


# ----------------------------------------------------------------------------- the builder


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
):
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
        import torch.distributed as dist

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
        from scale.data.dali import DaliLoader

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
