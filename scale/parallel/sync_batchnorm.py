"""BatchNorm with statistics over the batch of all ranks, applied to a built model from outside.

MoCo v3 normalises its heads (and ViT-BN its MLP sub-blocks) with BatchNorm synchronised across
all ranks. `torch.nn.SyncBatchNorm` has fused CUDA kernels but refuses CPU tensors, so:
- on NCCL process groups the converter uses `torch.nn.SyncBatchNorm`;
- elsewhere (gloo on CPU) it uses `CrossRankBatchNorm`: the same statistics from two
  differentiable all-reduces (sum and count, then centred sum of squares), so autograd produces
  the cross-rank gradient terms. A test checks the two agree on GPU.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from scale.parallel.dist import all_reduce_with_grad

log = logging.getLogger(__name__)


def _move_channels(x: torch.Tensor, channels_last: bool, to_first: bool) -> torch.Tensor:
    if not channels_last:
        return x
    return x.movedim(-1, 1) if to_first else x.movedim(1, -1)  # (B, N, D) <-> (B, D, N)


class CrossRankBatchNorm(_BatchNorm):
    """BatchNorm over the union of the batches of every rank in `process_group`, on any backend.

    Input is (B, C, ...) or, with `channels_last`, (B, ..., C). Outside training, or with one rank,
    it is plain BatchNorm.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        channels_last: bool = False,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group
        self.channels_last = channels_last

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (B, C, ...), got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _move_channels(x, self.channels_last, to_first=True)
        # As torch.nn.SyncBatchNorm: statistics cross ranks only in training mode.
        if self.training and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
            y = self._cross_rank(x)
        else:
            y = super().forward(x)
        return _move_channels(y, self.channels_last, to_first=False)

    def _cross_rank(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        C = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, C] + [1] * (x.dim() - 2)  # broadcast per channel
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in fp32 at least
        count = torch.full((1,), x.numel() // C, dtype=xf.dtype, device=x.device)
        totals = all_reduce_with_grad(torch.cat([xf.sum(dims), count]), self.process_group)  # (C + 1,)
        n = totals[-1]
        mean = totals[:-1] / n  # (C,)
        centred = xf - mean.view(shape)
        var = all_reduce_with_grad(centred.square().sum(dims), self.process_group) / n  # biased, (C,)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.training and self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), n.detach())
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        """torch's update (unbiased variance), with the count `n` kept on the device: no host sync."""
        self.num_batches_tracked.add_(1)
        if self.momentum is not None:
            factor: float | torch.Tensor = self.momentum
        else:  # cumulative moving average
            factor = 1.0 / self.num_batches_tracked.to(self.running_mean.dtype)
        unbiased = var * (n / (n - 1.0).clamp(min=1.0))
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype) * factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype) * factor)


class _ChannelsLastSyncBatchNorm(nn.SyncBatchNorm):
    """torch's SyncBatchNorm for (B, ..., C) inputs (ViT-BN tokens)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(-1, 1)).movedim(1, -1)


def _use_torch_sync(process_group: dist.ProcessGroup | None) -> bool:
    # A mixed "cpu:gloo,cuda:nccl" group trains on CUDA too.
    return dist.is_initialized() and "nccl" in str(dist.get_backend(process_group))


def convert_sync_batchnorm(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Replace every BatchNorm in `module` by a cross-rank one (in place where possible; returns the
    root). Weights, running statistics, `requires_grad` and train/eval mode are kept.

    A BatchNorm whose class sets `channels_last = True` (ViT-BN's `TokenBatchNorm`) keeps its
    (B, N, D) layout.
    """
    torch_sync = _use_torch_sync(process_group)

    def convert(m: nn.Module) -> nn.Module:
        if isinstance(m, _BatchNorm) and not isinstance(m, (CrossRankBatchNorm, nn.SyncBatchNorm)):
            channels_last = bool(getattr(m, "channels_last", False))
            if torch_sync:
                cls = _ChannelsLastSyncBatchNorm if channels_last else nn.SyncBatchNorm
                new = cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, process_group)
            else:
                new = CrossRankBatchNorm(
                    m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, process_group, channels_last
                )
            new = new.to(device=next(iter(m.state_dict().values())).device) if m.state_dict() else new
            with torch.no_grad():
                if m.affine:
                    new.weight.copy_(m.weight)
                    new.bias.copy_(m.bias)
                    new.weight.requires_grad_(m.weight.requires_grad)
                    new.bias.requires_grad_(m.bias.requires_grad)
                if m.track_running_stats:
                    new.running_mean.copy_(m.running_mean)
                    new.running_var.copy_(m.running_var)
                    new.num_batches_tracked.copy_(m.num_batches_tracked)
            new.train(m.training)
            return new
        for name, child in m.named_children():
            m.add_module(name, convert(child))
        return m

    out = convert(module)
    log.info(
        "BatchNorm synchronised across ranks with %s", "torch.nn.SyncBatchNorm" if torch_sync else "CrossRankBatchNorm"
    )
    return out
