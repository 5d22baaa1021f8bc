"""Input pipeline throughput: `python -m benchmarks.data`.

Images/s of two-view MoCo v3 batches (decode + both augmented views + collation) for:
torchvision on shards with 1 and N workers, torchvision on the same images as an ImageFolder
tree, DALI CPU-only, and DALI on the GPU when one is present. All read the same JPEGs: by default
a set made from scikit-learn's two bundled photographs (random crops at ImageNet-like sizes,
quality 90), or `--images DIR` (an ImageFolder tree of your own). Written to
benchmarks/results/data.md and data.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

from benchmarks.paper import add_output_args, check_results, write_results
from scale.arguments import POSITIVE, ExistingPath, Parser
from scale.data.augment import AugmentConfig
from scale.data.loader import build_loader
from scale.data.shards import make_shards
from scale.entry import run_cli


def make_benchmark_images(root: Path, num_images: int, seed: int = 0) -> Path:
    """`num_images` JPEGs of about 500 x 375 (ImageNet's median) cut from the sample photographs."""
    photos = [load_sample_image(name) for name in ("china.jpg", "flower.jpg")]  # (427, 640, 3)
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        photo = photos[i % 2]
        h, w = int(rng.integers(250, 427)), int(rng.integers(330, 640))
        y, x = int(rng.integers(0, 427 - h + 1)), int(rng.integers(0, 640 - w + 1))
        img = Image.fromarray(photo[y : y + h, x : x + w]).resize((500, 375), Image.BILINEAR)
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:05d}.jpg", quality=90)
    return root


def time_loader(loader, max_batches: int, warmup: int = 2) -> dict:
    """Images/s over up to `max_batches` batches after `warmup` batches (which include start-up)."""
    it = iter(loader)
    for i in range(warmup):
        try:
            next(it)
        except StopIteration:
            raise ValueError(f"the images make {i} batch(es), fewer than the {warmup} warm-up batches and one timed: "
                             "give more images or a smaller --batch-size") from None  # fmt: skip
    n, start = 0, time.perf_counter()
    for _ in range(max_batches):
        try:
            view1, _, _ = next(it)
        except StopIteration:
            break
        n += view1.shape[0]
    elapsed = time.perf_counter() - start
    return {"images": n, "seconds": round(elapsed, 3), "images_per_s": round(n / elapsed, 1)}


def run(
    images: Path | None, num_images: int, batch_size: int, crop_size: int, workers: int, max_batches: int
) -> list[dict]:

    with tempfile.TemporaryDirectory(prefix="scale-bench-data-") as tmp:
        return _run(Path(tmp), images, num_images, batch_size, crop_size, workers, max_batches)


def _run(tmp: Path, images, num_images, batch_size, crop_size, workers, max_batches) -> list[dict]:
    folder = images or make_benchmark_images(tmp / "images", num_images)
    make_shards(folder, tmp / "shards", "bench", max_samples=max(num_images // 4, 1), progress=False, verify=False)
    aug = AugmentConfig(crop_size=crop_size)
    common = dict(batch_size=batch_size, augment=aug, world_size=1, rank=0)
    configs = [
        ("torchvision", "shards", 1, None),
        ("torchvision", "shards", workers, None),
        ("torchvision", "folder", workers, None),
        ("dali-cpu", "shards", workers, None),
    ]
    if torch.cuda.is_available():
        configs.append(("dali-gpu", "shards", workers, 0))
    rows = []
    for backend, source, n_workers, device_id in configs:
        src = str(tmp / "shards") if source == "shards" else str(folder)
        row = {"backend": backend, "source": source, "workers": n_workers}
        try:
            loader = build_loader(
                src,
                backend="dali" if backend.startswith("dali") else "torchvision",
                num_workers=n_workers,
                device_id=device_id,
                **common,
            )
            row.update(time_loader(loader, max_batches))
        except ImportError as e:
            row["error"] = str(e).split(";")[0]
        print(row, flush=True)
        rows.append(row)
    return rows


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Two-view batches of {meta['batch_size']} at {meta['crop_size']} px from {meta['images']}, "
        f"{meta['date']}, {meta['machine']}.\n",
        "| backend | source | workers/threads | images/s | images timed |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        speed = r.get("images_per_s", f"n/a ({r.get('error', '')})")
        lines.append(f"| {r['backend']} | {r['source']} | {r['workers']} | {speed} | {r.get('images', 0)} |")
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m benchmarks.data", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--images", type=ExistingPath("dir"), help="ImageFolder tree to use instead of the generated set")
    p.add_argument("--num-images", type=POSITIVE, default=512, help="size of the generated set")
    p.add_argument("--batch-size", type=POSITIVE, default=32)
    p.add_argument("--crop-size", type=POSITIVE, default=224)
    p.add_argument("--workers", type=POSITIVE, default=os.cpu_count() or 1, help="N for the N-worker rows")
    p.add_argument("--max-batches", type=POSITIVE, default=12, help="timed batches per row")
    add_output_args(p)
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.images is None and args.num_images < 3 * args.batch_size:
        p.error(f"argument --num-images: {args.num_images} images make fewer than the 2 warm-up batches and one "
                f"timed batch of --batch-size {args.batch_size}: give at least {3 * args.batch_size}")  # fmt: skip
    check_results(args.out, ["data.md", "data.json"], args.overwrite)

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name(0)}"
    meta = {
        "date": date.today().isoformat(),
        "machine": machine,
        "batch_size": args.batch_size,
        "crop_size": args.crop_size,
        "images": str(args.images) if args.images else f"{args.num_images} generated 500x375 JPEGs",
    }
    rows = run(args.images, args.num_images, args.batch_size, args.crop_size, args.workers, args.max_batches)
    table = to_markdown(rows, meta)
    print(table)
    if str(args.out) != "-":
        md = "# Input pipeline throughput\n\nMade by `python -m benchmarks.data`.\n\n" + table
        files = {"data.md": md, "data.json": json.dumps({"meta": meta, "rows": rows}, indent=1)}
        write_results(args.out, files, args.overwrite)


def cli() -> None:
    """Command-line entry: one-line errors, `--debug` for the traceback."""
    run_cli(main)


if __name__ == "__main__":
    cli()
