"""Memory per rank of the real MoCo v3 training step, per backend: `python -m benchmarks.memory`
(also `scale-memory`).

    python -m benchmarks.memory                                    # ViT-B and ViT-L sweep, 2 ranks
    python -m benchmarks.memory --models vit_huge --backends ddp,zero3,zero3_lowmem,fsdp --precision bf16 \\
        --batch-size 1 --ac on --headroom 0.95 --set=--optim.implementation=torch-fused \\
        --name memory-vit_huge                                     # the ViT-H/14 headline
    python -m benchmarks.memory --models vit_base --backends zero2 --nproc 2 --ac off --steps 3

For every (model, backend, activation checkpointing) it first predicts the peak memory of all ranks
from the theoretical model state (`scale.parallel.memory.state_bytes`), the activations and a measured
per-process runtime overhead, and refuses, with the numbers, what would not fit in this machine's
available memory (a GPU's memory when there is one). Otherwise it launches the ranks (torchrun),
builds the trainer of `scale.train` (the same backend, model and optimizer as training) and runs
real steps on every rank.

After a warm-up step (optimizers create their state in the first), each measured step records
(the last one is reported):

- state: live bytes right after the backward (the most over the step's micro-batches): parameters,
  gradients, optimizer state, the momentum encoder, the backend's own buffers (activations are freed),
  above the bytes live before the trainer was built. On a CPU, live bytes are glibc's heap in use
  (mallinfo2: arena + mmapped chunks, where every torch CPU tensor lives); on a GPU,
  torch.cuda.memory_allocated.
- activations: live bytes after the forward minus before it (what the backward will use).
- peak live: the highest live bytes during the step above that baseline (model state +
  activations + transient buffers; sampled every 2 ms on a CPU, exact on a GPU).
- peak: the process's peak resident memory (VmHWM, reset before the measured step, after handing
  freed heap back with malloc_trim) on a CPU, torch.cuda.max_memory_reserved on a GPU.

JSON and a markdown table go to benchmarks/results/memory-*.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.memprobe import LivePeak, live_bytes, peak_bytes, reset_peak, rss_bytes
from benchmarks.paper import ROOT, check_results, write_results
from benchmarks.throughput import BACKENDS, add_step_args, build_config
from scale.arguments import FILE_NAME, FRACTION, POSITIVE, Names, Parser
from scale.config import apply_overrides
from scale.entry import run_cli
from scale.models import RESNET_PRESETS, VIT_ALIASES, VIT_PRESETS
from scale.parallel.ds_config import load_ds_json, zero_section, zero_stage
from scale.parallel.launch import init_distributed
from scale.parallel.memory import state_bytes, zero_persistent_buffer_bytes
from scale.train.memory import activation_bytes, count_params
from scale.train.parallelize import backbone_config
from scale.train.trainer import Trainer

GIB = 2**30
MODELS = (*sorted(VIT_PRESETS), *VIT_ALIASES, *RESNET_PRESETS)
# Resident memory of one rank before its trainer is built (python, torch, deepspeed, gloo),
# measured on this machine (about 0.6 GiB); used only to predict the peak before launching.
RUNTIME_OVERHEAD = 1.0 * GIB
# Resident memory above the live bytes during a step (allocator fragmentation, buffers outside the
# heap), as a fraction of the step's live bytes: up to 24% measured on ViT-B/L (FSDP2, ZeRO-3).
SLACK = 0.25
# A run is stopped if the host's available memory falls below this while it runs.
GUARD_FLOOR = 1.0 * GIB


# ---------------------------------------------------------------------------------- theory


def backend_kind(backend: str) -> tuple[str, int]:
    """('ddp'|'fsdp'|'deepspeed'|'single', ZeRO stage); zero* names are ds_configs/<name>.json."""
    if backend.startswith("zero"):
        return "deepspeed", zero_stage(ROOT / "ds_configs" / f"{backend}.json")
    return backend, 0


def config(args, world: int, out_dir: str):
    """The training config of the measured step (benchmarks.throughput's), with accumulation."""
    cfg = build_config(args, world, out_dir)
    if args.accum > 1:
        cfg = apply_overrides(cfg, [f"--batch.global_batch_size={args.batch_size * world * args.accum}",
                                    f"--batch.grad_accum_steps={args.accum}"])  # fmt: skip
    return cfg


def predict(args, backend: str, ac: bool, precision: str, world: int) -> dict:
    """Theoretical bytes per rank and the predicted peak of the whole machine."""
    a = argparse.Namespace(**{**vars(args), "backend": backend, "activation_checkpointing": ac})
    cfg = config(a, world, "/nonexistent")
    trainable, momentum = count_params(cfg)
    kind, stage = backend_kind(backend)
    buffers, transient = 0.0, 0.0
    if kind == "deepspeed":
        buffers = zero_persistent_buffer_bytes(load_ds_json(cfg.parallel.deepspeed_config), precision, args.accum)
        transient = transient_bucket_bytes(cfg.parallel.deepspeed_config, trainable, precision)
        transient += gathered_parameter_bytes(cfg.parallel.deepspeed_config, trainable + momentum, precision)
    state = state_bytes(kind, trainable, momentum, world, precision, args.accum, stage=stage, buffers=buffers)
    if cfg.optim.implementation != "torch-fused" and not torch.cuda.is_available():
        # foreach AdamW: about two temporaries of the fp32 parameters it updates (this rank's part)
        transient += 2 * 4 * trainable / (1 if kind in ("ddp", "single") else world)
    act = activation_bytes(backbone_config(cfg), args.batch_size, precision, ac)
    # The model is built whole (fp32) on every rank before it is sharded.
    build = 4 * (trainable + momentum)
    per_rank = RUNTIME_OVERHEAD + max(build, (1 + SLACK) * (sum(state.values()) + act + transient))
    return {"trainable": trainable, "momentum": momentum, "theory": state, "theory_activations": act,
            "transient": transient, "predicted_peak_per_rank": per_rank}  # fmt: skip


def transient_bucket_bytes(ds_config: str, trainable: int, precision: str) -> float:
    """ZeRO-1/2's gradient buckets during a backward (two with overlap_comm). On a CPU only the
    pages the gradients touch become resident, so at most the gradients' size is counted there."""
    zero = zero_section(load_ds_json(ds_config))
    if int(zero.get("stage", 0)) >= 3 or not zero.get("contiguous_gradients", True):
        return 0.0
    n = 2 if zero.get("overlap_comm", False) else 1
    bucket = float(zero.get("reduce_bucket_size", 500_000_000))
    if not torch.cuda.is_available():
        bucket = min(bucket, trainable)
    return n * bucket * 4  # fp32 staging under ZeRO-1; an upper bound for ZeRO-2's


def gathered_parameter_bytes(ds_config: str, params: int, precision: str) -> float:
    """ZeRO-3 keeps gathered parameters that will be used again soon (stage3_max_reuse_distance)
    up to stage3_max_live_parameters elements: with the large defaults both encoders stay gathered
    between their two views (measured on ViT-B/L: the base encoder from the first forward to the
    backward, the momentum encoder across its two forwards)."""
    zero = zero_section(load_ds_json(ds_config))
    if int(zero.get("stage", 0)) < 3:
        return 0.0
    width = 2 if precision in ("bf16", "fp16") else 4
    return min(float(zero.get("stage3_max_live_parameters", 1e9)), params) * width


# ---------------------------------------------------------------------------------- one run


def worker(args) -> None:
    """One rank of one configuration (under torchrun)."""
    init_distributed()
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    base = live_bytes(device)
    rss0 = rss_bytes()
    with tempfile.TemporaryDirectory(prefix="scale-memory-") as tmp:
        trainer = Trainer(config(args, world, tmp))
        b = trainer.backend
        after_setup = live_bytes(device)
        batches = iter(trainer.loader)
        for step in range(1 + args.steps):  # a warm-up step first: optimizer state exists after it
            reset_peak(device)
            state = activations = 0
            micro = []
            with LivePeak(device) as live_peak:
                for j in range(args.accum):
                    x1, x2, labels = next(batches)
                    micro.append((x1, x2, labels))
                    last = j == args.accum - 1
                    with b.gradient_sync(last):
                        before = live_bytes(device)
                        loss = b.forward(x1, x2)
                        activations = max(activations, live_bytes(device) - before)
                        b.backward(loss, args.accum, last)
                        del loss
                        state = max(state, live_bytes(device) - base)
                b.step(trainer.derived.lr, trainer.cfg.optim.weight_decay)
                b.momentum_update(0.99)
                # As the trainer: the monitors take the step (else every forward's features, tapped
                # for the dense kNN monitor, stay alive and are counted).
                trainer.monitors.after_step(step + 1, micro, None)
            after_step = live_bytes(device)
            peak = peak_bytes(device)
    row = {
        "rank": b.rank,
        "setup": after_setup - base,
        "state": state,
        "activations": activations,
        "between_steps": after_step - base,
        "peak": peak,
        "peak_live": live_peak.peak - base,
        "runtime_rss": rss0,
        "params_held": b.local_numel(b.module.base_encoder) + b.local_numel(b.module.predictor)
        if hasattr(b, "local_numel")
        else None,
    }
    rows = [None] * world
    if world > 1:
        dist.all_gather_object(rows, row)
    else:
        rows = [row]
    if b.is_main:
        Path(args.result).write_text(json.dumps({"description": b.describe(), "ranks": rows}))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    # Leave without interpreter teardown: a library thread still joinable at exit (seen once under
    # FSDP2 with activation checkpointing on gloo) aborts the process after the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def available_memory(nproc: int) -> float:
    """Bytes all ranks together may use: the host's MemAvailable, or the GPUs' memory."""
    if torch.cuda.is_available():
        return float(sum(torch.cuda.get_device_properties(i).total_memory for i in range(nproc)))
    info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()}
    return float(info["MemAvailable"])


def run_one(args, backend: str, ac: bool, precision: str) -> dict:
    world = args.nproc
    pred = predict(args, backend, ac, precision, world)
    row = {"model": args.model, "img_size": args.img_size, "backend": backend, "activation_checkpointing": ac,
           "precision": precision, "world_size": world, "batch_per_device": args.batch_size, "accum": args.accum,
           **pred}  # fmt: skip
    need = pred["predicted_peak_per_rank"] * (1 if torch.cuda.is_available() else world)
    settle()
    avail = available_memory(world) / (world if torch.cuda.is_available() else 1)
    if need > args.headroom * avail:
        row["refused"] = (
            f"predicted peak {need / GIB:.1f} GiB ({world} ranks x {pred['predicted_peak_per_rank'] / GIB:.1f} GiB: "
            f"(state {sum(pred['theory'].values()) / GIB:.1f} + activations {pred['theory_activations'] / GIB:.1f} "
            f"+ buffers {pred['transient'] / GIB:.1f}) x {1 + SLACK:.2f} + runtime {RUNTIME_OVERHEAD / GIB:.1f}) "
            f"> {args.headroom:.0%} of {avail / GIB:.1f} GiB available"
        )
        print(f"[memory] {args.model} {backend} ac={ac}: refused, {row['refused']}", flush=True)
        return row
    with tempfile.TemporaryDirectory(prefix="scale-memory-run-") as tmp:
        result = Path(tmp) / "result.json"
        worker_argv = ["--worker", "--result", str(result), "--backend", backend, "--precision", precision,
                       *(["--activation-checkpointing"] if ac else []), *step_argv(args)]  # fmt: skip
        launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={world}", f"--master_port={free_port()}"]
        cmd = [sys.executable, *(launcher if world > 1 else []), "-m", "benchmarks.memory", *worker_argv]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world))}
        # Large blocks from mmap, handed back to the OS when freed: resident memory follows the
        # live bytes instead of keeping glibc's freed heap (no effect on results).
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
        start = time.perf_counter()
        print(f"[memory] {args.model} {backend} ac={ac} {precision}: {' '.join(cmd[1:])}", flush=True)
        returncode, output, low = guarded_run(cmd, env, Path(tmp) / "log.txt")
        row["wall_s"] = time.perf_counter() - start
        row["min_available_gib"] = low / GIB
        if returncode != 0 or not result.exists():
            tail = output[-3000:]
            row["error"] = f"exit {returncode}: {tail}"
            print(f"[memory] failed:\n{tail}", flush=True)
            return row
        measured = json.loads(result.read_text())
    row.update(measured)
    r0 = measured["ranks"][0]
    print(
        f"[memory]   state {r0['state'] / GIB:.2f} GiB (theory {sum(pred['theory'].values()) / GIB:.2f}), "
        f"activations {r0['activations'] / GIB:.2f} GiB, peak live {r0['peak_live'] / GIB:.2f} GiB, "
        f"peak resident {r0['peak'] / GIB:.2f} GiB per rank, "
        f"{row['wall_s']:.0f} s",
        flush=True,
    )
    return row


def settle(timeout: float = 60.0) -> None:
    """Wait until the memory of earlier (killed) ranks has been given back: available memory
    stops rising (within 64 MiB over a second), or `timeout` seconds."""
    if torch.cuda.is_available():
        return
    end, last = time.monotonic() + timeout, available_memory(1)
    while time.monotonic() < end:
        time.sleep(1.0)
        now = available_memory(1)
        if now - last < 64 * 2**20:
            return
        last = now


def guarded_run(cmd: list[str], env: dict, log: Path, floor: float = GUARD_FLOOR) -> tuple[int, str, float]:
    """Run the ranks; stop them (SIGKILL to the process group) if the host's available memory falls
    under `floor`, so that a prediction that was too low cannot take the machine down.
    Returns (exit status, output, the lowest available memory seen)."""
    low = float("inf")
    with open(log, "w+") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=Path(__file__).resolve().parents[1], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        while proc.poll() is None:
            avail = available_memory(1) if not torch.cuda.is_available() else float("inf")
            low = min(low, avail)
            if avail < floor:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                out.write(f"\n[memory] stopped: available memory fell to {avail / GIB:.1f} GiB\n")
                break
            time.sleep(0.2)
        out.seek(0)
        return proc.returncode, out.read(), low


def step_argv(args) -> list[str]:
    out = ["--model", args.model, "--img-size", str(args.img_size), "--batch-size", str(args.batch_size),
           "--steps", str(args.steps), "--accum", str(args.accum), *[f"--set={x}" for x in args.set],
           "--dim", str(args.dim), "--mlp-dim", str(args.mlp_dim)]  # fmt: skip
    for key in ("patch_size", "embed_dim", "depth", "num_heads"):
        if getattr(args, key) is not None:
            out += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return out


# ---------------------------------------------------------------------------------- report


def write(rows: list[dict], out: Path, name: str, overwrite: bool = False) -> None:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    command = " ".join(["python -m benchmarks.memory", *sys.argv[1:]])
    meta = {"date": date.today().isoformat(), "device": device, "command": command}
    lines = [
        "# Memory per rank of the MoCo v3 training step",
        "",
        f"{meta['date']}, {device}. Made by `{meta['command']}`.",
        "",
        "Theory: bytes per rank of parameters + gradients + optimizer state (incl. fp32 masters) + momentum "
        "encoder + persistent buckets (`scale.parallel.memory.state_bytes`, docs/scaling.md). Measured on rank 0 "
        "(the ranks agree): live bytes after the backward above those before the trainer was built (state), "
        "after the forward minus before it (activations), the highest live bytes during the step above that "
        "baseline (peak live: model state + activations + transient buffers; sampled every 2 ms on a CPU), "
        "and the process's peak resident memory (peak RSS, with the ~0.6 GiB runtime; on a GPU the "
        "allocator's peak reserved memory).",
        "",
        "| model | px | backend | AC | precision | batch/rank x accum | params (M) | theory state | measured state "
        "| measured / theory | activations (theory / measured) | peak live | peak RSS |",
        "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        theory = sum(r["theory"].values())
        ac = "on" if r["activation_checkpointing"] else "off"
        head = (f"| {r['model']} | {r['img_size']} | {r['backend']} | {ac} "
                f"| {r['precision']} | {r['batch_per_device']} x {r.get('accum', 1)} | {r['trainable'] / 1e6:.1f} "
                f"| {theory / GIB:.2f} GiB |")  # fmt: skip
        if "refused" in r or "error" in r:
            why = r.get("refused") or "failed: " + r["error"].splitlines()[0]
            lines.append(f"{head} not run: {why} | | | | |")
            continue
        x = r["ranks"][0]
        lines.append(
            f"{head} {x['state'] / GIB:.2f} GiB | {x['state'] / theory:.2f} "
            f"| {r['theory_activations'] / GIB:.2f} / {x['activations'] / GIB:.2f} GiB "
            f"| {x['peak_live'] / GIB:.2f} GiB | {x['peak'] / GIB:.2f} GiB |"
        )
    files = {f"{name}.json": json.dumps({**meta, "rows": rows}, indent=1), f"{name}.md": "\n".join(lines) + "\n"}
    write_results(out, files, overwrite)


def row_key(r: dict) -> tuple:
    return (r["model"], r["img_size"], r["backend"], r["activation_checkpointing"], r["precision"], r["world_size"],
            r["batch_per_device"], r.get("accum", 1))  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m benchmarks.memory", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_step_args(p, batch_size=2, steps=1, workers=0)
    p.add_argument("--models", type=Names(MODELS), default="vit_base,vit_large", help="comma-separated model names")
    p.add_argument("--backends", type=Names([b for b in BACKENDS if b != "single"]),
                   default="ddp,zero1,zero2,zero3,fsdp", help="comma-separated: ddp zero1-3 fsdp")  # fmt: skip
    p.add_argument("--ac", default="both", choices=["on", "off", "both"], help="activation checkpointing")
    p.add_argument("--accum", type=POSITIVE, default=1, help="micro-batches accumulated per step")
    p.add_argument("--nproc", type=POSITIVE, default=2, help="ranks on this machine")
    p.add_argument("--headroom", type=FRACTION, default=0.9, help="fraction of available memory a run may use")
    p.add_argument("--name", type=FILE_NAME, default="memory", help="results file name (without extension)")
    p.add_argument("--keep", action="store_true",
                   help="reuse the measured rows of an earlier run of this --name (and replace its files)")  # fmt: skip
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p


def parse(argv):
    args = parser().parse_args(argv)
    if args.precision == "auto":
        args.precision = "bf16" if torch.cuda.is_available() else "fp32"
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Every configuration, then the results. Exit status 1 when one failed (a refusal, predicted
    not to fit, is a result, not a failure). Existing results are replaced only with --overwrite or
    --keep, and never by a sweep with a failed configuration (its rows are printed as they run)."""
    args = parse(argv)
    if args.worker:
        worker(args)  # does not return

    configs = [(m, b, ac) for m in args.models for b in args.backends
               for ac in {"on": [True], "off": [False], "both": [False, True]}[args.ac]]  # fmt: skip
    # Before any rank is launched: every configuration is valid, and the results may be written.
    for model, backend, ac in configs:
        a = argparse.Namespace(**{**vars(args), "model": model, "backend": backend, "activation_checkpointing": ac})
        config(a, args.nproc, "/nonexistent")
    names = [f"{args.name}.json", f"{args.name}.md"]
    check_results(args.out, names, args.overwrite or args.keep)
    done = {}
    previous = Path(args.out) / f"{args.name}.json"
    if args.keep and args.out != "-" and previous.exists():
        try:
            done = {row_key(r): r for r in json.loads(previous.read_text())["rows"] if "ranks" in r}
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"--keep: {previous} is not a results file of benchmarks.memory ({e})") from None
    rows = []
    for model, backend, ac in configs:
        args.model = model
        key = (model, args.img_size, backend, ac, args.precision, args.nproc, args.batch_size, args.accum)
        if key in done:
            print(f"[memory] {model} {backend} ac={ac}: kept from {previous}", flush=True)
            rows.append(done[key])
        else:
            rows.append(run_one(args, backend, ac, args.precision))
    failed = [f"{r['model']} {r['backend']} ac={'on' if r['activation_checkpointing'] else 'off'}"
              for r in rows if "error" in r]  # fmt: skip
    if args.out != "-":
        target = Path(args.out) / f"{args.name}.md"
        if failed and any((Path(args.out) / n).exists() for n in names):
            print(f"[memory] not written: {target} and its .json are left as they were, since "
                  f"{len(failed)} configuration(s) failed", flush=True)  # fmt: skip
        else:
            write(rows, Path(args.out), args.name, args.overwrite or args.keep)
            print(f"[memory] wrote {target}", flush=True)
    if failed:
        raise SystemExit(f"error: {len(failed)} of {len(rows)} configurations failed: {', '.join(failed)} (their "
                         "output is above)")  # fmt: skip
    return rows


def cli() -> None:
    """Console-script entry (`scale-memory`)."""
    run_cli(main)


if __name__ == "__main__":
    cli()
