"""The training precision of a run on its device: `parallel.precision` resolved ('auto' -> bf16 on
GPUs that support it, fp32 elsewhere), TF32 for fp32 on CUDA, and what the CPU does with bf16:
detected from torch's CPU feature checks, then measured.

Without AVX-512 BF16 (or AMX) an x86 CPU emulates bf16 matmuls: measured on a machine of this kind,
a 2048^3 bf16 matmul ran at 0.3 GFLOP/s against 129 in fp32, and a ViT-S step took 100 s instead
of 5.7. With AVX-512 BF16 bf16 runs natively (and with AMX faster than fp32). `auto` precision is
fp32 on every CPU (the numbers of a run do not depend on which machine it landed on); an explicit
bf16 on a CPU is checked here and a slowdown is logged with the measured ratio.
"""

from __future__ import annotations

import functools
import logging

import torch

from scale.errors import BackendError
from scale.hardware import PRECISIONS
from scale.hardware.peaks import measured_cpu_peak

log = logging.getLogger(__name__)


def resolve_precision(precision: str, device: torch.device | None = None) -> str:
    """'auto' -> bf16 on CUDA GPUs that support it, else fp32 (on every CPU: see below). fp16 needs
    CUDA. `device`: where the run computes (default: CUDA when this machine has it, else the CPU)."""
    device = device or default_device()
    if precision not in PRECISIONS:
        raise BackendError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise BackendError(
            "fp16 needs a CUDA GPU (loss scaling and fp16 kernels); on CPU use --parallel.precision=bf16 or fp32"
        )
    return precision


def default_device() -> torch.device:
    """The kind of device a run on this machine computes on, before placement picks one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None for fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def configure_tf32(enabled: bool, device: torch.device) -> None:
    """fp32 matmuls and convolutions on CUDA through TF32 tensor cores (inputs rounded to a 10-bit
    mantissa, fp32 accumulation: about 7x the plain fp32 rate on A100/H100), or full fp32. Logged;
    `--parallel.tf32=false` turns it off. Only fp32 runs are affected (bf16/fp16 autocast is not)."""
    if device.type != "cuda":
        return
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled
    log.info("fp32 matmuls on CUDA: %s", "TF32 tensor cores (--parallel.tf32=false for full fp32)" if enabled
             else "full fp32 (TF32 off)")  # fmt: skip


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
