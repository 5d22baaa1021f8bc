"""The bundled demo set: scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes),
upscaled to 32 px RGB JPEGs and written once as webdataset shards, so the CPU demo and the tests
go through the same shard path as ImageNet.

Split: stratified 80/20 with a fixed seed (1,437 train, 360 validation). Cache directory:
`$SCALE_CACHE/demo-digits-v1` (default `~/.cache/scale`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from scale.data.shards import make_shards

log = logging.getLogger(__name__)

DEMO_NAME = "demo-digits-v1"
DEMO_IMG_SIZE = 32
SPLITS = ("train", "val")


def cache_root() -> Path:
    return Path(os.environ.get("SCALE_CACHE", Path.home() / ".cache" / "scale"))


def demo_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir) / DEMO_NAME if cache_dir else cache_root() / DEMO_NAME


def _write_image_folders(root: Path) -> None:
    # scikit-learn's digits only when the demo set is written (once per machine): start-up time.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # (1797, 8, 8), 0..16 -> 0..255
    idx_train, idx_val = train_test_split(np.arange(len(images)), test_size=0.2, random_state=0, stratify=digits.target)
    for split, idx in (("train", idx_train), ("val", idx_val)):
        for i in idx:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(images[i], mode="L").resize((DEMO_IMG_SIZE, DEMO_IMG_SIZE), Image.BICUBIC)
            img.convert("RGB").save(folder / f"{i:04d}.jpg", quality=95)


def ensure_demo_shards(cache_dir: str | os.PathLike | None = None) -> Path:
    """The demo shard directory, written on first use (safe when several processes race)."""
    target = demo_dir(cache_dir)
    if all((target / f"{split}-manifest.json").is_file() for split in SPLITS):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("writing the demo digits shards to %s (once)", target)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{DEMO_NAME}."))
    try:
        _write_image_folders(work / "folders")
        shards = work / "shards"
        # Four training shards, so that 2 ranks x 2 workers each have their own.
        make_shards(work / "folders" / "train", shards, "train", max_samples=360, num_workers=1, progress=False)
        make_shards(work / "folders" / "val", shards, "val", shuffle=False, num_workers=1, progress=False)
        try:
            os.rename(shards, target)
        except OSError:
            if not (target / "train-manifest.json").is_file():  # not another process's finished copy
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
