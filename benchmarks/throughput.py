"""Training throughput of the real MoCo v3 step: `python -m benchmarks.throughput` (also
`scale-throughput`), under torchrun or the deepspeed launcher like training.

    python -m benchmarks.throughput --model vit_base --batch-size 64 --backend single --precision bf16
    torchrun --nproc_per_node 8 -m benchmarks.throughput --model vit_huge --backend fsdp --batch-size 8
    deepspeed -m benchmarks.throughput --model vit_huge --backend zero3 --batch-size 8

It builds the trainer of `scale.train` (same backend, model, optimizer, data path) and times warm-up
and timed steps, phase by phase: data, forward, backward, optimizer, momentum update (each phase is
closed by a device synchronisation, so phases do not overlap here; the step total is their sum).
Reports per device: images/s, TFLOP/s (16 x MACs per image plus heads; recomputation under
activation checkpointing not counted), MFU against the device's dense peak in the precision the
matmuls run in (on a CPU, against a matmul peak measured here, labelled as such), peak memory;
and the paper's Table 3 converted to images/s and TFLOP/s per TPU-v3 core. JSON and markdown go to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from scale.models.flops import PAPER_TABLE3_GMACS

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
IMAGENET_TRAIN = 1_281_167
# Paper Table 3: TPU-v3 devices (cores) and hours per 100 ImageNet epochs.
PAPER_TABLE3_TPU = {"vit_small": (256, 1.2), "vit_base": (256, 2.1), "vit_large": (256, 6.1), "vit_huge": (512, 9.8)}


def paper_view(model: str) -> dict | None:
    """Table 3 as images/s and TFLOP/s per TPU core (16 x MACs per image)."""
    if model not in PAPER_TABLE3_TPU:
        return None
    cores, hours = PAPER_TABLE3_TPU[model]
    img_per_s = IMAGENET_TRAIN * 100 / (hours * 3600 * cores)
    return {"tpu_cores": cores, "hours_per_100_epochs": hours, "img_per_s_per_core": img_per_s,
            "tflops_per_core": img_per_s * 16 * PAPER_TABLE3_GMACS[model] * 1e9 / 1e12}  # fmt: skip


def overridden(args) -> bool:
    return any(getattr(args, k) is not None for k in ("patch_size", "embed_dim", "depth", "num_heads"))


def build_config(args, world_size: int, out_dir: str):
    from scale.config import apply_overrides
    from scale.recipes import get_recipe

    over = [
        f"--model.name={args.model}", f"--model.img_size={args.img_size}", f"--data.source={args.data}",
        f"--batch.global_batch_size={args.batch_size * world_size}", f"--parallel.precision={args.precision}",
        f"--parallel.activation_checkpointing={args.activation_checkpointing}", "--schedule.epochs=100",
        "--schedule.warmup_epochs=1", f"--run.output_dir={out_dir}", "--run.name=throughput",
        "--run.progress=false", "--run.tensorboard=false", "--data.eval_source=", "--data.knn_train_source=",
        f"--data.num_workers={args.workers}", f"--model.dim={args.dim}", f"--model.mlp_dim={args.mlp_dim}",
    ]  # fmt: skip
    for key in ("patch_size", "embed_dim", "depth", "num_heads"):
        if getattr(args, key) is not None:
            over.append(f"--model.{key}={getattr(args, key)}")
    over += getattr(args, "set", [])
    if args.backend.startswith("zero"):
        over += [
            "--parallel.backend=deepspeed",
            f"--parallel.deepspeed_config={ROOT / 'ds_configs' / args.backend}.json",
        ]
    else:
        over.append(f"--parallel.backend={args.backend}")
    return apply_overrides(get_recipe("vit_b_300ep"), over)


def measure(trainer, warmup: int, steps: int) -> dict:
    """Time `warmup` + `steps` real training steps, phase by phase."""
    b = trainer.backend
    sync = torch.cuda.synchronize if b.device.type == "cuda" else (lambda: None)
    if b.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(b.device)
    phases = dict.fromkeys(("data", "forward", "backward", "optimizer", "momentum"), 0.0)
    batches = iter(trainer.loader)
    d = trainer.derived
    for i in range(warmup + steps):
        t = [time.perf_counter()]
        x1, x2, _ = next(batches)
        t.append(time.perf_counter())
        loss = b.forward(x1, x2)
        sync()
        t.append(time.perf_counter())
        b.backward(loss)
        sync()
        t.append(time.perf_counter())
        b.step(d.lr, trainer.cfg.optim.weight_decay)
        sync()
        t.append(time.perf_counter())
        b.momentum_update(0.99)
        sync()
        t.append(time.perf_counter())
        if i >= warmup:
            for k, start, end in zip(phases, t[:-1], t[1:], strict=True):
                phases[k] += end - start
    per_step = {k: v / steps for k, v in phases.items()}
    return {"step_s": sum(per_step.values()), "phases_s": per_step}


def add_step_args(parser: argparse.ArgumentParser, batch_size: int = 32, steps: int = 10, workers: int = 4) -> None:
    """The options that define the measured training step (shared with benchmarks.memory)."""
    parser.add_argument("--model", default="vit_base", help="any build_vit name (vit_small ... vit_bn_large_p7)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=batch_size, help="images per device")
    zero = sorted(p.stem for p in (ROOT / "ds_configs").glob("zero*.json"))  # zero1 ... zero3_offload
    parser.add_argument("--backend", "--parallel", default="single", choices=["single", "ddp", "fsdp", *zero],
                        help="zeroN[_variant]: DeepSpeed with ds_configs/<name>.json")  # fmt: skip
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--data", default="synthetic", help="'synthetic' or a data source as for training")
    parser.add_argument("--workers", type=int, default=workers)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--patch-size", type=int)
    parser.add_argument("--embed-dim", type=int)
    parser.add_argument("--depth", type=int)
    parser.add_argument("--num-heads", type=int)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--mlp-dim", type=int, default=4096)
    parser.add_argument("--set", action="append", default=[], metavar="--SECTION.FIELD=VALUE",
                        help="another config override, e.g. --set=--optim.implementation=torch-fused")  # fmt: skip
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS), help="results directory ('-' for none)")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(parser)
    args = parser.parse_args(argv)

    import torch.distributed as dist

    from scale.parallel.launch import init_distributed
    from scale.train.metrics import peak_memory_gib
    from scale.train.trainer import Trainer

    init_distributed()
    world = dist.get_world_size() if dist.is_initialized() else 1
    try:
        with tempfile.TemporaryDirectory(prefix="scale-throughput-") as tmp:
            trainer = Trainer(build_config(args, world, tmp))
            timing = measure(trainer, args.warmup, args.steps)
        b = trainer.backend
        img_per_s = args.batch_size / timing["step_s"]
        tflops = img_per_s * trainer.flops_per_image / 1e12
        result = {
            "date": date.today().isoformat(),
            "device": torch.cuda.get_device_name(b.device)
            if b.device.type == "cuda"
            else f"CPU ({os.cpu_count()} cores)",
            "world_size": world,
            "model": args.model,
            "img_size": args.img_size,
            "backend": trainer.backend.describe(),
            "activation_checkpointing": args.activation_checkpointing,
            "batch_per_device": args.batch_size,
            "flops_per_image": trainer.flops_per_image,
            "img_per_s_per_device": img_per_s,
            "tflops_per_device": tflops,
            "mfu": tflops * 1e12 / trainer.peak_flops,
            "peak": f"{trainer.peak_flops / 1e12:.2f} TFLOP/s ({trainer.peak_label})",
            "peak_mem_gib": peak_memory_gib(b.device),
            **timing,
            # Table 3 is for the paper's configurations only (224 px, no size overrides).
            "paper_table3": paper_view(args.model) if args.img_size == 224 and not overridden(args) else None,
        }
        result["projection"] = projection(result, args)
        if b.is_main:
            print(json.dumps(result, indent=1))
            if args.out != "-":
                write(result, Path(args.out))
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def projection(result: dict, args) -> list[dict]:
    """This device's measured time per image projected to N devices at global batch 4096 with
    `benchmarks.scaling`'s communication model (its default interconnect assumptions)."""
    from benchmarks.scaling import Assumptions, ModelCost, project
    from scale.train.memory import count_params, resolve_vit

    cfg = build_config(args, 1, "/nonexistent")
    cost = ModelCost(args.model, *count_params(cfg), result["flops_per_image"], resolve_vit(cfg).depth + 1)
    backend = {"single": "ddp", "ddp": "ddp"}.get(args.backend, args.backend)
    return [project(cost, backend, n, Assumptions(), 1.0 / result["img_per_s_per_device"]) for n in (8, 64, 256, 1024)]


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    name = f"throughput-{result['model']}-{result['backend'].split()[0]}-{result['world_size']}x"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    p = result["phases_s"]
    lines = [
        f"# Throughput: {result['model']} ({result['img_size']} px), {result['backend']}",
        "",
        f"{result['date']}, {result['device']}, {result['world_size']} rank(s), batch {result['batch_per_device']} "
        f"per device, activation checkpointing {result['activation_checkpointing']}.",
        "Made by `python -m benchmarks.throughput`.",
        "",
        "| img/s/device | TFLOP/s/device | MFU | peak memory | data | forward | backward | optimizer | momentum |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {result['img_per_s_per_device']:.1f} | {result['tflops_per_device']:.3f} | {100 * result['mfu']:.1f}% "
        f"| {result['peak_mem_gib']:.2f} GiB | {p['data']:.3f} s | {p['forward']:.3f} s | {p['backward']:.3f} s "
        f"| {p['optimizer']:.3f} s | {p['momentum']:.3f} s |",
        "",
        f"MFU against {result['peak']}.",
    ]
    lines += ["", "Projected to N devices at global batch 4096 (`benchmarks.scaling`, its default interconnect "
              "assumptions; this device's time per image):", "",
              "| devices | img/device (x accum) | step s (overlap / none) | h per 100 epochs (overlap / none) |",
              "|---:|---:|---:|---:|"]  # fmt: skip
    for r in result["projection"]:
        lines.append(f"| {r['gpus']} | {r['images_per_device']} (x{r['accum']}) | {r['step_s_overlap']:.2f} / "
                     f"{r['step_s_no_overlap']:.2f} | {r['hours_100ep_overlap']:.1f} / "
                     f"{r['hours_100ep_no_overlap']:.1f} |")  # fmt: skip
    if result["paper_table3"]:
        t = result["paper_table3"]
        lines += ["", f"Paper Table 3 ({t['tpu_cores']} TPU-v3 cores, {t['hours_per_100_epochs']} h per 100 epochs): "
                  f"{t['img_per_s_per_core']:.1f} img/s and {t['tflops_per_core']:.1f} TFLOP/s per core."]  # fmt: skip
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def cli() -> None:
    """Console-script entry (`scale-throughput`): exit status 0 on success."""
    from scale.entry import run_cli

    run_cli(main)


if __name__ == "__main__":
    cli()
