"""Scaling projection of MoCo v3 pretraining to 8-1,024 GPUs beside Table 3: `python -m benchmarks.scaling`.

    python -m benchmarks.scaling                                   # ViT-S/B/L/H, ViT-BN-L/7; H100 80 GiB
    python -m benchmarks.scaling --models vit_huge --gpus 256,512,1024 --gpu-memory 80
    python -m benchmarks.scaling --measured benchmarks/results/gpu-check/summary.json   # a measured MFU

For each model and GPU count at global batch 4096: every layout of the planner
(`scale.train.planner`: DDP, FSDP2 with and without resharding, ZeRO-1/2/3, with and without
activation checkpointing, each micro-batch) timed by `scale.train.timing` (the collectives of
`scale.train.traffic`, which `benchmarks.simulate` checks against the real code at fake ranks, on a
hierarchical network with ring latency linear in N; overlap only where the schedule allows it; the
optimizer and momentum update from their bytes; launch overhead), the fastest layout of each
backend that fits, and the planner's choice, in hours per 100 epochs, beside Table 3 (TPU-v3) and
the paper's 29.4 hours for ViT-H 300 epochs on 512 TPU cores. A projection, not a measurement:
every constant is an option and is written into the output (docs/scaling.md gives their sources).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from datetime import date

from benchmarks.paper import IMAGENET_TRAIN, PAPER_TABLE3_TPU, add_output_args, check_results, write_results
from benchmarks.plan import add_cluster_args, cluster_from_args, model_config
from scale.arguments import POSITIVE, Names, NumberList, Parser
from scale.entry import run_cli
from scale.train.planner import GIB, best_and_runner_up, candidates
from scale.train.timing import Cluster, Layout, step_time
from scale.train.traffic import BACKENDS, meta_model

MODELS = ("vit_small", "vit_base", "vit_large", "vit_huge", "vit_bn_large_p7")
PAPER_VIT_H_300EP = (512, 29.4)
"""The paper: ViT-H, 300 epochs on 512 TPU-v3 cores in 29.4 hours (Table 3: 9.8 h per 100 epochs)."""


def hours(step_s: float, global_batch: int, epochs: int = 100) -> float:
    return epochs * IMAGENET_TRAIN / global_batch * step_s / 3600


def project_model(model: str, gpus: int, cluster: Cluster, global_batch: int = 4096) -> dict:
    """The best layout per backend and the planner's choice for `model` on `gpus` GPUs."""
    cfg = model_config(model, gpus, global_batch)
    ranked = candidates(cfg, cluster, model=meta_model(cfg))
    best, runner = best_and_runner_up(ranked)
    per_backend = {}
    for backend in BACKENDS:
        fitting = [c for c in ranked if c.layout.backend == backend and c.fits]
        c = fitting[0] if fitting else None
        per_backend[backend] = None if c is None else {
            "layout": c.layout.describe(), "step_s": c.time.step, "images_per_s": c.images_per_s,
            "hours_100ep": hours(c.time.step, global_batch), "memory_gib": c.memory["total"] / GIB,
            "compute_s": c.time.compute, "exposed_comm_s": c.time.exposed_comm, "optimizer_s": c.time.optimizer,
            "host_s": c.time.host,
        }  # fmt: skip
    return {"model": model, "gpus": gpus, "images_per_gpu": global_batch // gpus, "backends": per_backend,
            "chosen": best.layout.describe() if best else None, "chosen_backend": best.layout.backend if best else None,
            "chosen_hours_100ep": hours(best.time.step, global_batch) if best else None,
            "runner_up": runner.layout.describe() if runner else None}  # fmt: skip


def project_layout(cfg, layout: Layout, cluster: Cluster) -> dict:
    """One layout's projection (`benchmarks.throughput` projects its measured run with it)."""
    t = step_time(meta_model(cfg), cfg, layout, cluster)
    return {"gpus": cluster.gpus, "images_per_device": layout.images_per_gpu, "accum": layout.accum,
            "step_s": t.step, "compute_s": t.compute, "exposed_comm_s": t.exposed_comm,
            "hours_100ep": hours(t.step, layout.images_per_gpu * cluster.gpus)}  # fmt: skip


def report(rows: list[dict], cluster: Cluster, global_batch: int) -> str:
    mfu = f"{cluster.mfu:.0%} MFU " + (f"measured ({cluster.measured})" if cluster.measured else "assumed")
    lines = [
        f"# Scaling projection: hours per 100 ImageNet epochs at global batch {global_batch}",
        "",
        f"{date.today().isoformat()}, made by `python -m benchmarks.scaling` (scale/train/timing.py, "
        "docs/scaling.md). A projection, not a measurement. "
        f"{cluster.gpu}, {cluster.memory_bytes / GIB:.0f} GiB; {mfu}; {cluster.gpus_per_node} GPUs per node, "
        f"NVLink {cluster.nvlink_gbps:.0f} GB/s bus bandwidth, {cluster.nic_gbps:.0f} GB/s NIC per GPU at "
        f"{cluster.nic_efficiency:.0%}; ring step {cluster.hop_us_nvlink} us in a node, {cluster.hop_us_ib} us "
        f"across; {cluster.launch_us} us per kernel launch. Each backend's cell: its fastest layout that fits "
        "(recompute and micro-batch chosen), '-' when none fits.",
        "",
        "| model | GPUs | img/GPU | " + " | ".join(BACKENDS) + " | planner's choice | Table 3 (TPU-v3 cores: h) |",
        "|---|---:|---:|" + "---:|" * len(BACKENDS) + "---|---|",
    ]
    for r in rows:
        cells = []
        for b in BACKENDS:
            x = r["backends"][b]
            cells.append("-" if x is None else f"{x['hours_100ep']:.2f}")
        tpu = PAPER_TABLE3_TPU.get(r["model"])
        paper = f"{tpu[0]}: {tpu[1]}" if tpu and r["gpus"] == tpu[0] else ""
        chosen = f"{r['chosen']} ({r['chosen_hours_100ep']:.2f} h)" if r["chosen"] else "nothing fits"
        lines.append(f"| {r['model']} | {r['gpus']} | {r['images_per_gpu']} | " + " | ".join(cells)
                     + f" | {chosen} | {paper} |")  # fmt: skip
    h = next((r for r in rows if r["model"] == "vit_huge" and r["gpus"] == PAPER_VIT_H_300EP[0]), None)
    if h and h["chosen"]:
        lines += ["", f"ViT-H, 300 epochs on {PAPER_VIT_H_300EP[0]} GPUs: {3 * h['chosen_hours_100ep']:.1f} hours "
                  f"projected ({h['chosen']}); the paper: {PAPER_VIT_H_300EP[1]} hours on {PAPER_VIT_H_300EP[0]} "
                  "TPU-v3 cores."]  # fmt: skip
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m benchmarks.scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Names(MODELS), default=",".join(MODELS))
    p.add_argument("--gpus", type=NumberList(POSITIVE), default="8,64,256,512,1024", help="GPU counts")
    p.add_argument("--global-batch", type=POSITIVE, default=4096)
    add_cluster_args(p)
    add_output_args(p)
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    p = parser()
    args = p.parse_args(argv)
    uneven = [g for g in args.gpus if args.global_batch % g]
    if uneven:
        p.error(f"argument --gpus: --global-batch {args.global_batch} does not split over {uneven[0]} GPUs")
    check_results(args.out, ["scaling.md", "scaling.json"], args.overwrite)
    rows = []
    for model in args.models:
        for n in args.gpus:
            rows.append(project_model(model, n, cluster_from_args(args, n), args.global_batch))
            print(f"{model} x{n}: {rows[-1]['chosen']}", flush=True)
    cluster = cluster_from_args(args, 8)
    text = report(rows, cluster, args.global_batch)
    print(text)
    if args.out != "-":
        files = {"scaling.md": text, "scaling.json": json.dumps({"cluster": asdict(cluster), "rows": rows}, indent=1)}
        write_results(args.out, files, args.overwrite)
    return rows


def cli() -> None:
    """Command-line entry: one-line errors, `--debug` for the traceback."""
    run_cli(main)


if __name__ == "__main__":
    cli()
