"""Metrics on rank 0: JSON lines, TensorBoard, and a progress bar with images/s and ETA.

MFU = achieved model FLOP/s per device / the device's dense peak in the precision the matmuls run
in: bf16/fp16 tensor cores (H100/H200 SXM 989, A100 312 TFLOP/s), TF32 tensor cores for fp32 with
TF32 on (H100/H200 SXM 495, A100 156), plain fp32 (H100/H200 SXM 67, A100 19.5); on a CPU against a
matmul peak measured at start, labelled as such.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path
from typing import Any

import torch

from scale.parallel.precision import measured_cpu_peak

log = logging.getLogger(__name__)

# Dense peaks (no sparsity) in TFLOP/s by compute precision, from NVIDIA's datasheets; the first
# key found in the device name wins, so the more specific names come first.
GPU_PEAKS_TFLOPS = {
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "GH200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6},
    "L40": {"bf16": 181.0, "fp16": 181.0, "tf32": 90.5, "fp32": 90.5},
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "V100": {"fp16": 125.0, "fp32": 15.7},
}


def device_peak(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak FLOP/s, how it was obtained) for MFU; `precision` is the one the matmuls run in:
    'bf16', 'fp16', 'tf32' or 'fp32' (`Backend.compute_precision`)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in GPU_PEAKS_TFLOPS.items():
            if key in name:
                if precision not in peaks:
                    return float("nan"), f"{key}: no {precision} peak known, MFU not reported"
                return peaks[precision] * 1e12, f"{key} dense {precision} peak"
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
