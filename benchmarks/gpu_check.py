"""The GPU check: `make gpu-check` (`python -m benchmarks.gpu_check`).

One command that measures what only a GPU can show, most informative first, each measurement with a
time budget of its own inside the whole check's (9 minutes by default, for a machine lent for ten),
and exits non-zero on any failure:

1. environment: torch, CUDA, the device; the packages the machine lacks (deepspeed, webdataset,
   braceexpand and their needs) installed from a folder of wheels (`make gpu-wheels`, about 5 MB)
   into a new folder of this run that only its user can read or write (never a fixed /tmp name that
   another user of a shared node could plant first), nothing else touched: a needed package missing
   with no wheel is a failure;
2. ceilings: versions, the bf16 8192^3 matmul and the device and pinned host copies;
3. step: ViT-B/16 through the real training step for 20 steps (CUDA-event times, CPU time per
   step, kernels per step, host syncs counted, a 2-step profiler trace), then ResNet-50 (LARS,
   channels-last) for 10;
4. memory: ViT-H/14 at its recipe's 64 images per GPU in one process, with and without activation
   checkpointing, and one-rank ZeRO-2/3: peak memory beside `check_memory`'s estimate;
5. compare: ViT-B/16 joint vs per-view views vs compiled (`benchmarks.throughput --compare`), which
   decides whether `--model.compile` becomes the GPU default;
6. batchnorm: two gloo ranks sharing the GPU, scale's cross-rank BatchNorm against torch's
   SyncBatchNorm (host syncs and time per step);
7. drift: 50 bf16 steps of ViT-S at the recipe's learning rate on one process, one-rank FSDP2 and
   one-rank ZeRO-2/3 (losses and the momentum encoder's movement side by side);
8. `pytest -m gpu tests/gpu`, last.

The results come back as three files (a lent GPU machine returns at most 8): `summary.md` (the
table to read), `summary.json` (everything measured) and `gpu-check.tar.gz` (each measurement's JSON
and log, the profiler trace, pytest's log and JUnit XML). Without CUDA every step runs as far as it
can, in seconds, and reports each CUDA-only one as skipped; the exit status is then 0 unless
something that can run on a CPU failed.

    make gpu-wheels                     # here, once: the wheels the GPU machine lacks -> wheels/
    make gpu-check                      # on the GPU machine (python3 -m benchmarks.gpu_check)
    python -m benchmarks.gpu_check --only step --only memory --out results/check
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "gpu-check"
NEEDED = ("deepspeed", "webdataset", "braceexpand", "hjson", "pydantic")

# The measurements in order (most informative first) with their budgets in seconds; pytest takes the rest.
PROBES = {"ceilings": 45, "step": 150, "memory": 170, "compare": 120, "batchnorm": 60, "drift": 150}
STEPS = ("environment", *PROBES, "pytest")
COMPARE = "per_view,joint,joint+compile"  # ViT-B/16, first one the baseline


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


def unsafe_folder(path: Path) -> str | None:
    """Why another user could change what is in `path` (None when nobody else can): it must be a
    folder, not a link, owned by this user and writable by nobody else."""
    try:
        st = os.lstat(path)
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        return "not a folder (a link or a file)"
    if st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}, not by this user ({os.getuid()})"
    if st.st_mode & 0o022:
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def private_dir(name: str) -> Path:
    """`$XDG_CACHE_HOME/scale/NAME` (default `~/.cache/scale/NAME`), kept between runs, created
    with mode 0700 and used only when it and its parent are this user's and writable by nobody
    else; otherwise (someone else's folder, a link, a shared mode) a new private temporary folder
    for this run, said once on the output."""
    parent = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scale"
    path, problem = parent / name, None
    for folder in (parent, path):
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            problem = f"{type(e).__name__}: {e}"
        problem = problem or unsafe_folder(folder)
        if problem:
            fallback = Path(tempfile.mkdtemp(prefix=f"scale-{name}-"))
            print(f"[gpu-check] not using {folder} ({problem}): {fallback} instead", flush=True)
            return fallback
    return path


def install_wheels(wheels: Path, site: Path) -> str:
    """Install the wheels in `wheels` into `site` (a new private folder of this run: nothing planted
    there before can be imported) when a needed package is missing; returns what was done."""
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if not missing:
        return "all needed packages present"
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        raise RuntimeError(f"missing {', '.join(missing)} and no wheels in {wheels}: run `make gpu-wheels` here first")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, found)]  # fmt: skip
    subprocess.run(cmd, check=True)
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])
    importlib.invalidate_caches()
    still = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if still:
        raise RuntimeError(f"after installing {len(found)} wheels, still missing: {', '.join(still)}")
    return f"installed {len(found)} wheels for {', '.join(missing)} into {site}"


def environment(check: Check, args, site: Path) -> dict:
    t = time.monotonic()
    import torch

    device = cuda_device() or f"CPU ({os.cpu_count()} cores), no CUDA"
    info = {"date": date.today().isoformat(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "device": device}  # fmt: skip
    try:
        info["packages"] = install_wheels(Path(args.wheels), site)
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


@functools.cache
def extensions_dir() -> str:
    """Where torch builds its C++/CUDA extensions (and loads them from): `TORCH_EXTENSIONS_DIR`
    when set, else this user's private cache folder (`private_dir`), kept between runs."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or str(private_dir("torch-extensions"))


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "PYTHONUNBUFFERED": "1", "TORCH_EXTENSIONS_DIR": extensions_dir()}  # fmt: skip


def _run(check: Check, name: str, cmd: list[str], raw: Path, budget: float) -> bool:
    """Run `cmd` with its log in raw/NAME.log, within `budget` seconds and what the check has left
    (its process group stopped at the limit); False, reported, when it failed."""
    t = time.monotonic()
    limit = min(budget, check.left() - 30)
    if limit < 10:
        check.add(name, "skipped", 0.0, "not run: the time budget is spent")
        return False
    with open(raw / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # fmt: skip
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            check.add(name, "failed", time.monotonic() - t, f"stopped at its budget of {limit:.0f} s")
            return False
    if code != 0:
        tail = (raw / f"{name}.log").read_text().strip().splitlines()
        check.add(name, "failed", time.monotonic() - t, (tail or ["?"])[-1][:200])
        return False
    return True


def run_probe(check: Check, name: str, raw: Path) -> dict:
    """One measurement of `benchmarks.gpu_probes` (or the side-by-side step): its JSON, summarised."""
    if cuda_device() is None:
        check.add(name, "skipped", 0.0, "needs CUDA (one GPU)")
        return {}
    t = time.monotonic()
    if name == "compare":
        cmd = [sys.executable, "-m", "benchmarks.throughput", "--model", "vit_base", "--batch-size", "128",
               "--precision", "bf16", "--compare", COMPARE, "--rounds", "2", "--steps", "5", "--warmup", "3",
               "--out", str(raw)]  # fmt: skip
        result_file = raw / "compare-vit_base-single-1x.json"
    else:
        cmd = [sys.executable, "-m", "benchmarks.gpu_probes", name, "--out", str(raw)]
        result_file = raw / f"{name}.json"
    if not _run(check, name, cmd, raw, PROBES[name]):
        return {}
    result = json.loads(result_file.read_text())
    status, detail = SUMMARIES[name](result)
    check.add(name, status, time.monotonic() - t, detail)
    return result


def _ceilings(r: dict) -> tuple[str, str]:
    return "passed", (f"{r['device']}: bf16 matmul {r['bf16_matmul_tflops']:.0f} TFLOP/s, device copy "
                      f"{r['device_copy_gbs']:.0f} GB/s, pinned H2D {r['h2d_pinned_gbs']:.0f} GB/s")  # fmt: skip


def _step(r: dict) -> tuple[str, str]:
    runs = [r, *([r["r50"]] if "r50" in r else [])]
    status = "passed" if all(x["host_syncs_per_step"] == 0 for x in runs) else "failed"  # queues without waiting
    return status, "; ".join(
        f"{x['model']} x{x['batch']}: {x['gpu_ms_median']:.1f} ms/step on the GPU, {x['cpu_ms_median']:.1f} ms of "
        f"CPU, {x['img_per_s']:.0f} img/s, MFU {100 * x['mfu']:.1f}%, {x['kernels_per_step']:.0f} kernels, "
        f"{x['host_syncs_per_step']:g} host syncs per step"
        for x in runs
    )


def _memory(r: dict) -> tuple[str, str]:
    parts, status = [], "passed"
    for c in r["cases"]:
        if "error" in c:
            parts.append(f"{c['case']}: {c['error'][:80]}")
            continue
        parts.append(f"{c['case']} peak {c['peak_allocated_gib']:.1f} GiB vs estimate {c['estimate_gib']:.1f}")
        if c["peak_allocated_gib"] > 1.1 * c["estimate_gib"] + 1:  # the estimate must not undercount
            status = "failed"
    return status, "; ".join(parts)


def _compare(r: dict) -> tuple[str, str]:
    rows = r["variants"]
    losses = {x["first_loss"] for x in rows}
    spread = (max(losses) - min(losses)) / abs(min(losses))
    status = "passed" if spread < 1e-2 else "failed"  # bf16: the variants' first losses agree to 1%
    return status, "; ".join(f"{x['variant']} {x['img_per_s_per_device']:.0f} img/s (x{1 / x['ratio_to_first']:.2f})"
                             for x in rows) + f"; first losses within {100 * spread:.2f}%"  # fmt: skip


def _batchnorm(r: dict) -> tuple[str, str]:
    rows = {x["variant"]: x for x in r["variants"]}
    status = "passed" if rows["scale"]["host_syncs_per_step"] == 0 else "failed"
    return status, "; ".join(f"{v}: {x['ms_per_step']:.2f} ms, {x['host_syncs_per_step']:g} host syncs per step"
                             for v, x in rows.items())  # fmt: skip


def _drift(r: dict) -> tuple[str, str]:
    parts, status = [], "passed"
    for name, x in r["backends"].items():
        if "error" in x:
            parts.append(f"{name}: {x['error'][:80]}")
            status = "failed"
        elif "drift_ratio" in x:
            parts.append(f"{name}: loss {x['losses'][-1]:.4f} (max diff {100 * x['max_loss_rel_diff']:.2f}%), "
                         f"momentum moved x{x['drift_ratio']:.3f}")  # fmt: skip
            if abs(x["drift_ratio"] - 1) > 0.05:  # an EMA applied twice moves it 1.99x as far
                status = "failed"
    return status, "; ".join(parts)


SUMMARIES = {"ceilings": _ceilings, "step": _step, "memory": _memory, "compare": _compare,
             "batchnorm": _batchnorm, "drift": _drift}  # fmt: skip


def run_pytest(check: Check, raw: Path) -> None:
    t = time.monotonic()
    xml = raw / "pytest-gpu.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-v", "-rs", "-p", "no:cacheprovider",
           f"--junitxml={xml}"]  # fmt: skip
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd.append("--timeout=240")  # one hung test must not take the whole budget
    if not _run(check, "pytest-gpu", cmd, raw, check.left()):
        for case in junit_cases(xml):
            check.add(f"  {case['name']}", case["status"], case["seconds"], case["detail"])
        return
    for case in junit_cases(xml):
        check.add(f"  {case['name']}", case["status"], case["seconds"], case["detail"])
    lines = (raw / "pytest-gpu.log").read_text().strip().splitlines()
    check.add("pytest -m gpu tests/gpu", "passed", time.monotonic() - t, lines[-1].strip("= ") if lines else "")


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


def write_results(out: Path, raw: Path, info: dict, check: Check, results: dict) -> list[Path]:
    """summary.md, summary.json and gpu-check.tar.gz (the raw folder, then removed): three files."""
    counts = {s: sum(r["status"] == s for r in check.rows) for s in ("passed", "failed", "skipped")}
    data = {**info, "seconds": round(time.monotonic() - check.start, 1), "counts": counts, "steps": check.rows,
            "results": results}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(data, indent=1))
    lines = [f"# GPU check: {info['device']}", "",
             f"{info['date']}; Python {info['python']}, torch {info['torch']} (CUDA {info['cuda']}); "
             f"{data['seconds']:.0f} s. Made by `make gpu-check` (`python -m benchmarks.gpu_check`); every "
             "measurement's JSON and log, the profiler trace and pytest's log are in gpu-check.tar.gz.", "",
             f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped.", "",
             "| step | status | s | detail |", "|---|---|---:|---|"]  # fmt: skip
    lines += [f"| {r['name'].strip()} | {r['status']} | {r['seconds']:.0f} | {r['detail'].replace('|', '/')} |"
              for r in check.rows]  # fmt: skip
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    archive = out / "gpu-check.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(raw, arcname="gpu-check")
    shutil.rmtree(raw, ignore_errors=True)
    return [out / "summary.md", out / "summary.json", archive]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", default=str(ROOT / "wheels"), help="folder of wheels for missing packages")
    default_out = f"{RESULTS.relative_to(ROOT)} on a GPU, a new private temporary folder without"
    parser.add_argument("--out", default=None, help=f"results folder (default: {default_out})")
    parser.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget of the whole check")
    parser.add_argument("--only", action="append", choices=STEPS, help="run only these steps (repeatable)")
    args = parser.parse_args(argv)
    steps = set(args.only or STEPS) | {"environment"}
    check = Check(args.budget_s)
    # This run's own folders (mode 0700, new names): the wheels' site and the raw measurements.
    work = Path(tempfile.mkdtemp(prefix="scale-gpu-check-work-"))
    try:
        info = environment(check, args, work / "site")
        if args.out:
            out = Path(args.out)
        else:
            out = RESULTS if cuda_device() else Path(tempfile.mkdtemp(prefix="scale-gpu-check-"))
        out.mkdir(parents=True, exist_ok=True)
        raw = work / "raw"
        raw.mkdir()
        results = {name: run_probe(check, name, raw) for name in PROBES if name in steps}
        if "pytest" in steps:
            run_pytest(check, raw)
        files = write_results(out, raw, info, check, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"[gpu-check] {len(check.failed)} failed; {', '.join(str(f) for f in files)}", flush=True)
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
