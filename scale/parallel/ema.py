"""The exponential moving average that moves a momentum encoder, on whatever local tensors a backend
holds (whole parameters, FSDP2 shards, ZeRO-3 partitions): `Backend.momentum_update` calls it."""

from __future__ import annotations

import torch

from scale.optim.optimizers import foreach_chunks


@torch.no_grad()
def ema_(
    targets: list[torch.Tensor], sources: list[torch.Tensor], momentum: float, applied: torch.Tensor | None = None
) -> None:
    """targets <- momentum * targets + (1 - momentum) * sources, in place, the authors' operation
    order (`scale.models.MoCoV3.momentum_update`).

    `applied` (a 0-dim bool tensor) decides on the device: where False the coefficients are 1 and 0,
    so the targets stay bitwise unchanged (k * 1 + q * 0 = k) without a host sync. The products
    (1 - m) * q are then temporaries, made chunk by chunk to bound their memory.
    """
    if not targets:
        return
    if applied is None:
        torch._foreach_mul_(targets, momentum)
        torch._foreach_add_(targets, sources, alpha=1.0 - momentum)
        return
    applied = applied.to(targets[0].device)
    dtype = targets[0].dtype  # the coefficients as exact as the unmasked path's scalars
    m = torch.where(applied, momentum, 1.0).to(dtype)
    one_minus_m = torch.where(applied, 1.0 - momentum, 0.0).to(dtype)
    for rows in foreach_chunks(targets):
        torch._foreach_mul_(targets[rows], m)
        torch._foreach_add_(targets[rows], torch._foreach_mul(sources[rows], one_minus_m))
