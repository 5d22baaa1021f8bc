"""Optimizers: AdamW (torch fused/foreach, DeepSpeed FusedAdam), LAMB (`Lamb` below, foreach; apex
FusedLAMB or DeepSpeed FusedLamb on request), LARS (the authors' `moco/optimizer.py`).

Parameter groups hold only trainable parameters: the frozen random patch projection and the fixed
sin-cos table never reach an optimizer. Each group carries `wd_scale` (1 or 0), so the trainer can
set a scheduled weight decay every step without undoing the exclusions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "lamb", "lars")
IMPLEMENTATIONS = ("auto", "torch", "torch-fused", "apex", "deepspeed", "scale")


def param_groups(model: nn.Module, exclude_norm_bias: bool = False,
                 lr_scale: Callable[[str], float] | None = None) -> list[dict]:  # fmt: skip
    """Trainable parameters in one group (the authors': weight decay on everything), or two with
    norms, biases, the class token and position embeddings excluded from weight decay; with
    `lr_scale` (a parameter's name -> its lr multiplier: layer-wise decay), one group per
    (multiplier, decay) pair, each with its `lr_scale`."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_token = name.endswith(("cls_token", "pos_embed"))
        wd = 0.0 if exclude_norm_bias and (p.ndim <= 1 or is_token) else 1.0
        groups.setdefault((lr_scale(name) if lr_scale else 1.0, wd), []).append(p)
    if not lr_scale:
        out = [{"params": groups.get((1.0, 1.0), []), "wd_scale": 1.0}]
        if (1.0, 0.0) in groups:
            out.append({"params": groups[(1.0, 0.0)], "wd_scale": 0.0})
        return out
    return [{"params": ps, "wd_scale": wd, "lr_scale": scale} for (scale, wd), ps in sorted(groups.items())]


def layer_decay_scale(depth: int, decay: float) -> Callable[[str], float]:
    """BEiT's layer-wise lr decay for a ViT of `depth` blocks: the patch embedding, class token and
    position table are layer 0, block i layer i + 1, the rest (final norm, classifier) layer
    depth + 1; layer l's lr is scaled by decay^(depth + 1 - l)."""

    def scale(name: str) -> float:
        parts = name.split(".")
        if "blocks" in parts:
            layer = int(parts[parts.index("blocks") + 1]) + 1
        elif any(p in ("patch_embed", "cls_token", "pos_embed") for p in parts):
            layer = 0
        else:
            layer = depth + 1
        return decay ** (depth + 1 - layer)

    return scale


# Foreach temporaries are bounded by processing a group's tensors in chunks of this many elements.
FOREACH_CHUNK_NUMEL = 1 << 24


def foreach_chunks(tensors: list[torch.Tensor], max_numel: int = FOREACH_CHUNK_NUMEL) -> list[slice]:
    """Consecutive index ranges whose tensors hold at most `max_numel` elements (one tensor larger
    than that is a range of its own)."""
    out, start, total = [], 0, 0
    for i, t in enumerate(tensors):
        if total and total + t.numel() > max_numel:
            out.append(slice(start, i))
            start, total = i, 0
        total += t.numel()
    if start < len(tensors):
        out.append(slice(start, len(tensors)))
    return out


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2020): Adam's update plus decoupled weight decay, rescaled per tensor by the
    trust ratio ||w|| / ||update|| (1 where either norm is 0). Bias-corrected moments.

    Two implementations of the same arithmetic: `foreach=True` (default) runs each operation over
    all tensors of a chunk at once (`torch._foreach_*`: a few kernels per chunk on a GPU, no fused
    kernel needed); `foreach=False` is the per-tensor reference.

    Like torch's fused optimizers (`_step_supports_amp_scaling`), `step` reads `self.found_inf` (a
    0-dim float32 tensor, 1 to skip) and `self.grad_scale` when they are set: a step is then
    skipped on the device, without a host synchronisation (parameters, moments and the step count
    stay unchanged). The gradients of a skipped step may be zeroed (they are discarded anyway).
    Per-tensor trust ratios need whole tensors: under FSDP2 the parameters are DTensors, whose
    norms cover the whole tensor.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        foreach: bool = True,
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach))

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            # The step count lives on the parameter's device: bias corrections need no host value.
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif not torch.is_tensor(state["step"]):  # a checkpoint of the earlier per-tensor Lamb (int step)
            state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32, device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._init_state(p) for p in params]
            grads = [p.grad for p in params]
            if grad_scale is not None:
                torch._foreach_div_(grads, grad_scale.to(grads[0].device))
            keep = None
            if found_inf is not None:
                keep = 1.0 - found_inf.to(device=grads[0].device, dtype=torch.float32)
                # Non-finite gradients must not reach the moments, even multiplied by 0 (NaN * 0 = NaN).
                for g in grads:
                    g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            if group.setdefault("foreach", True):  # groups of older checkpoints lack the key
                for rows in foreach_chunks(params):
                    self._foreach_step(group, params[rows], grads[rows], states[rows], keep)
            else:
                for p, g, state in zip(params, grads, states, strict=True):
                    self._single_step(group, p, g, state, keep)
        return loss

    @staticmethod
    def _single_step(group: dict, p: torch.Tensor, g: torch.Tensor, state: dict, keep: torch.Tensor | None) -> None:
        beta1, beta2 = group["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if keep is None:
            state["step"] += 1
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        else:  # the same with the increments scaled by keep (1: a step, 0: no change at all)
            state["step"] += keep
            m.mul_(1 - (1 - beta1) * keep).add_(g * ((1 - beta1) * keep))
            v.mul_(1 - (1 - beta2) * keep).add_(g * g * ((1 - beta2) * keep))
        t = state["step"].clamp(min=1)  # a first step that was skipped: no 0 / 0
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        update = m_hat / (v_hat.sqrt() + group["eps"])
        if group["weight_decay"]:
            update.add_(p, alpha=group["weight_decay"])
        w_norm, u_norm = p.norm(), update.norm()
        trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
        p.add_(update * (trust if keep is None else trust * keep), alpha=-group["lr"])

    @staticmethod
    def _foreach_step(group: dict, params: list, grads: list, states: list[dict], keep: torch.Tensor | None) -> None:
        beta1, beta2 = group["betas"]
        ms = [s["exp_avg"] for s in states]
        vs = [s["exp_avg_sq"] for s in states]
        steps = [s["step"] for s in states]
        if keep is None:
            torch._foreach_add_(steps, 1)
            torch._foreach_mul_(ms, beta1)
            torch._foreach_add_(ms, grads, alpha=1 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
        else:
            # Tensor scalars (a 0-dim `keep`) go through the `.Tensor` overloads: no host sync.
            torch._foreach_add_(steps, [keep] * len(steps))
            torch._foreach_mul_(ms, 1 - (1 - beta1) * keep)
            torch._foreach_add_(ms, torch._foreach_mul(grads, (1 - beta1) * keep))
            torch._foreach_mul_(vs, 1 - (1 - beta2) * keep)
            g2 = torch._foreach_mul(grads, grads)
            torch._foreach_mul_(g2, (1 - beta2) * keep)
            torch._foreach_add_(vs, g2)
            del g2
        t = torch._foreach_clamp_min(steps, 1.0)  # a first step that was skipped: no 0 / 0
        bc1, bc2 = torch._foreach_pow(beta1, t), torch._foreach_pow(beta2, t)  # (0-dim each)
        for bc in (bc1, bc2):  # 1 - beta^t
            torch._foreach_neg_(bc)
            torch._foreach_add_(bc, 1.0)
        update = torch._foreach_div(ms, bc1)  # m_hat
        denom = torch._foreach_div(vs, bc2)  # v_hat
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_div_(update, denom)
        del denom
        if group["weight_decay"]:
            torch._foreach_add_(update, params, alpha=group["weight_decay"])
        w_norm = torch.stack(torch._foreach_norm(params))  # (n,): every trust ratio in one operation
        u_norm = torch.stack(torch._foreach_norm(update))
        trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
        if keep is not None:
            trust = trust * keep
        torch._foreach_mul_(update, list(trust.to(update[0].dtype).unbind(0)))
        torch._foreach_add_(params, update, alpha=-group["lr"])


class LARS(torch.optim.Optimizer):
    """LARS as the authors' `moco/optimizer.py` (the same operations, bitwise): tensors of dimension
    <= 1 (norms, biases) get no weight decay and no trust-ratio scaling.

    Like `Lamb`, `step` reads `self.found_inf` (0-dim float32, 1 to skip) and `self.grad_scale` when
    they are set: a non-finite step is skipped on the device, without a host synchronisation
    (parameters and momentum buffers unchanged). Under FSDP2 the parameters are DTensors, whose norms
    cover the whole tensor."""

    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 nesterov: bool = False, trust_coefficient: float = 0.001):  # fmt: skip
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        trust_coefficient=trust_coefficient)  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if grad_scale is not None:
                    dp = dp / grad_scale.to(dp.device)
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
                if found_inf is None:
                    mu.mul_(g["momentum"]).add_(dp)
                    update = dp.add(mu, alpha=g["momentum"]) if g["nesterov"] else mu
                else:  # the new buffer only where the step is kept; a skipped step adds 0 x the old one
                    keep = found_inf.to(device=p.device) == 0
                    mu.copy_(torch.where(keep, mu * g["momentum"] + dp, mu))
                    update = dp.add(mu, alpha=g["momentum"]) if g["nesterov"] else mu
                    update = torch.where(keep, update, torch.zeros_like(update))  # not x 0: NaN x 0 is NaN
                p.add_(update, alpha=-g["lr"])
        return loss


def _on_cuda(groups: list[dict]) -> bool:
    return any(p.is_cuda for g in groups for p in g["params"])


def _has_dtensor(groups: list[dict]) -> bool:
    """True for FSDP2's sharded parameters (DTensors): kernels that read `p.data` see only a shard."""
    try:
        from torch.distributed.tensor import DTensor  # here: a torch built without distributed has none
    except ImportError:  # torch built without distributed
        return False
    return any(isinstance(p, DTensor) for g in groups for p in g["params"])


_logged: set[str] = set()


def _log_once(key: str, level: int, message: str, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        log.log(level, message, *args)


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

    `auto` chooses only implementations that compute exactly `scale`'s update: torch's fused
    AdamW on CUDA and CPU (every backend; DeepSpeed ZeRO takes it as a client optimizer, and it
    skips non-finite steps on the device), torch's foreach AdamW on request ('torch'); `scale`'s
    foreach `Lamb`; the
    authors' LARS. The fused LAMB kernels are available on request only: apex FusedLAMB computes
    the same update (by its source; not run here) but reads `p.data`, so not on FSDP2's DTensor
    parameters; DeepSpeed FusedLamb is another variant (see below). DeepSpeed FusedAdam is on request
    only: it JIT-compiles with nvcc at first use.

    Raises:
        ValueError: unknown name or implementation, or an implementation that is not available
            or cannot work on these parameters.
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
            if _has_dtensor(groups):
                raise ValueError("DeepSpeed FusedAdam cannot update FSDP2's DTensor parameters; use "
                                 "--optim.implementation=auto (torch's fused AdamW)")  # fmt: skip
            from deepspeed.ops.adam import FusedAdam  # optional dependency

            return FusedAdam(groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True), "deepspeed FusedAdam (AdamW mode)"
        if implementation not in ("auto", "torch", "torch-fused"):
            raise ValueError(f"AdamW implementations: auto, torch, torch-fused, deepspeed (got {implementation!r})")
        # Fused on CUDA and on CPU (ViT-S on this 2-core CPU: 38 ms a step against foreach's 148, no
        # temporaries of the parameters' size, skips on the device); 'torch': the foreach kernels,
        # whose CPU path reads each tensor's step count on the host (rounding differs in the last bits).
        fused = implementation in ("auto", "torch-fused")
        kind = {"fused": True} if fused else {"foreach": True}
        opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kind)
        return opt, f"torch AdamW ({'fused' if fused else 'foreach'})"

    if name == "lamb":
        if implementation in ("apex", "deepspeed"):
            if not cuda:
                raise ValueError(f"{implementation} LAMB needs CUDA parameters; use --optim.implementation=auto")
            if _has_dtensor(groups):
                raise ValueError(
                    f"{implementation}'s fused LAMB reads p.data, which is one shard of an FSDP2 DTensor parameter: "
                    "its trust ratios would be per shard. Use --optim.implementation=auto (scale's foreach Lamb, "
                    "whole-tensor norms) or --parallel.backend=ddp"
                )
        if implementation == "apex":
            try:
                from apex.optimizers import FusedLAMB  # optional dependency
            except ImportError:
                raise ValueError(
                    "apex is not installed: build it from github.com/NVIDIA/apex with --cuda_ext, "
                    "or use --optim.implementation=auto"
                ) from None
            # The same algorithm as `Lamb`: no internal global-norm clipping (an infinite bound is
            # a no-op in its kernel; clip with optim.clip_grad instead) and the trust ratio on every
            # group (NVLAMB).
            opt = FusedLAMB(groups, lr=lr, betas=betas, eps=eps, max_grad_norm=float("inf"), use_nvlamb=True)
            return opt, "apex FusedLAMB (no internal clipping, trust ratio on every group)"
        if implementation == "deepspeed":
            try:
                from deepspeed.ops.lamb import FusedLamb  # optional dependency
            except ImportError:
                raise ValueError("deepspeed is not installed: pip install deepspeed") from None
            _log_once(
                "ds-lamb",
                logging.WARNING,
                "DeepSpeed FusedLamb is a different LAMB variant from scale's (and the paper's): it folds Adam's "
                "bias correction into the step size outside the trust ratio (sqrt(1-b2^t)/(1-b1^t): 0.32x at step 1, "
                "0.15x at step 10, 0.80x at step 1000), adds eps and weight decay to the uncorrected moments, and "
                "compiles with nvcc at first use. --optim.implementation=auto gives scale's Lamb",
            )
            # Its trust-ratio clamp [0.01, 10] is removed, as in `Lamb`; the differences above remain.
            opt = FusedLamb(groups, lr=lr, betas=betas, eps=eps, max_coeff=1e9, min_coeff=0.0)
            return opt, "deepspeed FusedLamb (a different LAMB variant; trust ratio unclamped)"
        if implementation not in ("auto", "scale"):
            raise ValueError(f"LAMB implementations: auto (scale), scale, apex, deepspeed (got {implementation!r})")
        return Lamb(groups, lr=lr, betas=betas, eps=eps), "scale Lamb (foreach)"

    if implementation not in ("auto", "scale"):
        raise ValueError(f"LARS has one implementation, scale's (got {implementation!r})")
    return LARS(groups, lr=lr, momentum=momentum, trust_coefficient=trust_coefficient), "scale LARS (authors')"


def supports_device_skip(optimizer: torch.optim.Optimizer) -> bool:
    """True when `optimizer.step()` honours a `found_inf` tensor set on it (torch's fused Adam/AdamW,
    scale's Lamb and LARS): a non-finite step is then skipped on the device, with no host sync."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return bool(optimizer.defaults.get("fused"))
    return isinstance(optimizer, Lamb | LARS)


def set_lr_wd(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Set this step's lr and weight decay on every group (groups keep their wd exclusion)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        g["weight_decay"] = weight_decay * g.get("wd_scale", 1.0)
