"""The config's schema: one dataclass per section, a docstring and (where the type is not enough)
a rule per field, written beside it (`setting(default, rule)`), and the checks of relations between
fields. Overrides (`scale.config.overrides`) and derived values (`scale.config.derived`) build on it.

    python -m scale.pretrain --recipe vit_b_300ep --batch.global_batch_size=2048 --optim.base_lr=1e-4
"""

from __future__ import annotations

import dataclasses
import json
import signal
from dataclasses import dataclass, field
from typing import Any

from scale.config.rules import Rule, field_rule, non_negative, one_of, positive, setting
from scale.errors import ConfigError
from scale.hardware import PRECISIONS
from scale.parallel.registry import BACKEND_CHOICES


@dataclass
class ModelConfig:
    name: str = "vit_base"
    """Backbone: a ViT preset (scale.models.VIT_PRESETS or an alias such as vit_h14) or a torchvision
    ResNet (resnet50, ...; only img_size of the model options applies to it)."""
    img_size: int = setting(224, positive())
    """Crop size in pixels, for the model and the augmentation."""
    patch_size: int | None = setting(None, positive())
    """Patch size override (None: the preset's)."""
    use_bn: bool | None = None
    """ViT-BN override (None: the preset's)."""
    pos_embed: str = setting("sincos", one_of("sincos", "learned", "none"))
    """'sincos', 'learned' or 'none'."""
    pool: str = setting("cls", one_of("cls", "avg"))
    """'cls' or 'avg'."""
    random_patch_proj: bool = True
    """Freeze the random patch projection (paper Sec. 4.2); ViTs only (a ResNet has no patches)."""
    embed_dim: int | None = setting(None, positive())
    """Width override, for small models (None: the preset's)."""
    depth: int | None = setting(None, positive())
    """Depth override (None: the preset's)."""
    num_heads: int | None = setting(None, positive())
    """Heads override (None: the preset's)."""
    dim: int = setting(256, positive())
    """Output dimension of the projector and predictor."""
    mlp_dim: int = setting(4096, positive())
    """Hidden dimension of the projector and predictor."""
    temperature: float = setting(0.2, positive())
    """Softmax temperature tau (0.2 for ViT, 1.0 for ResNet-50: the r50_* recipes)."""
    view_forward: str = setting("auto", one_of("auto", "joint", "per_view"))
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
    backend: str = setting("torchvision", one_of("torchvision", "dali"))
    """'torchvision' or 'dali'."""
    num_workers: int = setting(8, non_negative())
    """DataLoader worker processes (torchvision) or DALI threads, per rank."""
    shuffle_buffer: int = setting(1000, non_negative())
    """Samples in each worker's shuffle buffer."""
    resampled: bool = False
    """Draw shards with replacement (very large runs)."""
    crop_min: float = setting(0.08, Rule(lo=0, lo_open=True, hi=1))
    """Smallest RandomResizedCrop area fraction (0.08 for ViT; fine-tuning's crops too: DeiT's 0.08)."""
    eval_source: str = ""
    """Labelled held-out data for the kNN monitor ('' for none; the demo uses 'demo:val')."""
    knn_train_source: str = ""
    """Labelled data whose features form the kNN memory bank ('' for none; the demo: 'demo')."""
    max_lost_fraction: float = setting(0.01, Rule(lo=0, hi=1))
    """Stop the run when more than this fraction of the samples read so far were lost (corrupt or
    undecodable images, unreadable or vanished shards); below it they are skipped, counted, logged."""


@dataclass
class OptimConfig:
    name: str = setting("adamw", one_of("adamw", "lamb", "lars"))
    """'adamw', 'lamb' or 'lars'."""
    base_lr: float = setting(1.5e-4, positive())
    """Learning rate per 256 images: lr = base_lr * global_batch_size / 256."""
    weight_decay: float = setting(0.1, non_negative())
    """Weight decay (AdamW decoupled)."""
    final_weight_decay: float | None = setting(None, non_negative())
    """If set, weight decay follows a cosine to this value; None keeps it constant (official)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam / LAMB betas."""
    eps: float = setting(1e-8, positive())
    momentum: float = setting(0.9, Rule(lo=0, hi=1, hi_open=True))
    """LARS momentum."""
    trust_coefficient: float = setting(0.001, positive())
    """LARS trust coefficient."""
    exclude_norm_bias_from_wd: bool = False
    """Exclude norms, biases and tokens from weight decay (the official code decays everything)."""
    clip_grad: float = setting(0.0, non_negative())
    """Clip the global gradient norm to this value; 0 disables (official: no clipping)."""
    implementation: str = setting("auto", one_of("auto", "torch", "torch-fused", "apex", "deepspeed", "scale"))
    """'auto' (only implementations equal to scale's update: torch's fused AdamW on CUDA, foreach
    on CPU; scale's foreach Lamb; the authors' LARS), or force 'torch' (foreach AdamW) /
    'torch-fused' (AdamW's fused kernel, on a CPU too: less peak memory) / 'apex' (FusedLAMB) /
    'deepspeed' (FusedAdam, or FusedLamb: another LAMB variant) / 'scale'."""


@dataclass
class ScheduleConfig:
    epochs: float = setting(300, positive())
    """Training length in epochs."""
    warmup_epochs: float = setting(40, non_negative())
    """Linear lr warmup from 0, then a half-cycle cosine to 0."""
    momentum: float = setting(0.99, Rule(lo=0, hi=1))
    """Momentum-encoder coefficient at the start; cosine to `final_momentum`."""
    final_momentum: float = setting(1.0, Rule(lo=0, hi=1))
    max_steps: int = setting(0, non_negative())
    """Stop after this many optimizer steps (0: run all epochs). Schedules still span all epochs."""


@dataclass
class BatchConfig:
    global_batch_size: int = setting(4096, positive())
    """Images per optimizer step over all ranks (the paper's batch)."""
    batch_size_per_device: int = setting(0, non_negative())
    """Images per rank per micro-step; 0 derives it as global / (world size x grad_accum_steps)."""
    grad_accum_steps: int = setting(1, positive())
    """Micro-steps per optimizer step (see `keys`)."""
    keys: str = setting("global", one_of("global", "micro"))
    """With gradient accumulation, the keys each query is contrasted with: 'global' (every
    micro-batch's keys are computed first, so each loss sees the global batch's keys, as without
    accumulation) or 'micro' (each micro-batch's own keys: micro-batch x world size)."""


@dataclass
class ParallelConfig:
    backend: str = setting("auto", one_of(*BACKEND_CHOICES))
    """'auto' (on several GPUs the planner's choice, on CPU ranks ddp, on one process single), 'single',
    'ddp', 'fsdp', 'hsdp' (FSDP2 sharded inside groups of `shard_size` ranks, replicated across) or
    'deepspeed'."""
    precision: str = setting("auto", one_of(*PRECISIONS))
    """'auto' (bf16 on GPUs that support it, else fp32), 'fp32', 'bf16' or 'fp16' (GPU only)."""
    activation_checkpointing: bool | str = setting(False, one_of("false", "true", "selective"))
    """true: recompute each transformer block in the backward pass (one more forward: ~+33% compute);
    'selective': keep each block's matmul and attention outputs and recompute only its cheap ops
    (normalisations, GELU, casts, adds: little compute, about 40% less activation memory than none);
    false: keep everything."""
    deepspeed_config: str = ""
    """DeepSpeed JSON (ds_configs/zero{1,2,3}.json); `--deepspeed PATH` sets it and the backend."""
    reshard_after_forward: bool = True
    """FSDP2 / HSDP: free the base encoder's gathered parameters after each block's forward
    (ZeRO-3-like); false keeps them until the backward (ZeRO-2-like: more memory, less
    communication). The momentum encoder (no backward) always frees them after its forward."""
    shard_size: int = setting(0, non_negative())
    """HSDP (`--parallel.backend=hsdp`): ranks per shard group (parameters, gradients and optimizer
    state sharded inside it, replicated across groups); 0: the ranks of one node (LOCAL_WORLD_SIZE)."""
    tf32: bool = True
    """fp32 on CUDA: matmuls and convolutions on TF32 tensor cores (10-bit mantissa inputs, fp32
    accumulation; about 7x the fp32 rate); false keeps full fp32. No effect on bf16/fp16 or CPU."""
    tune_cpu_malloc: bool = True
    """On a CPU: keep glibc malloc from unmapping freed blocks of up to 1 GiB (activations of more than
    32 MiB would be faulted in and zeroed again at every use; scale.hardware.cpu_malloc). Same results."""
    dist_backend: str = setting("auto", one_of("auto", "nccl", "gloo"))
    """'auto' (nccl with CUDA, else gloo), 'nccl' or 'gloo'."""
    timeout_minutes: float = setting(30, positive())
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
    seed: int = setting(0, Rule(lo=0, hi=2**32 - 1))
    log_every: int = setting(10, positive())
    """Log metrics every this many optimizer steps."""
    ckpt_every: int = setting(0, non_negative())
    """Checkpoint every this many optimizer steps (0: at the end of every epoch only)."""
    keep_last: int = setting(3, positive())
    """Checkpoints kept (older ones are deleted after a newer one is complete)."""
    ckpt_failure: str = setting("retry", one_of("stop", "retry"))
    """A checkpoint write that fails (ENOSPC, an I/O error): 'retry' logs it, removes the partial
    write and keeps training, writing again at the next interval (stopping after
    `max_ckpt_failures` failures in a row, or when the final or preemption checkpoint fails);
    'stop' stops at once. The previous checkpoint is intact either way."""
    max_ckpt_failures: int = setting(3, positive())
    """Checkpoint writes that may fail in a row under ckpt_failure=retry before the run stops."""
    resume: str = "auto"
    """'auto' (newest complete checkpoint of the run directory, if any), 'none', or a path."""
    max_nonfinite: int = setting(5, positive())
    """Stop after this many non-finite losses in a row (each one is skipped)."""
    preempt_signal: str = "USR2"
    """Signal that stops the run at the next check after a complete checkpoint (and requeues it
    under SLURM); '' or 'none' disables. USR2, not USR1: NCCL uses SIGUSR1."""
    preempt_check_every: int = setting(10, positive())
    """Steps between the ranks' agreement on a received signal (one small all-reduce read on the
    host each time)."""
    requeue: bool = True
    """Under SLURM, requeue the job (scontrol requeue) after the preemption checkpoint."""
    max_requeues: int = setting(50, non_negative())
    """Do not requeue a job SLURM has already restarted this many times (SLURM_RESTART_COUNT)."""
    trust_checkpoint_code: bool = False
    """Read checkpoints (resume, `finetune.pretrained`) with pickle's full unpickler. Off: weights and
    data only, a file asking for anything else is refused (`scale.safe_load`). Only for files from a
    source you trust: they can then run code on this machine."""
    stale_owner_minutes: float = setting(10.0, Rule(lo=0, lo_open=True))
    """A run directory is held by one job at a time (`RUN/owner.json`, `scale.train.run_owner`); a
    holder on another host whose heartbeat is older than this, and whose SLURM job squeue cannot
    vouch for, is taken to be gone and replaced (one on this host: when its process is gone)."""
    progress: bool = True
    """A progress bar on rank 0 (else periodic log lines)."""
    tensorboard: bool = True


@dataclass
class MonitorConfig:
    """The paper's instruments (scale.train.monitors) and the held-out kNN, on by default: they change
    nothing in training."""

    knn_every: int = setting(20, non_negative())
    """Classify the current batch against the dense kNN bank every this many steps (0: off)."""
    knn_bank_fraction: float = setting(0.1, Rule(lo=0, lo_open=True, hi=1))
    """Bank length as a fraction of the training set (the paper: 10%), rounded to whole steps."""
    knn_bank_size: int = setting(0, non_negative())
    """Bank length in features (0: from knn_bank_fraction); rounded to whole steps (2 crops each)."""
    knn_k: int = setting(200, positive())
    """Neighbours of both kNN monitors, the dense one and the held-out one (Wu et al. 2018: 200)."""
    knn_temperature: float = setting(0.07, positive())
    """Temperature of the kNN votes exp(sim / T), both monitors (Wu et al. 2018: 0.07)."""
    heldout_every_epochs: int = setting(0, non_negative())
    """Run the held-out kNN monitor (data.eval_source against data.knn_train_source) every this many
    epochs (0: only at the end of the run, when both are configured)."""
    dip_points: float = setting(3.0, non_negative())
    """A dense kNN value this many points (and 3 standard errors) below its running average is a dip."""
    grad_every: int = setting(1, non_negative())
    """Measure per-layer gradient norms every this many steps (0: off)."""
    spike_threshold: float = setting(3.0, Rule(lo=1, lo_open=True))
    """A layer's gradient norm above this multiple of its running average is a spike."""
    average_steps: int = setting(50, positive())
    """Horizon of the running averages (in measurements), and the warm-up before spikes are reported."""
    spike_window: int = setting(200, non_negative())
    """Steps after a first-layer spike in which a last-layer spike is reported with its delay."""


@dataclass
class FinetuneConfig:
    """End-to-end fine-tuning (`scale-finetune`, `scale.eval.finetune`): the DeiT recipe the authors
    fine-tuned with (its main.py defaults), read only by fine-tuning runs. The schedule, optimizer
    and batch sections apply as in pretraining; a fine-tuning recipe sets DeiT's values there."""

    pretrained: str = ""
    """Backbone to start from: a run directory or checkpoint of this project (any backend), the
    authors' release (.pth.tar), a timm / torchvision state dict or an export folder; '' starts from
    random init (the baseline)."""
    encoder: str = setting("base_encoder", one_of("base_encoder", "momentum_encoder"))
    """Which encoder of a MoCo v3 checkpoint to fine-tune (the authors: base_encoder)."""
    num_classes: int = setting(0, non_negative())
    """Classes of the classifier (0: from the training data's labels)."""
    drop_path: float = setting(0.1, Rule(lo=0, hi=1, hi_open=True))
    """Stochastic depth rate of the last block (ViTs; DeiT: 0.1)."""
    layer_decay: float = setting(1.0, Rule(lo=0, lo_open=True, hi=1))
    """Layer-wise lr decay (BEiT / MAE): block i's lr scaled by layer_decay^(depth + 1 - i); 1 (the
    default, DeiT's) turns it off. ViTs only."""
    warmup_lr: float = setting(1e-6, non_negative())
    """Learning rate at step 0, rising linearly to the peak over the warmup (DeiT: 1e-6)."""
    min_lr: float = setting(1e-5, non_negative())
    """Learning rate at the end of the cosine (DeiT: 1e-5)."""
    smoothing: float = setting(0.1, Rule(lo=0, hi=1, hi_open=True))
    """Label smoothing."""
    mixup: float = setting(0.8, non_negative())
    """Mixup alpha (0: off)."""
    cutmix: float = setting(1.0, non_negative())
    """CutMix alpha (0: off)."""
    mixup_prob: float = setting(1.0, Rule(lo=0, hi=1))
    """Probability of mixing a batch at all."""
    mixup_switch_prob: float = setting(0.5, Rule(lo=0, hi=1))
    """Probability of CutMix rather than mixup when both are on."""
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    """timm's RandAugment policy ('' for none)."""
    color_jitter: float = setting(0.3, non_negative())
    """Colour jitter (timm ignores it when auto_augment is set, as DeiT's runs)."""
    interpolation: str = setting("bicubic", one_of("bicubic", "bilinear", "random"))
    """Resizing in the training crops and the evaluation resize."""
    reprob: float = setting(0.25, Rule(lo=0, hi=1))
    """Random erasing probability (per image, pixel mode)."""
    repeats: int = setting(3, positive())
    """Repeated augmentation: copies of each sample per epoch (DeiT: 3; 1: off)."""
    ema_decay: float = setting(0.99996, Rule(lo=0, hi=1))
    """Model EMA decay per optimizer step (DeiT: 0.99996; 0: no EMA)."""
    eval_every_epochs: int = setting(1, non_negative())
    """Evaluate the model and its EMA on data.eval_source every this many epochs (0: at the end only)."""
    eval_crop_pct: float = setting(0.875, Rule(lo=0, lo_open=True, hi=1))
    """Evaluation: resize to img_size / crop_pct, then centre-crop img_size (DeiT: 0.875)."""


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
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    task: str = "pretrain"
    """'pretrain' (MoCo v3, `scale-pretrain`) or 'finetune' (a classifier end to end, `scale-finetune`):
    set by the recipe."""
    recipe: str = ""
    """The recipe this config started from."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)


def sections(cfg: Config) -> dict[str, Any]:
    """The config's sections by name ('model', 'data', ...)."""
    return {
        f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))
    }


RULES: dict[str, Rule] = {
    f"{name}.{f.name}": field_rule(f)
    for name, section in sections(Config()).items()
    for f in dataclasses.fields(section)
    if field_rule(f) is not None
}
"""Every field's accepted values beyond its type, from the fields' `setting`s (fields absent here take
any value of their type: names, paths, free text, booleans; names resolved elsewhere, such as
model.name or data.source, are checked by `scale.preflight`)."""


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


def signal_number(name: str) -> int | None:
    """A signal field's value: 'USR2' / 'SIGUSR2' / '12' -> the signal number; '' or 'none' -> None."""
    if not name or name.lower() == "none":
        return None
    if name.isdigit():
        return int(name)
    key = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
    number = getattr(signal, key, None)
    if not isinstance(number, signal.Signals):
        raise ValueError(f"run.preempt_signal={name!r} is not a signal name (USR2, USR1, TERM, ...) or number")
    return int(number)
