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
`stage3_param_persistence_threshold` are kept whole on every rank and updated whole). DeepSpeed's bf16 mode keeps module
parameters in bf16, where (1 - m) * (q - k) falls below bf16 resolution late in training: the EMA
therefore runs on an fp32 master of the momentum encoder's local part, copied into the bf16
parameters after every update.

Non-finite steps: DeepSpeed checks the reduced gradients itself in every mode (fp16 loss scaling,
bf16 `check_grad_overflow`, fp32 ZeRO overflow checks) and skips a step whose gradients are not
finite, clearing its accumulated gradient state; the backend reports it as skipped, and the trainer
then restores the BatchNorm statistics and skips the momentum update.

LAMB and LARS compute per-tensor trust ratios, which ZeRO's flattened partitions would change, so
they are refused here (use DDP or FSDP2 for them).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scale.parallel.base import Backend, BackendError, StepResult, ema_, is_write_failure
from scale.views import views_to

log = logging.getLogger(__name__)

# Fields scale sets from its own config (a JSON value that disagrees is an error).
OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")


def read_ds_config(path: str | Path) -> dict[str, Any]:
    """The JSON of a DeepSpeed config, or {} when it cannot be read (reported properly, with what to
    change, by resolve_ds_config when training starts)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def zero_section(path: str | Path) -> dict[str, Any]:
    return read_ds_config(path).get("zero_optimization", {})


def zero_stage(path: str | Path) -> int:
    """The ZeRO stage of the DeepSpeed config at `path` (0 when it cannot be read)."""
    return int(zero_section(path).get("stage", 0))


def persistent_buffer_bytes(path: str | Path, precision: str, accum_steps: int = 1) -> float:
    """Bytes of the gradient buckets DeepSpeed holds beside the model state (contiguous_gradients):
    ZeRO-3 allocates one `reduce_bucket_size` bucket in the communication dtype once and keeps it;
    ZeRO-1 allocates its (fp32, two with overlap_comm) on the first micro-batch of an accumulated
    step and keeps them until the boundary. ZeRO-2's live only within a backward (transient)."""
    ds = read_ds_config(path)
    zero = ds.get("zero_optimization", {})
    stage, bucket = int(zero.get("stage", 0)), float(zero.get("reduce_bucket_size", 500_000_000))
    if not zero.get("contiguous_gradients", True):
        return 0.0
    if stage >= 3:
        comm = ds.get("communication_data_type")
        return bucket * (4 if comm in ("fp32", "float32") or precision not in ("bf16", "fp16") else 2)
    if stage == 1 and accum_steps > 1:
        return bucket * 4 * (2 if zero.get("overlap_comm", False) else 1)
    return 0.0


def require_deepspeed():
    try:
        import deepspeed
    except ImportError as e:
        raise BackendError("DeepSpeed is not installed: pip install deepspeed (or use --parallel.backend=fsdp)") from e
    return deepspeed


def resolve_ds_config(path: str | Path, cfg: Any, derived: Any, precision: str) -> dict[str, Any]:
    """The DeepSpeed JSON with scale's batch, precision and clipping fields filled in or checked."""
    path = Path(path)
    if not path.is_file():
        raise BackendError(f"DeepSpeed config {str(path)!r} does not exist; see ds_configs/")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BackendError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    ds.pop("//", None)
    wanted = {
        "train_batch_size": derived.global_batch_size,
        "train_micro_batch_size_per_gpu": derived.batch_size_per_device,
        "gradient_accumulation_steps": derived.grad_accum_steps,
        "gradient_clipping": float(cfg.optim.clip_grad),
    }
    for key, value in wanted.items():
        if key in ds and ds[key] != "auto" and ds[key] != value:
            raise BackendError(
                f'{path}: {key}={ds[key]} contradicts the scale config ({value}); set it to "auto" or change '
                "the matching --batch.* / --optim.clip_grad"
            )
        ds[key] = value
    for key in ("bf16", "fp16"):
        section = ds.get(key, {})
        enabled = section.get("enabled", "auto")
        if enabled not in ("auto", precision == key):
            raise BackendError(
                f'{path}: {key}.enabled={enabled} contradicts --parallel.precision={precision}; set it to "auto"'
            )
        ds[key] = {**section, "enabled": precision == key}
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise BackendError(
                f"{path}: remove the {key!r} section: scale builds the optimizer (--optim.*) and sets the lr every step"
            )
    if "zero_optimization" not in ds:
        raise BackendError(f"{path}: no zero_optimization section (stage 1, 2 or 3)")
    if int(ds["zero_optimization"].get("zero_hpz_partition_size", 1)) > 1:
        raise BackendError(
            f"{path}: zero_hpz_partition_size > 1 (hpZ) gathers frozen parameters from a secondary copy that "
            "DeepSpeed refreshes only for trained ones, so the momentum encoder's EMA would be ignored; remove it"
        )
    return ds


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
        self.autocast_dtype = None  # the engine casts the module to bf16/fp16
        self._masters: list[torch.Tensor] | None = None

    def setup(self, model, optimizer_factory, cfg=None, derived=None, plan=None) -> None:
        deepspeed = require_deepspeed()
        self._ensure_process_group()
        self.cfg, self.derived = cfg, derived
        ds_config = resolve_ds_config(self.config_path, cfg, derived, self.precision)
        if cfg is not None and cfg.optim.name != "adamw":
            raise BackendError(
                f"--optim.name={cfg.optim.name} under DeepSpeed ZeRO: its per-tensor trust ratios would be computed "
                "on ZeRO's flattened partitions; use --parallel.backend=fsdp (or ddp) for LAMB and LARS"
            )
        self.stage = int(ds_config["zero_optimization"].get("stage", 0))
        model = model.to(self.device)
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
        import os

        import torch.distributed as dist

        from scale.parallel.placement import detect_launch

        if dist.is_initialized():
            return
        for key, value in detect_launch().env_for_torch().items():  # DeepSpeed asserts LOCAL_RANK is set
            os.environ.setdefault(key, value)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        log.info("DeepSpeed on one rank: a one-rank %s process group", backend)

    # ------------------------------------------------------------------ the step

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        x1, x2 = views_to((x1, x2), self.device, self.dtype)  # one copy (and cast) for adjacent views
        return self.model(x1, x2)

    def backward(self, loss: torch.Tensor, accum_steps: int = 1, last: bool = True) -> None:
        self.model.set_gradient_accumulation_boundary(last)
        self.model.backward(loss)  # DeepSpeed divides by the accumulation steps itself

    def step(self, lr: float, weight_decay: float, clip_grad: float = 0.0, measure_groups: bool = False) -> StepResult:
        """DeepSpeed checks the gradients itself (fp16 loss scaling; bf16 `check_grad_overflow`;
        fp32 ZeRO invalid-norm checks) and skips a step whose gradients are not finite, clearing its
        partitioned gradient state. Those checks read device values on the host inside
        `engine.step()` (DeepSpeed's own syncs, not avoidable from here); `was_step_applied()` is then
        a host bool and this backend adds no sync of its own."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr
            g["weight_decay"] = weight_decay * g.get("wd_scale", 1.0)
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
            for name in ("reduction_stream", "reduce_and_partition_stream"):
                stream = getattr(opt, name, None)
                if isinstance(stream, torch.cuda.Stream):
                    torch.cuda.current_stream(self.device).wait_stream(stream)
        norms = super().group_grad_norms()
        scale = float(getattr(opt, "loss_scale", 1.0) or 1.0) if self.precision == "fp16" else 1.0
        return norms / scale if scale != 1.0 else norms

    def _local_grad(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        """This rank's part of `p`'s reduced gradient. ZeRO-3: its fp32 gradient partition (read from
        the optimizer's map, as `deepspeed.utils.safe_get_local_grad` does, but without the stream
        synchronize that function makes per parameter: `group_grad_norms` orders the streams).
        ZeRO-1/2: the fragment of the partition this rank owns (`_hp_mapping`, as DeepSpeed's
        `get_full_hp_grad` reads it before its all-reduce); None where this rank owns no part."""
        if self.stage == 3:
            parts = getattr(self.model.optimizer, "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition", None)
            if parts is not None and not getattr(self.model.optimizer, "offload_optimizer", False):
                return parts.get(p.ds_id)
            from deepspeed.utils import safe_get_local_grad

            return safe_get_local_grad(p)
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            return None
        fragment = mapping.get_lp_grad_fragment(p._index_in_param_group).flatten()
        address = mapping.lp_fragment_address
        if fragment.numel() == p.numel() and address.numel != p.numel():  # a full buffer kept on every rank
            fragment = fragment.narrow(0, address.start, address.numel)
        return fragment

    def _reduce_group_squares(self, squares: torch.Tensor) -> torch.Tensor:
        return self._sum_over_ranks(squares)

    # ------------------------------------------------------------------ momentum encoder

    def _local_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The momentum encoder's local tensors, paired with the base encoder's.

        ZeRO-3 partitions each parameter: this rank's part is `ds_tensor`, which the forward gathers
        from. A parameter under `stage3_param_persistence_threshold` is in addition kept whole in
        `.data` on every rank (and re-gathered from the parts after optimizer steps): both are
        updated, with the same arithmetic, so they stay consistent. Both encoders have the same
        shapes, so their parameters are partitioned and persisted alike.
        """
        ks, qs = self.module.momentum_pairs()
        if self.stage != 3:
            return [k.data for k in ks], [q.data for q in qs]
        local_k, local_q = [], []
        for k, q in zip(ks, qs, strict=True):
            assert getattr(k, "ds_persist", False) == getattr(q, "ds_persist", False), (
                "encoders partitioned differently"
            )
            local_k.append(k.ds_tensor)
            local_q.append(q.ds_tensor)
            if getattr(k, "ds_persist", False):
                local_k.append(k.data)
                local_q.append(q.data)
        return local_k, local_q

    @torch.no_grad()
    def momentum_update(self, momentum: float, applied: torch.Tensor | bool = True) -> None:
        if applied is False:
            return
        mask = None if applied is True else applied
        ks, qs = self._local_pairs()
        if self.dtype == torch.float32:
            ema_(ks, qs, momentum, mask)
        else:
            if self._masters is None:  # fp32 master of this rank's part of the momentum encoder
                self._masters = [k.detach().float().clone() for k in ks]
            ema_(self._masters, [q.float() for q in qs], momentum, mask)
            torch._foreach_copy_(ks, self._masters)
        if self.stage == 3 and self.device.type == "cuda":
            self._order_before_next_gather()

    def _order_before_next_gather(self) -> None:
        """ZeRO-3 gathers parameters for the next forward on its own all-gather stream, reading
        `ds_tensor`; the EMA above wrote the momentum encoder's `ds_tensor` on the current stream, and
        nothing in DeepSpeed makes that stream wait for ours (it only makes the compute stream wait
        for its gathers). Without this, the first gathers of the next forward (prefetches included)
        can read partitions the EMA is still writing. `wait_stream` orders the two on the device:
        no host sync. With overlap_comm off the gather stream is the default stream: a no-op."""
        stream = self._gather_stream()
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        else:  # not found (another DeepSpeed version): order by waiting for the device, logged once
            if not getattr(self, "_warned_gather_stream", False):
                log.warning("DeepSpeed's ZeRO-3 all-gather stream not found: synchronising after each momentum update")
                self._warned_gather_stream = True
            torch.cuda.current_stream(self.device).synchronize()

    def _gather_stream(self):
        """The stream ZeRO-3's PartitionedParameterCoordinator gathers on (DeepSpeed 0.14-0.19:
        `optimizer.parameter_offload.get_param_coordinator()`, private `__allgather_stream`)."""
        opt = self.model.optimizer
        offload = getattr(opt, "parameter_offload", None) or opt
        get = getattr(offload, "get_param_coordinator", None)
        if get is None:
            return None
        try:
            coordinator = get()
        except TypeError:  # older releases take `training`
            coordinator = get(True)
        return getattr(coordinator, "_PartitionedParameterCoordinator__allgather_stream", None)

    @contextlib.contextmanager
    def evaluation(self, module: nn.Module):
        """Evaluation forwards outside the engine: inputs in the module's dtype, and under ZeRO-3
        the module's parameters gathered for the duration (one encoder at a time)."""
        import deepspeed

        def features(x: torch.Tensor) -> torch.Tensor:
            return module.pooled_features(x.to(self.dtype))

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
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
            raise
        if self._masters is not None:
            torch.save(self._masters, directory / f"momentum-master-rank{self.rank}.pt")

    def load(self, directory: Path) -> None:
        """Restore from `directory`. A checkpoint written by another number of ranks loads only in
        DeepSpeed's universal format (`engine_universal/`, written once by the command the error
        gives): ZeRO's flat partitions do not reshard on load."""
        saved = len(list((directory / "engine").glob("zero_pp_rank_*_mp_rank_00_optim_states.pt")))
        if saved and saved != self.world_size:
            self._load_universal(directory, saved)
            return
        path, _ = self.model.load_checkpoint(str(directory), tag="engine", load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed engine checkpoint in {directory}")
        self._masters = self._load_masters(directory / f"momentum-master-rank{self.rank}.pt")

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
        config = self.model._config  # DeepSpeed reads this flag when it loads
        config.load_universal_checkpoint = True
        try:
            path, _ = self.model.load_checkpoint(str(directory), tag=universal.name, load_lr_scheduler_states=False)
        finally:
            config.load_universal_checkpoint = False
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed universal checkpoint in {universal}")
        self._restore_untrained(directory)
        log.info("resumed a %d-rank DeepSpeed checkpoint on %d ranks from %s", saved, self.world_size, universal)

    def _restore_untrained(self, directory: Path) -> None:
        """What DeepSpeed's universal load leaves out: it restores the trained parameters and their
        optimizer state only. The momentum encoder (frozen parameters), the BatchNorm statistics
        and the momentum encoder's fp32 masters come from the original checkpoint's files."""
        states = torch.load(directory / "engine" / "mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=False)["module"]  # fmt: skip
        trained = {name for name, p in self.module.named_parameters() if p.requires_grad}
        untrained = {k: v for k, v in states.items() if k not in trained}
        _, unexpected = self.module.load_state_dict(untrained, strict=False)
        if unexpected:
            raise BackendError(f"{directory}: the checkpoint holds entries this model lacks: {unexpected[:5]}")
        if self._masters is not None:  # bf16/fp16: below ZeRO-3 every rank holds the whole momentum master
            self._masters = self._load_masters(directory / "momentum-master-rank0.pt")

    def _load_masters(self, path: Path) -> list[torch.Tensor] | None:
        """This rank's fp32 momentum masters, onto this process's device (the checkpoint may come
        from another GPU layout: cuda:5 there can be cuda:0 here), checked against its partitions."""
        if not path.is_file():
            return None
        masters = torch.load(path, map_location=self.device, weights_only=True)
        ks, _ = self._local_pairs()
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
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
            return export()

    def num_params(self, module: nn.Module, trainable_only: bool = False) -> int:
        return sum(
            getattr(p, "ds_numel", p.numel()) for p in module.parameters() if p.requires_grad or not trainable_only
        )

    def local_numel(self, module: nn.Module) -> int:
        """Elements of `module`'s parameters held by this rank (persistent ZeRO-3 ones in full)."""
        held = 0
        for p in module.parameters():
            partitioned = hasattr(p, "ds_tensor") and not getattr(p, "ds_persist", False)
            held += p.ds_tensor.numel() if partitioned else p.numel()
        return held

    @classmethod
    def theory_bytes(
        cls,
        trainable: int,
        momentum: int,
        world_size: int,
        precision: str,
        accum_steps: int = 1,
        stage: int = 0,
        buffers: float = 0.0,
        **_: Any,
    ) -> dict[str, float]:
        """ZeRO `stage`: module parameters and gradients in the training precision, an fp32 master
        partition that DeepSpeed keeps even in fp32, AdamW moments; the momentum encoder in the
        training precision plus scale's fp32 master of it under bf16/fp16. ZeRO-1 keeps whole
        gradients only while it accumulates micro-batches: DeepSpeed reduces them in buckets at the
        accumulation boundary and keeps this rank's partition, as ZeRO-2 does always (measured,
        DeepSpeed 0.19 with overlap_comm and contiguous_gradients). Transient buffers (gathers,
        per-backward buckets) are not counted; `buffers` are persistent ones
        (`persistent_buffer_bytes`), reported apart."""
        P, M, N = trainable, momentum, world_size
        h = 2 if precision in ("bf16", "fp16") else 4
        mom = (h + (4 if h == 2 else 0)) * M
        out = {
            "params": h * P / (N if stage >= 3 else 1),
            "grads": h * P / (N if stage >= 2 or accum_steps == 1 else 1),
            "optimizer": 12 * P / N,  # fp32 master partition + AdamW moments
            "momentum": mom / (N if stage >= 3 else 1),
        }
        if buffers:
            out["buffers"] = buffers
        return out

    def state_bytes(self, trainable: int, momentum: int, accum_steps: int = 1) -> dict[str, float]:
        buffers = persistent_buffer_bytes(self.config_path, self.precision, accum_steps)
        return self.theory_bytes(
            trainable, momentum, self.world_size, self.precision, accum_steps, stage=self.stage, buffers=buffers
        )

    def describe(self) -> str:
        return f"deepspeed ZeRO-{self.stage} on {self.device}, {self.world_size} rank(s), {self.precision}"
