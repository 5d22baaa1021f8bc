"""Shared test helpers: tiny model configs and a real multi-process (gloo) launcher."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# A ViT small enough for CPU tests: 32 px, patch 8 -> 16 patches + class token, width 32.
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
TINY_HEADS = dict(dim=16, mlp_dim=64)


def _entry(rank: int, fn, world_size: int, init_file: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


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
