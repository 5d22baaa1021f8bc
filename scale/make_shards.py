"""`scale-make-shards`: an ImageFolder tree -> webdataset tar shards with DALI index files and a
manifest (the format: `scale.data.shards`).

    scale-make-shards /data/imagenet/train /data/imagenet-shards --prefix train
    scale-make-shards /data/imagenet/val   /data/imagenet-shards --prefix val --no-shuffle
    scale-make-shards --index-only /data/imagenet-shards       # (re)write the .idx files only
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from scale.data.shards import make_shards, write_index
from scale.entry import run_cli


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, nargs="?", help="ImageFolder tree (root/CLASS/IMAGE)")
    parser.add_argument("out", type=Path, help="output directory for the shards")
    parser.add_argument("--prefix", default="train", help="shard name prefix (train, val)")
    parser.add_argument("--max-samples", type=int, default=1_000_000, help="samples per shard at most")
    parser.add_argument("--max-bytes", type=float, default=1e9, help="bytes per shard at most (default 1 GB)")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the sorted file order")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="reader/decoder processes (default: all cores)")
    parser.add_argument("--no-verify", action="store_true", help="skip the read-back verification")
    parser.add_argument("--index-only", action="store_true", help="only (re)write .idx files for OUT/*.tar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.index_only:
        tars = sorted(args.out.glob("*.tar"))
        if not tars:
            raise SystemExit(f"no .tar files in {args.out}")
        for tar in tars:
            print(f"{tar}: {write_index(tar)} samples")
        return
    if args.root is None:
        parser.error("ROOT is required unless --index-only")
    make_shards(
        args.root,
        args.out,
        prefix=args.prefix,
        max_samples=args.max_samples,
        max_bytes=args.max_bytes,
        shuffle=not args.no_shuffle,
        seed=args.seed,
        num_workers=args.workers,
        verify=not args.no_verify,
    )


def cli() -> None:
    """Command-line entry: one-line errors, `--debug` for the traceback."""
    run_cli(main)


if __name__ == "__main__":
    cli()
