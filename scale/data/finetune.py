"""Fine-tuning's input (DeiT's recipe, with timm's own implementations): per-sample RandAugment,
bicubic random-resized crops, flips and random erasing (`timm.data.create_transform`), repeated
augmentation, and mixup / cutmix / label smoothing on each batch (`timm.data.Mixup`), over the
same shard stream as pretraining (`TwoViewStream`: per-rank shard plans, counted skips of corrupt
images, exact resume).

Determinism: timm's transforms draw from Python's `random` and NumPy's global generator, and its
Mixup from NumPy's. Each sample's transform runs with both seeded from the sample's own seed (the
stream seeds torch's per sample), and each batch's mixup from (seed, epoch, batch, rank), the
global states put back afterwards: a resumed run sees the same augmentations and mixes as an
uninterrupted one.

Repeated augmentation on shards: timm's RASampler spreads the 3 copies of a sample over 3 ranks;
here each rank hands out its own samples 3 times in a row (each copy augmented anew) and reads a
third of its share per epoch, so an epoch keeps its length and each rank still needs no index of
the dataset. (With one rank, RASampler also puts the copies in one batch.)
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from scale.data.augment import IMAGENET_MEAN, IMAGENET_STD
from scale.data.epoch_loader import EpochLoader
from scale.data.sources import resolve_source
from scale.data.stream import TwoViewStream, worker_init

log = logging.getLogger(__name__)


@dataclass
class FinetuneAugment:
    """DeiT's training augmentation and batch mixing (its main.py defaults)."""

    img_size: int = 224
    num_classes: int = 1000
    crop_min: float = 0.08
    """Smallest RandomResizedCrop area (DeiT: 0.08)."""
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    interpolation: str = "bicubic"
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    color_jitter: float = 0.3
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.1
    repeats: int = 3

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


class SeededTimmTransform:
    """timm's training transform of one uint8 (3, H, W) image -> a 1-tuple of its normalised float
    (3, S, S) crop, with Python's and NumPy's generators seeded from torch's (which the stream
    seeds per sample) for the call."""

    def __init__(self, aug: FinetuneAugment):
        from timm.data import create_transform

        self.crop_size = aug.img_size
        self.transform = create_transform(
            aug.img_size, is_training=True, color_jitter=aug.color_jitter,
            auto_augment=aug.auto_augment or None, interpolation=aug.interpolation, re_prob=aug.reprob,
            re_mode=aug.remode, re_count=aug.recount, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            scale=(aug.crop_min, 1.0),
        )  # fmt: skip

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor]:
        seed = torch.initial_seed()
        py_state, np_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            return (self.transform(Image.fromarray(image.permute(1, 2, 0).numpy())),)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class BatchMixer:
    """timm's Mixup (mixup / cutmix, switched per batch, with label smoothing) applied to a batch, or
    label smoothing alone when both are off: (images, labels) -> (images, soft targets (B, C))."""

    def __init__(self, aug: FinetuneAugment):
        from timm.data import Mixup

        self.aug = aug
        self.mixup = None
        if aug.mixes:
            self.mixup = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mixup_prob,
                               switch_prob=aug.mixup_switch_prob, mode=aug.mixup_mode,
                               label_smoothing=aug.smoothing, num_classes=aug.num_classes)  # fmt: skip

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        from timm.data.mixup import mixup_target

        if self.mixup is None:
            return images, mixup_target(labels, self.aug.num_classes, 1.0, self.aug.smoothing)
        state = np.random.get_state()
        np.random.seed(seed % 2**32)
        try:
            return self.mixup(images, labels)
        finally:
            np.random.set_state(state)


class FinetuneLoader(EpochLoader):
    """`(images, soft targets, labels)` training batches of one rank, on `device`."""

    def __init__(
        self,
        source: str,
        aug: FinetuneAugment,
        *,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        num_workers: int = 4,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        device: torch.device | None = None,
    ):
        super().__init__()
        if aug.mixes and batch_size % 2:
            raise ValueError(f"mixup / cutmix need an even batch per device, got {batch_size}")
        src = resolve_source(source)
        log.info("fine-tuning data: %s, %d repeat(s) per sample, rank %d of %d", src, aug.repeats, rank, world_size)
        self.stream = TwoViewStream(src, SeededTimmTransform(aug), batch_size=batch_size, world_size=world_size,
                                    rank=rank, num_workers=num_workers, seed=seed, shuffle=True,
                                    shuffle_buffer=shuffle_buffer, repeats=aug.repeats)  # fmt: skip
        self.batches_per_epoch, self.batch_size = self.stream.batches_per_epoch, batch_size
        self.device, self.seed, self.rank = device, seed, rank
        self.mixer = BatchMixer(aug)

    def _epoch_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        self.stream.configure(self.epoch, self.batches_done)
        workers = self.stream.num_workers
        loader = DataLoader(self.stream, batch_size=None, num_workers=workers,
                            pin_memory=self.device is not None and self.device.type == "cuda",
                            worker_init_fn=worker_init if workers else None)  # fmt: skip
        index = self.batches_done
        for views, labels, meta in loader:
            if meta["skipped"]:
                self.num_skipped += len(meta["skipped"])
                log.warning("%d corrupt sample(s) skipped (%d in all): %s", len(meta["skipped"]), self.num_skipped,
                            ", ".join(meta["skipped"][:5]))  # fmt: skip
            images = views[0]
            if self.device is not None:
                images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            seed = int(np.random.SeedSequence([self.seed, self.epoch, index, self.rank]).generate_state(1)[0])
            images, targets = self.mixer(images, labels, seed)
            index += 1
            yield images, targets, labels

    def state_dict(self) -> dict:
        epoch, done = self.position()
        return {"epoch": epoch, "batches_done": done}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
