"""Fashion-MNIST end to end: does MoCo v3 pretraining help? `python -m benchmarks.fashion RUN`.

RUN is a pretraining run on Fashion-MNIST (`python -m scale.pretrain --recipe fashion_demo`: the
CPU demo's ViT, 7 epochs, about 35 minutes on 2 cores). Each evaluation runs twice, on RUN's
backbone and on the same architecture at the initial weights RUN started from (`--random-init`,
the same seed), through the project's own commands:

- kNN (`scale.knn_eval`): the 60,000 training images as the bank, the 10,000 test images as queries;
- the linear probe, the paper's protocol (`scale.linear_probe`: RandomResizedCrop + flip, SGD with
  momentum, cosine, several learning rates in one pass, the best reported) and its fixed-crop
  variant (`--no-augment`: features of the centre crop, cached);
- end-to-end fine-tuning (`scale.finetune`, the DeiT recipe scaled to 28 px) with all the labels
  (`fashion_finetune`) and with 10% of them (`fashion_finetune_10pct`: 6,000 class-balanced images,
  the same number of steps).

Every command is printed and written beside its result; a step whose result exists is not run
again (the script can be stopped and rerun). Results: benchmarks/results/fashion.md and .json
(`--results`), and each step's own files under `--out`. `--smoke` runs every step in seconds on
subsets (for the tests): its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

from scale.arguments import POSITIVE, ExistingPath, Parser, refuse_existing, refuse_inside, write_atomic
from scale.entry import run_cli

RESULTS = Path(__file__).parent / "results"
LRS = "0.01,0.03,0.1,0.3,1,3,10"  # base lrs of the probes' heads, all in one pass (the best is reported)


def steps(run: str, out: Path, smoke: bool, probe_epochs: int, fixed_epochs: int) -> list[dict[str, Any]]:
    """Each evaluation as (name, backbone, command, result file)."""
    py = [sys.executable, "-m"]
    train = "fashion:train@600" if smoke else "fashion"
    test = "fashion:test" if not smoke else "fashion:train@100"
    out_s = str(out)
    plan = []
    for tag, extra in (("pretrained", []), ("random init", ["--random-init"])):
        key = "pre" if tag == "pretrained" else "rand"
        plan.append(dict(name="kNN (k=20)", backbone=tag, result=f"{out_s}/knn-{key}/knn.json",
                         cmd=[*py, "scale.knn_eval", run, "--train", train, "--val", test, "--ks", "10,20,200",
                              "--workers", "1", "--out", f"{out_s}/knn-{key}", *extra]))  # fmt: skip
        plan.append(dict(name="linear probe (paper protocol)", backbone=tag,
                         result=f"{out_s}/probe-{key}/linear_probe.json",
                         cmd=[*py, "scale.linear_probe", run, "--train", train, "--val", test, "--epochs",
                              str(1 if smoke else probe_epochs), "--batch-size", "256", "--lrs", LRS,
                              "--workers", "1", "--no-progress", "--no-tensorboard", "--out",
                              f"{out_s}/probe-{key}", *extra]))  # fmt: skip
        plan.append(dict(name="linear probe (fixed crop)", backbone=tag,
                         result=f"{out_s}/fixed-{key}/linear_probe.json",
                         cmd=[*py, "scale.linear_probe", run, "--train", train, "--val", test, "--epochs",
                              str(2 if smoke else fixed_epochs), "--batch-size", "256", "--lrs", LRS,
                              "--no-augment", "--workers", "1", "--no-progress", "--no-tensorboard", "--out",
                              f"{out_s}/fixed-{key}", *extra]))  # fmt: skip
    for recipe, labels in (("fashion_finetune", "100%"), ("fashion_finetune_10pct", "10%")):
        for tag in ("pretrained", "random init"):
            key = "pre" if tag == "pretrained" else "rand"
            name = f"{recipe}-{key}"
            cmd = [*py, "scale.finetune", "--recipe", recipe, f"--run.output_dir={out_s}", f"--run.name={name}",
                   "--run.progress=false", "--run.tensorboard=false"]  # fmt: skip
            if tag == "pretrained":
                cmd += ["--pretrained", run]
            else:  # the run's architecture at its own seed: the pretrained run's config, no weights
                cmd += random_init_args(run)
            if smoke:
                cmd += ["--schedule.max_steps=2", "--data.eval_source=fashion:train@100",
                        "--finetune.eval_every_epochs=0", "--batch.global_batch_size=32"]  # fmt: skip
                if labels == "100%":
                    cmd += ["--data.source=fashion:train@600"]
            plan.append(dict(name=f"fine-tuning, {labels} of the labels", backbone=tag,
                             result=f"{out_s}/{name}/results.json", cmd=cmd))  # fmt: skip
    return plan


def random_init_args(run: str) -> list[str]:
    """Overrides that build RUN's architecture with RUN's seed (fine-tuning's random-init baseline)."""
    config = json.loads((Path(run) / "config.json").read_text())
    m = config["model"]
    keys = ("name", "img_size", "patch_size", "embed_dim", "depth", "num_heads", "pool", "pos_embed", "use_bn")
    args = [f"--model.{k}={m[k]}" for k in keys if m.get(k) is not None]
    return [*args, f"--run.seed={config['run']['seed']}"]


def accuracy(step: dict[str, Any]) -> dict[str, float]:
    r = json.loads(Path(step["result"]).read_text())
    if "knn" in step["result"]:
        return {"top1": r["top1"]["20"]}
    if step["result"].endswith("linear_probe.json"):
        return {"top1": r["best"]["top1"], "base_lr": r["best"]["base_lr"]}
    out = {"top1": r["top1"]}
    if "ema_top1" in r:
        out["ema_top1"] = r["ema_top1"]
    return out


def pretraining_summary(run: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r for r in rows if "loss" in r]
    knn = [(r["step"], r["knn_top1"]) for r in rows if "knn_top1" in r]
    config = json.loads((run / "config.json").read_text())
    return {"steps": losses[-1]["step"] if losses else 0, "final_loss": losses[-1]["loss"] if losses else None,
            "img_per_s": losses[-1].get("img_per_s") if losses else None, "heldout_knn": knn,
            "epochs": config["schedule"]["epochs"], "batch": config["batch"]["global_batch_size"]}  # fmt: skip


def write_report(run: Path, plan: list[dict[str, Any]], results: Path, seconds: dict[str, float],
                 overwrite: bool = False) -> None:  # fmt: skip
    rows: dict[str, dict[str, Any]] = {}
    for step in plan:
        rows.setdefault(step["name"], {})[step["backbone"]] = accuracy(step)
    summary = pretraining_summary(run)
    data = {"date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "pretraining_run": str(run), "pretraining": summary, "results": rows,
            "commands": [{"step": s["name"], "backbone": s["backbone"], "command": shlex.join(_shown(s["cmd"]))}
                         for s in plan], "seconds": seconds}  # fmt: skip
    json_text = json.dumps(data, indent=1)
    lines = ["# Fashion-MNIST: MoCo v3 pretraining against random init", "",
             f"{data['date']}, {data['machine']}, CPU only. Pretraining: `python -m scale.pretrain --recipe "
             f"fashion_demo` ({summary['epochs']:g} epochs at batch {summary['batch']}, {summary['steps']} steps, "
             f"final loss {summary['final_loss']:.3f}); held-out kNN during it (k=20, 10% of the training set "
             f"as the bank): {', '.join(f'step {s}: {v:.1f}%' for s, v in summary['heldout_knn']) or 'none'}.",
             "", "Top-1 (%) on the 10,000 test images; the same architecture and seed at random init beside it.",
             "", "| evaluation | pretrained | random init | difference |", "|---|---:|---:|---:|"]  # fmt: skip
    for name, by in rows.items():
        pre, rand = by.get("pretrained", {}), by.get("random init", {})
        cell = [f"{pre.get('top1', float('nan')):.2f}", f"{rand.get('top1', float('nan')):.2f}"]
        for i, r in enumerate((pre, rand)):
            if "ema_top1" in r:
                cell[i] += f" (EMA {r['ema_top1']:.2f})"
            if "base_lr" in r:
                cell[i] += f" (base lr {r['base_lr']:g})"
        lines.append(f"| {name} | {cell[0]} | {cell[1]} | {pre.get('top1', 0) - rand.get('top1', 0):+.2f} |")
    lines += ["", "Commands (in this order; `python -m benchmarks.fashion RUN` runs them all):", "", "```"]
    lines += [shlex.join(_shown(s["cmd"])) for s in plan] + ["```"]
    write_atomic(results.with_suffix(".json"), json_text, overwrite)
    write_atomic(results.with_suffix(".md"), "\n".join(lines) + "\n", overwrite)
    print("\n".join(lines))


def _shown(cmd: list[str]) -> list[str]:
    return ["python", *cmd[1:]] if cmd and cmd[0] == sys.executable else cmd


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m benchmarks.fashion", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("run", metavar="RUN", type=ExistingPath("dir"), help="the fashion_demo pretraining run directory")
    p.add_argument("--out", type=Path, default=Path("runs/fashion_eval"), help="where each step writes")
    p.add_argument("--results", type=Path, default=RESULTS / "fashion", help="report path (.md and .json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.add_argument("--probe-epochs", type=POSITIVE, default=5, help="linear probe with augmentation (paper protocol)")
    p.add_argument("--fixed-epochs", type=POSITIVE, default=30, help="fixed-crop linear probe (cached features)")
    p.add_argument("--smoke", action="store_true", help="every step in seconds on subsets (tests)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if not (args.run / "config.json").is_file():
        raise SystemExit(f"error: {args.run} is not a run directory (no config.json); pretrain it first: "
                         "python -m scale.pretrain --recipe fashion_demo")  # fmt: skip
    refuse_inside(args.out, "--out", args.run, "RUN", replaced=False)
    refuse_existing([args.results.with_suffix(".md"), args.results.with_suffix(".json")], args.overwrite)
    plan = steps(str(args.run), args.out, args.smoke, args.probe_epochs, args.fixed_epochs)
    seconds: dict[str, float] = {}
    for i, step in enumerate(plan, 1):
        label = f"{step['name']}, {step['backbone']}"
        if Path(step["result"]).is_file():
            print(f"[{i}/{len(plan)}] {label}: done before ({step['result']})", flush=True)
            continue
        print(f"[{i}/{len(plan)}] {label}: {shlex.join(_shown(step['cmd']))}", flush=True)
        log = Path(step["result"]).parent.with_suffix(".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(log, "w") as f:
            done = subprocess.run(step["cmd"], stdout=f, stderr=subprocess.STDOUT)
        seconds[label] = round(time.time() - t0, 1)
        if done.returncode != 0 or not Path(step["result"]).is_file():
            raise SystemExit(f"error: {label} failed (exit {done.returncode}); see {log}")
    write_report(args.run, plan, args.results, seconds, args.overwrite)


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
