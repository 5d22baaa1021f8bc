"""FLOPs of the paper's backbones against Table 3: `python -m benchmarks.flops`.

For each model: analytic MACs per 224 crop, MACs counted by torch's FlopCounterMode on the meta
device (what the module really executes), the paper's Table 3 figure and the difference, and the
training FLOPs of one image (16 x MACs, heads shown separately). Written to
benchmarks/results/flops.md as well.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from scale.arguments import POSITIVE, Parser, refuse_existing, write_atomic
from scale.entry import run_cli
from scale.models import ResNetConfig, build_backbone, resolve_backbone_config
from scale.models.flops import PAPER_TABLE3_GMACS, backbone_macs, counted_macs, moco_training_flops, vit_macs
from scale.models.vit import count_params

ROWS = [
    ("R-50", "resnet50"),  # Table 3's reference ("vs. R50": 4.1 G)
    ("ViT-S/16", "vit_small"),
    ("ViT-B/16", "vit_base"),
    ("ViT-L/16", "vit_large"),
    ("ViT-H/14", "vit_huge"),
    ("ViT-L/7", "vit_large_p7"),
    ("ViT-BN-L/7", "vit_bn_large_p7"),
]
RESULTS = Path(__file__).parent / "results" / "flops.md"


def build_table(img_size: int = 224) -> list[dict]:
    rows = []
    for label, name in ROWS:
        cfg = resolve_backbone_config(name, img_size=img_size)
        total = backbone_macs(cfg)
        resnet = isinstance(cfg, ResNetConfig)
        train = moco_training_flops(cfg)
        paper = PAPER_TABLE3_GMACS.get(name) if img_size == 224 else None
        with torch.device("meta"):
            params = count_params(build_backbone(name, img_size=img_size))
        rows.append(
            dict(
                model=label,
                name=name,
                params_m=params / 1e6,
                tokens=None if resnet else cfg.num_tokens,
                gmacs=total / 1e9,
                gmacs_counted=counted_macs(cfg) / 1e9,
                gmacs_paper=paper,
                diff_pct=None if paper is None else 100 * (total / 1e9 / paper - 1),
                attn_matmul_pct=None if resnet else 100 * vit_macs(cfg).attn_matmul / total,
                train_gflops=train.backbone / 1e9,
                heads_gflops=train.heads / 1e9,
            )
        )
    return rows


def to_markdown(rows: list[dict], img_size: int) -> str:
    header = (
        f"MACs per {img_size}x{img_size} crop (backbone) and FLOPs per MoCo v3 training image (2 crops: "
        "16 x MACs for the backbone; heads = 16 x projector + 12 x predictor MACs; R-50's projector has 2 "
        "layers, the ViTs' 3).\n\n"
        "| model | params (M) | tokens | GMACs analytic | GMACs FlopCounter | Table 3 | diff | "
        "QK/AV share | train GFLOPs/img backbone | + heads |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        paper = "-" if r["gmacs_paper"] is None else f"{r['gmacs_paper']:.1f}"
        diff = "-" if r["diff_pct"] is None else f"{r['diff_pct']:+.2f}%"
        tokens = "-" if r["tokens"] is None else r["tokens"]
        attn = "-" if r["attn_matmul_pct"] is None else f"{r['attn_matmul_pct']:.1f}%"
        lines.append(
            f"| {r['model']} | {r['params_m']:.1f} | {tokens} | {r['gmacs']:.2f} | {r['gmacs_counted']:.2f} | "
            f"{paper} | {diff} | {attn} | {r['train_gflops']:.0f} | {r['heads_gflops']:.2f} |"
        )
    return header + "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m benchmarks.flops", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--img-size", type=POSITIVE, default=224, help="crop side in pixels (Table 3 is at 224)")
    p.add_argument("--out", default=str(RESULTS), help="markdown file to write ('-' for none)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.out != "-":
        out = Path(args.out)
        if out.is_dir():
            raise IsADirectoryError(f"--out {out} is a folder; give the markdown file to write")
        refuse_existing([out], args.overwrite)
    table = to_markdown(build_table(args.img_size), args.img_size)
    print(table)
    if args.out != "-":
        text = "# FLOPs against the paper's Table 3\n\nMade by `python -m benchmarks.flops`.\n\n" + table
        write_atomic(args.out, text, args.overwrite)
        print(f"written to {args.out}")


def cli() -> None:
    """Command-line entry: one-line errors, `--debug` for the traceback."""
    run_cli(main)


if __name__ == "__main__":
    cli()
