"""Precision chosen by the hardware: the CPU's bf16 capability detected (mocked here), `auto`
fp32 on every CPU, an explicit bf16 warned about with the measured slowdown, MFU against the peak of
the precision in use."""

import logging

import pytest
import torch

from scale.hardware import peaks, precision
from scale.parallel.base import SingleProcess


@pytest.fixture
def cpu(monkeypatch):
    """Mock this CPU: `set(native, fp32 GFLOP/s, bf16 GFLOP/s)`."""

    def set_cpu(native, fp32, bf16):
        precision.cpu_bf16_slowdown.cache_clear()
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bool(native), raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
        peaks = {torch.float32: fp32 * 1e9, torch.bfloat16: bf16 * 1e9}
        monkeypatch.setattr(precision, "measured_cpu_peak", lambda dtype=torch.float32, *a, **k: peaks[dtype])

    yield set_cpu
    precision.cpu_bf16_slowdown.cache_clear()


def test_the_capability_is_read_from_torchs_cpu_checks(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert precision.cpu_bf16_native() is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert precision.cpu_bf16_native() is True
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert precision.cpu_bf16_native() is None  # a torch that cannot tell: measured instead


def test_explicit_bf16_on_a_cpu_without_bf16_is_warned_with_the_measured_slowdown(cpu, caplog):
    cpu(native=False, fp32=129.0, bf16=0.3)  # what the issue measured on such a machine
    with caplog.at_level(logging.WARNING):
        backend = SingleProcess("bf16", torch.device("cpu"))
    assert backend.precision == "bf16"  # asked for: kept, but said
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "430x slower" in warning and "no AVX-512 BF16" in warning and "--parallel.precision=fp32" in warning


def test_auto_is_fp32_on_every_cpu_and_native_fast_bf16_is_not_warned(cpu, caplog):
    cpu(native=True, fp32=100.0, bf16=400.0)  # an AMX-class CPU
    assert SingleProcess("auto", torch.device("cpu")).precision == "fp32"  # numbers independent of the machine
    with caplog.at_level(logging.WARNING):
        assert SingleProcess("bf16", torch.device("cpu")).precision == "bf16"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    cpu(native=True, fp32=205.0, bf16=124.0)  # native but slower (this machine, 2026-12-02)
    assert "1.7x slower" in precision.check_cpu_bf16()


def test_cpu_mfu_uses_the_peak_of_the_precision_in_use(monkeypatch):
    monkeypatch.setattr(peaks, "measured_cpu_peak", lambda dtype=torch.float32, *a, **k: {
        torch.float32: 129e9, torch.bfloat16: 0.3e9}[dtype])  # fmt: skip
    assert peaks.device_peak(torch.device("cpu"), "fp32") == (129e9, "measured CPU float32 matmul peak")
    assert peaks.device_peak(torch.device("cpu"), "bf16") == (0.3e9, "measured CPU bfloat16 matmul peak")


def test_the_peak_probe_measures_an_emulated_dtype_quickly():
    rate = precision.measured_cpu_peak(torch.float32, n=256)
    assert 1e8 < rate < 1e13  # FLOP/s of a real matmul


def test_tuned_cpu_malloc_serves_large_activations_from_the_heap_not_fresh_mmaps():
    import ctypes
    import platform

    from scale.hardware.cpu_malloc import tune_cpu_malloc

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc without mallinfo2")

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]  # fmt: skip

    libc.mallinfo2.restype = MallInfo2
    assert tune_cpu_malloc() and tune_cpu_malloc()  # idempotent
    before = libc.mallinfo2().hblkhd  # bytes held in mmapped blocks
    x = torch.empty(16 * 197 * 3072, dtype=torch.float32)  # 39 MiB: above glibc's largest default threshold
    assert libc.mallinfo2().hblkhd == before  # from the heap: kept for reuse after it is freed
    del x


def test_the_momentum_masters_update_converts_one_chunk_at_a_time(monkeypatch):
    """16-bit momentum-encoder tensors (DeepSpeed's fp16 mode) move through fp32 masters; the fp32
    copies of the base encoder are made chunk by chunk (a whole copy was 2.6 GB for ViT-H), with the
    numbers of the whole-list update."""
    from torch import nn
    from torch.utils._python_dispatch import TorchDispatchMode

    from scale.optim import optimizers
    from scale.parallel import base
    from scale.parallel.base import SingleProcess

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.q = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)]).bfloat16()
            self.k = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)]).bfloat16().requires_grad_(False)

        def momentum_pairs(self):
            return list(self.k.parameters()), list(self.q.parameters())

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    def run(chunk_numel):
        monkeypatch.setattr(base, "foreach_chunks", lambda t: optimizers.foreach_chunks(t, chunk_numel))
        backend = SingleProcess("fp32", torch.device("cpu"))
        backend.module = Pair()
        backend.momentum_update(0.9)  # the masters are made
        with Ops() as ops:
            backend.momentum_update(0.9)
        return [p.clone() for p in backend.module.k.parameters()], ops.ops

    whole, _ = run(10**9)
    chunked, ops = run(300)  # a chunk: at most 300 elements (a 16x16 weight and its bias)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked, strict=True))
    copies = [i for i, op in enumerate(ops) if op == "_to_copy"]
    updates = [i for i, op in enumerate(ops) if op.startswith("_foreach_mul")]
    assert len(copies) == 8 and updates[0] < copies[-1], ops  # updates between the conversions
