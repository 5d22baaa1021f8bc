"""Scaling projection of MoCo v3 pretraining to N GPUs: `python -m benchmarks.scaling`.

    python -m benchmarks.scaling                                      # Table 3's models, H100, assumed MFU
    python -m benchmarks.scaling --from benchmarks/results/throughput-vit_base-single-1x.json
    python -m benchmarks.scaling --models vit_huge --gpu H200 --mfu 0.35 --inter-gbps 40

Per device and step at global batch B (4096), for each backend:

- compute: T_c = micro-batches x micro-batch x F / (peak x MFU), F = 16 x MACs per image
  (`scale.models.flops`, both views, momentum encoder included), or the per-image time measured by
  `benchmarks.throughput` (`--from`), scaled linearly with the images per device;
- communication, bytes each rank sends per step (ring collectives, f = (N-1)/N; g = 4 bytes per
  gradient element reduced (fp32, as configured), h = 2 bytes per bf16 parameter gathered, P / M =
  trainable / momentum-encoder parameters, A = micro-batches per step, V = encoder calls per
  micro-batch: 1 with joint views (plain ViTs, the default), 2 per view (ViT-BN, conv stem)):
    DDP      2 f g P                      (all-reduce once per step; no_sync on the others)
    ZeRO-1   f (g P + h P)                (reduce-scatter at the boundary + all-gather of the update)
    ZeRO-2   f (A g P + h P)              (reduce-scatter every micro-batch)
    ZeRO-3   f (A g P + 2 V A h P + V A h M)
    FSDP2    f (g P + 2 V A h P + V A h M)  (reshard_after_forward=true: the base encoder is gathered
             for each call's forward and again for its backward, the momentum encoder for each
             call; no reduce-scatter before the last micro-batch)
    FSDP2 (reshard_after_forward=false)   f (g P + A h P + V A h M)
  at the bus bandwidth of NVLink inside a node (N <= GPUs per node) or of the GPU's NIC across
  nodes, plus a latency per collective (alpha x ceil(log2 N); ZeRO-3/FSDP2 issue one per
  sharded unit and use).
- step time without overlap: T_c + T_comm; with overlap: max(T_c, T_comm) + T_comm / L (the first
  gather / last reduction of L units cannot be hidden).
- hours per 100 epochs = 100 x 1,281,167 / B x step time.

Printed beside Table 3 (TPU-v3 cores, hours per 100 epochs). Every assumption is an option and is
written into the output.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import torch

from benchmarks.paper import IMAGENET_TRAIN, PAPER_TABLE3_TPU, RESULTS
from scale.entry import run_cli
from scale.models import build_moco
from scale.models.flops import moco_training_flops

BACKENDS = ("ddp", "zero1", "zero2", "zero3", "fsdp", "fsdp-noreshard")
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
GPU_MEMORY_GIB = {"H100": 80.0, "H200": 141.0, "A100": 80.0}


@dataclass(frozen=True)
class Assumptions:
    gpu: str = "H100"
    mfu: float = 0.40
    """Model FLOPs utilisation of the compute (when not measured with --from)."""
    intra_gbps: float = 300.0
    """GB/s bus bandwidth per GPU inside a node (NVLink; NCCL all-reduce busbw reaches ~350-450)."""
    inter_gbps: float = 40.0
    """GB/s per GPU across nodes (one 400 Gb/s NIC per GPU at 80%)."""
    gpus_per_node: int = 8
    latency_us: float = 20.0
    """Per collective, per ring/tree hop level (x ceil(log2 N))."""
    micro_batch: int = 64
    """Largest micro-batch per device (activation memory); more images per device accumulate."""
    global_batch: int = 4096


@dataclass(frozen=True)
class ModelCost:
    name: str
    trainable: int
    momentum: int
    flops_per_image: float
    units: int
    """Sharded units per encoder (transformer blocks + the encoder itself)."""
    calls: int = 1
    """Encoder calls per micro-batch, V: 1 with joint views, 2 for per-view backbones (ViT-BN)."""


def model_cost(name: str) -> ModelCost:
    with torch.device("meta"):
        m = build_moco(name)
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    momentum = sum(p.numel() for p in m.momentum_encoder.parameters())
    cfg = m.base_encoder.cfg
    calls = 1 if m.joint_views else 2
    return ModelCost(name, trainable, momentum, moco_training_flops(cfg).total, cfg.depth + 1, calls)


def comm_bytes(backend: str, c: ModelCost, n: int, accum: int, g: int = 4, h: int = 2) -> float:
    """Bytes each rank sends per step (formulas in the module docstring)."""
    if n == 1:
        return 0.0
    f, P, M, A, V = (n - 1) / n, c.trainable, c.momentum, accum, c.calls
    return (
        f
        * {
            "ddp": 2 * g * P,
            "zero1": g * P + h * P,
            "zero2": A * g * P + h * P,
            "zero3": A * g * P + 2 * V * A * h * P + V * A * h * M,
            "fsdp": g * P + 2 * V * A * h * P + V * A * h * M,
            "fsdp-noreshard": g * P + A * h * P + V * A * h * M,
        }[backend]
    )


def collectives(backend: str, c: ModelCost, accum: int, bucket_bytes: float = 25 * 2**20) -> int:
    """Collectives per step (for the latency term)."""
    grads = math.ceil(4 * c.trainable / bucket_bytes)
    if backend == "ddp":
        return grads
    if backend in ("zero1", "zero2"):
        return grads * (accum if backend == "zero2" else 1) + math.ceil(2 * c.trainable / (4 * bucket_bytes))
    V = c.calls  # per unit and micro-batch: the base encoder's forward and backward, the momentum encoder's forward
    gathers = {"zero3": 3 * V, "fsdp": 3 * V, "fsdp-noreshard": 1 + V}[backend]
    return accum * c.units * gathers + c.units * (accum if backend == "zero3" else 1)


def project(c: ModelCost, backend: str, n: int, a: Assumptions, s_per_image: float | None = None) -> dict:
    per_device = a.global_batch // n
    accum = max(1, math.ceil(per_device / a.micro_batch))
    if s_per_image is None:
        s_per_image = c.flops_per_image / (GPU_PEAK_TFLOPS[a.gpu] * 1e12 * a.mfu)
    t_c = per_device * s_per_image
    bw = (a.intra_gbps if n <= a.gpus_per_node else a.inter_gbps) * 1e9
    volume = comm_bytes(backend, c, n, accum)
    t_comm = volume / bw + collectives(backend, c, accum) * a.latency_us * 1e-6 * max(1, math.ceil(math.log2(n)))
    steps_100 = 100 * IMAGENET_TRAIN / a.global_batch
    serial = t_c + t_comm
    overlapped = min(serial, max(t_c, t_comm) + t_comm / c.units)
    return {
        "model": c.name, "backend": backend, "gpus": n, "images_per_device": per_device, "accum": accum,
        "compute_s": t_c, "comm_gb_per_rank": volume / 1e9, "comm_s": t_comm,
        "step_s_no_overlap": serial, "step_s_overlap": overlapped,
        "hours_100ep_no_overlap": steps_100 * serial / 3600, "hours_100ep_overlap": steps_100 * overlapped / 3600,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vit_small,vit_base,vit_large,vit_huge")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--gpus", default="8,64,256,512,1024", help="device counts")
    p.add_argument("--from", dest="source", help="a benchmarks.throughput JSON: its measured time per image")
    for field, default in asdict(Assumptions()).items():
        p.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default)
    p.add_argument("--out", default=str(RESULTS), help="results directory ('-' for none)")
    args = p.parse_args(argv)
    a = Assumptions(**{k: getattr(args, k) for k in asdict(Assumptions())})
    s_per_image, measured = None, None
    if args.source:
        measured = json.loads(Path(args.source).read_text())
        s_per_image = 1.0 / measured["img_per_s_per_device"]
        args.models = measured["model"]
    rows = []
    for model in args.models.split(","):
        c = model_cost(model)
        for backend in args.backends.split(","):
            if backend not in BACKENDS:
                raise SystemExit(f"unknown backend {backend!r}: one of {', '.join(BACKENDS)}")
            rows += [project(c, backend, int(n), a, s_per_image) for n in args.gpus.split(",")]
    text = report(rows, a, measured)
    print(text)
    if args.out != "-":
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = "scaling" if measured is None else f"scaling-{Path(args.source).stem}"
        (out / f"{name}.md").write_text(text)
        (out / f"{name}.json").write_text(json.dumps({"assumptions": asdict(a), "rows": rows}, indent=1))
    return rows


def report(rows: list[dict], a: Assumptions, measured: dict | None) -> str:
    if measured:
        basis = (f"compute from the measured {measured['img_per_s_per_device']:.1f} img/s per device "
                 f"({measured['device']}, {measured['backend']}, {measured['date']})")  # fmt: skip
    else:
        basis = f"compute at an assumed {a.mfu:.0%} MFU of the {a.gpu}'s {GPU_PEAK_TFLOPS[a.gpu]:.0f} TFLOP/s bf16 peak"
    lines = [
        f"# Scaling projection: hours per 100 ImageNet epochs at global batch {a.global_batch}",
        "",
        f"{date.today().isoformat()}, made by `python -m benchmarks.scaling` (formulas in its docstring and "
        "docs/scaling.md). A projection, not a measurement. Assumptions: " + basis + f"; {a.gpus_per_node} GPUs per "
        f"node, {a.intra_gbps:.0f} GB/s per GPU inside a node, {a.inter_gbps:.0f} GB/s per GPU across nodes, "
        f"{a.latency_us:.0f} us x ceil(log2 N) per collective, micro-batch <= {a.micro_batch}.",
        "",
        "| model | backend | GPUs | img/GPU (x accum) | compute s | comm GB/rank | comm s | step s (overlap / none) "
        "| h per 100 ep (overlap / none) | Table 3 (TPU-v3 cores: h) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tpu = PAPER_TABLE3_TPU.get(r["model"])
        paper = f"{tpu[0]}: {tpu[1]}" if tpu and r["gpus"] == tpu[0] else ""
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['gpus']} | {r['images_per_device']} (x{r['accum']}) "
            f"| {r['compute_s']:.3f} | {r['comm_gb_per_rank']:.2f} | {r['comm_s']:.3f} "
            f"| {r['step_s_overlap']:.3f} / {r['step_s_no_overlap']:.3f} "
            f"| {r['hours_100ep_overlap']:.1f} / {r['hours_100ep_no_overlap']:.1f} | {paper} |"
        )
    return "\n".join(lines) + "\n"


def cli() -> None:
    """Command-line entry: one-line errors, `--debug` for the traceback."""
    run_cli(main)


if __name__ == "__main__":
    cli()
