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
        dist.all_gather_into_tensor(out, keys.contiguous(), group=self.group)
        return out
