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

Side by side (`--compare`): variants of the step built in one process and timed back to back,
round after round (a noisy machine slows all of them alike), with their ratios to the first:

    python -m benchmarks.throughput --model vit_small --batch-size 8 --precision fp32 \
        --compare reference,per_view,joint,joint+compile --rounds 3 --steps 2

    reference        MoCo v3's step written here from the paper's Algorithm 1, in plain eager PyTorch
                     (one forward per view and encoder, torch's default AdamW, a Python EMA loop)
    per_view, joint  scale's step with `--model.view_forward` set so
    ...+compile      with `--model.compile=true` (regional torch.compile of the blocks and heads)

All variants start from the same weights and batch: their first losses are printed, and must agree.
On a CPU the fp32 matmul peak is measured before and after, and `--profile` adds a torch.profiler
table of the first variant's step (where the time goes).
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
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from benchmarks.paper import ROOT, add_output_args, check_results, paper_view, write_results
from benchmarks.scaling import project_layout
from scale.arguments import NON_NEGATIVE, POSITIVE, Names, Parser
from scale.config import apply_overrides
from scale.entry import run_cli
from scale.errors import ConfigError
from scale.hardware.peaks import measured_cpu_peak, peak_memory_gib
from scale.models import is_resnet
from scale.parallel.ds_config import zero_stage
from scale.parallel.launch import init_distributed
from scale.recipes import get_recipe
from scale.train.parallelize import backbone_config, build_model
from scale.train.timing import Cluster, Layout
from scale.train.trainer import Trainer

BACKENDS = ["single", "ddp", "fsdp", *sorted(p.stem for p in (ROOT / "ds_configs").glob("zero*.json"))]
"""zeroN[_variant]: DeepSpeed with ds_configs/<name>.json (zero1 ... zero3_offload)."""


def overridden(args) -> bool:
    return any(getattr(args, k) is not None for k in ("patch_size", "embed_dim", "depth", "num_heads"))


def build_config(args, world_size: int, out_dir: str):
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
    # the paper's recipe of the family: AdamW and tau 0.2 for a ViT, LARS and tau 1.0 for a ResNet
    cfg = apply_overrides(get_recipe("r50_100ep" if is_resnet(args.model) else "vit_b_300ep"), over)
    try:  # the model's name and sizes, which the config leaves to the model layer
        backbone_config(cfg)
    except ValueError as e:
        raise ConfigError(f"--model {args.model}: {e}") from None
    return cfg


def measure(trainer, warmup: int, steps: int) -> dict:
    """Time `warmup` + `steps` real training steps, phase by phase."""
    b = trainer.backend
    sync = torch.cuda.synchronize if b.device.type == "cuda" else (lambda: None)
    if b.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(b.device)
    batches = iter(trainer.loader)
    lr, wd = trainer.derived.lr, trainer.cfg.optim.weight_decay
    if warmup:
        _phases(b, batches, lr, wd, warmup, sync, trainer.monitors)
    per_step, _ = _phases(b, batches, lr, wd, steps, sync, trainer.monitors)
    return {"step_s": sum(per_step.values()), "phases_s": per_step}


VARIANTS = ("reference", "per_view", "joint", "per_view+compile", "joint+compile")


def variant_overrides(variant: str) -> list[str]:
    """Config overrides of a scale variant ('per_view', 'joint', with '+compile')."""
    views, _, compiled = variant.partition("+")
    if views not in ("per_view", "joint") or compiled not in ("", "compile"):
        raise ValueError(f"unknown variant {variant!r}: one of {', '.join(VARIANTS)}")
    return [f"--model.view_forward={views}", f"--model.compile={'true' if compiled else 'false'}"]


class ReferenceStep:
    """MoCo v3's step as the paper's Algorithm 1 writes it, in plain eager PyTorch, on the same
    modules (same weights, same math) as scale's model: one forward per view and encoder, the
    contrastive loss, torch's AdamW with its defaults over all parameters, and the momentum update as
    the authors' loop over parameters. A yardstick for what scale's step adds or saves."""

    def __init__(self, cfg, device: torch.device, lr: float):
        torch.manual_seed(cfg.run.seed)  # the trainer's seed: the same initial weights
        model = build_model(cfg).to(device)
        self.f_q, self.g_q, self.f_k = model.base_encoder, model.predictor, model.momentum_encoder
        self.tau, self.device = cfg.model.temperature, device
        trained = [p for m in (self.f_q, self.g_q) for p in m.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=cfg.optim.weight_decay)
        self.pairs = list(zip(self.f_k.parameters(), self.f_q.parameters(), strict=True))

    def ctr(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q, k = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(k, dim=1)
        logits = q @ k.T / self.tau
        return torch.nn.functional.cross_entropy(logits, torch.arange(q.shape[0], device=q.device)) * 2 * self.tau

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        x1, x2 = x1.to(self.device), x2.to(self.device)
        q1, q2 = self.g_q(self.f_q(x1)), self.g_q(self.f_q(x2))
        with torch.no_grad():
            k1, k2 = self.f_k(x1), self.f_k(x2)
        return self.ctr(q1, k2) + self.ctr(q2, k1)

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def step(self, lr: float, weight_decay: float) -> None:
        self.optimizer.step()

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        for k, q in self.pairs:  # the authors' `param_m.data = param_m.data * m + param_b.data * (1. - m)`
            k.mul_(m).add_(q, alpha=1.0 - m)


def _phases(runner, batches, lr: float, weight_decay: float, steps: int, sync, monitors=None) -> tuple[dict, float]:
    """`steps` steps of `runner` (a Backend or a ReferenceStep), phase by phase; and the first loss.
    `monitors` (the trainer's `RunMonitors`) take each step as in training: without them the dense
    kNN monitor's features, tapped by every forward, would pile up."""
    phases = dict.fromkeys(("data", "forward", "backward", "optimizer", "momentum", "monitors"), 0.0)
    first = float("nan")
    for i in range(steps):
        t = [time.perf_counter()]
        x1, x2, labels = next(batches)
        t.append(time.perf_counter())
        loss = runner.forward(x1, x2)
        sync()
        t.append(time.perf_counter())
        runner.backward(loss)
        sync()
        t.append(time.perf_counter())
        runner.step(lr, weight_decay)
        sync()
        t.append(time.perf_counter())
        runner.momentum_update(0.99)
        sync()
        t.append(time.perf_counter())
        if monitors is not None:
            monitors.after_step(i + 1, [(x1, x2, labels)], None)
            sync()
        t.append(time.perf_counter())
        if i == 0:
            first = float(loss.detach())
        for k, start, end in zip(phases, t[:-1], t[1:], strict=True):
            phases[k] += end - start
    return {k: v / steps for k, v in phases.items()}, first


def compare(args, world: int, tmp: str) -> dict:
    """Build every variant of `args.compare`, then time them back to back for `args.rounds` rounds."""
    variants = list(args.compare)
    for v in variants:
        if v != "reference":
            variant_overrides(v)  # unknown names fail before anything is built
    if "reference" in variants and (world > 1 or args.backend != "single"):
        raise ValueError("the reference variant runs on one process: use --backend single, or leave it out")
    base_cfg = build_config(args, world, tmp)
    runners: dict[str, tuple] = {}
    first_trainer = None
    for v in variants:
        if v == "reference":
            continue
        cfg = apply_overrides(build_config(args, world, tmp), [*variant_overrides(v), f"--run.name={v}"])
        trainer = Trainer(cfg)
        first_trainer = first_trainer or trainer
        runners[v] = (trainer.backend, iter(trainer.loader), trainer.derived.lr, trainer.monitors)
    if "reference" in variants:
        template = first_trainer or Trainer(base_cfg)
        device, lr = template.backend.device, template.derived.lr
        runners["reference"] = (ReferenceStep(base_cfg, device, lr), iter(template.loader), lr, None)
        first_trainer = first_trainer or template
    b = first_trainer.backend
    sync = torch.cuda.synchronize if b.device.type == "cuda" else (lambda: None)
    cpu = b.device.type == "cpu"
    dtype = torch.bfloat16 if b.precision == "bf16" else torch.float32
    peaks = [measured_cpu_peak(dtype, 2048)] if cpu else []
    wd = base_cfg.optim.weight_decay
    losses, times = {}, {v: [] for v in variants}
    phases_sum = {v: {} for v in variants}
    for v in variants:  # warm-up: compilation, allocator, first-touch of the optimizer state
        runner, batches, lr, monitors = runners[v]
        _, losses[v] = _phases(runner, batches, lr, wd, args.warmup, sync, monitors)
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[::-1]  # ABBA: drifts of the machine cancel
        for v in order:
            runner, batches, lr, monitors = runners[v]
            phases, _ = _phases(runner, batches, lr, wd, args.steps, sync, monitors)
            times[v].append(sum(phases.values()))
            for k in phases:
                phases_sum[v][k] = phases_sum[v].get(k, 0.0) + phases[k] / args.rounds
        if b.is_main:
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{v} {times[v][-1]:.3f} s" for v in variants),
                  flush=True)  # fmt: skip
    if cpu:
        peaks.append(measured_cpu_peak(dtype, 2048))
    flops = first_trainer.flops_per_image
    peak = max(peaks) if cpu else first_trainer.peak_flops
    median = {v: sorted(times[v])[len(times[v]) // 2] for v in variants}  # over the rounds
    rows = []
    for v in variants:
        rate = args.batch_size / median[v]
        rows.append({"variant": v, "step_s": median[v], "step_s_rounds": times[v], "img_per_s_per_device": rate,
                     "tflops_per_device": rate * flops / 1e12, "fraction_of_peak": rate * flops / peak,
                     "first_loss": losses[v], "phases_s": phases_sum[v],
                     "ratio_to_first": median[v] / median[variants[0]]})  # fmt: skip
    result = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(b.device) if b.device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "world_size": world, "model": args.model, "img_size": args.img_size, "backend": b.describe(),
        "batch_per_device": args.batch_size, "activation_checkpointing": args.activation_checkpointing,
        "flops_per_image": flops, "rounds": args.rounds, "steps_per_round": args.steps, "warmup": args.warmup,
        "peak": (f"measured {str(dtype).split('.')[-1]} 2048^3 matmul peak, before / after: "
                 + " / ".join(f"{p / 1e9:.0f}" for p in peaks) + " GFLOP/s") if cpu
        else f"{first_trainer.peak_flops / 1e12:.1f} TFLOP/s ({first_trainer.peak_label})",
        "peak_flops": max(peaks) if cpu else first_trainer.peak_flops,
        "variants": rows,
    }  # fmt: skip
    if args.profile:
        v = variants[0]
        runner, batches, lr, monitors = runners[v]
        result["profile"] = {"variant": v, "table": profile_step(runner, batches, lr, wd, sync, b.device, monitors)}
    return result


def profile_step(runner, batches, lr: float, weight_decay: float, sync, device: torch.device, monitors=None,
                 rows: int = 25) -> str:  # fmt: skip
    """torch.profiler's table of one step, the operators sorted by their own time."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        _phases(runner, batches, lr, weight_decay, 1, sync, monitors)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def write_compare(result: dict, out: Path, overwrite: bool = False) -> Path:
    name = f"compare-{result['model']}-{result['backend'].split()[0]}-{result['world_size']}x"
    first = result["variants"][0]["variant"]
    lines = [
        f"# Side by side: {result['model']} ({result['img_size']} px), {result['backend']}",
        "",
        f"{result['date']}, {result['device']}, {result['world_size']} rank(s), batch {result['batch_per_device']} "
        f"per device, activation checkpointing {result['activation_checkpointing']}; {result['rounds']} rounds of "
        f"{result['steps_per_round']} steps per variant, back to back in one process, after {result['warmup']} "
        "warm-up steps each. Made by `python -m benchmarks.throughput --compare ...`.",
        "",
        f"| variant | step s (median) | vs {first} | img/s/device | TFLOP/s | of peak | first loss | forward "
        "| backward | optimizer | momentum | monitors | rounds (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["variants"]:
        p = r["phases_s"]
        lines.append(
            f"| {r['variant']} | {r['step_s']:.3f} | {r['ratio_to_first']:.3f} | {r['img_per_s_per_device']:.2f} "
            f"| {r['tflops_per_device']:.3f} | {100 * r['fraction_of_peak']:.1f}% | {r['first_loss']:.6f} "
            f"| {p['forward']:.3f} | {p['backward']:.3f} | {p['optimizer']:.3f} | {p['momentum']:.3f} "
            f"| {p['monitors']:.3f} | {', '.join(f'{t:.3f}' for t in r['step_s_rounds'])} |"
        )
    lines += ["", f"Peak: {result['peak']}. FLOPs per image: {result['flops_per_image'] / 1e9:.1f} G (16 x MACs "
              "of both views through the base encoder, the momentum encoder's forward, the heads)."]  # fmt: skip
    if "profile" in result:
        lines += ["", f"Profile of one `{result['profile']['variant']}` step (torch.profiler, by self time):", "",
                  "```", result["profile"]["table"], "```"]  # fmt: skip
    files = {f"{name}.json": json.dumps(result, indent=1), f"{name}.md": "\n".join(lines) + "\n"}
    return write_results(out, files, overwrite)[1]


def add_step_args(parser: argparse.ArgumentParser, batch_size: int = 32, steps: int = 10, workers: int = 4) -> None:
    """The options that define the measured training step (shared with benchmarks.memory)."""
    parser.add_argument("--model", default="vit_base", help="vit_small ... vit_bn_large_p7, resnet50")
    parser.add_argument("--img-size", type=POSITIVE, default=224)
    parser.add_argument("--batch-size", type=POSITIVE, default=batch_size, help="images per device")
    parser.add_argument("--backend", "--parallel", default="single", choices=BACKENDS,
                        help="zeroN[_variant]: DeepSpeed with ds_configs/<name>.json")  # fmt: skip
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument(
        "--activation-checkpointing",
        nargs="?",
        const="true",
        default="false",
        choices=["false", "true", "selective"],
        help="recompute every block (true) or its cheap ops",
    )
    parser.add_argument("--data", default="synthetic", help="'synthetic' or a data source as for training")
    parser.add_argument("--workers", type=NON_NEGATIVE, default=workers)
    parser.add_argument("--warmup", type=NON_NEGATIVE, default=3)
    parser.add_argument("--steps", type=POSITIVE, default=steps)
    parser.add_argument("--patch-size", type=POSITIVE)
    parser.add_argument("--embed-dim", type=POSITIVE)
    parser.add_argument("--depth", type=POSITIVE)
    parser.add_argument("--num-heads", type=POSITIVE)
    parser.add_argument("--dim", type=POSITIVE, default=256)
    parser.add_argument("--mlp-dim", type=POSITIVE, default=4096)
    parser.add_argument("--set", action="append", default=[], metavar="--SECTION.FIELD=VALUE",
                        help="another config override, e.g. --set=--optim.implementation=torch-fused")  # fmt: skip
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    add_output_args(parser)


def launched_world() -> int:
    """The world size the launcher set (1 without one): known before any process group exists."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def result_name(kind: str, args, world: int, backend: str | None = None) -> str:
    """`kind`-MODEL-BACKEND-Nx: BACKEND is the backend's own name (`describe()`'s first word), or
    before it exists the one the arguments give."""
    backend = backend or ("deepspeed" if args.backend.startswith("zero") else args.backend)
    return f"{kind}-{args.model}-{backend}-{world}x"


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m benchmarks.throughput", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_step_args(p)
    p.add_argument(
        "--compare", type=Names(VARIANTS), help=f"side by side: comma-separated variants of {', '.join(VARIANTS)}"
    )
    p.add_argument("--rounds", type=POSITIVE, default=3, help="--compare: rounds of --steps steps per variant")
    p.add_argument("--profile", action="store_true", help="--compare: profile one step of the first variant")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    # Before any process group, model or measurement: the configuration, and results that would be replaced.
    build_config(args, launched_world(), "/nonexistent")
    if args.compare and "reference" in args.compare and (launched_world() > 1 or args.backend != "single"):
        raise ValueError("--compare: the reference variant runs on one process: use --backend single, or leave it out")
    check_results(args.out, [f"{result_name('compare' if args.compare else 'throughput', args, launched_world())}"
                             f".{ext}" for ext in ("json", "md")], args.overwrite)  # fmt: skip

    init_distributed()
    world = dist.get_world_size() if dist.is_initialized() else 1
    try:
        if args.compare:
            with tempfile.TemporaryDirectory(prefix="scale-compare-") as tmp:
                result = compare(args, world, tmp)
            if (not dist.is_initialized() or dist.get_rank() == 0) and args.out != "-":
                print(write_compare(result, Path(args.out), args.overwrite).read_text())
            return result
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
                write(result, Path(args.out), args.overwrite)
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def projection(result: dict, args) -> list[dict]:
    """This run's layout projected to N GPUs at global batch 4096 with `scale.train.timing` (its
    default network): at the MFU measured here when this is a GPU, else at the assumed 40%."""
    cfg = build_config(args, 1, "/nonexistent")
    if args.backend.startswith("zero"):
        backend = f"zero{zero_stage(cfg.parallel.deepspeed_config)}"
    elif args.backend == "fsdp":
        backend = "fsdp" if cfg.parallel.reshard_after_forward else "fsdp-noreshard"
    else:
        backend = "ddp"
    mfu = result["mfu"] if result["device"].startswith("cuda") or "NVIDIA" in result["device"] else 0.40
    rows = []
    for n in (8, 64, 256, 1024):
        per_gpu = 4096 // n
        micro = min(per_gpu, result["batch_per_device"])
        recompute = {"true": True, "selective": "selective"}.get(str(result["activation_checkpointing"]).lower(), False)
        layout = Layout(backend, recompute, per_gpu, micro)
        planned = apply_overrides(cfg, ["--batch.global_batch_size=4096"])
        rows.append({**project_layout(planned, layout, Cluster(n, mfu=mfu)), "mfu": mfu})
    return rows


def write(result: dict, out: Path, overwrite: bool = False) -> None:
    name = f"throughput-{result['model']}-{result['backend'].split()[0]}-{result['world_size']}x"
    p = result["phases_s"]
    lines = [
        f"# Throughput: {result['model']} ({result['img_size']} px), {result['backend']}",
        "",
        f"{result['date']}, {result['device']}, {result['world_size']} rank(s), batch {result['batch_per_device']} "
        f"per device, activation checkpointing {result['activation_checkpointing']}.",
        "Made by `python -m benchmarks.throughput`.",
        "",
        "| img/s/device | TFLOP/s/device | MFU | peak memory | data | forward | backward | optimizer | momentum "
        "| monitors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {result['img_per_s_per_device']:.1f} | {result['tflops_per_device']:.3f} | {100 * result['mfu']:.1f}% "
        f"| {result['peak_mem_gib']:.2f} GiB | {p['data']:.3f} s | {p['forward']:.3f} s | {p['backward']:.3f} s "
        f"| {p['optimizer']:.3f} s | {p['momentum']:.3f} s | {p['monitors']:.3f} s |",
        "",
        f"MFU against {result['peak']}.",
    ]
    mfu = result["projection"][0]["mfu"] if result["projection"] else 0.4
    lines += ["", f"Projected to N H100s at global batch 4096 (`scale.train.timing`, its default network; {mfu:.0%} "
              "MFU: measured here on a GPU, else assumed):", "",
              "| GPUs | img/GPU (x accum) | compute s | exposed communication s | step s | h per 100 epochs |",
              "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in result["projection"]:
        lines.append(f"| {r['gpus']} | {r['images_per_device']} (x{r['accum']}) | {r['compute_s']:.3f} | "
                     f"{r['exposed_comm_s']:.3f} | {r['step_s']:.3f} | {r['hours_100ep']:.2f} |")  # fmt: skip
    if result["paper_table3"]:
        t = result["paper_table3"]
        lines += ["", f"Paper Table 3 ({t['tpu_cores']} TPU-v3 cores, {t['hours_per_100_epochs']} h per 100 epochs): "
                  f"{t['img_per_s_per_core']:.1f} img/s and {t['tflops_per_core']:.1f} TFLOP/s per core."]  # fmt: skip
    write_results(out, {f"{name}.json": json.dumps(result, indent=1), f"{name}.md": "\n".join(lines) + "\n"}, overwrite)


def cli() -> None:
    """Console-script entry (`scale-throughput`): exit status 0 on success."""
    run_cli(main)


if __name__ == "__main__":
    cli()
