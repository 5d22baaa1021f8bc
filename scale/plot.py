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

from scale.arguments import ExistingPath, Parser, check_creatable, write_atomic
from scale.entry import run_cli

log = logging.getLogger(__name__)


class PlotError(ValueError):
    """A run directory that cannot be plotted: the message says why."""


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _step(r: dict) -> str | None:
    if "step" not in r:
        return "no 'step'"
    if not _number(r["step"]) or not math.isfinite(r["step"]) or r["step"] < 0:
        return f"'step' is {r['step']!r}, not a step number"
    return None


def _numbers(r: dict, keys: tuple[str, ...], optional: tuple[str, ...] = ()) -> str | None:
    """Why `r` lacks a number under each of `keys` (and a number or null under `optional`), or None."""
    for k in keys:
        if k not in r:
            return f"no {k!r}"
        if not _number(r[k]):
            return f"{k!r} is {r[k]!r}, not a number"
    for k in optional:
        if r.get(k) is not None and not _number(r[k]):
            return f"{k!r} is {r[k]!r}, not a number"
    return None


def _metrics_row(r: dict) -> str | None:
    """Why a metrics.jsonl row cannot be used (None: it can): every row has a step; a training row
    (with 'loss') numbers or null for loss, lr, momentum and epoch; a kNN row its accuracy."""
    why = _step(r) or _numbers(r, (), ("loss", "lr", "momentum", "epoch"))
    if why is None and "knn_dense_queries" in r:
        why = _numbers(r, ("knn_dense_top1",))
    if why is None and "knn_top1" in r and "loss" not in r:
        why = _numbers(r, ("knn_top1",))
    return why


def _gradients_row(r: dict) -> str | None:
    if "layers" in r:
        ok = isinstance(r["layers"], list) and all(isinstance(n, str) for n in r["layers"])
        return None if ok else "'layers' is not a list of names"
    rel = r.get("relative")
    if not isinstance(rel, list) or not all(v is None or _number(v) for v in rel):
        return "'relative' is not a list of numbers"
    return _step(r)


EVENT_FIELDS = {"spike": ("step", "relative"), "knn_dip": ("step", "top1"), "spike_delay": ("delay",)}


def _events_row(r: dict) -> str | None:
    if not isinstance(r.get("event"), str):
        return "no 'event' name"
    if r["event"] == "spike" and not isinstance(r.get("layer"), str):
        return "a spike without its 'layer'"
    fields = EVENT_FIELDS.get(r["event"], ())
    return (_step(r) if "step" in fields else None) or _numbers(r, fields)


def _rows(path: Path, check=lambda r: None) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of a JSON-lines file that `check` accepts, and why each other one was skipped (a
    line torn by a kill, a row of another version, a hand edit): the rest is still good."""
    if not path.is_file():
        return [], []
    out, skipped = [], []
    for i, raw in enumerate(path.read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode())
        except ValueError:  # also UnicodeDecodeError
            skipped.append(f"line {i}: not JSON")
            continue
        why = check(row) if isinstance(row, dict) else f"a {type(row).__name__}, not an object"
        if why:
            skipped.append(f"line {i}: {why}")
        else:
            out.append(row)
    return out, skipped


def _log_skipped(path: Path, rows: list, skipped: list[str]) -> None:
    if skipped:
        log.warning("%s: skipped %d of %d rows (%s%s)", path, len(skipped), len(skipped) + len(rows),
                    "; ".join(skipped[:3]), "; ..." if len(skipped) > 3 else "")  # fmt: skip


class Run:
    """What the plots need from one run directory. Rows that cannot be used are skipped, counted
    (`skipped`) and logged."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        if not self.dir.is_dir():
            raise PlotError(f"{self.dir} {'is not a directory' if self.dir.exists() else 'does not exist'}: give a "
                            "run directory (runs/NAME) of scale.pretrain")  # fmt: skip
        if not (self.dir / "metrics.jsonl").is_file():
            raise PlotError(f"{self.dir} has no metrics.jsonl: give a run directory (runs/NAME) of scale.pretrain")
        self.config = self._config()
        run_section = self.config.get("run")
        self.name = run_section.get("name") if isinstance(run_section, dict) else None
        self.name = self.name if isinstance(self.name, str) and self.name else self.dir.name
        rows, bad = _rows(self.dir / "metrics.jsonl", _metrics_row)
        if not rows:
            why = f" ({len(bad)} malformed: {bad[0]})" if bad else " yet"
            raise PlotError(f"{self.dir / 'metrics.jsonl'} holds no usable rows{why}: nothing to plot")
        _log_skipped(self.dir / "metrics.jsonl", rows, bad)
        self.train = [r for r in rows if "loss" in r]
        self.knn_dense = [(r["step"], r["knn_dense_top1"]) for r in rows if "knn_dense_queries" in r]
        self.knn_heldout = [(r["step"], r["knn_top1"]) for r in rows if "knn_top1" in r and "loss" not in r]
        per_epoch = [r["step"] / r["epoch"] for r in self.train if r.get("epoch") and math.isfinite(r["epoch"])]
        self.steps_per_epoch = per_epoch[-1] if per_epoch else None
        grads, bad_grads = _rows(self.dir / "gradients.jsonl", _gradients_row)
        _log_skipped(self.dir / "gradients.jsonl", grads, bad_grads)
        header = next((r for r in grads if "layers" in r), None)
        self.layers: list[str] = header["layers"] if header else []
        self.grads = [r for r in grads if "step" in r]
        wrong = [r for r in self.grads if len(r["relative"]) != len(self.layers)]
        if wrong:  # rows of another model (or with no header): they do not fit the heat map
            log.warning("%s: skipped %d gradient rows whose layer count is not the header's %d",
                        self.dir / "gradients.jsonl", len(wrong), len(self.layers))  # fmt: skip
            self.grads = [r for r in self.grads if len(r["relative"]) == len(self.layers)]
        self.events, bad_events = _rows(self.dir / "events.jsonl", _events_row)
        _log_skipped(self.dir / "events.jsonl", self.events, bad_events)
        self.skipped = len(bad) + len(bad_grads) + len(wrong) + len(bad_events)

    def _config(self) -> dict[str, Any]:
        path = self.dir / "config.json"
        if not path.is_file():
            return {}
        try:
            config = json.loads(path.read_bytes().decode())
        except ValueError:
            log.warning("%s is not JSON: the run is named by its folder, without a spike threshold", path)
            return {}
        return config if isinstance(config, dict) else {}

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


def _save(plt, fig, path: Path) -> Path:
    """The PNG written whole (a temporary file renamed into place), replacing the plot of an
    earlier call: plots are redrawn from the run's files, which are only read."""
    try:
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120), overwrite=True)
    finally:
        plt.close(fig)
    return path


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
    return _save(plt, fig, path)


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
    return _save(plt, fig, path)


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
        return _save(plt, fig, path)
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
    return _save(plt, fig, path)


def _threshold(run: Run) -> float | None:
    monitor = run.config.get("monitor")
    value = monitor.get("spike_threshold") if isinstance(monitor, dict) else None
    return value if _number(value) else None


def plot_folder(runs: list[Run], out: str | Path | None) -> Path:
    """Where the PNGs go (`--out`, else RUN_DIR/plots for one run, ./plots for several), checked."""
    out = Path(out) if out else (runs[0].dir / "plots" if len(runs) == 1 else Path("plots"))
    if out.exists() and not out.is_dir():
        raise PlotError(f"--out {out} is a file; give a folder for the PNGs")
    check_creatable(out / "knn.png")
    return out


def plot_runs(run_dirs: list[str | Path | Run], out: str | Path | None = None) -> list[Path]:
    """Write every plot for `run_dirs` (paths, or `Run`s already read); returns the paths written.
    Every run is read before anything is written."""
    runs = [d if isinstance(d, Run) else Run(Path(d)) for d in run_dirs]
    out = plot_folder(runs, out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_knn(runs, out / "knn.png"), plot_training(runs, out / "training.png")]
    names = [r.name for r in runs]
    for i, run in enumerate(runs):
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run.name)
        if names.count(run.name) > 1:
            safe += f"-{i}"
        paths.append(plot_gradients(run, out / f"gradients-{safe}.png"))
    return paths


def summary(run: Run) -> str:
    """One line per run: points, spikes, dips, and the mean first-to-last-layer delay."""
    spikes = sum(e.get("event") == "spike" for e in run.events)
    dips = sum(e.get("event") == "knn_dip" for e in run.events)
    delays = [e["delay"] for e in run.events if e.get("event") == "spike_delay"]
    delay = f", first->last layer delay {sum(delays) / len(delays):.1f} steps (n={len(delays)})" if delays else ""
    last = run.knn_dense[-1][1] if run.knn_dense else math.nan
    skipped = f"; {run.skipped} malformed rows skipped" if run.skipped else ""
    return (f"{run.name}: {len(run.knn_dense)} dense kNN points (last {last:.1f}%), {len(run.grads)} gradient rows, "
            f"{spikes} layer spikes, {dips} kNN dips{delay}{skipped}")  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="scale-plot", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", type=ExistingPath("dir"))
    p.add_argument("--out", default=None, help="folder for the PNGs (default: RUN_DIR/plots, or ./plots)")
    return p


def main(argv: list[str] | None = None) -> list[Path]:
    args = parser().parse_args(argv)
    runs = [Run(d) for d in args.run_dirs]
    paths = plot_runs(runs, plot_folder(runs, args.out))
    for run in runs:
        print(summary(run))
    for p in paths:
        print(f"wrote {p}")
    return paths


def cli() -> None:
    """Command-line entry: one-line errors (a run that cannot be plotted, an unwritable --out),
    `--debug` for the traceback."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_cli(main)


if __name__ == "__main__":
    cli()
