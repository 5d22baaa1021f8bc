"""Typed configuration: one dataclass per section, a docstring per field, `--section.field=value`
overrides checked against the field's type, and the derived values computed in one place.

    python -m scale.pretrain --recipe vit_b_300ep --batch.global_batch_size=2048 --optim.base_lr=1e-4
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration a user got wrong: the message says what to change."""


@dataclass
class ModelConfig:
    name: str = "vit_base"
    """Backbone preset (scale.models.VIT_PRESETS or an alias such as vit_h14)."""
    img_size: int = 224
    """Crop size in pixels, for the model and the augmentation."""
    patch_size: int | None = None
    """Patch size override (None: the preset's)."""
    use_bn: bool | None = None
    """ViT-BN override (None: the preset's)."""
    pos_embed: str = "sincos"
    """'sincos', 'learned' or 'none'."""
    pool: str = "cls"
    """'cls' or 'avg'."""
    random_patch_proj: bool = True
    """Freeze the random patch projection (paper Sec. 4.2)."""
    embed_dim: int | None = None
    """Width override, for small models (None: the preset's)."""
    depth: int | None = None
    """Depth override (None: the preset's)."""
    num_heads: int | None = None
    """Heads override (None: the preset's)."""
    dim: int = 256
    """Output dimension of the projector and predictor."""
    mlp_dim: int = 4096
    """Hidden dimension of the projector and predictor."""
    temperature: float = 0.2
    """Softmax temperature tau (0.2 for ViT)."""
    view_forward: str = "auto"
    """'auto': both views through each encoder as one batch (same math, one call per encoder) unless
    the backbone has BatchNorm before its head (ViT-BN, conv stem): then per view; 'joint'; 'per_view'
    (the authors' order)."""
    compile: bool = False
    """torch.compile each transformer block and the heads (regional: one graph reused by every
    block); equal to eager within float rounding. Off by default: not measured faster on CPU here,
    not yet measured on a GPU (docs/benchmarks.md)."""

    def vit_overrides(self) -> dict[str, Any]:
        keys = ("patch_size", "use_bn", "embed_dim", "depth", "num_heads")
        out = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        return {
            **out,
            "img_size": self.img_size,
            "pos_embed": self.pos_embed,
            "pool": self.pool,
            "random_patch_proj": self.random_patch_proj,
        }


@dataclass
class DataConfig:
    source: str = "demo"
    """'demo', 'synthetic', a shard pattern or directory, or an ImageFolder tree."""
    backend: str = "torchvision"
    """'torchvision' or 'dali'."""
    num_workers: int = 8
    """DataLoader worker processes (torchvision) or DALI threads, per rank."""
    shuffle_buffer: int = 1000
    """Samples in each worker's shuffle buffer."""
    resampled: bool = False
    """Draw shards with replacement (very large runs)."""
    crop_min: float = 0.08
    """Smallest RandomResizedCrop area fraction (0.08 for ViT)."""
    eval_source: str = ""
    """Labelled held-out data for the kNN monitor ('' for none; the demo uses 'demo:val')."""
    knn_train_source: str = ""
    """Labelled data whose features form the kNN memory bank ('' for none; the demo: 'demo')."""
    max_lost_fraction: float = 0.01
    """Stop the run when more than this fraction of the samples read so far were lost (corrupt or
    undecodable images, unreadable or vanished shards); below it they are skipped, counted, logged."""


@dataclass
class OptimConfig:
    name: str = "adamw"
    """'adamw', 'lamb' or 'lars'."""
    base_lr: float = 1.5e-4
    """Learning rate per 256 images: lr = base_lr * global_batch_size / 256."""
    weight_decay: float = 0.1
    """Weight decay (AdamW decoupled)."""
    final_weight_decay: float | None = None
    """If set, weight decay follows a cosine to this value; None keeps it constant (official)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam / LAMB betas."""
    eps: float = 1e-8
    momentum: float = 0.9
    """LARS momentum."""
    trust_coefficient: float = 0.001
    """LARS trust coefficient."""
    exclude_norm_bias_from_wd: bool = False
    """Exclude norms, biases and tokens from weight decay (the official code decays everything)."""
    clip_grad: float = 0.0
    """Clip the global gradient norm to this value; 0 disables (official: no clipping)."""
    implementation: str = "auto"
    """'auto' (only implementations equal to scale's update: torch's fused AdamW on CUDA, foreach
    on CPU; scale's foreach Lamb; the authors' LARS), or force 'torch' (foreach AdamW) /
    'torch-fused' (AdamW's fused kernel, on a CPU too: less peak memory) / 'apex' (FusedLAMB) /
    'deepspeed' (FusedAdam, or FusedLamb: another LAMB variant) / 'scale'."""


@dataclass
class ScheduleConfig:
    epochs: float = 300
    """Training length in epochs."""
    warmup_epochs: float = 40
    """Linear lr warmup from 0, then a half-cycle cosine to 0."""
    momentum: float = 0.99
    """Momentum-encoder coefficient at the start; cosine to `final_momentum`."""
    final_momentum: float = 1.0
    max_steps: int = 0
    """Stop after this many optimizer steps (0: run all epochs). Schedules still span all epochs."""


@dataclass
class BatchConfig:
    global_batch_size: int = 4096
    """Images per optimizer step over all ranks (the paper's batch)."""
    batch_size_per_device: int = 0
    """Images per rank per micro-step; 0 derives it as global / (world size x grad_accum_steps)."""
    grad_accum_steps: int = 1
    """Micro-steps per optimizer step. Each loss sees only micro-batch x world size negatives."""


@dataclass
class ParallelConfig:
    backend: str = "auto"
    """'auto' (ddp when launched with several ranks, else single), 'single', 'ddp', 'fsdp' or 'deepspeed'."""
    precision: str = "auto"
    """'auto' (bf16 on GPUs that support it, else fp32), 'fp32', 'bf16' or 'fp16' (GPU only)."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in the backward pass."""
    deepspeed_config: str = ""
    """DeepSpeed JSON (ds_configs/zero{1,2,3}.json); `--deepspeed PATH` sets it and the backend."""
    reshard_after_forward: bool = True
    """FSDP2: free gathered parameters after each block's forward (ZeRO-3-like); false keeps them
    until the backward (ZeRO-2-like: more memory, less communication)."""
    tf32: bool = True
    """fp32 on CUDA: matmuls and convolutions on TF32 tensor cores (10-bit mantissa inputs, fp32
    accumulation; about 7x the fp32 rate); false keeps full fp32. No effect on bf16/fp16 or CPU."""
    tune_cpu_malloc: bool = True
    """On a CPU: keep glibc malloc from unmapping freed blocks of up to 1 GiB (activations of more than
    32 MiB would be faulted in and zeroed again at every use; scale.parallel.cpu). Same results."""
    dist_backend: str = "auto"
    """'auto' (nccl with CUDA, else gloo), 'nccl' or 'gloo'."""
    timeout_minutes: float = 30
    """Collective timeout of the process group: a rank that stops responding for this long makes the
    others stop with an error that names it (`scale.train.watchdog`)."""
    skip_memory_check: bool = False
    """Start even when the per-rank memory estimate exceeds the device's (or host's) memory."""


@dataclass
class RunConfig:
    name: str = ""
    """'' (default): the recipe's name, plus the backend when it is not the replicated default
    (`vit_h_300ep-fsdp`, `cpu_demo-zero2`): a run on another backend gets its own directory, the
    same command again resumes in its own (`default_run_name`)."""
    output_dir: str = "runs"
    """Run directory is output_dir/name: config.json, metrics.jsonl, TensorBoard, checkpoints."""
    seed: int = 0
    log_every: int = 10
    """Log metrics every this many optimizer steps."""
    ckpt_every: int = 0
    """Checkpoint every this many optimizer steps (0: at the end of every epoch only)."""
    keep_last: int = 3
    """Checkpoints kept (older ones are deleted after a newer one is complete)."""
    ckpt_failure: str = "retry"
    """A checkpoint write that fails (ENOSPC, an I/O error): 'retry' logs it, removes the partial
    write and keeps training, writing again at the next interval (stopping after
    `max_ckpt_failures` failures in a row, or when the final or preemption checkpoint fails);
    'stop' stops at once. The previous checkpoint is intact either way."""
    max_ckpt_failures: int = 3
    """Checkpoint writes that may fail in a row under ckpt_failure=retry before the run stops."""
    resume: str = "auto"
    """'auto' (newest complete checkpoint of the run directory, if any), 'none', or a path."""
    max_nonfinite: int = 5
    """Stop after this many non-finite losses in a row (each one is skipped)."""
    preempt_signal: str = "USR2"
    """Signal that stops the run at the next check after a complete checkpoint (and requeues it
    under SLURM); '' or 'none' disables. USR2, not USR1: NCCL uses SIGUSR1."""
    preempt_check_every: int = 10
    """Steps between the ranks' agreement on a received signal (one small all-reduce read on the
    host each time)."""
    requeue: bool = True
    """Under SLURM, requeue the job (scontrol requeue) after the preemption checkpoint."""
    max_requeues: int = 50
    """Do not requeue a job SLURM has already restarted this many times (SLURM_RESTART_COUNT)."""
    knn_every_epochs: int = 0
    """Run the kNN monitor every this many epochs (0: only at the end, when configured)."""
    knn_k: int = 200
    """Neighbours in the kNN monitor (Wu et al.: 200)."""
    knn_temperature: float = 0.07
    progress: bool = True
    """A progress bar on rank 0 (else periodic log lines)."""
    tensorboard: bool = True


@dataclass
class MonitorConfig:
    """The paper's instruments (scale.train.monitors), on by default: they change nothing in training."""

    knn_every: int = 20
    """Classify the current batch against the dense kNN bank every this many steps (0: off)."""
    knn_bank_fraction: float = 0.1
    """Bank length as a fraction of the training set (the paper: 10%), rounded to whole steps."""
    knn_bank_size: int = 0
    """Bank length in features (0: from knn_bank_fraction); rounded to whole steps (2 crops each)."""
    knn_k: int = 200
    knn_temperature: float = 0.07
    """Wu et al. 2018's k and temperature."""
    dip_points: float = 3.0
    """A dense kNN value this many points (and 3 standard errors) below its running average is a dip."""
    grad_every: int = 1
    """Measure per-layer gradient norms every this many steps (0: off)."""
    spike_threshold: float = 3.0
    """A layer's gradient norm above this multiple of its running average is a spike."""
    average_steps: int = 50
    """Horizon of the running averages (in measurements), and the warm-up before spikes are reported."""
    spike_window: int = 200
    """Steps after a first-layer spike in which a last-layer spike is reported with its delay."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run: RunConfig = field(default_factory=RunConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    recipe: str = ""
    """The recipe this config started from."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        cfg = cls()
        for section, values in d.items():
            if section == "recipe":
                cfg.recipe = values
                continue
            for key, value in values.items():
                set_field(cfg, f"{section}.{key}", value)
        return cfg


# ----------------------------------------------------------------------------- field rules


@dataclass(frozen=True)
class Rule:
    """What values a field accepts beyond its type: a range (`lo`/`hi`, open or closed) or choices.
    `check_fields` enforces every rule; the config fuzz test generates a violation of each."""

    lo: float | None = None
    lo_open: bool = False
    hi: float | None = None
    hi_open: bool = False
    choices: tuple[str, ...] = ()

    def violation(self, value: Any) -> str | None:
        """Why `value` is not accepted, or None."""
        if value is None:
            return None
        if self.choices:
            return None if value in self.choices else f"is not one of: {', '.join(self.choices)}"
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return f"must be {'>' if self.lo_open else '>='} {self.lo:g}" + self._hi()
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return f"must be {'<' if self.hi_open else '<='} {self.hi:g}" + self._lo()
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        return None

    def _hi(self) -> str:
        return "" if self.hi is None else f" and {'<' if self.hi_open else '<='} {self.hi:g}"

    def _lo(self) -> str:
        return "" if self.lo is None else f" and {'>' if self.lo_open else '>='} {self.lo:g}"

    def wrong_values(self) -> list[Any]:
        """Values that break this rule (for the fuzz test)."""
        if self.choices:
            return ["no-such-" + self.choices[0]]
        out = []
        if self.lo is not None:
            out.append(self.lo if self.lo_open else self.lo - 1)
        if self.hi is not None:
            out.append(self.hi if self.hi_open else self.hi + 1)
        return out


def positive() -> Rule:
    return Rule(lo=0, lo_open=True)


def non_negative() -> Rule:
    return Rule(lo=0)


def one_of(*choices: str) -> Rule:
    return Rule(choices=choices)


# Every field's accepted values beyond its type (fields absent here take any value of their type:
# names, paths, free text, booleans; names resolved elsewhere, such as model.name or
# data.source, are checked by `scale.preflight`).
RULES: dict[str, Rule] = {
    "model.img_size": positive(),
    "model.patch_size": positive(),
    "model.pos_embed": one_of("sincos", "learned", "none"),
    "model.pool": one_of("cls", "avg"),
    "model.embed_dim": positive(),
    "model.depth": positive(),
    "model.num_heads": positive(),
    "model.dim": positive(),
    "model.mlp_dim": positive(),
    "model.temperature": positive(),
    "model.view_forward": one_of("auto", "joint", "per_view"),
    "data.backend": one_of("torchvision", "dali"),
    "data.num_workers": non_negative(),
    "data.shuffle_buffer": non_negative(),
    "data.crop_min": Rule(lo=0, lo_open=True, hi=1),
    "data.max_lost_fraction": Rule(lo=0, hi=1),
    "optim.name": one_of("adamw", "lamb", "lars"),
    "optim.base_lr": positive(),
    "optim.weight_decay": non_negative(),
    "optim.final_weight_decay": non_negative(),
    "optim.eps": positive(),
    "optim.momentum": Rule(lo=0, hi=1, hi_open=True),
    "optim.trust_coefficient": positive(),
    "optim.clip_grad": non_negative(),
    "optim.implementation": one_of("auto", "torch", "torch-fused", "apex", "deepspeed", "scale"),
    "schedule.epochs": positive(),
    "schedule.warmup_epochs": non_negative(),
    "schedule.momentum": Rule(lo=0, hi=1),
    "schedule.final_momentum": Rule(lo=0, hi=1),
    "schedule.max_steps": non_negative(),
    "batch.global_batch_size": positive(),
    "batch.batch_size_per_device": non_negative(),
    "batch.grad_accum_steps": positive(),
    "parallel.backend": one_of("auto", "single", "ddp", "fsdp", "deepspeed"),
    "parallel.precision": one_of("auto", "fp32", "bf16", "fp16"),
    "parallel.dist_backend": one_of("auto", "nccl", "gloo"),
    "parallel.timeout_minutes": positive(),
    "run.seed": Rule(lo=0, hi=2**32 - 1),
    "run.log_every": positive(),
    "run.ckpt_every": non_negative(),
    "run.keep_last": positive(),
    "run.max_nonfinite": positive(),
    "run.ckpt_failure": one_of("stop", "retry"),
    "run.max_ckpt_failures": positive(),
    "run.preempt_check_every": positive(),
    "run.max_requeues": non_negative(),
    "run.knn_every_epochs": non_negative(),
    "run.knn_k": positive(),
    "run.knn_temperature": positive(),
    "monitor.knn_every": non_negative(),
    "monitor.knn_bank_fraction": Rule(lo=0, lo_open=True, hi=1),
    "monitor.knn_bank_size": non_negative(),
    "monitor.knn_k": positive(),
    "monitor.knn_temperature": positive(),
    "monitor.dip_points": non_negative(),
    "monitor.grad_every": non_negative(),
    "monitor.spike_threshold": Rule(lo=1, lo_open=True),
    "monitor.average_steps": positive(),
    "monitor.spike_window": non_negative(),
}


def check_fields(cfg: Config) -> None:
    """Every field against its rule (`RULES`) and the relations between fields that need no data
    or launch; raises a ConfigError naming the field and what it accepts."""
    for dotted, rule in RULES.items():
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        why = rule.violation(value)
        if why:
            raise ConfigError(f"--{dotted}={value!r} {why}")
    o, s = cfg.optim, cfg.schedule
    for i, beta in enumerate(o.betas):
        if not 0 <= beta < 1:
            raise ConfigError(f"--optim.betas={','.join(map(str, o.betas))}: beta{i + 1} must be in [0, 1)")
    if s.warmup_epochs > s.epochs:
        raise ConfigError(
            f"--schedule.warmup_epochs={s.warmup_epochs} exceeds --schedule.epochs={s.epochs}; lower the warmup"
        )
    try:
        signal_number(cfg.run.preempt_signal)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.run.resume not in ("auto", "none") and not cfg.run.resume:
        raise ConfigError("--run.resume is empty; use auto, none or a checkpoint directory")


# ----------------------------------------------------------------------------- overrides


def _sections(cfg: Config) -> dict[str, Any]:
    return {
        f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))
    }


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """`value` (a string from the command line, or JSON) as the field's type, or a ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if (value is None or (isinstance(value, str) and value.lower() == "none")) and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot parse {value!r}")
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        if len(items) != len(args):
            raise ConfigError(f"{where} takes {len(args)} comma-separated values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(items, args, strict=True))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where} is a bool (true/false), got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} is an int, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} is an int, got {value!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"{where} is an int, got {value!r}")
        return int(f)
    if annotation is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} is a float, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} is a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {annotation}")


def set_field(cfg: Config, dotted: str, value: Any) -> None:
    """Set `section.field` to `value` (parsed and type-checked)."""
    sections = _sections(cfg)
    if "." not in dotted:
        raise ConfigError(f"override {dotted!r} must be SECTION.FIELD; sections: {', '.join(sections)}")
    section, name = dotted.split(".", 1)
    if section not in sections:
        raise ConfigError(f"unknown config section {section!r} in {dotted!r}; sections: {', '.join(sections)}")
    obj = sections[section]
    hints = typing.get_type_hints(type(obj))
    if name not in hints:
        raise ConfigError(f"unknown key {dotted!r}; valid keys of [{section}]: {', '.join(sorted(hints))}")
    setattr(obj, name, _coerce(value, hints[name], dotted))


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `--section.field=value` (or `section.field=value`) strings."""
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(f"override {item!r} needs a value: --section.field=value")
        key, value = text.split("=", 1)
        set_field(cfg, key, value)
    return cfg


def describe(cfg: Config) -> str:
    """Every field with its value and docstring, for --help-config."""
    import ast
    import inspect

    lines = []
    for section, obj in _sections(cfg).items():
        lines.append(f"[{section}]")
        docs: dict[str, str] = {}
        tree = ast.parse(inspect.getsource(type(obj)))
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:] + [None], strict=True):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
        for f in dataclasses.fields(obj):
            lines.append(f"  --{section}.{f.name}={getattr(obj, f.name)!r}  {docs.get(f.name, '')}".rstrip())
    return "\n".join(lines)


def signal_number(name: str) -> int | None:
    """A signal field's value: 'USR2' / 'SIGUSR2' / '12' -> the signal number; '' or 'none' -> None."""
    import signal

    if not name or name.lower() == "none":
        return None
    if name.isdigit():
        return int(name)
    key = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
    number = getattr(signal, key, None)
    if not isinstance(number, signal.Signals):
        raise ValueError(f"run.preempt_signal={name!r} is not a signal name (USR2, USR1, TERM, ...) or number")
    return int(number)


def default_run_name(cfg: Config) -> str:
    """`cfg.run.name`, or when it is '' the recipe's name (`run` without one) and, for the sharded
    backends, a suffix: `-fsdp`, or the DeepSpeed config's name (`-zero3`)."""
    if cfg.run.name:
        return cfg.run.name
    base = cfg.recipe or "run"
    p = cfg.parallel
    if p.backend == "fsdp":
        return f"{base}-fsdp"
    if p.backend == "deepspeed":
        stem = p.deepspeed_config.rsplit("/", 1)[-1].removesuffix(".json") or "deepspeed"
        return f"{base}-{stem}"
    return base


# ----------------------------------------------------------------------------- derived values


@dataclass(frozen=True)
class Derived:
    """Values computed from the config and the launch, in one place (logged at start)."""

    world_size: int
    batch_size_per_device: int
    grad_accum_steps: int
    global_batch_size: int
    lr: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    negatives_per_loss: int
    """Keys each query is contrasted with: micro-batch x world size."""

    def summary(self) -> str:
        return (
            f"world size {self.world_size} x batch per device {self.batch_size_per_device} x grad accumulation "
            f"{self.grad_accum_steps} = global batch {self.global_batch_size}; lr {self.lr:.3g}; "
            f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps, {self.warmup_steps} warmup steps; "
            f"{self.negatives_per_loss} keys per loss"
        )


def derive(cfg: Config, world_size: int, num_samples: int) -> Derived:
    """Check that the batch splits and compute lr, per-device batch and step counts.

    Raises:
        ConfigError: the global batch does not split into world size x per-device batch x
            accumulation steps, or the data is smaller than one global batch.
    """
    check_fields(cfg)
    b = cfg.batch
    per_device = b.batch_size_per_device or b.global_batch_size // (world_size * b.grad_accum_steps)
    if per_device * world_size * b.grad_accum_steps != b.global_batch_size or per_device < 1:
        raise ConfigError(
            f"global batch {b.global_batch_size} does not split into {world_size} ranks x "
            f"{b.batch_size_per_device or per_device} per device x {b.grad_accum_steps} accumulation steps; "
            "change --batch.global_batch_size, --batch.batch_size_per_device or --batch.grad_accum_steps"
        )
    steps_per_epoch = num_samples // b.global_batch_size
    if steps_per_epoch < 1:
        raise ConfigError(
            f"the data has {num_samples} samples, fewer than one global batch of {b.global_batch_size}; "
            "lower --batch.global_batch_size"
        )
    s = cfg.schedule
    total = max(1, round(s.epochs * steps_per_epoch))
    return Derived(
        world_size=world_size,
        batch_size_per_device=per_device,
        grad_accum_steps=b.grad_accum_steps,
        global_batch_size=b.global_batch_size,
        lr=cfg.optim.base_lr * b.global_batch_size / 256,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=round(s.warmup_epochs * steps_per_epoch),
        negatives_per_loss=per_device * world_size,
    )
