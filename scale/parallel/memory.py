"""The model state each backend keeps per rank, in theory (docs/scaling.md has the arithmetic):
parameters, gradients, optimizer state and the momentum encoder, by component, for P trainable
parameters and a momentum encoder of M, without building anything. `scale.train.memory` checks a
run against it before training; `benchmarks/memory.py` measures the real step beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Bytes = dict[str, float]


def replicated_bytes(P: int, M: int, N: int, precision: str, accum_steps: int = 1) -> Bytes:
    """One process (and the base of DDP): fp32 parameters (autocast casts per op, the masters stay
    fp32), fp32 gradients, AdamW's two moments, the fp32 momentum encoder; the same on every rank."""
    return {"params": 4 * P, "grads": 4 * P, "optimizer": 8 * P, "momentum": 4 * M}


def ddp_bytes(P: int, M: int, N: int, precision: str, accum_steps: int = 1) -> Bytes:
    """As one process; the gradients are views into DDP's buckets (`gradient_as_bucket_view`),
    except while accumulating: the accumulated gradients and the bucket are both alive in the last
    micro-batch."""
    out = replicated_bytes(P, M, N, precision, accum_steps)
    if accum_steps > 1:
        out["grads"] = 8 * P
    return out


def fsdp_bytes(P: int, M: int, N: int, precision: str, accum_steps: int = 1) -> Bytes:
    """fp32 parameters, gradients and AdamW moments sharded over the ranks, the momentum encoder
    too (under bf16 the unsharded 16-bit copies exist one unit at a time: transient). Without
    gradient sync on the first micro-batches of an accumulated step, FSDP2 keeps unsharded
    gradients."""
    grads = 4 * P if accum_steps > 1 else 4 * P / N
    return {"params": 4 * P / N, "grads": grads, "optimizer": 8 * P / N, "momentum": 4 * M / N}


def zero_bytes(
    P: int, M: int, N: int, precision: str, accum_steps: int = 1, stage: int = 0, buffers: float = 0.0
) -> Bytes:
    """ZeRO `stage`: module parameters and gradients in fp32 (bf16 runs by autocast over them: the
    precision policy) or fp16 (DeepSpeed's fp16 mode), an fp32 master partition that DeepSpeed keeps
    even in fp32, AdamW moments; the momentum encoder as the module, plus scale's fp32 master of it
    under fp16. ZeRO-1 keeps whole
    gradients only while it accumulates micro-batches: DeepSpeed reduces them in buckets at the
    accumulation boundary and keeps this rank's partition, as ZeRO-2 does always (measured,
    DeepSpeed 0.19 with overlap_comm and contiguous_gradients). Transient buffers (gathers,
    per-backward buckets) are not counted; `buffers` are persistent ones
    (`zero_persistent_buffer_bytes`), reported apart."""
    h = 2 if precision == "fp16" else 4
    mom = (h + (4 if h == 2 else 0)) * M
    out = {
        "params": h * P / (N if stage >= 3 else 1),
        "grads": h * P / (N if stage >= 2 or accum_steps == 1 else 1),
        "optimizer": 12 * P / N,  # fp32 master partition + AdamW moments
        "momentum": mom / (N if stage >= 3 else 1),
    }
    if buffers:
        out["buffers"] = buffers
    return out


def zero_persistent_buffer_bytes(ds: dict[str, Any], precision: str, accum_steps: int = 1) -> float:
    """Bytes of the gradient buckets DeepSpeed holds beside the model state (contiguous_gradients),
    for the DeepSpeed config `ds` (its parsed JSON): ZeRO-3 allocates one `reduce_bucket_size`
    bucket in the communication dtype once and keeps it; ZeRO-1 allocates its (fp32, two with
    overlap_comm) on the first micro-batch of an accumulated step and keeps them until the boundary.
    ZeRO-2's live only within a backward (transient)."""
    zero = ds.get("zero_optimization", {})
    stage, bucket = int(zero.get("stage", 0)), float(zero.get("reduce_bucket_size", 500_000_000))
    if not zero.get("contiguous_gradients", True):
        return 0.0
    if stage >= 3:
        comm = ds.get("communication_data_type")
        return bucket * (4 if comm in ("fp32", "float32") or precision != "fp16" else 2)
    if stage == 1 and accum_steps > 1:
        return bucket * 4 * (2 if zero.get("overlap_comm", False) else 1)
    return 0.0


THEORY: dict[str, Callable[..., Bytes]] = {
    "single": replicated_bytes,
    "ddp": ddp_bytes,
    "fsdp": fsdp_bytes,
    "hsdp": fsdp_bytes,  # sharded inside a group: world_size is the group's
    "deepspeed": zero_bytes,
}


def state_bytes(
    kind: str,
    trainable: int,
    momentum: int,
    world_size: int,
    precision: str,
    accum_steps: int = 1,
    stage: int = 0,
    buffers: float = 0.0,
) -> Bytes:
    """Theoretical bytes per rank of the model state, by component, for backend `kind` ('single',
    'ddp', 'fsdp', 'hsdp' (`world_size`: its shard group's), 'deepspeed' with ZeRO `stage` and
    persistent `buffers`)."""
    if kind == "deepspeed":
        return zero_bytes(trainable, momentum, world_size, precision, accum_steps, stage, buffers)
    return THEORY[kind](trainable, momentum, world_size, precision, accum_steps)
