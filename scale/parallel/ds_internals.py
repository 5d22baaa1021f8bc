"""The DeepSpeed internals scale reads where DeepSpeed has no public form, each behind one named
helper, checked against DeepSpeed 0.19.8 (the pinned version; 0.14-0.19 where said). When an
upgrade renames one, the helper's fallback is logged (or its error names the helper), nowhere else
changes. ZeRO-3 parameters' `ds_*` attributes (`ds_tensor`, `ds_persist`, `ds_numel`, `ds_id`)
are DeepSpeed's parameter API, used by its own utilities, and read here too so that every access
lives in one file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import nn

from scale.errors import BackendError

log = logging.getLogger(__name__)

DEEPSPEED_CHECKED = "0.19.8"


def require_deepspeed():
    """The deepspeed module, or a BackendError saying how to install it."""
    try:
        import deepspeed  # optional: only DeepSpeed runs need it
    except ImportError as e:
        raise BackendError("DeepSpeed is not installed: pip install deepspeed (or use --parallel.backend=fsdp)") from e
    return deepspeed


# ---------------------------------------------------------------------- ZeRO-3 parameters


def partition(p: nn.Parameter) -> torch.Tensor:
    """This rank's part of a ZeRO-3 parameter (the forward gathers the whole from the parts)."""
    return p.ds_tensor


def is_persistent(p: nn.Parameter) -> bool:
    """Whether ZeRO-3 keeps `p` whole on every rank (under `stage3_param_persistence_threshold`) in
    `.data`, besides its partition."""
    return bool(getattr(p, "ds_persist", False))


def full_numel(p: nn.Parameter) -> int:
    """Elements of the whole parameter (ZeRO-3 empties `.data` outside a gather)."""
    return getattr(p, "ds_numel", p.numel())


def held_numel(p: nn.Parameter) -> int:
    """Elements of `p` this rank holds: its ZeRO-3 partition, or all of it (persistent or not ZeRO-3)."""
    partitioned = hasattr(p, "ds_tensor") and not is_persistent(p)
    return p.ds_tensor.numel() if partitioned else p.numel()


# ---------------------------------------------------------------------- reduced gradients


def reduction_streams(optimizer) -> Iterator[torch.cuda.Stream]:
    """The CUDA streams ZeRO-1/2 (`reduction_stream`) and ZeRO-3 (`reduce_and_partition_stream`)
    write reduced gradients on."""
    for name in ("reduction_stream", "reduce_and_partition_stream"):
        stream = getattr(optimizer, name, None)
        if isinstance(stream, torch.cuda.Stream):
            yield stream


def loss_scale(optimizer) -> float:
    """The current fp16 loss scale of a DeepSpeed optimizer, as a host float (no device read)."""
    return float(getattr(optimizer, "loss_scale", 1.0) or 1.0)


def zero3_local_grad(optimizer, p: nn.Parameter) -> torch.Tensor | None:
    """This rank's fp32 gradient partition of `p` under ZeRO-3, from the optimizer's private map (as
    `deepspeed.utils.safe_get_local_grad` reads it, without the stream synchronize that function
    makes per parameter); through `safe_get_local_grad` with optimizer offload or when the map is
    not found."""
    parts = getattr(optimizer, "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition", None)
    if parts is not None and not getattr(optimizer, "offload_optimizer", False):
        return parts.get(p.ds_id)
    from deepspeed.utils import safe_get_local_grad  # optional dependency (this file's only user of it)

    return safe_get_local_grad(p)


def zero12_local_grad(p: nn.Parameter) -> torch.Tensor | None:
    """The fragment of `p`'s reduced gradient in this rank's ZeRO-1/2 partition (`_hp_mapping`, as
    DeepSpeed's `get_full_hp_grad` reads it before its all-reduce); None where this rank owns none."""
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:
        return None
    fragment = mapping.get_lp_grad_fragment(p._index_in_param_group).flatten()
    address = mapping.lp_fragment_address
    if fragment.numel() == p.numel() and address.numel != p.numel():  # a full buffer kept on every rank
        fragment = fragment.narrow(0, address.start, address.numel)
    return fragment


# ---------------------------------------------------------------------- ZeRO-3 gathers


def zero3_gather_stream(optimizer) -> torch.cuda.Stream | None:
    """The stream ZeRO-3's PartitionedParameterCoordinator gathers on (DeepSpeed 0.14-0.19:
    `optimizer.parameter_offload.get_param_coordinator()`, private `__allgather_stream`); None when
    not found."""
    offload = getattr(optimizer, "parameter_offload", None) or optimizer
    get = getattr(offload, "get_param_coordinator", None)
    if get is None:
        return None
    try:
        coordinator = get()
    except TypeError:  # older releases take `training`
        coordinator = get(True)
    return getattr(coordinator, "_PartitionedParameterCoordinator__allgather_stream", None)


# ---------------------------------------------------------------------- checkpoints


def set_universal_load(engine, enabled: bool) -> None:
    """Make the engine's next `load_checkpoint` read DeepSpeed's universal format: the flag its
    loader reads from the engine's config (`engine._config.load_universal_checkpoint`), which has no
    setter."""
    engine._config.load_universal_checkpoint = enabled
