"""Fashion-MNIST (Xiao et al. 2017: 60,000 training and 10,000 test images of clothing, 28 px grey,
10 classes) as webdataset shards: the project's real second dataset, small enough for this CPU.

Debian ships it (`apt-get install dataset-fashion-mnist`: IDX files under
/usr/share/datasets/fashion-mnist/). The first use of the sources `fashion` / `fashion:test`
converts them once into `$SCALE_CACHE/fashion-mnist-v1` (about 40 s): lossless PNGs, RGB as the
models expect, the classes in the dataset's order. `python -m scale.data.fashion OUT_DIR` writes
the same shards anywhere (e.g. a shared filesystem), from the Debian folder or `--idx-dir`.

Subsets: `fashion:train@10%` (or `@6000`) is the first N samples of a stratified, seeded ordering
of the training set (the same for every run and every rank), for training with a fraction of the
labels; written once beside the full set.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import os
import re
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from scale.data.demo import cache_root
from scale.data.shards import make_shards
from scale.errors import DataError

log = logging.getLogger(__name__)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_NAME = "fashion-mnist-v1"
CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SPEC = re.compile(r"^fashion(?::(train|test))?(?:@(\d+(?:\.\d+)?)(%?))?$")


def idx_dir() -> Path:
    return Path(os.environ.get("SCALE_FASHION_IDX", DEBIAN_DIR))


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip or plain) as a uint8 array: (N, H, W) images or (N,) labels."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            magic = f.read(4)
            if len(magic) != 4 or magic[:2] != b"\0\0" or magic[2] != 0x08:
                raise DataError(f"{path} is not a uint8 IDX file (magic {magic.hex()})")
            dims = struct.unpack(f">{magic[3]}I", f.read(4 * magic[3]))
            data = np.frombuffer(f.read(), dtype=np.uint8)
    except (OSError, EOFError, struct.error) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} holds {data.size} bytes for shape {dims}: truncated")
    return data.reshape(dims)


def split_paths(split: str, root: Path | None = None) -> list[Path]:
    """The (images, labels) IDX files of `split`; a missing one is an error saying how to install them."""
    root = root or idx_dir()
    paths = [root / name for name in FILES[split]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST not found ({missing[0]} is missing): install it with "
            "`apt-get install dataset-fashion-mnist`, or set SCALE_FASHION_IDX to a folder holding the IDX files"
        )
    return paths


def load_split(split: str, root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) int64) of `split` ('train' / 'test')."""
    paths = split_paths(split, root)
    images, labels = read_idx(paths[0]), read_idx(paths[1]).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(f"{paths[0]} has {len(images)} images but {paths[1]} {len(labels)} labels")
    return images, labels


def subset_order(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """A seeded order of the samples in which every prefix is (nearly) class-balanced: each class's
    samples shuffled, then interleaved round-robin. The first N of it is the N-label subset."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    order = []
    for i in range(max(len(p) for p in per_class)):
        order.extend(int(p[i]) for p in per_class if i < len(p))
    return np.asarray(order)


def write_folder(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, root: Path) -> None:
    for c, name in enumerate(CLASSES):
        (root / f"{c}-{name}").mkdir(parents=True, exist_ok=True)
    for i in indices:
        c = int(labels[i])
        Image.fromarray(images[i], mode="L").convert("RGB").save(root / f"{c}-{CLASSES[c]}" / f"{i:05d}.png")


def subset_size(count: str, percent: str, total: int) -> int:
    n = round(total * float(count) / 100) if percent else int(float(count))
    if not 0 < n <= total:
        raise DataError(f"a Fashion-MNIST subset of {count}{percent} is not between 1 and {total} samples")
    return n


def write_split(out: Path, split: str, size: int | None = None, root: Path | None = None, progress: bool = False):
    """Shards of `split` (or of its first `size` samples in `subset_order`) in `out`, prefix
    `split` or `train@N`."""
    images, labels = load_split(split, root)
    indices = subset_order(labels)[:size] if size else np.arange(len(labels))
    prefix = f"{split}@{size}" if size else split
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out, prefix=f".{prefix}.folders."))
    try:
        write_folder(images, labels, indices, work)
        # ~16 shards for the training set: enough for 2 ranks x 2 workers and the probes' splits.
        per_shard = max(256, -(-len(indices) // 16))
        make_shards(work, out, prefix, max_samples=per_shard, shuffle=split == "train", num_workers=1,
                    progress=progress)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure_fashion_shards(split: str = "train", size: int | None = None) -> list[Path]:
    """The shards of a split (or subset) in the cache, written on first use (safe when processes race:
    each writes into its own folder, the first complete one is moved in)."""
    target = cache_root() / FASHION_NAME
    prefix = f"{split}@{size}" if size else split
    if not (target / f"{prefix}-manifest.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        log.info("writing Fashion-MNIST %s shards to %s (once)", prefix, target)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{FASHION_NAME}."))
        try:
            write_split(tmp, split, size)
            target.mkdir(exist_ok=True)
            for path in sorted(tmp.iterdir(), key=lambda p: p.name.endswith("-manifest.json")):  # manifest last
                if not (target / path.name).exists():
                    os.replace(path, target / path.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return sorted(target.glob(f"{glob_escape(prefix)}-*.tar"))


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def is_fashion_spec(spec: str) -> bool:
    return spec.startswith("fashion") and SPEC.match(spec) is not None


def fashion_shards(spec: str) -> list[Path]:
    """`fashion` / `fashion:train` / `fashion:test`, optionally `@N` or `@P%` (training subsets)."""
    m = SPEC.match(spec)
    if m is None:
        raise DataError(f"{spec!r}: write fashion, fashion:train, fashion:test or fashion:train@10%")
    split, count, percent = m.group(1) or "train", m.group(2), m.group(3)
    if count and split != "train":
        raise DataError(f"{spec!r}: subsets are of the training set (fashion:train@{count}{percent})")
    total = len(read_idx(split_paths("train")[1])) if count else 0  # the labels file: 60 kB
    size = subset_size(count, percent, total) if count else None
    return ensure_fashion_shards(split, None if size == total else size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scale.data.fashion", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="where to write train-*.tar and test-*.tar (and their indexes, manifests)")
    parser.add_argument("--idx-dir", default=None, help=f"folder of the four IDX files (default {DEBIAN_DIR})")
    parser.add_argument("--subset", action="append", default=[], help="also a training subset, e.g. 10%% or 6000")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out, root = Path(args.out_dir), Path(args.idx_dir) if args.idx_dir else None
        total = len(load_split("train", root)[1])
        sizes = [subset_size(s.rstrip("%"), "%" if s.endswith("%") else "", total) for s in args.subset]
        for split in ("train", "test"):
            write_split(out, split, root=root, progress=True)
        for size in sizes:
            write_split(out, "train", size, root=root, progress=True)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
