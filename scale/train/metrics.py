"""Metrics on rank 0: JSON lines, TensorBoard, and a progress bar with images/s and ETA.

MFU = achieved model FLOP/s per device / the device's dense peak: H100/H200 989, A100 312 TFLOP/s
(bf16 tensor cores); on a CPU against a matmul peak measured at start, labelled as such.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# Dense bf16/fp16 tensor-core peaks (no sparsity), FLOP/s.
GPU_PEAKS = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "A10": 125e12, "L40": 181e12,
             "V100": 125e12}  # fmt: skip


def measured_cpu_peak(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 3) -> float:
    """FLOP/s of an n^3 matmul on this CPU in `dtype` (best of `repeats`)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def device_peak(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak FLOP/s, how it was obtained) for MFU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAKS.items():
            if key in name:
                return peak, f"{key} dense bf16 peak"
        return float("nan"), f"unknown GPU {name!r}: no peak, MFU not reported"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return measured_cpu_peak(dtype), f"measured CPU {str(dtype).split('.')[-1]} matmul peak"


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB


class MetricsLogger:
    """Writes metrics rows on the main rank; a no-op elsewhere."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        if not enabled:
            return
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 (lives as long as the run)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed (pip install tensorboard): metrics go to metrics.jsonl only")

    def log(self, step: int, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **row}) + "\n")
        if self.tb:
            for key, value in row.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


class Progress:
    """A tqdm bar over optimizer steps on the main rank (ETA, images/s), or periodic log lines."""

    def __init__(self, total: int, initial: int, enabled: bool, bar: bool):
        self.enabled, self.total = enabled, total
        self.bar = None
        self.start, self.start_step = time.time(), initial
        if enabled and bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc="pretrain")

    def update(self, step: int, postfix: dict[str, str]) -> None:
        if not self.enabled:
            return
        if self.bar:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(postfix, refresh=False)

    def line(self, step: int, text: str) -> None:
        """A log line with the ETA (when there is no bar)."""
        if not self.enabled or self.bar:
            return
        done = step - self.start_step
        rate = done / max(time.time() - self.start, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        log.info("step %d/%d %s ETA %s", step, self.total, text, _hms(eta))

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def _hms(seconds: float) -> str:
    if seconds != seconds:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
