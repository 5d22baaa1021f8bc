"""BatchNorm with statistics over the batch of all ranks, applied to a built model from outside.

MoCo v3 normalises its heads (and ViT-BN its MLP sub-blocks) with BatchNorm synchronised across
all ranks. The converter uses `CrossRankBatchNorm` on every backend: torch's `SyncBatchNorm`
refuses CPU tensors and, on NCCL, reads a count on the host and all-gathers on every call (16 host
syncs a step for a ViT, about 160 for ViT-BN-L/7), which stops the CPU from running ahead of the
GPU as FSDP2's prefetching needs. A test checks the two agree on a GPU.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from scale.parallel.dist import all_reduce_with_grad
from scale.parallel.recompute import recompute_phase

log = logging.getLogger(__name__)


def _move_channels(x: torch.Tensor, channels_last: bool, to_first: bool) -> torch.Tensor:
    if not channels_last:
        return x
    return x.movedim(-1, 1) if to_first else x.movedim(1, -1)  # (B, N, D) <-> (B, D, N)


class _ReplayedAllReduce(torch.autograd.Function):
    """The sum over ranks of a recomputed forward, taken from the forward it repeats (no
    communication); its backward is the all-reduce of the gradients, as the original's."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, total: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return total.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None, None


class _WideSums(torch.autograd.Function):
    """Per channel, the sum and the sum of squares of `x` (fp32 or wider) in fp64, (2C,): the
    products of fp32 values are exact in fp64. Keeps `x` itself for the backward, not its fp64 copy
    (autograd through `x.double().square()` would keep 8 bytes per element instead of 4); the
    gradient is the same fp64 arithmetic, cast back: d/dx = g_sum + 2 x g_sq."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dims: list[int], shape: list[int]) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.dims, ctx.shape = dims, shape
        wide = x.double()
        return torch.cat([wide.sum(dims), wide.square().sum(dims)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (x,) = ctx.saved_tensors
        g_sum, g_sq = grad.chunk(2)
        out = g_sum.view(ctx.shape) + x.double() * 2 * g_sq.view(ctx.shape)
        return out.to(x.dtype), None, None


class CrossRankBatchNorm(_BatchNorm):
    """BatchNorm over the union of the batches of every rank in `process_group`, on every backend
    (gloo and NCCL alike), with no host sync: torch's SyncBatchNorm reads a count on the host and
    all-gathers on every call, which would stop the CPU from running ahead of the GPU.

    Input is (B, C, ...) or, with `channels_last`, (B, ..., C). Outside training, or with one rank,
    it is plain BatchNorm. One differentiable all-reduce per call carries the count, the sum and the
    sum of squares (in fp64, which keeps the variance as exact as a centred two-pass one) of every
    view given (a list: the heads' two views, each with its own statistics as in the paper's
    Algorithm 1). Under activation recompute the recomputed forward
    reuses the forward's sums (`scale.parallel.recompute`). The output is fp32 under autocast, as
    torch's autocast gives BatchNorm's, else the input's dtype.
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

    def _cross_rank(self) -> bool:
        # As torch.nn.SyncBatchNorm: statistics cross ranks only in training mode.
        return self.training and dist.is_initialized() and dist.get_world_size(self.process_group) > 1

    takes_views = True
    """`ViewwiseMLP` may call it with the list of every view's batch at once (`forward`)."""

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """A batch, or a list of views' batches: each normalised with its own statistics (over every
        rank), the running statistics updated view after view, as separate calls would, with one
        collective for all. Called through the module (never `forward` itself), so that the hooks of
        a sharded backend gather its parameters."""
        if isinstance(x, torch.Tensor):
            return self._views([x])[0]
        return self._views(list(x))

    def _views(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = [_move_channels(x, self.channels_last, to_first=True) for x in views]
        if not self._cross_rank():
            return [_move_channels(super(CrossRankBatchNorm, self).forward(x), self.channels_last, to_first=False)
                    for x in xs]  # fmt: skip
        for x in xs:
            self._check_input_dim(x)
        x0 = xs[0]
        C = x0.shape[1]
        dims = [0, *range(2, x0.dim())]
        shape = [1, C] + [1] * (x0.dim() - 2)  # broadcast per channel
        dtype = torch.promote_types(x0.dtype, torch.float32)  # statistics in fp32 at least
        phase = recompute_phase()
        total = phase[1].replay(self) if phase is not None and phase[0] == "recompute" else None
        xf = [x.to(dtype) for x in xs]
        # Sums in fp64 (the products of fp32 values are exact there): E[x^2] - E[x]^2 then keeps the
        # precision of a centred two-pass variance, in one pass and one collective.
        count = [torch.full((1,), x.numel() // C, dtype=torch.float64, device=x.device) for x in xs]
        local = torch.stack([torch.cat([_WideSums.apply(x, dims, shape), c])
                             for x, c in zip(xf, count, strict=True)])  # (V, 2C + 1)  # fmt: skip
        if total is not None:  # the recompute of a forward: its sums, no collective (the backward's only)
            totals = _ReplayedAllReduce.apply(local, total, self.process_group)
        else:
            totals = all_reduce_with_grad(local, self.process_group)
            if phase is not None:  # the forward of a recomputed module: kept for its recompute
                phase[1].record(self, totals.detach())
        outs = []
        for v, x in enumerate(xf):
            n = totals[v, -1]
            mean_wide = totals[v, :C] / n
            mean = mean_wide.to(dtype)
            var = (totals[v, C : 2 * C] / n - mean_wide.square()).clamp(min=0.0).to(dtype)  # biased, (C,)
            y = (x - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
            if self.affine:
                y = y * self.weight.view(shape) + self.bias.view(shape)
            if self.track_running_stats:
                self._update_running_stats(mean.detach(), var.detach(), n.detach().to(dtype))
            out_dtype = dtype if torch.is_autocast_enabled(y.device.type) else xs[v].dtype
            outs.append(_move_channels(y.to(out_dtype), self.channels_last, to_first=False))
        return outs

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


def convert_sync_batchnorm(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Replace every BatchNorm in `module` by a cross-rank one (in place where possible; returns the
    root). Weights, running statistics, `requires_grad` and train/eval mode are kept.

    A BatchNorm whose class sets `channels_last = True` (ViT-BN's `TokenBatchNorm`) keeps its
    (B, N, D) layout.
    """

    def convert(m: nn.Module) -> nn.Module:
        if isinstance(m, _BatchNorm) and not isinstance(m, (CrossRankBatchNorm, nn.SyncBatchNorm)):
            channels_last = bool(getattr(m, "channels_last", False))
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
    log.info("BatchNorm synchronised across ranks with CrossRankBatchNorm (one collective per call, no host sync)")
    return out
