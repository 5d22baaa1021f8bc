"""`scale-make-shards`: an ImageFolder tree -> webdataset tar shards with DALI index files and a
manifest (the format: `scale.data.shards`).

    scale-make-shards /data/imagenet/train /data/imagenet-shards --prefix train
    scale-make-shards /data/imagenet/val   /data/imagenet-shards --prefix val --no-shuffle
    scale-make-shards --index-only /data/imagenet-shards       # (re)write the .idx files (and a missing manifest)
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

# torch-free: the command line is checked before the shard writer (torch, torchvision) is imported
from scale.arguments import (
    FILE_NAME,
    POSITIVE,
    POSITIVE_FLOAT,
    ExistingPath,
    Parser,
    check_creatable,
    refuse_inside,
)
from scale.entry import run_cli


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="scale-make-shards", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", metavar="ROOT", type=ExistingPath("dir"), nargs="?",
                   help="ImageFolder tree (root/CLASS/IMAGE)")  # fmt: skip
    p.add_argument("out", metavar="OUT", type=Path, help="output directory for the shards (not inside ROOT)")
    p.add_argument("--prefix", type=FILE_NAME, default="train", help="shard name prefix (train, val)")
    p.add_argument("--max-samples", type=POSITIVE, default=1_000_000, help="samples per shard at most")
    p.add_argument("--max-bytes", type=POSITIVE_FLOAT, default=1e9, help="bytes per shard at most (default 1 GB)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the sorted file order")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=POSITIVE, default=None, help="reader/decoder processes (default: all cores)")
    p.add_argument("--no-verify", action="store_true", help="skip the read-back verification")
    p.add_argument(
        "--index-only",
        action="store_true",
        help="(re)write .idx files for OUT/*.tar, and the manifest of a set that has none",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.index_only:
        if args.root is not None:
            p.error("argument --index-only: takes OUT only (the folder of the .tar files), not ROOT")
        if not args.out.is_dir():
            raise NotADirectoryError(f"OUT {args.out} is not a directory of shards")
        tars = sorted(args.out.glob("*.tar"))
        if not tars:
            raise FileNotFoundError(f"no .tar files in OUT {args.out}")
    else:
        if args.root is None:
            p.error("argument ROOT: required unless --index-only")
        refuse_inside(args.out, "OUT", args.root, "ROOT", replaced=False)
        if args.out.exists() and not args.out.is_dir():
            raise NotADirectoryError(f"OUT {args.out} is a file; give a directory for the shards")
        taken = sorted(args.out.glob(f"{args.prefix}-*")) if args.out.is_dir() else []
        if taken:
            raise FileExistsError(f"OUT {args.out} already holds {taken[0].name}; choose another --prefix or OUT")
        check_creatable(args.out / "x")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from scale.data.shards import index_shards, make_shards

    if args.index_only:
        for tar, count in index_shards(args.out):
            print(f"{tar}: {count} samples")
        return
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
