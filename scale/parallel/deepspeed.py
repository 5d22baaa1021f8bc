"""DeepSpeed ZeRO-1/2/3 behind the backend contract.

    deepspeed scale/pretrain.py --deepspeed ds_configs/zero2.json [--recipe NAME] [overrides]

The ZeRO stage, overlap and bucket settings come from the JSON given with `--deepspeed`; batch,
precision and clipping fields are filled from the scale config (or checked against it: a
contradiction is a clear error). The optimizer is scale's (`build_optimizer`: torch's fused AdamW on
GPUs, which DeepSpeed steps on its flat fp32 partitions, also when they are offloaded to the CPU,
where torch has a fused kernel too; DeepSpeed's FusedAdam only on request, as it JIT-compiles with
nvcc), passed to `deepspeed.initialize` as a client optimizer.

Momentum encoder: under ZeRO-1/2 it is a replicated module; under ZeRO-3 its parameters are
partitioned exactly like the base encoder's (same shapes, same partitioning), so the EMA runs on the
local partitions (`param.ds_tensor`) with no gathering (parameters under
`stage3_param_persistence_threshold` are kept whole on every rank and updated whole).

Precision (docs/training.md): bf16 runs as on one process, by autocast over the engine's fp32
parameters (DeepSpeed's own bf16 mode would store every parameter, normalisations included, the
BatchNorm statistics and the sin-cos table in bf16, without autocast). fp16 uses DeepSpeed's fp16
mode and loss scaler: the module in fp16, where (1 - m) * (q - k) falls below the resolution late in
training, so the EMA runs on an fp32 master of the momentum encoder's local part, copied into the
fp16 parameters after every update.

Non-finite steps: DeepSpeed checks the reduced gradients itself in every mode (fp16 loss scaling,
bf16 `check_grad_overflow`, fp32 ZeRO overflow checks) and skips a step whose gradients are not
finite, clearing its accumulated gradient state; the backend reports it as skipped, and the trainer
then restores the BatchNorm statistics and skips the momentum update.

LAMB and LARS compute per-tensor trust ratios, which ZeRO's flattened partitions would change, so
they are refused here (use DDP or FSDP2 for them).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from scale.errors import BackendError, is_write_failure
from scale.optim import set_lr_wd
from scale.parallel import ds_internals as internals
from scale.parallel.base import Backend, StepResult, on_device
from scale.parallel.ds_config import load_ds_json, resolve_ds_config, zero_stage
from scale.parallel.memory import zero_bytes, zero_persistent_buffer_bytes
from scale.parallel.placement import plan_placement
from scale.safe_load import load_safely
from scale.views import views_to

log = logging.getLogger(__name__)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `a` and `b` overlap in memory (an in-place update of one changes the other)."""
    sa, sb = a.untyped_storage(), b.untyped_storage()
    if sa.data_ptr() != sb.data_ptr() or a.numel() == 0 or b.numel() == 0:
        return False
    a0, b0 = a.storage_offset() * a.element_size(), b.storage_offset() * b.element_size()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(self, config_path: str, precision: str = "auto", device: torch.device | None = None):
        super().__init__(precision, device)
        if self.precision == "fp16" and self.device.type != "cuda":
            raise BackendError("fp16 needs a CUDA GPU (DeepSpeed refuses it on CPU); use --parallel.precision=bf16")
        self.config_path = config_path
        self.stage = zero_stage(config_path)
        self.has_loss_scaling = self.precision == "fp16"
        self.scaler = None  # DeepSpeed scales fp16 losses itself
        if self.precision == "fp16":
            self.autocast_dtype = None  # DeepSpeed's fp16 mode: the engine casts the module to fp16
        # bf16: autocast over the engine's fp32 parameters, as on one process (`resolve_ds_config`).

    def setup(self, model, optimizer_factory, settings=None, plan=None) -> None:
        deepspeed = internals.require_deepspeed()
        self._ensure_process_group()
        self.settings, self.plan = settings or self.settings, plan or self.plan
        ds_config = resolve_ds_config(self.config_path, self.settings, self.precision)
        self.stage = int(ds_config["zero_optimization"]["stage"])
        model = on_device(model, self.device)
        optimizer = optimizer_factory(model)
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config, dist_init_required=False
        )
        self.module = self.model.module
        self.dtype = next(self.module.parameters()).dtype
        log.info("DeepSpeed ZeRO-%d from %s, module parameters in %s", self.stage, self.config_path, self.dtype)

    def _ensure_process_group(self) -> None:
        """DeepSpeed needs a process group even for one rank (`deepspeed --num_gpus 1`, or a plain
        `python -m scale.pretrain --deepspeed ...`), which `init_distributed` does not create for a
        world of one: create a one-rank group in memory (no rendezvous, nothing to wait for)."""
        if dist.is_initialized():
            return
        launch, device = plan_placement()
        # DeepSpeed asserts LOCAL_RANK is set, and sets the device from it: the one placement chose.
        os.environ.update(launch.env_for_torch(device))
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        log.info("DeepSpeed on one rank: a one-rank %s process group", backend)

    # ------------------------------------------------------------------ the step

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, keys: tuple | None = None) -> torch.Tensor:
        if self.dtype == torch.float32:  # fp32 and bf16: the engine's fp32 parameters under autocast
            return super().forward(x1, x2, keys)
        x1, x2 = views_to((x1, x2), self.device, self.dtype)  # fp16 module: one copy (and cast) for adjacent views
        return self.model(x1, x2) if keys is None else self.model(x1, x2, keys=keys)

    @torch.no_grad()
    def keys(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.dtype == torch.float32:
            return super().keys(x1, x2)
        x1, x2 = views_to((x1, x2), self.device, self.dtype)
        return self.model(x1, x2, keys_only=True)

    def backward(self, loss: torch.Tensor, accum_steps: int = 1, last: bool = True) -> None:
        self.model.set_gradient_accumulation_boundary(last)
        self.model.backward(loss)  # DeepSpeed divides by the accumulation steps itself

    def step(self, lr: float, weight_decay: float, clip_grad: float = 0.0, measure_groups: bool = False) -> StepResult:
        """DeepSpeed checks the gradients itself (fp16 loss scaling; bf16 `check_grad_overflow`;
        fp32 ZeRO invalid-norm checks) and skips a step whose gradients are not finite, clearing its
        partitioned gradient state. Those checks read device values on the host inside
        `engine.step()` (DeepSpeed's own syncs, not avoidable from here); `was_step_applied()` is then
        a host bool and this backend adds no sync of its own."""
        set_lr_wd(self.optimizer, lr, weight_decay)
        groups = self.group_grad_norms() if measure_groups else None  # before step() clears the gradients
        self.model.step()
        self.model.set_gradient_accumulation_boundary(None)
        norm = self.model.get_global_grad_norm()  # a device tensor, float('inf') on overflow, or None
        if not torch.is_tensor(norm):
            norm = torch.tensor(float("nan") if norm is None else float(norm))
        return StepResult(norm, bool(self.model.was_step_applied()), groups)

    # ------------------------------------------------------------------ per-layer gradient norms

    def group_grad_norms(self) -> torch.Tensor:
        """As `Backend.group_grad_norms`, from this rank's fragments of ZeRO's reduced gradients
        (between backward and `engine.step()`, the only time they exist), unscaled by the fp16 loss
        scale (a host float: no sync)."""
        opt = self.model.optimizer
        if self.device.type == "cuda":  # the reduced gradients are written on ZeRO's own streams
            for stream in internals.reduction_streams(opt):
                torch.cuda.current_stream(self.device).wait_stream(stream)
        norms = super().group_grad_norms()
        scale = internals.loss_scale(opt) if self.precision == "fp16" else 1.0
        return norms / scale if scale != 1.0 else norms

    def _local_grad(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        """This rank's part of `p`'s reduced gradient: its fp32 partition (ZeRO-3), or the fragment of
        the partition this rank owns (ZeRO-1/2; None where it owns none). `group_grad_norms` orders
        the streams first."""
        if self.stage == 3:
            return internals.zero3_local_grad(self.model.optimizer, p)
        return internals.zero12_local_grad(p)

    def _loss_scale(self) -> float | None:
        """DeepSpeed's fp16 loss scale (a host float: no device read)."""
        return internals.loss_scale(self.model.optimizer) if self.precision == "fp16" else None

    def _reduce_group_squares(self, squares: torch.Tensor) -> torch.Tensor:
        return self._sum_over_ranks(squares)

    # ------------------------------------------------------------------ momentum encoder

    def _momentum_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The momentum encoder's local tensors, paired with the base encoder's (in the module's
        dtype: bf16/fp16 ones are updated through fp32 masters by `Backend.momentum_update`).

        ZeRO-3 partitions each parameter: this rank's part is `ds_tensor`, which the forward gathers
        from. A parameter under `stage3_param_persistence_threshold` is in addition kept whole in
        `.data` on every rank (and re-gathered from the parts after optimizer steps): both are
        updated, with the same arithmetic, so they stay consistent, unless they are one tensor
        (one rank: the partition is the whole parameter, in the same storage), which is updated once.
        Both encoders have the same shapes, so their parameters are partitioned and persisted alike.
        """
        ks, qs = self.module.momentum_pairs()
        if self.stage != 3:
            return [k.data for k in ks], [q.data for q in qs]
        local_k, local_q = [], []
        for k, q in zip(ks, qs, strict=True):
            assert internals.is_persistent(k) == internals.is_persistent(q), "encoders partitioned differently"
            part = internals.partition(k)
            local_k.append(part)
            local_q.append(internals.partition(q))
            if internals.is_persistent(k) and not _same_memory(part, k.data):
                local_k.append(k.data)
                local_q.append(q.data)
        return local_k, local_q

    def _after_momentum_update(self) -> None:
        if self.stage == 3 and self.device.type == "cuda":
            self._order_before_next_gather()

    def _order_before_next_gather(self) -> None:
        """ZeRO-3 gathers parameters for the next forward on its own all-gather stream, reading
        `ds_tensor`; the EMA above wrote the momentum encoder's `ds_tensor` on the current stream, and
        nothing in DeepSpeed makes that stream wait for ours (it only makes the compute stream wait
        for its gathers). Without this, the first gathers of the next forward (prefetches included)
        can read partitions the EMA is still writing. `wait_stream` orders the two on the device:
        no host sync. With overlap_comm off the gather stream is the default stream: a no-op."""
        stream = internals.zero3_gather_stream(self.model.optimizer)
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        else:  # not found (another DeepSpeed version): order by waiting for the device, logged once
            if not getattr(self, "_warned_gather_stream", False):
                log.warning("DeepSpeed's ZeRO-3 all-gather stream not found: synchronising after each momentum update")
                self._warned_gather_stream = True
            torch.cuda.current_stream(self.device).synchronize()

    @contextlib.contextmanager
    def evaluation(self, module: nn.Module, method: str = "pooled_features"):
        """Evaluation forwards outside the engine: inputs in the module's dtype, and under ZeRO-3
        the module's parameters gathered for the duration (one encoder at a time)."""
        deepspeed = internals.require_deepspeed()

        def features(x: torch.Tensor) -> torch.Tensor:
            run = module if method == "forward" else getattr(module, method)
            return run(x.to(self.dtype))

        if self.stage == 3:
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                yield features
        else:
            yield features

    # ------------------------------------------------------------------ state

    def save(self, directory: Path) -> None:
        try:
            self.model.save_checkpoint(str(directory), tag="engine", save_latest=False)
        except (OSError, RuntimeError) as e:
            if not is_write_failure(e):
                raise
            # A file write failed here (ENOSPC...), after DeepSpeed's last collective but before its
            # closing barrier, which the ranks whose writes succeeded are waiting in: join it, so
            # that every rank then agrees on the failure (scale.train.checkpoint).
            if dist.is_initialized():
                dist.barrier()
            raise
        if self._momentum_masters is not None:
            path = self._masters_file(directory)
            if self.stage == 3 or self.is_main:  # below ZeRO-3 every rank holds the same whole masters
                torch.save(self._momentum_masters, path)

    def load(self, directory: Path) -> None:
        """Restore from `directory`. A checkpoint written by another number of ranks loads only in
        DeepSpeed's universal format (`engine_universal/`, written once by the command the error
        gives): ZeRO's flat partitions do not reshard on load."""
        saved = len(list((directory / "engine").glob("zero_pp_rank_*_mp_rank_00_optim_states.pt")))
        if saved and saved != self.world_size:
            self._load_universal(directory, saved)
            return
        self.check_checkpoint_files(list((directory / "engine").glob("*.pt")))  # DeepSpeed unpickles them
        path, _ = self.model.load_checkpoint(str(directory), tag="engine", load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed engine checkpoint in {directory}")
        self._momentum_masters = self._load_masters(self._masters_file(directory, reading=True))

    def _load_universal(self, directory: Path, saved: int) -> None:
        universal = directory / "engine_universal"
        if self.stage >= 3:
            raise BackendError(
                f"{directory} is a ZeRO-3 checkpoint of {saved} ranks and this run has {self.world_size}: DeepSpeed's "
                "universal load restores only the trained parameters, and ZeRO-3 partitions the momentum encoder "
                f"too, so it is not supported. Resume with {saved} ranks (FSDP2 checkpoints reshard: "
                "--parallel.backend=fsdp)"
            )
        if not (universal / "zero").is_dir():
            raise BackendError(
                f"{directory} was written by {saved} ranks and this run has {self.world_size}: DeepSpeed ZeRO "
                f"partitions do not reshard on load. Resume with {saved} ranks, or convert it once with "
                f"`python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state --input_folder "
                f"{directory / 'engine'} --output_folder {universal}` and run the same command again"
            )
        self.check_checkpoint_files(list(universal.rglob("*.pt")))  # DeepSpeed unpickles them
        internals.set_universal_load(self.model, True)
        try:
            path, _ = self.model.load_checkpoint(str(directory), tag=universal.name, load_lr_scheduler_states=False)
        finally:
            internals.set_universal_load(self.model, False)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed universal checkpoint in {universal}")
        self._restore_untrained(directory)
        log.info("resumed a %d-rank DeepSpeed checkpoint on %d ranks from %s", saved, self.world_size, universal)

    def _restore_untrained(self, directory: Path) -> None:
        """What DeepSpeed's universal load leaves out: it restores the trained parameters and their
        optimizer state only. The momentum encoder (frozen parameters), the BatchNorm statistics
        and the momentum encoder's fp32 masters come from the original checkpoint's files."""
        states = load_safely(directory / "engine" / "mp_rank_00_model_states.pt")["module"]
        trained = {name for name, p in self.module.named_parameters() if p.requires_grad}
        untrained = {k: v for k, v in states.items() if k not in trained}
        _, unexpected = self.module.load_state_dict(untrained, strict=False)
        if unexpected:
            raise BackendError(f"{directory}: the checkpoint holds entries this model lacks: {unexpected[:5]}")
        if self.dtype != torch.float32:  # fp16: below ZeRO-3 every rank holds the whole momentum master
            self._momentum_masters = self._load_masters(self._masters_file(directory, reading=True))

    def _masters_file(self, directory: Path, reading: bool = False) -> Path:
        """Where the fp32 momentum masters are: one file per rank under ZeRO-3 (each holds its
        partitions), one file for all below it (every rank holds the same whole masters). Reading a
        checkpoint written before the masters were written once, rank 0's file stands for all."""
        if self.stage == 3:
            return directory / f"momentum-master-rank{self.rank}.pt"
        shared = directory / "momentum-master.pt"
        return shared if shared.is_file() or not reading else directory / "momentum-master-rank0.pt"

    def _load_masters(self, path: Path) -> list[torch.Tensor] | None:
        """This rank's fp32 momentum masters, onto this process's device (the checkpoint may come
        from another GPU layout: cuda:5 there can be cuda:0 here), checked against its partitions."""
        if not path.is_file():
            return None
        masters = load_safely(path, map_location=self.device)
        ks, _ = self._momentum_pairs()
        if [tuple(m.shape) for m in masters] != [tuple(k.shape) for k in ks]:
            raise BackendError(
                f"{path} holds momentum-encoder partitions of another layout (world size or ZeRO stage changed); "
                "resume with the world size and ds config it was saved with"
            )
        return masters

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Complete tensors on CPU, floating point ones converted to fp32 (from the module's own dtype)."""

        def export() -> dict[str, torch.Tensor]:
            return {k: (v.float() if v.is_floating_point() else v).detach().cpu().clone()
                    for k, v in self.module.state_dict().items()}  # fmt: skip

        if self.stage != 3:
            return export()
        deepspeed = internals.require_deepspeed()
        with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
            return export()

    def num_params(self, module: nn.Module, trainable_only: bool = False) -> int:
        return sum(internals.full_numel(p) for p in module.parameters() if p.requires_grad or not trainable_only)

    def local_numel(self, module: nn.Module) -> int:
        """Elements of `module`'s parameters held by this rank (persistent ZeRO-3 ones in full)."""
        return sum(internals.held_numel(p) for p in module.parameters())

    def state_bytes(self, trainable: int, momentum: int, accum_steps: int = 1, shard_size: int = 0) -> dict[str, float]:
        buffers = zero_persistent_buffer_bytes(load_ds_json(self.config_path), self.precision, accum_steps)
        return zero_bytes(trainable, momentum, self.world_size, self.precision, accum_steps, self.stage, buffers)

    def describe(self) -> str:
        return f"deepspeed ZeRO-{self.stage} on {self.device}, {self.world_size} rank(s), {self.precision}"
