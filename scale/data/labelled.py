"""Labelled single-view data for evaluation: the linear probe's training stream and a rank's share of
a labelled set for evaluation passes and feature extraction.

- Training (`LabelledLoader`): the pretraining loader's machinery (`TwoViewStream`: shard order per
  epoch, disjoint equal batches per rank and worker, per-sample seeded augmentation, counted skips
  of corrupt images, exact resume) with one view: RandomResizedCrop + horizontal flip, as the
  authors' main_lincls.py. Images travel as uint8 and are normalised on the device.
- Evaluation (`eval_batches`): every sample of this rank's contiguous share (all samples over all
  ranks, none dropped), Resize(crop / 0.875) + CenterCrop(crop), read by DataLoader workers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2 as T

from scale.data.augment import IMAGENET_MEAN, IMAGENET_STD, Normalize
from scale.data.epoch_loader import EpochLoader
from scale.data.sources import FolderSource, ShardSource
from scale.data.stream import TwoViewStream, worker_init
from scale.errors import DataError

log = logging.getLogger(__name__)


class OneView:
    """uint8 (3, H, W) -> a 1-tuple of uint8 (3, S, S): the probe's training augmentation, or the
    evaluation resize + centre crop when `train` is false."""

    def __init__(
        self, crop_size: int = 224, train: bool = True, crop_scale: tuple[float, float] = (0.08, 1.0), flip: bool = True
    ):
        self.crop_size, self.train = crop_size, train
        if train:
            ops = [T.RandomResizedCrop(crop_size, scale=crop_scale, antialias=True)]
            self.ops = T.Compose(ops + ([T.RandomHorizontalFlip()] if flip else []))
        else:
            self.ops = T.Compose([T.Resize(round(crop_size / 0.875), antialias=True), T.CenterCrop(crop_size)])

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.ops(image),)


def check_labels(source, what: str) -> int:
    """The number of classes of a labelled source: an image folder's class folders, the
    `<prefix>-classes.json` that `scale-make-shards` writes beside shards, or else one more than the
    largest label among the first sample of each shard (logged once: a subset of few shards may not
    show every class). Unlabelled data (-1) is a clear error."""
    if isinstance(source, FolderSource):
        return len(source.classes)
    first = source.tars[0]
    classes = first.parent / f"{first.name.rsplit('-', 1)[0]}-classes.json"
    if classes.is_file():
        try:
            return len(json.loads(classes.read_text()))
        except (OSError, ValueError) as e:
            raise DataError(f"{classes} cannot be read ({e}); rewrite it or remove it") from None
    labels = set()
    for unit in range(len(source.counts)):
        if source.counts[unit]:
            labels.add(source.read_one(unit, 0)[2])
    if -1 in labels:
        raise DataError(f"{what} has no labels (webdataset .cls / .label.i32 entries); the probe needs labelled data")
    n = max(labels) + 1 if labels else 0
    log.warning("%s has no classes file beside its shards: %d classes, from the first sample of each shard", what, n)
    return n


class LabelledLoader(EpochLoader):
    """`(images, labels)` training batches of one rank: images float32 normalised on `device`."""

    def __init__(
        self,
        source,
        *,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        crop_size: int = 224,
        train: bool = True,
        num_workers: int = 4,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        device: torch.device | None = None,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        flip: bool = True,
    ):
        super().__init__()
        view = OneView(crop_size, train, crop_scale, flip)
        self.stream = TwoViewStream(source, view, batch_size=batch_size, world_size=world_size,
                                    rank=rank, num_workers=num_workers, seed=seed, shuffle=True,
                                    shuffle_buffer=shuffle_buffer)  # fmt: skip
        self.batches_per_epoch, self.batch_size = self.stream.batches_per_epoch, batch_size
        self.device = device
        self.normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def _epoch_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.stream.configure(self.epoch, self.batches_done)
        workers = self.stream.num_workers
        loader = DataLoader(self.stream, batch_size=None, num_workers=workers,
                            pin_memory=self.device is not None and self.device.type == "cuda",
                            worker_init_fn=worker_init if workers else None)  # fmt: skip
        for images, labels, meta in loader:
            if meta["skipped"]:
                self.num_skipped += len(meta["skipped"])
                log.warning("%d corrupt sample(s) skipped (%d in all): %s", len(meta["skipped"]), self.num_skipped,
                            ", ".join(meta["skipped"][:5]))  # fmt: skip
            images = images[0]  # the one view, (B, 3, S, S)
            if self.device is not None:
                images = images.to(self.device, non_blocking=True)
            yield self.normalize(images), labels

    def state_dict(self) -> dict:
        epoch, done = self.position()
        return {"epoch": epoch, "batches_done": done}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])


def rank_share(counts: list[int], rank: int, world_size: int) -> list[tuple[int, int, int]]:
    """This rank's contiguous share of all samples as (unit, start, stop) runs; the shares of all
    ranks cover every sample once (sizes differ by at most one)."""
    total = sum(counts)
    return runs_between(counts, total * rank // world_size, total * (rank + 1) // world_size)


def runs_between(counts: list[int], lo: int, hi: int) -> list[tuple[int, int, int]]:
    """Samples [lo, hi) of the concatenated units as (unit, start, stop) runs."""
    runs, offset = [], 0
    for unit, count in enumerate(counts):
        a, b = max(lo, offset), min(hi, offset + count)
        if a < b:
            runs.append((unit, a - offset, b - offset))
        offset += count
    return runs


def split_runs(runs: list[tuple[int, int, int]], part: int, parts: int) -> list[tuple[int, int, int]]:
    """Part `part` of `parts` contiguous parts of the samples of `runs`."""
    pieces = rank_share([b - a for _, a, b in runs], part, parts)  # (index into runs, start, stop)
    return [(runs[i][0], runs[i][1] + a, runs[i][1] + b) for i, a, b in pieces]


class _ShareStream(IterableDataset):
    """uint8 batches (images, labels) of a list of runs, split over DataLoader workers by samples."""

    def __init__(self, source, runs: list[tuple[int, int, int]], transform: OneView, batch_size: int):
        self.source, self.runs, self.transform, self.batch_size = source, runs, transform, batch_size

    def _samples(self, runs) -> Iterator[tuple[str, bytes | None, int]]:
        for unit, a, b in runs:
            if isinstance(self.source, ShardSource):
                yield from self.source.read(unit, a, b)
            else:
                yield self.source.read_one(unit, 0)

    def __iter__(self):
        info = get_worker_info()
        k, K = (info.id, info.num_workers) if info else (0, 1)
        runs = split_runs(self.runs, k, K)  # each worker a contiguous part: shards are read sequentially
        images, labels, skipped = [], [], []
        for key, data, label in self._samples(runs):
            try:
                image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            except Exception:
                skipped.append(key)
                continue
            images.append(self.transform(image)[0])
            labels.append(label)
            if len(images) == self.batch_size:
                yield torch.stack(images), torch.tensor(labels, dtype=torch.int64), skipped
                images, labels, skipped = [], [], []
        if images or skipped:
            empty = torch.zeros(0, 3, self.transform.crop_size, self.transform.crop_size, dtype=torch.uint8)
            yield (torch.stack(images) if images else empty), torch.tensor(labels, dtype=torch.int64), skipped


def eval_batches(
    source,
    *,
    rank: int = 0,
    world_size: int = 1,
    crop_size: int = 224,
    batch_size: int = 256,
    num_workers: int = 4,
    train_augment: bool = False,
    device: torch.device | None = None,
    skipped: list[str] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images normalised on `device`, labels) of every sample of this rank's share, in batches;
    undecodable samples are skipped and appended to `skipped`."""
    runs = rank_share(source.counts, rank, world_size)
    stream = _ShareStream(source, runs, OneView(crop_size, train=train_augment), batch_size)
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers,
                        worker_init_fn=worker_init if num_workers else None)  # fmt: skip
    normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    for images, labels, bad in loader:
        if bad:
            log.warning("%d undecodable sample(s) skipped: %s", len(bad), ", ".join(bad[:5]))
            if skipped is not None:
                skipped.extend(bad)
        if len(labels):
            if device is not None:
                images = images.to(device, non_blocking=True)
            yield normalize(images), labels
