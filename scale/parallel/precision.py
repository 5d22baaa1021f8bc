"""What the CPU does with bf16: detected from torch's CPU feature checks, then measured.

Without AVX-512 BF16 (or AMX) an x86 CPU emulates bf16 matmuls: measured on a machine of this kind,
a 2048^3 bf16 matmul ran at 0.3 GFLOP/s against 129 in fp32, and a ViT-S step took 100 s instead
of 5.7. With AVX-512 BF16 bf16 runs natively (and with AMX faster than fp32). `auto` precision is
fp32 on every CPU (the numbers of a run do not depend on which machine it landed on); an explicit
bf16 on a CPU is checked here and a slowdown is logged with the measured ratio.
"""

from __future__ import annotations

import functools
import logging
import time

import torch

log = logging.getLogger(__name__)


def cpu_bf16_native() -> bool | None:
    """True when this CPU has native bf16 matmuls (x86 AVX-512 BF16 or AMX), False when torch says
    it has neither, None when torch cannot tell (another architecture: measure instead)."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if not all(callable(c) for c in checks):
        return None
    try:
        return any(bool(c()) for c in checks)
    except RuntimeError:
        return None


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


@functools.cache
def cpu_bf16_slowdown() -> tuple[bool | None, float, float]:
    """(native bf16, fp32 FLOP/s, bf16 FLOP/s) of this CPU, measured once per process."""
    return cpu_bf16_native(), measured_cpu_peak(torch.float32, 512), measured_cpu_peak(torch.bfloat16, 512)


def check_cpu_bf16() -> str | None:
    """For an explicit bf16 run on a CPU: a warning (logged, and returned) when bf16 matmuls are
    slower than fp32 here, naming the measured ratio and what to do; None when bf16 is as fast."""
    native, fp32, bf16 = cpu_bf16_slowdown()
    if bf16 >= fp32:
        log.info("bf16 on this CPU: %.0f GFLOP/s matmuls against %.0f in fp32 (native bf16)", bf16 / 1e9, fp32 / 1e9)
        return None
    why = {False: "this CPU has no AVX-512 BF16 or AMX, so torch emulates bf16",
           True: "native bf16 (AVX-512 BF16), but slower than fp32 here",
           None: "torch cannot tell whether this CPU has native bf16"}[native]  # fmt: skip
    message = (
        f"--parallel.precision=bf16 on this CPU: bf16 matmuls run at {bf16 / 1e9:.1f} GFLOP/s against "
        f"{fp32 / 1e9:.0f} in fp32 ({_times(fp32 / bf16)} slower; {why}); use --parallel.precision=fp32 "
        "(or auto) unless bf16 itself is what you test"
    )
    log.warning("%s", message)
    return message


def _times(ratio: float) -> str:
    return f"{ratio:.1f}x" if ratio < 10 else f"{ratio:.0f}x"
