"""The backend contract every parallelism plugs into, and the single-process backend.

The trainer only ever calls the public methods below; a backend overrides small hooks (`_wrap`,
`_no_sync`, `_momentum_pairs`, `_local_grad`, ...). It knows nothing about MoCo beyond two
duck-typed calls on the model: `model(x1, x2)` returns the loss and `model.momentum_pairs()` pairs
the momentum encoder's parameters with the base encoder's (see `scale.models.moco`).

Per optimizer step the trainer does:
    saved = backend.snapshot_buffers()
    for each micro-batch: loss = backend.forward_backward(x1, x2, accum_steps, last=...)
    result = backend.step(lr, weight_decay, clip)         # grad norm, applied (device tensors)
    backend.restore_buffers(saved, result.applied)       # BN statistics back if skipped
    backend.momentum_update(next momentum, result.applied)

Nothing in it waits for the device (no host sync) with torch's fused AdamW or scale's Lamb: the
decision to skip a non-finite step stays a device tensor until a log row reads it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from scale.errors import CheckpointError
from scale.hardware.precision import autocast_dtype, check_cpu_bf16, resolve_precision
from scale.optim import set_lr_wd, supports_device_skip
from scale.optim.optimizers import foreach_chunks
from scale.parallel.ema import ema_
from scale.parallel.memory import state_bytes
from scale.parallel.placement import plan_placement
from scale.parallel.settings import BackendSettings, ShardingPlan
from scale.safe_load import check_files, load_safely
from scale.views import views_to

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


def on_device(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` moved to `device`; left as it is when every tensor is there already (a simulated
    run's fake tensors cannot be moved, nor need to)."""
    tensors = [*module.parameters(), *module.buffers()]
    if all(t.device == device for t in tensors):
        return module
    return module.to(device)


@dataclass
class StepResult:
    """One optimizer step: the global gradient norm before clipping (non-finite when the step was
    skipped) and whether it was applied, as 0-dim device tensors (a bool where a backend already
    knows it on the host)."""

    grad_norm: torch.Tensor
    applied: torch.Tensor | bool
    group_norms: torch.Tensor | None = None
    """(G,) gradient norms of `Backend.grad_groups` (whole tensors, unscaled, before clipping) when
    the step was asked to measure them, on the device."""


_logged: set[str] = set()


def _log_once(key: str, message: str, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        log.info(message, *args)


class Backend:
    """One process's model, optimizer, precision and communication."""

    name = "single"
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
        if self.precision == "bf16" and device.type == "cpu" and self.rank == 0:
            check_cpu_bf16()  # bf16 emulated on CPUs without AVX-512 BF16: hundreds of times slower
        self.autocast_dtype = autocast_dtype(self.precision)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.has_loss_scaling = self.scaler is not None
        self.model: nn.Module | None = None  # the (possibly wrapped) module that runs the forward
        self.module: nn.Module | None = None  # the plain model underneath
        self.optimizer: torch.optim.Optimizer | None = None
        self.grad_groups: list[list[nn.Parameter]] = []
        """Parameter groups (e.g. one per layer) whose gradient norms `step(measure_groups=True)`
        returns; set by the trainer after `setup` (parameters of `self.module`)."""
        self._group_index: tuple[tuple[int, ...], torch.Tensor] | None = None
        self.settings, self.plan = BackendSettings(), ShardingPlan()
        self._momentum_masters: list[torch.Tensor] | None = None
        """fp32 masters of this rank's momentum-encoder tensors where those are held in 16 bits
        (DeepSpeed's bf16/fp16 modes), made at the first update (`momentum_update`)."""

    # ------------------------------------------------------------------ set-up

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def compute_precision(self) -> str:
        """The precision the matmuls run in: bf16 / fp16, or for fp32 on CUDA 'tf32' when TF32 is
        on (`configure_tf32`); the peak that MFU is measured against."""
        tf32 = torch.get_float32_matmul_precision() != "highest"
        if self.precision == "fp32" and self.device.type == "cuda" and tf32:
            return "tf32"
        return self.precision

    def setup(
        self,
        model: nn.Module,
        optimizer_factory: OptimizerFactory,
        settings: BackendSettings | None = None,
        plan: ShardingPlan | None = None,
    ) -> None:
        """Move `model` to the device, wrap it (hook), build the optimizer over its parameters.

        `settings`: the run's values a backend needs (batch split, clipping, the optimizer's name,
        FSDP2 resharding); `plan`: how to shard the model (replicated backends ignore it).
        """
        self.settings, self.plan = settings or BackendSettings(), plan or ShardingPlan()
        self.module = on_device(model, self.device)
        self.model = self._wrap(self.module)
        self.optimizer = optimizer_factory(self.module)

    def _wrap(self, module: nn.Module) -> nn.Module:
        return module

    def _no_sync(self) -> contextlib.AbstractContextManager:
        """Hook: context for micro-steps that must not synchronise gradients (accumulation)."""
        return contextlib.nullcontext()

    def gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's backward: gradients are synchronised across ranks only if
        `enabled` (the last micro-batch of an accumulated step)."""
        return contextlib.nullcontext() if enabled else self._no_sync()

    # ------------------------------------------------------------------ the step

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, keys: tuple | None = None) -> torch.Tensor:
        """The loss of one micro-batch (graph kept for `backward`); against `keys` (`keys()` of every
        micro-batch of the step, with this one's offset) when given."""
        x1, x2 = views_to((x1, x2), self.device)  # one copy when the loader made them one tensor
        with self.autocast():
            return self.model(x1, x2) if keys is None else self.model(x1, x2, keys=keys)

    @torch.no_grad()
    def keys(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both views' keys of one micro-batch, normalised and gathered over the ranks (no graph)."""
        x1, x2 = views_to((x1, x2), self.device)
        with self.autocast():
            return self.model(x1, x2, keys_only=True)

    def backward(self, loss: torch.Tensor, accum_steps: int = 1, last: bool = True) -> None:
        scaled = loss / accum_steps
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()

    def forward_backward(
        self, x1: torch.Tensor, x2: torch.Tensor, accum_steps: int = 1, last: bool = True, keys: tuple | None = None
    ) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns the (unscaled, detached) loss. Gradients
        are synchronised across ranks on the `last` micro-batch of a step only. `keys`: see `forward`."""
        with self.gradient_sync(last):
            loss = self.forward(x1, x2) if keys is None else self.forward(x1, x2, keys)
            self.backward(loss, accum_steps, last)
        return loss.detach()

    def step(self, lr: float, weight_decay: float, clip_grad: float = 0.0, measure_groups: bool = False) -> StepResult:
        """Clip, check and apply the accumulated gradients; zero them.

        Returns the global gradient norm (before clipping) and whether the step was applied (not
        when the norm is not finite), both as device tensors: the decision is taken on the device
        (`found_inf`, as torch's fused optimizers take it from a GradScaler), so a default GPU step
        does not wait for the host. The norm is all-reduced (DDP) or whole (FSDP2), so every rank
        decides alike. With `measure_groups`, also the norms of `grad_groups` (`group_grad_norms`).
        """
        set_lr_wd(self.optimizer, lr, weight_decay)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)  # on the device; records the scaler's own inf check
        groups = self.group_grad_norms() if measure_groups else None
        norm = self._grad_norm(clip_grad)
        applied = torch.isfinite(norm)
        self._optimizer_step(applied)
        if self.scaler:
            self.scaler.update()  # halves the scale after an overflow, on the device
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(norm, applied, groups)

    def group_grad_norms(self) -> torch.Tensor:
        """(G,) float32 L2 norms of the gradients of each of `grad_groups`, of whole tensors (equal
        to one process's), on the device: one `_foreach_norm` over this rank's gradients, the squares
        summed per group, then (sharded backends) one all-reduce of G numbers. No host sync."""
        grads, index = [], []
        for gi, params in enumerate(self.grad_groups):
            for p in params:
                g = self._local_grad(p)
                if g is not None and g.numel():
                    grads.append(g)
                    index.append(gi)
        out = torch.zeros(len(self.grad_groups), dtype=torch.float32, device=self.device)
        if grads:
            key = tuple(index)
            if self._group_index is None or self._group_index[0] != key:  # built once, not copied every step
                self._group_index = (key, torch.tensor(index, device=self.device))
            norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])
            out.index_add_(0, self._group_index[1], norms.square())
        return self._reduce_group_squares(out).sqrt()

    def _local_grad(self, p: nn.Parameter) -> torch.Tensor | None:
        """Hook: this rank's part of `p`'s gradient (replicated backends: all of it)."""
        g = p.grad
        return g.to_local() if g is not None and hasattr(g, "to_local") else g

    def _reduce_group_squares(self, squares: torch.Tensor) -> torch.Tensor:
        """Hook: sum the per-group squared norms over the ranks (sharded backends; replicated ones
        hold whole gradients already)."""
        return squares

    def _sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) on the communication device, returned on `t`'s device (no host sync on NCCL)."""
        if self.world_size == 1:
            return t
        out = t.to(self.comm_device())
        dist.all_reduce(out)
        return out.to(t.device)

    def _optimizer_step(self, applied: torch.Tensor) -> None:
        opt = self.optimizer
        if supports_device_skip(opt):
            opt.grad_scale, opt.found_inf = None, (~applied).to(torch.float32)  # 0-dim float32, as they expect
            try:
                opt.step()
            finally:
                del opt.grad_scale, opt.found_inf
            return
        if self.device.type == "cuda":
            _log_once(
                "host-skip",
                "%s cannot skip a non-finite step on the device: one host sync per step decides it "
                "(torch's fused AdamW and scale's Lamb need none)",
                type(opt).__name__,
            )
        if bool(applied):  # host sync, justified above: this optimizer has no found_inf input
            opt.step()

    def _grad_norm(self, clip_grad: float) -> torch.Tensor:
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = self._total_norm([p.grad for p in params])
        if clip_grad > 0:  # without clipping, no pass over the gradients (clip_grad_norm_ multiplies by 1)
            torch.nn.utils.clip_grads_with_norm_(params, clip_grad, norm, foreach=True)
        return norm

    def _total_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Hook: the L2 norm of all gradients of this step, equal on every rank."""
        return torch.nn.utils.get_total_norm(grads, foreach=True)

    @torch.no_grad()
    def momentum_update(self, momentum: float, applied: torch.Tensor | bool = True) -> None:
        """Move the momentum encoder (EMA towards the base encoder) if the step was `applied`: a
        device tensor keeps the decision on the device (a skipped step leaves it bitwise equal).

        Runs on this rank's tensors (`_momentum_pairs`: whole parameters, shards or partitions) in
        fp32: where they are held in 16 bits, on fp32 masters of them, copied back after the update
        (in bf16, (1 - m) * (q - k) falls below the resolution of k late in training)."""
        if applied is False:
            return
        mask = None if applied is True else applied
        ks, qs = self._momentum_pairs()
        if self._momentum_masters is None and ks and ks[0].dtype == torch.float32:
            ema_(ks, qs, momentum, mask)
        elif ks:
            if self._momentum_masters is None:
                self._momentum_masters = [k.detach().float().clone() for k in ks]
            masters = self._momentum_masters
            for rows in foreach_chunks(masters):  # fp32 copies of the base encoder one chunk at a time
                ema_(masters[rows], [q.float() for q in qs[rows]], momentum, mask)
                torch._foreach_copy_(ks[rows], masters[rows])
        self._after_momentum_update()

    def _momentum_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Hook: this rank's momentum-encoder tensors and the base encoder's matching ones (the
        model's `momentum_pairs`, as local tensors: sharded backends give their shards)."""
        return self.module.momentum_pairs()  # the parameters themselves (updated under no_grad)

    def _after_momentum_update(self) -> None:
        """Hook: order the update before the next forward's reads where a backend needs it."""

    def _buffer_groups(self) -> list[list[torch.Tensor]]:
        """The model's buffers (BatchNorm statistics and counters) grouped by dtype, in order."""
        groups: dict[torch.dtype, list[torch.Tensor]] = {}
        for b in self.module.buffers():
            groups.setdefault(b.dtype, []).append(b)
        return list(groups.values())

    def snapshot_buffers(self) -> list[torch.Tensor]:
        """Copies of the BatchNorm statistics, to undo a step whose loss was not finite: one flat
        copy per dtype (one kernel each, however many BatchNorms)."""
        return [torch.cat([b.detach().reshape(-1) for b in group]) for group in self._buffer_groups()]

    def restore_buffers(self, saved: list[torch.Tensor], applied: torch.Tensor | bool = False) -> None:
        """Put the `saved` statistics back unless the step was `applied` (a device tensor: decided
        on the device, for all buffers of a dtype at once: a where and one multi-tensor copy)."""
        if applied is True:
            return
        with torch.no_grad():
            for group, flat in zip(self._buffer_groups(), saved, strict=True):
                if applied is not False:
                    flat = torch.where(applied, torch.cat([b.reshape(-1) for b in group]), flat)
                parts = flat.split([b.numel() for b in group])
                torch._foreach_copy_(group, [part.view(b.shape) for part, b in zip(parts, group, strict=True)])

    def scaler_overflow(self, loss: torch.Tensor) -> torch.Tensor | None:
        """Under loss scaling (fp16), whether a skipped step counts as an fp16 overflow (skipped, the
        scale lowered), not a failure: while the scale is still at least 1. An fp16 overflow is one
        in the gradients or in the activations (a value beyond 65504 makes the loss itself
        non-finite): both skip the step and lower the scale. Below 1, fp16 gradients cannot overflow:
        the steps are non-finite by themselves and count as such (the run stops after
        `run.max_nonfinite` in a row). A device tensor; None without loss scaling."""
        if not self.has_loss_scaling:
            return None
        scale = self._loss_scale()
        if scale is None:
            return torch.ones((), dtype=torch.bool, device=loss.device)
        return torch.as_tensor(scale, device=loss.device).reshape(()) >= 1.0

    def _loss_scale(self) -> torch.Tensor | float | None:
        """Hook: the current loss scale without a host sync (GradScaler's device tensor: `get_scale()`
        would read it)."""
        return getattr(self.scaler, "_scale", None)

    # ------------------------------------------------------------------ communication

    def all_true(self, flag: torch.Tensor) -> torch.Tensor:
        """`flag` (a 0-dim bool tensor) holds on every rank: a bool tensor on `flag`'s device. On
        NCCL the all-reduce is queued on the device, with no host sync."""
        if self.world_size == 1:
            return flag
        t = flag.to(device=self.comm_device(), dtype=torch.int32).reshape(1)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t.to(flag.device).reshape(()).bool()

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any (a host read: for rare decisions such as a
        preemption, not every step)."""
        if self.world_size == 1:
            return bool(flag)
        t = torch.tensor([int(flag)], dtype=torch.int32, device=self.comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def all_reduce_mean_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of `t` over the ranks, as a tensor on `t`'s device (no host sync on NCCL)."""
        if self.world_size == 1:
            return t
        out = t.detach().to(device=self.comm_device(), dtype=torch.float64).clone()
        dist.all_reduce(out)
        return (out / self.world_size).to(t.device)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (for decisions that must agree, e.g. where to resume)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def check_checkpoint_files(self, paths: list[Path]) -> None:
        """Before a library reads these pickle-based files with pickle's full unpickler: each rank
        checks its share (`scale.safe_load.check_files`: every file once over the ranks); every rank
        raises the first error found."""
        errors = self.all_gather_object(check_files(sorted(paths), self.rank, self.world_size))
        error = next((e for e in errors if e), None)
        if error:
            raise CheckpointError(error)

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def comm_device(self) -> torch.device:
        """Where collectives take their tensors: the GPU under NCCL, else the CPU."""
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
        state = load_safely(directory / "model.pt", map_location=self.device)
        self.load_state_dict(state)

    @contextlib.contextmanager
    def evaluation(self, module: nn.Module, method: str = "pooled_features"):
        """Context in which `module` (a part of this backend's model) can run evaluation forwards
        outside the training forward; yields a function x -> module.<method>(x) (its pooled features,
        or `forward`: a classifier's logits) that prepares the input as this backend needs. Call on
        every rank."""
        yield module if method == "forward" else getattr(module, method)  # the module: its hooks run (FSDP2)

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

    def state_bytes(self, trainable: int, momentum: int, accum_steps: int = 1, shard_size: int = 0) -> dict[str, float]:
        """Theoretical bytes per rank of the model state (`scale.parallel.memory`), by component, for
        this backend's world size, precision and settings (`shard_size`: HSDP's group, 0: a node)."""
        return state_bytes(self.name, trainable, momentum, self.world_size, self.precision, accum_steps)

    def describe(self) -> str:
        return f"{self.name} on {self.device}, {self.world_size} rank(s), {self.precision}"


class SingleProcess(Backend):
    """One process, one device: no communication."""

    name = "single"
