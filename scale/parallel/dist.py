"""Process-group helpers that the models are given from outside (they never import this)."""

from __future__ import annotations

import torch
import torch.distributed as dist


class AllGatherKeys:
    """MoCo v3's key gather across the ranks of `group`: (B, F) per rank -> (W * B, F), in rank order.

    No autograd: keys come from the momentum encoder and need no gradient. Every rank must pass the
    same local batch (the loader drops the last incomplete batch for this reason).
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        if not dist.is_initialized():
            raise RuntimeError("AllGatherKeys needs an initialised process group; use LocalKeys for one process")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    @torch.no_grad()
    def __call__(self, keys: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return keys
        out = keys.new_empty((self.world_size * keys.shape[0], *keys.shape[1:]))  # (W * B, F)
        all_gather_single(out, keys.contiguous(), group=self.group)
        return out


# torch >= 2.14 names it all_gather_single; older releases all_gather_into_tensor.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _DifferentiableAllReduce(torch.autograd.Function):
    """Sum over ranks whose backward is again the sum over ranks: every rank's output depends on
    every rank's input, so d(sum of all ranks' losses)/d(input) gathers all upstream gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_with_grad(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Out-of-place all-reduce (sum) through which autograd flows across ranks."""
    return _DifferentiableAllReduce.apply(tensor, group)
