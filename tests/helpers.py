"""Shared test helpers: tiny model configs and a real multi-process (gloo) launcher."""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# A ViT small enough for CPU tests: 32 px, patch 8 -> 16 patches + class token, width 32.
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
TINY_HEADS = dict(dim=16, mlp_dim=64)


def _entry(rank: int, fn, world_size: int, init_file: str, args: tuple) -> None:
    torch.set_num_threads(1)
    # What torchrun sets (DeepSpeed checks LOCAL_RANK).
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    # A bounded wait: a rank that fails before a collective must not leave the others waiting for
    # the 30-minute default.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=300))  # fmt: skip
    try:
        fn(rank, world_size, *args)
    finally:
        if dist.is_initialized():  # an entry point under test may have ended it itself
            dist.destroy_process_group()
    # Success: leave without interpreter teardown, where background threads of gloo/FSDP were
    # occasionally seen to abort ("terminate called without an active exception") after the work
    # was done. Failures still propagate above, through mp.spawn's error channel.
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, world_size: int = 2, *args) -> None:
    """Run `fn(rank, world_size, *args)` in `world_size` real processes joined by gloo.

    `fn` must be a module-level function; an exception in any rank fails the caller.
    """
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        mp.spawn(_entry, args=(fn, world_size, init_file, args), nprocs=world_size, join=True)


def write_image_folder(root, images, labels=None, ext: str = "png", quality: int = 95):
    """Write uint8 HWC arrays as root/<label>/<i>.<ext> (label defaults to the index: one class per
    image, so labels identify samples). Returns root."""
    from pathlib import Path

    from PIL import Image

    root = Path(root)
    for i, img in enumerate(images):
        label = i if labels is None else labels[i]
        folder = root / f"{label:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:05d}.{ext}", **({"quality": quality} if ext == "jpg" else {}))
    return root


def random_images(n: int, size: int = 16, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


class FixedBatchLoader:
    """An in-memory loader with the EpochLoader interface: deterministic global batches of random
    images; rank r of `world` gets rows [r*B, (r+1)*B) of each. `classes` gives each row a
    label (else -1). `nan_at` puts a NaN into the
    global batch of those (epoch, index) pairs."""

    def __init__(self, num_batches, global_batch, world=1, rank=0, img=32, seed=0, nan_at=(), dtype=None, classes=0):
        import torch

        self.batches_per_epoch, self.global_batch, self.world, self.rank = num_batches, global_batch, world, rank
        self.img, self.seed, self.nan_at, self.classes = img, seed, set(nan_at), classes
        self.dtype = dtype or torch.get_default_dtype()
        self.epoch, self.batches_done, self.num_skipped = 0, 0, 0
        self.batch_size = global_batch // world

    def __len__(self):
        return self.batches_per_epoch

    def _batch(self, epoch, i):
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 1009 + i)
        x1 = torch.randn(self.global_batch, 3, self.img, self.img, generator=g, dtype=self.dtype)
        x2 = torch.randn(self.global_batch, 3, self.img, self.img, generator=g, dtype=self.dtype)
        if (epoch, i) in self.nan_at:
            x1[0, 0, 0, 0] = float("nan")
        rows = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        if self.classes:  # labels: a deterministic class per global row
            labels = torch.randint(self.classes, (self.global_batch,), generator=g)[rows]
        else:
            labels = torch.full((self.batch_size,), -1)
        return x1[rows], x2[rows], labels

    def __iter__(self):
        if self.batches_done >= len(self):
            self.epoch, self.batches_done = self.epoch + 1, 0
        while self.batches_done < len(self):
            batch = self._batch(self.epoch, self.batches_done)
            self.batches_done += 1
            yield batch
        self.epoch, self.batches_done = self.epoch + 1, 0

    def set_epoch(self, epoch):
        self.epoch, self.batches_done = epoch, 0

    def metrics(self):
        return {"data/skipped": 0.0}

    def state_dict(self):
        if self.batches_done >= len(self):
            return {"epoch": self.epoch + 1, "batches_done": 0}
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state):
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]


def tiny_config(out_dir, name="tiny", **overrides):
    """A Config for a tiny MoCo v3 ViT that trains in seconds on CPU."""
    from scale.config import Config, apply_overrides

    cfg = Config(recipe="test")
    m = cfg.model
    m.name, m.img_size, m.patch_size, m.embed_dim, m.depth, m.num_heads = "vit_small", 32, 8, 32, 2, 4
    m.dim, m.mlp_dim = 16, 64
    cfg.data.source = "synthetic"
    cfg.batch.global_batch_size = 8
    cfg.optim.base_lr = 1e-3
    cfg.schedule.epochs = 3
    cfg.schedule.warmup_epochs = 1
    cfg.parallel.precision = "fp32"
    cfg.run.output_dir = str(out_dir)
    cfg.run.name = name
    cfg.run.log_every = 1
    cfg.run.progress = False
    cfg.run.tensorboard = False
    return apply_overrides(cfg, [f"{k}={v}" for k, v in overrides.items()])


def read_metrics(run_dir):
    import json
    from pathlib import Path

    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return [r for r in rows if "knn_dense_queries" not in r]  # the dense kNN monitor's rows apart


def train_tiny_run(root, name: str = "tiny"):
    """A tiny pretraining run with one checkpoint (step 1) in root/runs/NAME; returns its directory."""
    from pathlib import Path

    from scale.train.trainer import Trainer

    Trainer(tiny_config(Path(root) / "runs", name, **{"schedule.max_steps": 1}), loader=FixedBatchLoader(4, 8)).fit()
    return Path(root) / "runs" / name
