"""A process's memory, measured: the live bytes of its heap (glibc's mallinfo2 on a CPU, the caching
allocator on a GPU), their peak sampled during a step, and the peak resident memory (VmHWM, reset
between steps). `benchmarks.memory` measures every rank's training step with these."""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import torch


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in [
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        ]
    ]


_mallinfo2 = None


def live_bytes(device: torch.device) -> int:
    """Bytes in use by the allocator that holds this device's tensors."""
    global _mallinfo2
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    if _mallinfo2 is None:
        try:
            _mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
        except (OSError, AttributeError) as e:
            raise RuntimeError("the CPU memory benchmark needs glibc >= 2.33 (mallinfo2)") from e
        _mallinfo2.restype = _MallInfo2
    m = _mallinfo2()
    return m.uordblks + m.hblkhd


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so RSS is what is live
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


class LivePeak:
    """The highest `live_bytes` seen while the context is open: exact on a GPU (the allocator's
    own peak), sampled every `interval` seconds by a thread on a CPU (torch releases the GIL in its
    kernels; a buffer living shorter than the interval can be missed)."""

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device, self.interval, self.peak = device, interval, 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, live_bytes(self.device))
            self._stop.wait(self.interval)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = live_bytes(self.device)
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, live_bytes(self.device))


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device)  # what the caching allocator held
    return _status_kib("VmHWM") * 1024


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")
