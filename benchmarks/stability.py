"""A miniature of the paper's stability experiment (Sec. 4.2, Fig. 5): the demo digits at a too-high
learning rate, once with a learned patch projection and once with the random (frozen) one, with
the dense kNN and gradient monitors on; the curves side by side and the spike / dip counts.

    python -m benchmarks.stability                          # 4x the demo's lr, 120 steps per run
    python -m benchmarks.stability --lr-scale 8 --steps 200 --out benchmarks/results/stability

Writes OUT/knn.png, OUT/training.png, OUT/gradients-*.png and OUT/stability.md (the table, the
command, date and machine). Each run is a normal run directory under OUT/runs (resumable, plottable
again with scale-plot).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
from pathlib import Path

from benchmarks.paper import add_output_args, check_results, write_results
from scale.arguments import POSITIVE, POSITIVE_FLOAT, Parser
from scale.config import apply_overrides
from scale.entry import run_cli, setup_logging
from scale.plot import Run, plot_runs, summary
from scale.recipes import get_recipe
from scale.train.trainer import Trainer

log = logging.getLogger(__name__)


def run_name(learned: bool, lr_scale: float) -> str:
    return f"{'learned' if learned else 'random'}-patch-lr{lr_scale:g}x"


def run_one(out: Path, learned: bool, lr_scale: float, steps: int, knn_every: int, seed: int) -> Path:
    cfg = get_recipe("cpu_demo")
    apply_overrides(cfg, [
        f"--model.random_patch_proj={str(not learned).lower()}",
        f"--optim.base_lr={cfg.optim.base_lr * lr_scale}",
        f"--schedule.max_steps={steps}", f"--monitor.knn_every={knn_every}", f"--run.seed={seed}",
        f"--run.output_dir={out / 'runs'}", f"--run.name={run_name(learned, lr_scale)}", "--run.tensorboard=false",
        "--run.progress=false",
    ])  # fmt: skip
    trainer = Trainer(cfg)
    trainer.fit()
    return trainer.run_dir


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m benchmarks.stability", description=__doc__.split("\n\n")[0])
    p.add_argument("--lr-scale", type=POSITIVE_FLOAT, default=4.0, help="times the demo's base lr (1.5e-3)")
    p.add_argument("--steps", type=POSITIVE, default=120)
    p.add_argument("--knn-every", type=POSITIVE, default=2)
    p.add_argument("--seed", type=int, default=0)
    add_output_args(p, "benchmarks/results/stability", "results folder (the report, the plots and runs/)")
    return p


def main(argv: list[str] | None = None) -> Path:
    args = parser().parse_args(argv)
    if args.out == "-":
        raise ValueError("--out -: the stability runs need a folder (their run directories go to OUT/runs)")
    out = Path(args.out)
    # Before the runs: they must be new (a run directory is never replaced; an existing one would be
    # resumed, not rerun), and the report is replaced only with --overwrite.
    for learned in (True, False):
        run_dir = out / "runs" / run_name(learned, args.lr_scale)
        if run_dir.exists():
            raise FileExistsError(f"{run_dir} exists: remove it or choose another --out (runs are never replaced)")
    check_results(out, ["stability.md", "stability.json"], args.overwrite)
    setup_logging()
    dirs = [run_one(out, learned, args.lr_scale, args.steps, args.knn_every, args.seed) for learned in (True, False)]
    plot_runs(dirs, out)
    lines = [
        f"# Stability miniature: learned vs random patch projection at {args.lr_scale:g}x the demo lr",
        "",
        f"Measured {datetime.date.today()} on {platform.processor() or platform.machine()} (CPU), "
        f"`python -m benchmarks.stability --lr-scale {args.lr_scale:g} --steps {args.steps} "
        f"--knn-every {args.knn_every} --seed {args.seed} --out {args.out}`.",
        "",
        "| run | dense kNN points | last / best / mean of last 10 (%) | layer spikes | kNN dips "
        "| first->last delay (steps) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for d in dirs:
        run = Run(d)
        vals = [v for _, v in run.knn_dense]
        spikes = sum(e.get("event") == "spike" for e in run.events)
        dips = sum(e.get("event") == "knn_dip" for e in run.events)
        delays = [e["delay"] for e in run.events if e.get("event") == "spike_delay"]
        tail = vals[-10:]
        stats = f"{vals[-1]:.1f} / {max(vals):.1f} / {sum(tail) / len(tail):.1f}" if vals else "-"
        delay = f"{sum(delays) / len(delays):.1f} (n={len(delays)})" if delays else "-"
        lines.append(f"| {run.name} | {len(vals)} | {stats} | {spikes} | {dips} | {delay} |")
        print(summary(run))
    lines += [
        "",
        "Plots: knn.png (both curves), training.png, gradients-*.png (per-layer relative gradient norms).",
        "",
    ]
    files = {"stability.md": "\n".join(lines), "stability.json": json.dumps(vars(args), indent=1)}
    write_results(out, files, args.overwrite)
    print(f"wrote {out / 'stability.md'}")
    return out


def cli() -> None:
    """Command-line entry: one-line errors, `--debug` for the traceback."""
    run_cli(main)


if __name__ == "__main__":
    cli()
