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


class _CrossRankNorm(torch.autograd.Function):
    """Every view's BatchNorm output from statistics over all ranks: y_v = (x_v - mean_v) * invstd_v
    * weight + bias, computed in `dtype` (fp32 at least). Keeps only the inputs (in their own dtype)
    and the statistics for the backward, as torch's SyncBatchNorm: a ResNet keeps a quarter of the
    bytes an autograd graph through the elementwise operations would. The gradient through the
    statistics needs the sums over all ranks of dy and dy * xhat: one all-reduce for all views.

    `meta` = (process group, broadcast shape, dims reduced, compute dtype, output dtypes)."""

    @staticmethod
    def forward(ctx, weight, bias, stats, counts, meta, *xs):
        group, shape, dims, dtype, out_dtypes = meta
        ctx.meta, ctx.affine = meta, weight is not None
        ctx.save_for_backward(stats, counts, *([weight] if weight is not None else []), *xs)
        outs = []
        for v, x in enumerate(xs):
            y = (x.to(dtype) - stats[v, 0].view(shape)) * stats[v, 1].view(shape)
            if weight is not None:
                y = y * weight.to(dtype).view(shape) + bias.to(dtype).view(shape)
            outs.append(y.to(out_dtypes[v]))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        group, shape, dims, dtype, _ = ctx.meta
        stats, counts, *xs = ctx.saved_tensors
        weight = xs.pop(0) if ctx.affine else None
        xhats, dys, local = [], [], []
        for v, (x, dy) in enumerate(zip(xs, grads, strict=True)):
            xhat = (x.to(dtype) - stats[v, 0].view(shape)) * stats[v, 1].view(shape)
            dy = torch.zeros_like(xhat) if dy is None else dy.to(dtype)
            xhats.append(xhat)
            dys.append(dy)
            local.append(torch.cat([dy.sum(dims), (dy * xhat).sum(dims)]))
        local_sums = torch.stack(local)  # (V, 2C): this rank's sums of dy and dy * xhat, per channel
        total = local_sums.clone()
        dist.all_reduce(total, group=group)
        C = stats.shape[-1]
        dxs = []
        for v, (x, xhat, dy) in enumerate(zip(xs, xhats, dys, strict=True)):
            n = counts[v].to(dtype)
            scale = stats[v, 1] if weight is None else stats[v, 1] * weight.to(dtype)
            dx = (dy - (total[v, :C] / n).view(shape) - xhat * (total[v, C:] / n).view(shape)) * scale.view(shape)
            dxs.append(dx.to(x.dtype))
        grad_w = grad_b = None
        if weight is not None:  # this rank's part: the backend reduces parameter gradients over ranks
            grad_b = local_sums[:, :C].sum(0).to(weight.dtype)
            grad_w = local_sums[:, C:].sum(0).to(weight.dtype)
        return (grad_w, grad_b, None, None, None, *dxs)


class CrossRankBatchNorm(_BatchNorm):
    """BatchNorm over the union of the batches of every rank in `process_group`, on every backend
    (gloo and NCCL alike), with no host sync: torch's SyncBatchNorm reads a count on the host and
    all-gathers on every call, which would stop the CPU from running ahead of the GPU.

    Input is (B, C, ...) or, with `channels_last`, (B, ..., C). Outside training, or with one rank,
    it is plain BatchNorm. One all-reduce per call carries the count, the sum and the sum of squares
    (in fp64, from each rank's centred mean and variance: as exact as a centred one) of every view given (a
    list: the heads' two views, each with its own statistics as in the paper's Algorithm 1), and one
    in the backward the sums of the gradients the statistics need (`_CrossRankNorm`, which keeps
    only the input for the backward). Under activation recompute the recomputed forward reuses the
    forward's sums (`scale.parallel.recompute`). The output is fp32 under autocast (the heads, ViT-BN)
    or, with `keep_input_dtype` (a convolution's BatchNorm2d), the input's dtype, as cuDNN's.
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
        keep_input_dtype: bool = False,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group
        self.channels_last = channels_last
        self.keep_input_dtype = keep_input_dtype
        """Output in the input's dtype under autocast too (a convolution's BatchNorm2d, as cuDNN's under
        CUDA autocast: bf16 maps stay bf16); else fp32 under autocast (the heads' and ViT-BN's)."""

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
        dtype = torch.promote_types(x0.dtype, torch.float32)  # statistics and arithmetic in fp32 at least
        phase = recompute_phase()
        with torch.no_grad():  # the statistics' gradient is `_CrossRankNorm`'s backward
            if phase is not None and phase[0] == "recompute":  # the forward's sums: no collective
                totals = phase[1].replay(self)
            else:
                # Sums in fp64 from each rank's centred statistics: E[x^2] - E[x]^2 over all ranks then
                # keeps the precision of a centred variance, in one collective.
                local = torch.stack([self._sums(x, dims) for x in xs])  # (V, 2C + 1)
                totals = all_reduce_with_grad(local, self.process_group)
                if phase is not None:  # the forward of a recomputed module: kept for its recompute
                    phase[1].record(self, totals)
            n = totals[:, -1:]  # (V, 1)
            mean = totals[:, :C] / n
            var = (totals[:, C : 2 * C] / n - mean.square()).clamp(min=0.0)  # biased, (V, C)
            stats = torch.stack([mean, torch.rsqrt(var + self.eps)], dim=1).to(dtype)  # (V, 2, C)
        autocast = torch.is_autocast_enabled(x0.device.type)
        out_dtypes = [x.dtype if self.keep_input_dtype or not autocast else dtype for x in xs]
        meta = (self.process_group, shape, dims, dtype, out_dtypes)
        weight, bias = (self.weight, self.bias) if self.affine else (None, None)
        outs = _CrossRankNorm.apply(weight, bias, stats, totals[:, -1].clone(), meta, *xs)
        if self.track_running_stats:
            for v in range(len(xs)):
                self._update_running_stats(mean[v].to(dtype), var[v].to(dtype), n[v, 0].to(dtype))
        return [_move_channels(y, self.channels_last, to_first=False) for y in outs]

    @staticmethod
    def _sums(x: torch.Tensor, dims: list[int]) -> torch.Tensor:
        """Per channel, in fp64: the sum and the sum of squares of `x`, and the count; (2C + 1,).
        From this rank's mean and variance (`torch.var_mean`: one pass, no temporary the size of `x`
        in fp32 inputs; a ResNet's largest maps would need two fp64 copies otherwise), so the sums
        over ranks give the global variance without cancellation: E[x^2] - E[x]^2 with E[x^2] =
        var + mean^2 per rank, exact in fp64."""
        var, mean = torch.var_mean(x if x.dtype in (torch.float32, torch.float64) else x.float(), dims, correction=0)
        n = x.numel() // x.shape[1]
        mean, var = mean.double(), var.double()
        count = torch.full((1,), n, dtype=torch.float64, device=x.device)
        return torch.cat([mean * n, (var + mean.square()) * n, count])

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
            new = CrossRankBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, process_group,
                                     channels_last, keep_input_dtype=isinstance(m, nn.BatchNorm2d))  # fmt: skip
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
