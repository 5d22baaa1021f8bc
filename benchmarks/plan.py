"""Every layout of a model on N GPUs and the one to run: `python -m benchmarks.plan`.

    python -m benchmarks.plan --model vit_huge --gpus 512 --gpu-memory 80
    python -m benchmarks.plan --model vit_bn_large_p7 --gpus 64 --gpu-memory 40 --simulate all
    python -m benchmarks.plan --model vit_base --gpus 256 --measured benchmarks/results/gpu-check/summary.json

Lists each candidate (backend: DDP, FSDP2 with or without resharding, ZeRO-1/2/3; activation
checkpointing; micro-batch per GPU and so gradient accumulation) with its memory per GPU (state +
activations + transient, `scale.train.planner`), the simulated peak where `benchmarks.simulate`
runs it (DDP and FSDP2; `--simulate`), whether it fits and why not, the projected step time
(`scale.train.timing`), images/s and hours per 100 epochs; names the fastest that fits (and leaves
MoCo v3's loss as it is: no accumulation when anything without fits) and the runner-up with another
backend. `--parallel.backend=auto` makes the same choice at start-up.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import fields
from datetime import date
from pathlib import Path

from benchmarks.paper import IMAGENET_TRAIN, add_output_args, check_results, write_results
from benchmarks.simulate import RECIPE_OF, SIMULATED, sim_config, simulate
from scale.arguments import FRACTION, POSITIVE, POSITIVE_FLOAT, ExistingPath, Names, Number, Parser
from scale.entry import run_cli
from scale.train.planner import GIB, HEADROOM, RESERVE_GIB, Candidate, best_and_runner_up, candidates
from scale.train.timing import GPUS, Cluster
from scale.train.traffic import BACKENDS, meta_model

log = logging.getLogger("benchmarks.plan")

SKIP = ("gpus", "memory_gib", "measured", "mfu", "gpu")


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    """The time model's constants as options (`scale.train.timing.Cluster`, where each is sourced)."""
    p.add_argument("--gpu", default="H100", choices=sorted(GPUS))
    p.add_argument("--gpu-memory", type=POSITIVE_FLOAT, default=None, help="GiB per GPU (default: the GPU's)")
    p.add_argument("--mfu", type=FRACTION, default=None, help="assumed MFU (default 0.40, or --measured's)")
    p.add_argument("--measured", type=ExistingPath("file"), default=None, help="a `make gpu-check` summary.json or a "
                   "benchmarks.throughput JSON measured on this GPU: its MFU replaces the assumption")  # fmt: skip
    for f in fields(Cluster):
        if f.name not in SKIP:
            p.add_argument(f"--{f.name.replace('_', '-')}", type=cluster_rule(f.name, f.default), default=f.default)


def cluster_rule(name: str, default) -> Number:
    """The range of a time-model constant: efficiencies are fractions, latencies may be zero (an
    ideal network), counts and bandwidths are positive."""
    if name.endswith("efficiency"):
        return FRACTION
    if name.endswith("_us") or name.startswith("kernels"):
        return Number(type(default), minimum=0)
    return Number(type(default), minimum=1) if isinstance(default, int) else POSITIVE_FLOAT


def measured_mfu(path: str) -> tuple[float, str]:
    """The MFU measured in a `make gpu-check` summary.json (its real ViT-B step) or a
    `benchmarks.throughput` JSON, and where it came from."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--measured {path}: not a readable JSON file ({e})") from None
    step = data.get("results", {}).get("step") if isinstance(data, dict) else None
    if isinstance(step, dict) and _fraction(step.get("mfu")):
        return float(step["mfu"]), f"{path}: {step.get('model')} step on {data.get('device')}, {data.get('date')}"
    if isinstance(data, dict) and _fraction(data.get("mfu")):
        return float(data["mfu"]), f"{path}: {data.get('model')} on {data.get('device')}, {data.get('date')}"
    raise ValueError(f"--measured {path}: no 'mfu' between 0 and 1 in it (give a make gpu-check summary.json or a "
                     "benchmarks.throughput JSON)")  # fmt: skip


def _fraction(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1


def cluster_from_args(args: argparse.Namespace, gpus: int) -> Cluster:
    kw = {f.name: getattr(args, f.name) for f in fields(Cluster) if f.name not in SKIP}
    mfu, source = (args.mfu or 0.40), ""
    if args.measured:
        mfu, source = measured_mfu(args.measured)
        mfu = args.mfu or mfu
    return Cluster(gpus, gpu=args.gpu, memory_gib=args.gpu_memory, mfu=mfu, measured=source, **kw)


def model_config(model: str, gpus: int, global_batch: int = 4096):
    """`model`'s recipe (`benchmarks.simulate.RECIPE_OF`) at `global_batch` on `gpus` GPUs."""
    if global_batch % gpus:
        raise ValueError(f"--global-batch {global_batch} does not split over {gpus} GPUs")
    return sim_config(model, "ddp", gpus, global_batch // gpus)


def _simulated(c: Candidate, model: str, gpus: int) -> float | None:
    backend = c.layout.backend.split("-")[0]  # fsdp / hsdp with or without resharding
    if backend not in SIMULATED:
        return None
    row = simulate(model, backend, gpus, c.layout.micro_batch, ac=c.layout.activation_checkpointing,
                   accum=c.layout.accum, reshard=not c.layout.backend.endswith("-noreshard"))  # fmt: skip
    return row["peak_gib"]


def table(ranked: list[Candidate], sims: dict[int, float], best, runner, images: int) -> list[str]:
    lines = ["| | layout | GiB/GPU: state + activations + transient = total | simulated peak | fits | step ms | img/s "
             "| h / 100 ep |", "|---|---|---|---:|---|---:|---:|---:|"]  # fmt: skip
    for c in ranked:
        mark = "**chosen**" if c is best else ("runner-up" if c is runner else "")
        m = c.memory
        sim = f"{sims[id(c)]:.1f}" if id(c) in sims else ""
        fits = "yes" if c.fits else "no: " + c.why_not().split(" (")[0]
        hours = 100 * images / c.global_batch * c.time.step / 3600
        lines.append(f"| {mark} | {c.layout.describe()} | {m['state'] / GIB:.1f} + {m['activations'] / GIB:.1f} + "
                     f"{m['transient'] / GIB:.1f} = {m['total'] / GIB:.1f} | {sim} | {fits} | {c.time.step * 1e3:.0f} "
                     f"| {c.images_per_s:,.0f} | {hours:.1f} |")  # fmt: skip
    return lines


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m benchmarks.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_huge", choices=list(RECIPE_OF))
    p.add_argument("--gpus", type=POSITIVE, default=512)
    p.add_argument("--global-batch", type=POSITIVE, default=4096)
    p.add_argument("--backends", type=Names(BACKENDS), default=",".join(BACKENDS))
    p.add_argument("--simulate", default="chosen", choices=["none", "chosen", "all"],
                   help="run benchmarks.simulate for the chosen layout and the runner-up, or every DDP / FSDP2 row "
                   "(a minute or two each for ViT-H)")  # fmt: skip
    add_cluster_args(p)
    add_output_args(p)
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    p = parser()
    args = p.parse_args(argv)
    if args.global_batch % args.gpus:
        p.error(f"argument --global-batch: {args.global_batch} does not split over --gpus {args.gpus}")
    cluster = cluster_from_args(args, args.gpus)
    name = f"plan-{args.model}-{args.gpus}x{cluster.memory_bytes / GIB:.0f}g"
    # The plan is printed in any case (it is cheap and deterministic); an existing result is kept
    # unless --overwrite, with a line that says so.
    names = [f"{name}.md", f"{name}.json"]
    kept = args.out != "-" and not args.overwrite and any((Path(args.out) / n).exists() for n in names)
    if not kept:
        check_results(args.out, names, args.overwrite)
    cfg = model_config(args.model, args.gpus, args.global_batch)
    ranked = candidates(cfg, cluster, tuple(args.backends), model=meta_model(cfg))
    best, runner = best_and_runner_up(ranked)
    todo = [c for c in ranked if args.simulate == "all" or (args.simulate == "chosen" and c in (best, runner))]
    sims = {}
    for c in todo:
        peak = _simulated(c, args.model, args.gpus)
        if peak is not None:
            sims[id(c)] = peak
    mfu = f"{cluster.mfu:.0%} MFU " + (f"measured ({cluster.measured})" if cluster.measured else "assumed")
    head = [f"# Plan: {args.model} on {args.gpus} x {args.gpu} ({cluster.memory_bytes / GIB:.0f} GiB), global batch "
            f"{args.global_batch}", "",
            f"{date.today().isoformat()}, made by `python -m benchmarks.{Path(__file__).stem} --model {args.model} "
            f"--gpus {args.gpus}`. Fits: total <= {HEADROOM:.0%} of the GPU less {RESERVE_GIB:.0f} GiB "
            f"({cluster.memory_bytes * HEADROOM / GIB - RESERVE_GIB:.1f} GiB). Time model (scale/train/timing.py, "
            f"docs/scaling.md): {mfu}; {cluster.gpus_per_node} GPUs per node, NVLink {cluster.nvlink_gbps:.0f} GB/s, "
            f"{cluster.nic_gbps:.0f} GB/s NIC per GPU x {cluster.nic_efficiency:.0%}; ring step "
            f"{cluster.hop_us_nvlink} / {cluster.hop_us_ib} us; {cluster.launch_us} us per kernel launch.",
            ""]  # fmt: skip
    if best is None:
        verdict = "Nothing fits: more GPUs, more memory per GPU, or a smaller model."
    else:
        verdict = f"Chosen: **{best.layout.describe()}**"
        verdict += f"; runner-up: {runner.layout.describe()}." if runner else "."
    text = "\n".join([*head, verdict, "", *table(ranked, sims, best, runner, IMAGENET_TRAIN)]) + "\n"
    print(text)
    rows = [{"layout": c.layout.__dict__, "memory": c.memory, "fits": c.fits, "why_not": c.why_not(),
             "step_s": c.time.step, "time": c.time.as_dict(), "images_per_s": c.images_per_s,
             "simulated_peak_gib": sims.get(id(c)), "chosen": c is best, "runner_up": c is runner}
            for c in ranked]  # fmt: skip
    if kept:
        log.warning("%s exists: printed above, not replaced (--overwrite replaces it)", Path(args.out) / names[0])
    elif args.out != "-":
        write_results(args.out, {f"{name}.md": text, f"{name}.json": json.dumps(rows, indent=1)}, args.overwrite)
    return rows


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
