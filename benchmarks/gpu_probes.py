"""The measurements of the GPU check (`benchmarks.gpu_check`), one per command, each writing
`OUT/NAME.json` (and its traces) and run by the check in its own process with a time budget:

    python -m benchmarks.gpu_probes ceilings --out DIR      # versions, bf16 matmul, copies
    python -m benchmarks.gpu_probes step --out DIR          # ViT-B/16, the real training step
    python -m benchmarks.gpu_probes memory --out DIR        # ViT-H/14 peak memory vs the estimate
    python -m benchmarks.gpu_probes batchnorm --out DIR     # cross-rank BatchNorm variants, 2 ranks
    python -m benchmarks.gpu_probes drift --out DIR         # ViT-S on each backend, 50 bf16 steps

Every probe needs CUDA; without it the check reports them as skipped without starting them.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.paper import ROOT
from scale.arguments import POSITIVE, Parser
from scale.config import apply_overrides
from scale.errors import BackendError
from scale.models.moco import build_mlp
from scale.parallel.sync_batchnorm import convert_sync_batchnorm
from scale.recipes import get_recipe
from scale.train.memory import estimate
from scale.train.trainer import Trainer

GIB = 2**30
PROBES = ("ceilings", "step", "memory", "batchnorm", "drift")


def _config(recipe: str, out_dir: str, name: str, batch: int, *extra: str):
    """A recipe on synthetic data at `batch` images on one process, bf16, quiet."""
    return apply_overrides(get_recipe(recipe), [
        "--data.source=synthetic", f"--batch.global_batch_size={batch}", "--parallel.precision=bf16",
        f"--run.output_dir={out_dir}", f"--run.name={name}", "--run.progress=false", "--run.tensorboard=false",
        "--run.log_every=1000", "--data.eval_source=", "--data.knn_train_source=", "--schedule.epochs=100",
        *extra,
    ])  # fmt: skip


def _events_ms(start: torch.cuda.Event, end: torch.cuda.Event) -> float:
    return start.elapsed_time(end)


@contextlib.contextmanager
def _host_syncs():
    """Counts what `torch.cuda.set_sync_debug_mode('warn')` reports inside the block."""
    found: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found += [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]


# ----------------------------------------------------------------------------- the probes


def ceilings(out: Path) -> dict:
    """Versions, and what the GPU reaches: a bf16 8192^3 matmul (TFLOP/s), a device copy and a
    pinned host-to-device copy (GB/s): the ceilings MFU and the data path are read against."""
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    result = {"device": torch.cuda.get_device_name(dev), "capability": list(torch.cuda.get_device_capability(dev)),
              "memory_gib": props.total_memory / GIB, "python": platform.python_version(), "torch": torch.__version__,
              "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}  # fmt: skip
    for name in ("deepspeed", "timm", "webdataset"):
        with contextlib.suppress(ImportError):
            result[name] = __import__(name).__version__
    n = 8192
    a, b = torch.randn(n, n, device=dev, dtype=torch.bfloat16), torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    result["bf16_matmul_tflops"] = _best(lambda: a @ b, 2 * n**3 / 1e12)
    big = torch.empty(GIB // 2, dtype=torch.uint8, device=dev)
    other = torch.empty_like(big)
    result["device_copy_gbs"] = _best(lambda: other.copy_(big), 2 * big.numel() / 1e9)  # read + write
    host = torch.empty(GIB // 4, dtype=torch.uint8).pin_memory()
    target = torch.empty(host.numel(), dtype=torch.uint8, device=dev)
    result["h2d_pinned_gbs"] = _best(lambda: target.copy_(host, non_blocking=True), host.numel() / 1e9)
    return result


def _best(fn, work: float, repeats: int = 10) -> float:
    """`work` per second of `fn` at its best of `repeats` timed runs (CUDA events), after a warm-up."""
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, _events_ms(start, end) / 1e3)
    return work / best


def step(out: Path, model: str = "vit_b_300ep", batch: int = 128, steps: int = 20) -> dict:
    """ViT-B/16 through the real training step (the trainer's `train_step`, bf16, synthetic pinned
    batches): GPU time per step (CUDA events), CPU time per step (the host's dispatch, no sync),
    kernels per step, host syncs per step, and a 2-step profiler trace (Chrome format); then
    ResNet-50 (its recipe: LARS, channels-last) the same way at 128 images, under "r50"."""
    result = _step(out, model, batch, steps, "trace-step.json")
    result["r50"] = _step(out, "r50_100ep", 128, 10, "trace-step-r50.json")
    return result


def _step(out: Path, model: str, batch: int, steps: int, trace_name: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(_config(model, tmp, "step", batch))
        batch_ = next(iter(trainer.loader))
        for _ in range(3):  # warm-up: allocator, kernels, optimizer state
            trainer.train_step([batch_])
        torch.cuda.synchronize()
        gpu_ms, cpu_ms = [], []
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t = time.perf_counter()
            start.record()
            trainer.train_step([batch_])
            end.record()
            cpu_ms.append(1e3 * (time.perf_counter() - t))
            end.synchronize()
            gpu_ms.append(_events_ms(start, end))
        with _host_syncs() as syncs:
            for _ in range(2):
                trainer.train_step([batch_])
            torch.cuda.synchronize()
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(2):
                trainer.train_step([batch_])
            torch.cuda.synchronize()
        trace = out / trace_name
        prof.export_chrome_trace(str(trace))
        with open(trace, "rb") as f, gzip.open(f"{trace}.gz", "wb") as g:
            shutil.copyfileobj(f, g)
        trace.unlink()
        kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        gpu_ms.sort()
        img_per_s = batch / (gpu_ms[len(gpu_ms) // 2] / 1e3)
        median = gpu_ms[len(gpu_ms) // 2]
        return {"model": trainer.cfg.model.name, "batch": batch, "steps": steps, "gpu_ms_median": median,
                "gpu_ms_min": gpu_ms[0], "cpu_ms_median": sorted(cpu_ms)[len(cpu_ms) // 2],
                "img_per_s": img_per_s, "mfu": img_per_s * trainer.flops_per_image / trainer.peak_flops,
                "kernels_per_step": kernels / 2, "host_syncs_per_step": len(syncs) / 2, "host_syncs": syncs[:10],
                "backend": trainer.backend.describe(), "trace": trace.name + ".gz"}  # fmt: skip


MEMORY_CASES = [  # (name, extra overrides): ViT-H/14 at the recipe's 64 images per GPU, one process
    ("single", []),
    ("single+AC", ["--parallel.activation_checkpointing=true"]),
    ("single+SAC", ["--parallel.activation_checkpointing=selective"]),
    ("zero2", ["--parallel.backend=deepspeed", f"--parallel.deepspeed_config={ROOT / 'ds_configs' / 'zero2.json'}"]),
    ("zero3", ["--parallel.backend=deepspeed", f"--parallel.deepspeed_config={ROOT / 'ds_configs' / 'zero3.json'}"]),
]


def memory(out: Path, batch: int = 64) -> dict:
    """ViT-H/14 at its recipe's per-GPU batch (slurm/vit_h_300ep.sh: 64) in one process, with full,
    selective and no activation checkpointing, and one-rank ZeRO-2/3: the peak memory of three real steps
    beside `check_memory`'s estimate, on which the SLURM scripts' sizes rest. Each in a process of its
    own (a fresh allocator)."""
    rows = []
    for name, _ in MEMORY_CASES:
        cmd = [sys.executable, "-m", "benchmarks.gpu_probes", "memory-one", "--out", str(out), "--case", name,
               "--batch", str(batch)]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
        path = out / f"memory-{name}.json"
        if proc.returncode == 0 and path.is_file():
            rows.append(json.loads(path.read_text()))
        else:
            rows.append({"case": name, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]})
    return {"model": "vit_huge", "batch": batch, "cases": rows}


def memory_one(out: Path, case: str, batch: int) -> dict:
    extra = dict(MEMORY_CASES)[case]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config("vit_h_300ep", tmp, case, batch, "--parallel.skip_memory_check=true", *extra)
        try:
            trainer = Trainer(cfg)
        except BackendError as e:
            result = {"case": case, "error": str(e)}
        else:
            est = estimate(cfg, trainer.backend, batch)
            b = next(iter(trainer.loader))
            for _ in range(3):
                trainer.train_step([b])
            torch.cuda.synchronize()
            result = {"case": case, "estimate_gib": est.total / GIB, "estimate_state_gib": est.model_state / GIB,
                      "estimate_activations_gib": est.activations / GIB,
                      "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
                      "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
                      "device_gib": est.available / GIB}  # fmt: skip
    (out / f"memory-{case}.json").write_text(json.dumps(result, indent=1))
    return result


def _bn_rank(rank: int, world: int, init_file: str, variant: str, out: str) -> None:
    """One of two gloo ranks on the one GPU: the heads' MLP (BatchNorm after every Linear) in forward
    and backward over both views, with scale's cross-rank BatchNorm or torch's SyncBatchNorm."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.cuda.set_device(0)
    torch.manual_seed(0)
    head = build_mlp(3, 768, 4096, 256).cuda()
    convert = convert_sync_batchnorm if variant == "scale" else torch.nn.SyncBatchNorm.convert_sync_batchnorm
    head = convert(head)
    x = torch.randn(2 * 128, 768, device="cuda", requires_grad=True)  # both views of 128 images

    def once():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = head(x, views=2) if variant == "scale" else torch.cat([head(v) for v in x.chunk(2)])
        y.float().square().mean().backward()

    for _ in range(3):
        once()
    torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    with _host_syncs() as syncs:
        for _ in range(10):
            once()
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 10
    if rank == 0:
        Path(out).write_text(json.dumps({"variant": variant, "ms_per_step": 1e3 * seconds,
                                         "host_syncs_per_step": len(syncs) / 10}))  # fmt: skip
    dist.destroy_process_group()


def batchnorm(out: Path) -> dict:
    """Two gloo ranks sharing the GPU: the heads with each cross-rank BatchNorm, host syncs and time
    per forward and backward (torch's SyncBatchNorm reads a count on the host per call)."""
    rows = []
    for variant in ("scale", "torch"):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "result.json"
            mp.spawn(_bn_rank, args=(2, str(Path(tmp) / "rdzv"), variant, str(path)), nprocs=2, join=True)
            rows.append(json.loads(path.read_text()))
    return {"batch_per_rank": 128, "views": 2, "variants": rows}


DRIFT_BACKENDS = {  # overrides, one rank each
    "single": [],
    "fsdp": ["--parallel.backend=fsdp"],
    "zero2": ["--parallel.backend=deepspeed", f"--parallel.deepspeed_config={ROOT / 'ds_configs' / 'zero2.json'}"],
    "zero3": ["--parallel.backend=deepspeed", f"--parallel.deepspeed_config={ROOT / 'ds_configs' / 'zero3.json'}"],
}


def drift(out: Path, steps: int = 50, batch: int = 64) -> dict:
    """ViT-S/16, 50 steps in bf16 at a realistic learning rate (the recipe's lr for batch 4096, no
    warm-up) on one process, one-rank FSDP2 and one-rank ZeRO-2/3: the losses and the momentum
    encoder's movement side by side (an EMA applied twice moves it 1.99x as far)."""
    rows = {}
    for name in DRIFT_BACKENDS:
        cmd = [sys.executable, "-m", "benchmarks.gpu_probes", "drift-one", "--out", str(out), "--case", name,
               "--batch", str(batch), "--steps", str(steps)]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
        path = out / f"drift-{name}.json"
        rows[name] = json.loads(path.read_text()) if proc.returncode == 0 and path.is_file() else {
            "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}  # fmt: skip
    ref = rows.get("single", {})
    for row in rows.values():
        if "losses" in row and "losses" in ref:
            row["max_loss_rel_diff"] = max(
                abs(a - b) / abs(b) for a, b in zip(row["losses"], ref["losses"], strict=True)
            )
            row["drift_ratio"] = row["momentum_drift"] / ref["momentum_drift"]
    return {"model": "vit_small", "steps": steps, "batch": batch, "backends": rows}


def drift_one(out: Path, case: str, batch: int, steps: int) -> dict:
    if case == "fsdp":  # FSDP2 runs over a process group: one rank, in memory
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config("vit_s_300ep", tmp, case, batch, "--schedule.warmup_epochs=0", f"--schedule.max_steps={steps}",
                      "--run.log_every=1", *DRIFT_BACKENDS[case])  # fmt: skip
        cfg.optim.base_lr = 1.5e-4 * 4096 / batch  # the recipe's lr (batch 4096: 2.4e-3) at this batch
        trainer = Trainer(cfg)
        start = {k: v.detach().float().cpu().clone() for k, v in trainer.backend.full_state_dict().items()
                 if k.startswith("momentum_encoder.")}  # fmt: skip
        trainer.fit()
        end = {k: v.float() for k, v in trainer.backend.full_state_dict().items() if k in start}
        rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in rows if "loss" in r]
        moved = torch.cat([(end[k] - start[k]).flatten() for k in start]).norm().item()
        result = {"case": case, "backend": trainer.backend.describe(), "losses": losses, "momentum_drift": moved}
    if not dist.is_initialized() or dist.get_rank() == 0:
        (out / f"drift-{case}.json").write_text(json.dumps(result, indent=1))
    return result


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "PYTHONUNBUFFERED": "1"}  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m benchmarks.gpu_probes", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("probe", choices=[*PROBES, "memory-one", "drift-one"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--case", default="")
    p.add_argument("--batch", type=POSITIVE, default=64)
    p.add_argument("--steps", type=POSITIVE, default=50)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not torch.cuda.is_available():
        print(f"{args.probe}: needs CUDA", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.probe == "memory-one":
        memory_one(args.out, args.case, args.batch)
        return 0
    if args.probe == "drift-one":
        drift_one(args.out, args.case, args.batch, args.steps)
        return 0
    result = {"ceilings": ceilings, "step": step, "memory": memory, "batchnorm": batchnorm, "drift": drift}[args.probe](
        args.out
    )
    (args.out / f"{args.probe}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
