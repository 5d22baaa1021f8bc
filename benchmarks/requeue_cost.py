"""What a requeue costs the metric files, measured: the rows after the resumed checkpoint are cut
from the end of `gradients.jsonl` (`scale.train.run_dir.cut_metrics`, reading only the tail and
truncating in place) against reading, parsing and rewriting the whole file (what a resume did
before). The file is the size a long run writes: about 1 KB a step (per-layer norms of ViT-H's 32
blocks and heads).

    python -m benchmarks.requeue_cost                    # 100,000 steps (about 110 MB), cut 10 steps back
    python -m benchmarks.requeue_cost --steps 300000 --back 500

Prints both times; writes nothing but a temporary folder, removed at the end.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from scale.arguments import POSITIVE, Parser, at_least
from scale.entry import run_cli
from scale.train.run_dir import AsideFolder, cut_metrics


def parser() -> Parser:
    p = Parser(description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=POSITIVE, default=100_000, help="rows in the file (one a step)")
    p.add_argument("--back", type=at_least(0), default=10, help="rows after the resumed checkpoint")
    p.add_argument("--layers", type=POSITIVE, default=60, help="gradient groups per row (ViT-H: about 60)")
    return p


def _whole_file(path: Path, step: int) -> None:
    """The previous rewind: every row read and parsed, the kept ones written back."""
    rows = path.read_text().splitlines()
    kept = [r for r in rows if r.strip() and json.loads(r).get("step", 0) <= step]
    path.write_text("".join(r + "\n" for r in kept))


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if args.back >= args.steps:
        parser().error(f"argument --back: {args.back} must be below --steps {args.steps}")
    quiet = logging.getLogger("scale.train.run_dir")  # its line about the rows it set aside
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return _measure(args)
    finally:
        quiet.setLevel(level)


def _measure(args) -> dict:
    row = {"norm": [round(0.123456 * i, 6) for i in range(args.layers)],
           "relative": [round(1.0123 * i, 4) for i in range(args.layers)]}  # fmt: skip
    step = args.steps - args.back
    with tempfile.TemporaryDirectory(prefix="scale-requeue-cost-") as tmp:
        path = Path(tmp) / "gradients.jsonl"
        with open(path, "w") as f:
            f.write(json.dumps({"layers": [f"layer{i}" for i in range(args.layers)]}) + "\n")
            for s in range(1, args.steps + 1):
                f.write(json.dumps({"step": s, **row}) + "\n")
        size = path.stat().st_size
        copy = Path(tmp) / "copy.jsonl"
        shutil.copy(path, copy)
        t = time.perf_counter()
        _whole_file(copy, step)
        whole = time.perf_counter() - t
        t = time.perf_counter()
        cut_metrics(path, step, AsideFolder(Path(tmp), step))
        cut = time.perf_counter() - t
        assert path.read_bytes() == copy.read_bytes(), "the two rewinds disagree"
    print(f"gradients.jsonl of {size / 1e6:.0f} MB ({args.steps:,} steps), resumed {args.back} steps back: "
          f"read + parse + rewrite {whole:.2f} s, cut from the end {cut * 1e3:.1f} ms")  # fmt: skip
    return {"bytes": size, "whole_s": whole, "cut_s": cut}


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
