"""The two views of a batch as one tensor: shared by the loaders' output, the backends' copy to the
device and MoCo's joint forward. No torch.distributed, no model: a leaf module."""

from __future__ import annotations

import torch


def adjacent(*views: torch.Tensor) -> bool:
    """Whether the `views` (same shape, dtype and device, contiguous) lie one after the other in one
    buffer, in order: the two halves of a (V, B, ...) tensor, as the loaders hand them over."""
    first = views[0]
    return first.numel() > 0 and first.is_contiguous() and all(
        v.shape == first.shape and v.dtype == first.dtype and v.device == first.device and v.is_contiguous()
        and v.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and v.storage_offset() == first.storage_offset() + i * first.numel()
        for i, v in enumerate(views)
    )  # fmt: skip


def join_views(*views: torch.Tensor) -> torch.Tensor:
    """The views (B, ...) each, stacked along the batch as (V * B, ...): a view of their memory when
    they are `adjacent`, else one copy."""
    if len(views) == 1:
        return views[0]
    if adjacent(*views):
        first = views[0]
        return first.as_strided((len(views) * first.shape[0], *first.shape[1:]), first.stride(), first.storage_offset())
    return torch.cat(views)


def views_to(
    views: tuple[torch.Tensor, ...], device: torch.device, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, ...]:
    """The views on `device` (and in `dtype`), in one non-blocking copy when they are `adjacent`
    (the result is adjacent again), else one copy each. Views already there are returned as they are."""
    if all(v.device == device and (dtype is None or v.dtype == dtype) for v in views):
        return views
    if len(views) > 1 and adjacent(*views):
        return join_views(*views).to(device, dtype, non_blocking=True).chunk(len(views))
    return tuple(v.to(device, dtype, non_blocking=True) for v in views)
