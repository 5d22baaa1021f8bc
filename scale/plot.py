"""`scale-plot RUN_DIR [RUN_DIR ...]`: the paper's instruments as PNGs, from the run directories'
metrics.jsonl, gradients.jsonl and events.jsonl (matplotlib; no torch needed).

Writes into `--out` (default: RUN_DIR/plots for one run, ./plots for several):
- knn.png: the dense kNN curves of every run on one axis (paper Fig. 1, 2, 5), with the held-out
  kNN points where the run had them and the detected dips marked;
- training.png: loss, learning rate and momentum coefficient of every run;
- gradients-NAME.png, per run: each layer's gradient norm relative to its running average (Fig. 4:
  first layer, a middle block, the last block, the heads), spikes marked, and every layer as a heat map.

    scale-plot runs/cpu_demo
    scale-plot runs/lr-high-learned runs/lr-high-random --out plots/
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class PlotError(ValueError):
    """A run directory that cannot be plotted: the message says why."""


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write: the rest is still good
    return out


class Run:
    """What the plots need from one run directory."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        if not (self.dir / "metrics.jsonl").is_file():
            raise PlotError(f"{self.dir} has no metrics.jsonl: give a run directory (runs/NAME) of scale.pretrain")
        config = self.dir / "config.json"
        self.name = json.loads(config.read_text()).get("run", {}).get("name") if config.is_file() else None
        self.name = self.name or self.dir.name
        rows = _rows(self.dir / "metrics.jsonl")
        self.train = [r for r in rows if "loss" in r]
        self.knn_dense = [(r["step"], r["knn_dense_top1"]) for r in rows if "knn_dense_queries" in r]
        self.knn_heldout = [(r["step"], r["knn_top1"]) for r in rows if "knn_top1" in r and "loss" not in r]
        per_epoch = [r["step"] / r["epoch"] for r in self.train if r.get("epoch")]
        self.steps_per_epoch = per_epoch[-1] if per_epoch else None
        grads = _rows(self.dir / "gradients.jsonl")
        header = next((r for r in grads if "layers" in r), None)
        self.layers: list[str] = header["layers"] if header else []
        self.grads = [r for r in grads if "step" in r]
        self.events = _rows(self.dir / "events.jsonl")

    def x(self, step: float) -> float:
        return step / self.steps_per_epoch if self.steps_per_epoch else step

    @property
    def x_label(self) -> str:
        return "epoch" if self.steps_per_epoch else "step"


def _pyplot():
    try:
        import matplotlib  # here: the Agg backend must be chosen before pyplot is imported
    except ImportError:
        raise PlotError("matplotlib is not installed: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and v is not None else float("nan")


def plot_knn(runs: list[Run], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for run in runs:
        if run.knn_dense:
            line = ax.plot([run.x(s) for s, _ in run.knn_dense], [v for _, v in run.knn_dense], lw=1.2,
                           label=f"{run.name} (dense, training crops)")[0]  # fmt: skip
            dips = [e for e in run.events if e.get("event") == "knn_dip"]
            if dips:
                ax.scatter([run.x(e["step"]) for e in dips], [e["top1"] for e in dips], marker="v", s=40,
                           color=line.get_color(), edgecolor="black", zorder=3, label=f"{run.name}: dips")  # fmt: skip
        if run.knn_heldout:
            ax.plot([run.x(s) for s, _ in run.knn_heldout], [v for _, v in run.knn_heldout], "o--", ms=4,
                    label=f"{run.name} (held-out, per epoch)")  # fmt: skip
    if not any(r.knn_dense or r.knn_heldout for r in runs):
        ax.text(0.5, 0.5, "no kNN values in these runs", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(runs[0].x_label)
    ax.set_ylabel("kNN top-1 accuracy (%)")
    ax.set_title("kNN monitor")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_training(runs: list[Run], path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    labels = ("contrastive loss", "learning rate", "momentum coefficient m")
    for key, ax, label in zip(("loss", "lr", "momentum"), axes, labels, strict=True):
        for run in runs:
            pts = [(run.x(r["step"]), _num(r.get(key))) for r in run.train]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2, label=run.name)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title("training")
    axes[-1].set_xlabel(runs[0].x_label)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _shown_layers(layers: list[str]) -> list[int]:
    """First layer, a middle block, the last block and the heads (Fig. 4's selection)."""
    blocks = [i for i, n in enumerate(layers) if n.startswith("block.")]
    picks = [0]
    if blocks:
        picks += [blocks[len(blocks) // 2], blocks[-1]]
    picks += [i for i, n in enumerate(layers) if n in ("projector", "predictor")]
    return sorted(dict.fromkeys(picks))


def plot_gradients(run: Run, path: Path) -> Path:
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7.5), sharex=True, gridspec_kw={"height_ratios": [1, 1.1]})
    if not run.grads or not run.layers:
        top.text(0.5, 0.5, "no gradient norms in this run (monitor.grad_every=0?)", ha="center", va="center",
                 transform=top.transAxes)  # fmt: skip
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path
    xs = np.array([run.x(r["step"]) for r in run.grads])
    rel = np.array([[_num(v) for v in r["relative"]] for r in run.grads], dtype=float)  # (steps, layers)
    spikes = [e for e in run.events if e.get("event") == "spike"]
    for i in _shown_layers(run.layers):
        line = top.plot(xs, rel[:, i], lw=1.0, label=run.layers[i])[0]
        mine = [e for e in spikes if e["layer"] == run.layers[i]]
        if mine:
            top.scatter([run.x(e["step"]) for e in mine], [e["relative"] for e in mine], marker="^", s=36,
                        color=line.get_color(), edgecolor="black", zorder=3)  # fmt: skip
    threshold = _threshold(run)
    if threshold:
        top.axhline(threshold, color="red", ls=":", lw=1, label=f"spike threshold ({threshold:g}x)")
    top.set_yscale("log")
    top.set_ylabel("gradient norm / running average")
    top.set_title(f"{run.name}: per-layer gradient magnitude (spikes marked)")
    top.grid(alpha=0.3, which="both")
    top.legend(fontsize=8, ncol=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        heat = np.log2(np.clip(rel.T, 1 / 16, 16))
    extent = (xs[0], xs[-1] if len(xs) > 1 else xs[0] + 1, len(run.layers) - 0.5, -0.5)
    im = bottom.imshow(heat, aspect="auto", cmap="coolwarm", vmin=-3, vmax=3, extent=extent, interpolation="nearest")
    bottom.set_yticks(range(len(run.layers)))
    bottom.set_yticklabels(run.layers, fontsize=7 if len(run.layers) <= 30 else 5)
    bottom.set_ylabel("layer (first at the top)")
    bottom.set_xlabel(run.x_label)
    cbar = fig.colorbar(im, ax=bottom, pad=0.01)
    cbar.set_label("log2(norm / running average)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _threshold(run: Run) -> float | None:
    config = run.dir / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("monitor", {}).get("spike_threshold")
    return None


def plot_runs(run_dirs: list[str | Path], out: str | Path | None = None) -> list[Path]:
    """Write every plot for `run_dirs`; returns the paths written."""
    runs = [Run(Path(d)) for d in run_dirs]
    out = Path(out) if out else (runs[0].dir / "plots" if len(runs) == 1 else Path("plots"))
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_knn(runs, out / "knn.png"), plot_training(runs, out / "training.png")]
    names = [r.name for r in runs]
    for run in runs:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run.name)
        if names.count(run.name) > 1:
            safe += f"-{runs.index(run)}"
        paths.append(plot_gradients(run, out / f"gradients-{safe}.png"))
    return paths


def summary(run: Run) -> str:
    """One line per run: points, spikes, dips, and the mean first-to-last-layer delay."""
    spikes = sum(e.get("event") == "spike" for e in run.events)
    dips = sum(e.get("event") == "knn_dip" for e in run.events)
    delays = [e["delay"] for e in run.events if e.get("event") == "spike_delay"]
    delay = f", first->last layer delay {sum(delays) / len(delays):.1f} steps (n={len(delays)})" if delays else ""
    last = run.knn_dense[-1][1] if run.knn_dense else math.nan
    return (f"{run.name}: {len(run.knn_dense)} dense kNN points (last {last:.1f}%), {len(run.grads)} gradient rows, "
            f"{spikes} layer spikes, {dips} kNN dips{delay}")  # fmt: skip


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="scale-plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default: RUN_DIR/plots, or ./plots)")
    args = parser.parse_args(argv)
    paths = plot_runs(args.run_dirs, args.out)
    for run_dir in args.run_dirs:
        print(summary(Run(Path(run_dir))))
    for p in paths:
        print(f"wrote {p}")
    return paths


def cli() -> None:
    try:
        main()
    except PlotError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    cli()
