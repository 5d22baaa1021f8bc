"""Optimizers: AdamW (torch fused/foreach, DeepSpeed FusedAdam), LAMB (apex FusedLAMB, DeepSpeed
FusedLamb, or the pure-torch `Lamb` below), LARS (the authors' `moco/optimizer.py`).

Parameter groups hold only trainable parameters: the frozen random patch projection and the fixed
sin-cos table never reach an optimizer. Each group carries `wd_scale` (1 or 0), so the trainer can
set a scheduled weight decay every step without undoing the exclusions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "lamb", "lars")
IMPLEMENTATIONS = ("auto", "torch", "torch-fused", "apex", "deepspeed", "scale")


def param_groups(model: nn.Module, exclude_norm_bias: bool = False) -> list[dict]:
    """Trainable parameters in one group (the authors': weight decay on everything), or two with
    norms, biases, the class token and position embeddings excluded from weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_token = name.endswith(("cls_token", "pos_embed"))
        (no_decay if exclude_norm_bias and (p.ndim <= 1 or is_token) else decay).append(p)
    groups = [{"params": decay, "wd_scale": 1.0}]
    if no_decay:
        groups.append({"params": no_decay, "wd_scale": 0.0})
    return groups


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2020): Adam's update plus decoupled weight decay, rescaled per tensor by the
    trust ratio ||w|| / ||update|| (1 where either norm is 0). Bias-corrected moments."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = m / (1 - beta1 ** state["step"])
                v_hat = v / (1 - beta2 ** state["step"])
                update = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                w_norm, u_norm = p.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.add_(update * trust, alpha=-group["lr"])
        return loss


class LARS(torch.optim.Optimizer):
    """LARS as the authors' `moco/optimizer.py`: tensors of dimension <= 1 (norms, biases) get no
    weight decay and no trust-ratio scaling."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 nesterov: bool = False, trust_coefficient: float = 0.001):  # fmt: skip
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        trust_coefficient=trust_coefficient)  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(
                        param_norm > 0.0,
                        torch.where(update_norm > 0, g["trust_coefficient"] * param_norm / update_norm, one),
                        one,
                    )
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                dp = dp.add(mu, alpha=g["momentum"]) if g["nesterov"] else mu
                p.add_(dp, alpha=-g["lr"])
        return loss


def _on_cuda(groups: list[dict]) -> bool:
    return any(p.is_cuda for g in groups for p in g["params"])


def build_optimizer(
    name: str,
    groups: Iterable[dict],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    momentum: float = 0.9,
    trust_coefficient: float = 0.001,
    implementation: str = "auto",
) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer and a description of the implementation chosen (log it).

    Raises:
        ValueError: unknown name or implementation, or an implementation that is not available.
    """
    groups = [dict(g) for g in groups]
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown optimizer implementation {implementation!r}; one of {', '.join(IMPLEMENTATIONS)}")
    cuda = _on_cuda(groups)
    for g in groups:
        g["weight_decay"] = weight_decay * g.get("wd_scale", 1.0)

    if name == "adamw":
        if implementation == "deepspeed":
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True), "deepspeed FusedAdam (AdamW mode)"
        if implementation not in ("auto", "torch", "torch-fused"):
            raise ValueError(f"AdamW implementations: torch, torch-fused, deepspeed (got {implementation!r})")
        # torch-fused: the fused kernel on a CPU too (no foreach temporaries of the parameters' size:
        # less peak memory; rounding differs from foreach in the last bits).
        fused = cuda or implementation == "torch-fused"
        kind = {"fused": True} if fused else {"foreach": True}
        opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kind)
        return opt, f"torch AdamW ({'fused' if fused else 'foreach'})"

    if name == "lamb":
        if implementation in ("auto", "apex") and cuda:
            try:
                from apex.optimizers import FusedLAMB

                # The same algorithm as `Lamb`: no internal global-norm clipping (clip with
                # optim.clip_grad instead) and the trust ratio on every group (NVLAMB).
                opt = FusedLAMB(groups, lr=lr, betas=betas, eps=eps, max_grad_norm=float("inf"), use_nvlamb=True)
                return opt, "apex FusedLAMB (no internal clipping, trust ratio on every group)"
            except ImportError:
                if implementation == "apex":
                    raise ValueError(
                        "apex is not installed: build it from github.com/NVIDIA/apex with --cuda_ext, "
                        "or use --optim.implementation=auto"
                    ) from None
                log.info("apex not installed (NVIDIA/apex, built with --cuda_ext, gives FusedLAMB); trying DeepSpeed")
        if implementation in ("auto", "deepspeed") and cuda:
            try:
                from deepspeed.ops.lamb import FusedLamb

                # DeepSpeed clamps the trust ratio to [min_coeff, max_coeff] (0.01, 10 by default);
                # unclamped here, as `Lamb` and the paper's LAMB.
                opt = FusedLamb(groups, lr=lr, betas=betas, eps=eps, max_coeff=1e9, min_coeff=0.0)
                return opt, "deepspeed FusedLamb (trust ratio unclamped)"
            except ImportError:
                if implementation == "deepspeed":
                    raise ValueError("deepspeed is not installed: pip install deepspeed") from None
        if implementation in ("apex", "deepspeed"):
            raise ValueError(f"{implementation} LAMB needs CUDA parameters; use --optim.implementation=scale on CPU")
        return Lamb(groups, lr=lr, betas=betas, eps=eps), "scale Lamb (pure torch)"

    if implementation not in ("auto", "scale"):
        raise ValueError(f"LARS has one implementation, scale's (got {implementation!r})")
    return LARS(groups, lr=lr, momentum=momentum, trust_coefficient=trust_coefficient), "scale LARS (authors')"


def set_lr_wd(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Set this step's lr and weight decay on every group (groups keep their wd exclusion)."""
    for g in optimizer.param_groups:
        g["lr"] = lr
        g["weight_decay"] = weight_decay * g.get("wd_scale", 1.0)
