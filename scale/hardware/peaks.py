"""A device's peaks, for MFU and memory reports: dense matmul FLOP/s by compute precision (NVIDIA's
datasheets for GPUs, measured for a CPU) and the peak memory a process has used.

MFU = achieved model FLOP/s per device / the device's dense peak in the precision the matmuls run
in: bf16/fp16 tensor cores (H100/H200 SXM 989, A100 312 TFLOP/s), TF32 tensor cores for fp32 with
TF32 on (H100/H200 SXM 495, A100 156), plain fp32 (H100/H200 SXM 67, A100 19.5); on a CPU against a
matmul peak measured at start, labelled as such.
"""

from __future__ import annotations

import resource
import time

import torch

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


def measured_cpu_peak(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 3) -> float:
    """FLOP/s of an n^3 matmul on this CPU in `dtype` (best of `repeats`). A 256^3 probe first: a
    dtype this CPU emulates (bf16 without AVX-512 BF16: under 1 GFLOP/s) is measured on the probe
    alone, which takes a fraction of a second instead of minutes."""

    def rate(size: int, times: int) -> float:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(times):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        return 2 * size**3 / best

    probe = rate(256, 1)
    if probe < 5e9 or n <= 256:
        return probe
    return rate(n, repeats)
