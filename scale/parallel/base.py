"""The backend contract every parallelism plugs into, and the single-process backend.

The trainer only ever calls the public methods below; a backend overrides small hooks (`_wrap`,
`_no_sync`, `_save_model`, ...). It knows nothing about MoCo beyond two duck-typed calls on the
model: `model(x1, x2)` returns the loss and `model.momentum_update(momentum)` moves the momentum
encoder (see `scale.models.moco`).

Per optimizer step the trainer does:
    for each micro-batch: loss = backend.forward_backward(x1, x2, accum_steps, last=...)
    grad_norm = backend.step(lr, weight_decay, clip)     # None when skipped (non-finite gradients)
    if grad_norm is not None: backend.momentum_update(next momentum)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from scale.optim import set_lr_wd
from scale.parallel.placement import plan_placement

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class ShardingPlan:
    """What a sharded backend needs to know about a model, given by whoever knows the model.

    units: modules to shard one by one, innermost first (e.g. every transformer block of both
        encoders, then the encoders); the root is sharded last by the backend.
    forward_methods: (module, method name) pairs called from outside besides `forward` (e.g. an
        encoder's `pooled_features` for evaluation), so sharded backends gather parameters for them.
    """

    units: list[nn.Module] = field(default_factory=list)
    forward_methods: list[tuple[nn.Module, str]] = field(default_factory=list)


@torch.no_grad()
def ema_(targets: list[torch.Tensor], sources: list[torch.Tensor], momentum: float) -> None:
    """targets <- momentum * targets + (1 - momentum) * sources, in place, the authors' operation
    order (`scale.models.MoCoV3.momentum_update`), on whatever local tensors a backend holds."""
    if targets:
        torch._foreach_mul_(targets, momentum)
        torch._foreach_add_(targets, sources, alpha=1.0 - momentum)


class BackendError(ValueError):
    """A parallel/precision setting that cannot work here: the message says what to change."""


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on CUDA GPUs that support it, else fp32. fp16 needs CUDA."""
    if precision not in PRECISIONS:
        raise BackendError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise BackendError(
            "fp16 needs a CUDA GPU (loss scaling and fp16 kernels); on CPU use --parallel.precision=bf16 or fp32"
        )
    return precision


class Backend:
    """One process's model, optimizer, precision and communication."""

    name = "single"
    preferred_optimizer = None
    """Optimizer implementation this backend prefers under `--optim.implementation=auto`."""
    has_loss_scaling = False
    """True when skipped steps can be loss-scale overflows (fp16), not failures."""

    def __init__(self, precision: str = "auto", device: torch.device | None = None):
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        if device is None:
            launch, plan = plan_placement()
            device = torch.device(plan.kind, plan.index) if plan.kind == "cuda" else torch.device("cpu")
            log.info("rank %d: %s (%s; launched by %s)", self.rank, device, plan.reason, launch.launcher)
        self.device = device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.precision = resolve_precision(precision, device)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.has_loss_scaling = self.scaler is not None
        self.model: nn.Module | None = None  # the (possibly wrapped) module that runs the forward
        self.module: nn.Module | None = None  # the plain model underneath
        self.optimizer: torch.optim.Optimizer | None = None

    # ------------------------------------------------------------------ set-up

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(
        self,
        model: nn.Module,
        optimizer_factory: OptimizerFactory,
        cfg: Any = None,
        derived: Any = None,
        plan: ShardingPlan | None = None,
    ) -> None:
        """Move `model` to the device, wrap it (hook), build the optimizer over its parameters.

        `cfg` (the run's `scale.config.Config`) and `derived` (`scale.config.Derived`) are kept for
        backends that need them (micro-batch, accumulation, clipping, stages); `plan` says how to
        shard the model (replicated backends ignore it).
        """
        self.cfg, self.derived, self.plan = cfg, derived, plan or ShardingPlan()
        self.module = model.to(self.device)
        self.model = self._wrap(self.module)
        self.optimizer = optimizer_factory(self.module)

    def _wrap(self, module: nn.Module) -> nn.Module:
        return module

    def _no_sync(self) -> contextlib.AbstractContextManager:
        """Context for micro-steps that must not synchronise gradients (accumulation)."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ the step

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """The loss of one micro-batch (graph kept for `backward`)."""
        x1 = x1.to(self.device, non_blocking=True)
        x2 = x2.to(self.device, non_blocking=True)
        with self.autocast():
            return self.model(x1, x2)

    def backward(self, loss: torch.Tensor, accum_steps: int = 1, last: bool = True) -> None:
        scaled = loss / accum_steps
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()

    def forward_backward(
        self, x1: torch.Tensor, x2: torch.Tensor, accum_steps: int = 1, last: bool = True
    ) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns the (unscaled, detached) loss. Gradients
        are synchronised across ranks on the `last` micro-batch of a step only."""
        with self._no_sync() if not last else contextlib.nullcontext():
            loss = self.forward(x1, x2)
            self.backward(loss, accum_steps, last)
        return loss.detach()

    def step(self, lr: float, weight_decay: float, clip_grad: float = 0.0) -> float | None:
        """Clip, check and apply the accumulated gradients; zero them. Returns the global gradient
        norm (before clipping), or None if the gradients were not finite and the step was skipped."""
        set_lr_wd(self.optimizer, lr, weight_decay)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = self._grad_norm(clip_grad)
        finite = bool(torch.isfinite(norm))
        if self.scaler:
            self.scaler.step(self.optimizer)  # skips by itself on inf/nan
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm) if finite else None

    def _grad_norm(self, clip_grad: float) -> torch.Tensor:
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        max_norm = clip_grad if clip_grad > 0 else float("inf")
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    def momentum_update(self, momentum: float) -> None:
        self.module.momentum_update(momentum)

    def snapshot_buffers(self) -> list[torch.Tensor]:
        """Copies of the BatchNorm statistics, to undo a step whose loss was not finite."""
        return [b.detach().clone() for b in self.module.buffers()]

    def restore_buffers(self, saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for b, s in zip(self.module.buffers(), saved, strict=True):
                b.copy_(s)

    # ------------------------------------------------------------------ communication

    def all_reduce_mean(self, value: float | torch.Tensor) -> float:
        t = torch.as_tensor(value, dtype=torch.float64, device=self._comm_device())
        if self.world_size > 1:
            dist.all_reduce(t)
            t /= self.world_size
        return float(t)

    def all_true(self, flag: bool | torch.Tensor) -> bool:
        """True if `flag` holds on every rank."""
        t = torch.as_tensor(flag, dtype=torch.int32, device=self._comm_device()).reshape(1)
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (for decisions that must agree, e.g. where to resume)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Model (both encoders, predictor, BN statistics), optimizer and loss-scaler state."""
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def save(self, directory: Path) -> None:
        """Write the training state into `directory` (rank 0 writes for replicated backends)."""
        if self.is_main:
            torch.save(self.state_dict(), directory / "model.pt")

    def load(self, directory: Path) -> None:
        state = torch.load(directory / "model.pt", map_location=self.device, weights_only=False)
        self.load_state_dict(state)

    @contextlib.contextmanager
    def evaluation(self, module: nn.Module):
        """Context in which `module` (a part of this backend's model) can run evaluation forwards
        outside the training forward; yields a function x -> module.pooled_features(x) that
        prepares the input as this backend needs. Call on every rank."""
        yield module.pooled_features

    def eval_model(self) -> nn.Module:
        """The model to run evaluation forwards with, on every rank (sharded backends return their
        sharded module: every rank must run the same number of forwards)."""
        return self.module

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's complete state dict on CPU (on every rank), e.g. to export or compare."""
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def num_params(self, module: nn.Module, trainable_only: bool = False) -> int:
        """Parameter count of `module` (sharded backends count the full tensors)."""
        return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

    def state_bytes(self, trainable: int, momentum: int, accum_steps: int = 1) -> dict[str, float]:
        """Theoretical bytes per rank of parameters, gradients, optimizer state and the momentum
        encoder, by component (`scale.train.memory.state_bytes`, docs/scaling.md)."""
        from scale.train.memory import state_bytes

        return state_bytes("ddp", trainable, momentum, self.world_size, self.precision)

    def model_state_bytes(self, trainable: int, momentum: int, accum_steps: int = 1) -> float:
        """Total of `state_bytes`, for the memory check before training."""
        return sum(self.state_bytes(trainable, momentum, accum_steps).values())

    def describe(self) -> str:
        return f"{self.name} on {self.device}, {self.world_size} rank(s), {self.precision}"


class SingleProcess(Backend):
    """One process, one device: no communication."""

    name = "single"
