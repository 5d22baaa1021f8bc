"""The prepared GPU check: `make gpu-check` (`python -m benchmarks.gpu_check`).

One command that runs everything CUDA-only in `scale` on one GPU, within a time budget (8 minutes
by default), and exits non-zero on any failure:

1. environment: torch, CUDA, the device; packages the machine lacks (deepspeed, webdataset,
   braceexpand and their needs) installed from a folder of wheels (`make gpu-wheels` builds it,
   about 5 MB) into a private folder, nothing else touched;
2. `pytest -m gpu tests/gpu`: cross-rank BatchNorm against torch's SyncBatchNorm (fp32, bf16),
   optimizer parity on CUDA (fused vs foreach AdamW, foreach vs per-tensor Lamb, DeepSpeed's
   FusedLamb against its own arithmetic and its stated difference, apex FusedLAMB when installed),
   one-GPU training in bf16 and fp16 with save + resume, host syncs per step, the deepspeed
   launcher with ZeRO-1/2/3 in bf16 and fp16, ZeRO-3 against one GPU, DALI on the GPU (reported
   as skipped where DALI is not installed: its wheel is larger than a transfer to the lent GPU
   machine allows);
3. the throughput CLI for ViT-B/16, L/16, H/14 and BN-L/7 in bf16 (activation checkpointing for
   BN-L/7), its results written with date and device;
4. the side-by-side step (`benchmarks.throughput --compare`) for the same models in bf16: per-view
   vs joint views, eager vs compiled (BN-L/7: per view, eager vs compiled; joint views do not apply
   to a backbone with BatchNorm), which decides whether `--model.compile` becomes the GPU default.

Without CUDA every step runs as far as it can and reports what it skipped and why; the exit status
is then 0 unless something that can run on a CPU failed.

    make gpu-wheels                     # here, once: the wheels the GPU machine lacks -> wheels/
    make gpu-check                      # on the GPU machine (python3 -m benchmarks.gpu_check)
    python -m benchmarks.gpu_check --only pytest --out /tmp/check
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "gpu-check"
SITE = Path("/tmp/scale-gpu-site")
NEEDED = ("deepspeed", "webdataset", "braceexpand", "hjson", "pydantic")

# (model, images per GPU, activation checkpointing): the paper's runs on one H200 in bf16. BN-L/7
# (1,025 tokens) needs checkpointing to hold 32 images; the others fit without it.
THROUGHPUT = [
    ("vit_base", 128, False),
    ("vit_large", 64, False),
    ("vit_huge", 32, False),
    ("vit_bn_large_p7", 32, True),
]
STEPS = ("environment", "pytest", "throughput", "compare")
# Variants timed side by side per model (`benchmarks.throughput --compare`), first one the baseline.
COMPARE = {"vit_bn_large_p7": "per_view,per_view+compile"}
COMPARE_DEFAULT = "per_view,joint,joint+compile"


class Check:
    """Collects the outcome of each step: passed / failed / skipped, seconds, detail."""

    def __init__(self, budget_s: float):
        self.start, self.budget_s, self.rows = time.monotonic(), budget_s, []

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def add(self, name: str, status: str, seconds: float, detail: str = "") -> None:
        self.rows.append({"name": name, "status": status, "seconds": round(seconds, 1), "detail": detail})
        print(f"[gpu-check] {status.upper():7s} {name} ({seconds:.0f} s) {detail}", flush=True)

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == "failed"]


def cuda_device() -> str | None:
    import torch  # here and below: this script runs on bare GPU images, before its wheels are installed

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def install_wheels(wheels: Path) -> str:
    """Install the wheels in `wheels` into SITE when a needed package is missing; returns what was done."""
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if not missing:
        return "all needed packages present"
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        return f"missing {', '.join(missing)} and no wheels in {wheels} (make gpu-wheels)"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, found)]  # fmt: skip
    subprocess.run(cmd, check=True)
    sys.path.insert(0, str(SITE))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(SITE), str(ROOT), os.environ.get("PYTHONPATH", "")])
    importlib.invalidate_caches()
    still = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if still:
        raise RuntimeError(f"after installing {len(found)} wheels, still missing: {', '.join(still)}")
    return f"installed {len(found)} wheels for {', '.join(missing)} into {SITE}"


def environment(check: Check, args) -> dict:
    t = time.monotonic()
    import torch

    device = cuda_device() or f"CPU ({os.cpu_count()} cores), no CUDA"
    info = {"date": date.today().isoformat(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "device": device}  # fmt: skip
    try:
        info["packages"] = install_wheels(Path(args.wheels))
    except (subprocess.CalledProcessError, RuntimeError) as e:
        check.add("environment", "failed", time.monotonic() - t, f"wheels: {e}")
        return info
    for name in ("deepspeed", "webdataset", "nvidia.dali", "apex"):
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:
            spec = None
        info[name] = "present" if spec is not None else "absent"
    check.add("environment", "passed", time.monotonic() - t,
              f"{info['device']}; torch {info['torch']} (CUDA {info['cuda']}); {info['packages']}")  # fmt: skip
    return info


def run_pytest(check: Check, out: Path) -> None:
    t = time.monotonic()
    xml, log_path = out / "pytest-gpu.xml", out / "pytest-gpu.log"
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONUNBUFFERED": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/scale-torch-extensions")}  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-v", "-rs", "-p", "no:cacheprovider",
           f"--junitxml={xml}"]  # fmt: skip
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd.append("--timeout=240")  # one hung test must not take the whole budget
    # The log is written as it runs (kept if the budget stops it); pytest and everything it starts
    # (the deepspeed launcher's ranks) form one process group, stopped together.
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # fmt: skip
        try:
            returncode = proc.wait(timeout=max(30.0, check.left() - 60))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            passed = sum(" PASSED" in line for line in log_path.read_text().splitlines())
            check.add("pytest -m gpu tests/gpu", "failed", time.monotonic() - t,
                      f"stopped at the time budget after {passed} passed tests; see {log_path.name}")  # fmt: skip
            return
    for case in junit_cases(xml):
        check.add(f"  {case['name']}", case["status"], case["seconds"], case["detail"])
    lines = log_path.read_text().strip().splitlines()
    summary = lines[-1].strip("= ") if lines else f"exit {returncode}"
    check.add("pytest -m gpu tests/gpu", "passed" if returncode == 0 else "failed", time.monotonic() - t, summary)


def junit_cases(xml: Path) -> list[dict]:
    if not xml.is_file():
        return []
    cases = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        status, detail = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                status, detail = "failed", (child.get("message") or "")[:200]
            elif child.tag == "skipped":
                status, detail = "skipped", (child.get("message") or "")[:200]
        cases.append({"name": name, "status": status, "seconds": float(case.get("time", 0)), "detail": detail})
    return cases


def _run_cli(check: Check, name: str, args: list[str], ac: bool) -> bool:
    """Run `python -m benchmarks.throughput ARGS` within the budget; False (reported) when it failed."""
    t = time.monotonic()
    cmd = [sys.executable, "-m", "benchmarks.throughput", *args, *(["--activation-checkpointing"] if ac else [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=max(30.0, check.left() - 15), text=True,
                              capture_output=True)  # fmt: skip
    except subprocess.TimeoutExpired:
        check.add(name, "failed", time.monotonic() - t, "stopped at the time budget")
        return False
    if proc.returncode != 0:
        check.add(name, "failed", time.monotonic() - t, (proc.stderr.strip().splitlines() or ["?"])[-1][:200])
        return False
    return True


def run_throughput(check: Check, out: Path, steps: int) -> list[dict]:
    results = []
    if cuda_device() is None:
        for model, _, _ in THROUGHPUT:
            check.add(f"throughput {model} bf16", "skipped", 0.0, "needs CUDA (one GPU)")
        return results
    for model, batch, ac in THROUGHPUT:
        name = f"throughput {model} bf16 x{batch}{' AC' if ac else ''}"
        if check.left() < 45:
            check.add(name, "skipped", 0.0, "not run: the time budget is spent")
            continue
        t = time.monotonic()
        args = ["--model", model, "--batch-size", str(batch), "--precision", "bf16", "--warmup", "3",
                "--steps", str(steps), "--out", str(out)]  # fmt: skip
        if not _run_cli(check, name, args, ac):
            continue
        result = json.loads((out / f"throughput-{model}-single-1x.json").read_text())
        results.append(result)
        check.add(name, "passed", time.monotonic() - t,
                  f"{result['img_per_s_per_device']:.0f} img/s, {result['tflops_per_device']:.0f} TFLOP/s, "
                  f"MFU {100 * result['mfu']:.1f}%, peak {result['peak_mem_gib']:.1f} GiB")  # fmt: skip
    return results


def run_compare(check: Check, out: Path) -> list[dict]:
    """The side-by-side step of each model (in the throughput step's batch and checkpointing)."""
    results = []
    if cuda_device() is None:
        for model, _, _ in THROUGHPUT:
            check.add(f"compare {model} bf16", "skipped", 0.0, "needs CUDA (one GPU)")
        return results
    for model, batch, ac in THROUGHPUT:
        variants = COMPARE.get(model, COMPARE_DEFAULT)
        name = f"compare {model} bf16 x{batch}{' AC' if ac else ''}: {variants}"
        if check.left() < 90:
            check.add(name, "skipped", 0.0, "not run: the time budget is spent")
            continue
        t = time.monotonic()
        args = ["--model", model, "--batch-size", str(batch), "--precision", "bf16", "--compare", variants,
                "--rounds", "2", "--steps", "3", "--warmup", "2", "--out", str(out)]  # fmt: skip
        if not _run_cli(check, name, args, ac):
            continue
        result = json.loads((out / f"compare-{model}-single-1x.json").read_text())
        results.append(result)
        rows = result["variants"]
        losses = {r["first_loss"] for r in rows}
        spread = (max(losses) - min(losses)) / abs(min(losses))
        status = "passed" if spread < 1e-2 else "failed"  # bf16: the variants' first losses agree to 1%
        check.add(name, status, time.monotonic() - t,
                  "; ".join(f"{r['variant']} {r['img_per_s_per_device']:.0f} img/s (x{1 / r['ratio_to_first']:.2f})"
                            for r in rows) + f"; first losses within {100 * spread:.2f}%")  # fmt: skip
    return results


def write_summary(out: Path, info: dict, check: Check, throughput: list[dict]) -> None:
    counts = {s: sum(r["status"] == s for r in check.rows) for s in ("passed", "failed", "skipped")}
    data = {**info, "seconds": round(time.monotonic() - check.start, 1), "counts": counts, "steps": check.rows,
            "throughput": throughput}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(data, indent=1))
    lines = [f"# GPU check: {info['device']}", "",
             f"{info['date']}; Python {info['python']}, torch {info['torch']} (CUDA {info['cuda']}); "
             f"{data['seconds']:.0f} s. Made by `make gpu-check` (`python -m benchmarks.gpu_check`).", "",
             f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped.", "",
             "| step | status | s | detail |", "|---|---|---:|---|"]  # fmt: skip
    lines += [f"| {r['name'].strip()} | {r['status']} | {r['seconds']:.0f} | {r['detail'].replace('|', '/')} |"
              for r in check.rows]  # fmt: skip
    if throughput:
        lines += ["", "| model | img/s | TFLOP/s | MFU | peak memory |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['model']} x{r['batch_per_device']}{' AC' if r['activation_checkpointing'] else ''} | "
                  f"{r['img_per_s_per_device']:.0f} | {r['tflops_per_device']:.0f} | {100 * r['mfu']:.1f}% | "
                  f"{r['peak_mem_gib']:.1f} GiB |" for r in throughput]  # fmt: skip
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", default=str(ROOT / "wheels"), help="folder of wheels for missing packages")
    default_out = f"{RESULTS.relative_to(ROOT)} on a GPU, /tmp/scale-gpu-check without"
    parser.add_argument("--out", default=None, help=f"results folder (default: {default_out})")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole check")
    parser.add_argument("--only", action="append", choices=STEPS, help="run only these steps (repeatable)")
    parser.add_argument("--throughput-steps", type=int, default=8)
    args = parser.parse_args(argv)
    steps = set(args.only or STEPS) | {"environment"}
    check = Check(args.budget_s)
    info = environment(check, args)
    out = Path(args.out) if args.out else (RESULTS if cuda_device() else Path("/tmp/scale-gpu-check"))
    out.mkdir(parents=True, exist_ok=True)
    if not check.failed and "pytest" in steps:
        run_pytest(check, out)
    throughput = run_throughput(check, out, args.throughput_steps) if "throughput" in steps else []
    if "compare" in steps:
        run_compare(check, out)  # results in out/compare-*.md and the summary's rows
    write_summary(out, info, check, throughput)
    print(f"[gpu-check] {len(check.failed)} failed; summary in {out / 'summary.md'}", flush=True)
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
