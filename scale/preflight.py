"""Every check a run can make before anything heavy exists: no process group, no model, no data
read. `scale.pretrain` runs it on every rank first (and alone with `--check`), so a wrong field,
name, file or batch split ends in one line that names the field and the fix, and nothing is
written anywhere.

What it checks:
- every field against its rule (`scale.config.RULES`: ranges and choices) and the relations between
  fields (warmup within the epochs, betas, the preemption signal);
- names resolved by other layers: the model preset with its overrides (`resolve_backbone_config`), the
  optimizer implementation for the optimizer, the precision on this machine, the backend for the
  launched world size;
- the batch split for the launched world size;
- files: the data sources resolve (shards with their indexes, an image folder), the DeepSpeed JSON
  parses and agrees with the scale config, a `--run.resume` path is a complete checkpoint, the
  output directory is not a file;
- optional packages the config needs (DeepSpeed, DALI) are installed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import zipfile
from pathlib import Path

import torch

from scale.config import Config, ConfigError, check_fields, split_batch
from scale.data.sources import resolve_source
from scale.errors import BackendError, CheckpointError, DataError
from scale.hardware.precision import resolve_precision
from scale.models import ResNetConfig, resolve_backbone_config
from scale.models.export import is_export
from scale.models.moco import resolve_view_forward
from scale.parallel.ds_config import load_ds_json, resolve_ds_config, zero_section
from scale.parallel.ds_internals import require_deepspeed
from scale.parallel.placement import detect_launch
from scale.parallel.registry import launch_problem, selective_recompute_problem
from scale.parallel.settings import BackendSettings
from scale.safe_load import load_safely, trust_checkpoint_code

# Optimizer implementations each optimizer accepts (scale.optim.build_optimizer).
OPTIMIZER_IMPLEMENTATIONS = {
    "adamw": ("auto", "torch", "torch-fused", "deepspeed"),
    "lamb": ("auto", "scale", "apex", "deepspeed"),
    "lars": ("auto", "scale"),
}


def preflight(cfg: Config, world_size: int | None = None, data: bool = True) -> None:
    """Raise a ConfigError (one line: the field and the fix) for anything that cannot work.

    `world_size`: the launched world size (default: what the launcher's environment says).
    `data`: also resolve the data sources (reads the shard indexes' headers, builds the demo set).
    """
    check_fields(cfg)
    world = detect_launch().world_size if world_size is None else world_size
    _check_model(cfg)
    _check_optimizer(cfg)
    precision = _check_parallel(cfg, world)
    per_device = split_batch(cfg, world)
    if cfg.parallel.backend == "deepspeed":
        _check_deepspeed(cfg, per_device, precision)
    _check_run(cfg)
    if cfg.task == "finetune":
        _check_finetune(cfg, per_device)
    elif cfg.task != "pretrain":
        raise ConfigError(f"task {cfg.task!r} is neither pretrain nor finetune")
    if data:
        _check_data(cfg)


def _check_model(cfg: Config) -> None:
    try:
        backbone = resolve_backbone_config(cfg.model.name, **cfg.model.vit_overrides())
        mixes = isinstance(backbone, ResNetConfig) or backbone.use_bn or backbone.conv_stem
        resolve_view_forward(cfg.model.view_forward, mixes)
    except ValueError as e:
        raise ConfigError(f"--model.*: {e}") from None
    if cfg.model.compile:
        _check_compile()


def _check_compile() -> None:
    """torch.compile's inductor needs a C++ compiler for CPU code and Triton for CUDA kernels: say so
    now, not at the first step after minutes of start-up."""
    if torch.cuda.is_available():
        if importlib.util.find_spec("triton") is None:
            raise ConfigError("--model.compile=true needs Triton on a GPU (pip install triton, which torch's CUDA "
                              "wheels normally bring); or --model.compile=false")  # fmt: skip
    elif not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "c++", "g++", "clang++") if c):
        raise ConfigError("--model.compile=true on a CPU needs a C++ compiler for inductor's kernels (e.g. "
                          "apt install g++, or set CXX); or --model.compile=false")  # fmt: skip


def _check_optimizer(cfg: Config) -> None:
    o = cfg.optim
    allowed = OPTIMIZER_IMPLEMENTATIONS[o.name]
    if o.implementation not in allowed:
        raise ConfigError(
            f"--optim.implementation={o.implementation!r} does not implement {o.name}; one of: {', '.join(allowed)}"
        )


def _check_parallel(cfg: Config, world: int) -> str:
    """The backend for the launched world size (`scale.parallel.registry`) and the precision on this
    machine; returns the resolved precision."""
    p = cfg.parallel
    try:
        precision = resolve_precision(p.precision)
    except BackendError as e:
        raise ConfigError(f"--parallel.precision: {e}") from None
    if p.dist_backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("--parallel.dist_backend=nccl needs CUDA GPUs; use auto or gloo on a CPU")
    problem = launch_problem(p.backend, world, p.deepspeed_config, shard_size=p.shard_size)
    if problem:
        raise ConfigError(problem)
    stage = 0
    if p.deepspeed_config and p.activation_checkpointing == "selective" and Path(p.deepspeed_config).is_file():
        stage = int(zero_section(load_ds_json(p.deepspeed_config)).get("stage", 0))
    problem = selective_recompute_problem(p.activation_checkpointing, p.backend, stage)
    if problem:
        raise ConfigError(problem)
    return precision


def _check_deepspeed(cfg: Config, per_device: int, precision: str) -> None:
    """The DeepSpeed JSON parses and agrees with the scale config (`resolve_ds_config`, as the backend
    reads it), and DeepSpeed is installed."""
    settings = BackendSettings(
        global_batch_size=cfg.batch.global_batch_size,
        batch_size_per_device=per_device,
        grad_accum_steps=cfg.batch.grad_accum_steps,
        clip_grad=cfg.optim.clip_grad,
        optimizer=cfg.optim.name,
    )
    try:
        resolve_ds_config(cfg.parallel.deepspeed_config, settings, precision)
        require_deepspeed()
    except BackendError as e:
        raise ConfigError(str(e)) from None


def _check_run(cfg: Config) -> None:
    r = cfg.run
    out = Path(r.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--run.output_dir={r.output_dir!r} is a file, not a directory; choose another path")
    if "/" in r.name or r.name in (".", ".."):
        raise ConfigError(f"--run.name={r.name!r} must be a plain name (it becomes output_dir/name)")
    if r.resume not in ("auto", "none"):
        path = Path(r.resume)
        if not (path / "client.pt").is_file():
            raise ConfigError(
                f"--run.resume={r.resume!r} is not a complete checkpoint directory (no client.pt); "
                "use auto, none or a RUN/checkpoints/step-N directory"
            )
    d = cfg.data
    if cfg.task == "pretrain" and bool(d.eval_source) != bool(d.knn_train_source):
        raise ConfigError(
            "the kNN monitor needs both --data.eval_source and --data.knn_train_source (or neither); "
            f"got eval_source={d.eval_source!r}, knn_train_source={d.knn_train_source!r}"
        )


def _check_finetune(cfg: Config, per_device: int) -> None:
    """Fine-tuning's own fields: the checkpoint exists, the options suit the backbone and the data path."""
    f, d = cfg.finetune, cfg.data
    if f.pretrained:
        path = Path(f.pretrained).expanduser()
        if not path.exists():
            raise ConfigError(f"--finetune.pretrained={f.pretrained!r} does not exist; give a run directory, a "
                              "checkpoint directory or file, or leave it empty for random init")  # fmt: skip
        complete = (path / "client.pt").is_file() or list(path.glob("checkpoints/step-*/client.pt"))
        if path.is_dir() and not complete and not is_export(path):
            raise ConfigError(f"--finetune.pretrained={f.pretrained!r} is a directory without a complete checkpoint "
                              "(checkpoints/step-*/client.pt); wait for one or give a checkpoint file")  # fmt: skip
        if path.is_file():  # readable, and data only (tensors memory-mapped: nothing large is read here)
            trust_checkpoint_code(cfg.run.trust_checkpoint_code)
            try:
                load_safely(path, mmap=zipfile.is_zipfile(path))
            except CheckpointError as e:
                raise ConfigError(f"--finetune.pretrained: {e}") from None
    backbone = resolve_backbone_config(cfg.model.name, **cfg.model.vit_overrides())
    if isinstance(backbone, ResNetConfig) and f.layer_decay < 1:
        raise ConfigError("--finetune.layer_decay is for ViTs (per transformer block); set it to 1 for a ResNet")
    if (f.mixup > 0 or f.cutmix > 0) and per_device % 2:
        raise ConfigError(f"mixup / cutmix mix each batch with its reverse: they need an even batch per device, got "
                          f"{per_device}; change --batch.global_batch_size or set --finetune.mixup=0 "
                          "--finetune.cutmix=0")  # fmt: skip
    if d.backend != "torchvision":
        raise ConfigError("fine-tuning's augmentation (RandAugment, random erasing, mixup) is timm's, on the CPU "
                          "workers: use --data.backend=torchvision")  # fmt: skip
    if d.source == "synthetic":
        raise ConfigError("fine-tuning needs labelled data: --data.source=synthetic has no labels")


def _check_data(cfg: Config) -> None:
    d = cfg.data
    if d.backend == "dali":
        try:
            import nvidia.dali  # noqa: F401  (optional: only DALI runs need it)
        except ImportError:
            raise ConfigError(
                "--data.backend=dali needs NVIDIA DALI: pip install nvidia-dali-cuda120 "
                "(or use --data.backend=torchvision)"
            ) from None
    for field, source in (("source", d.source), ("eval_source", d.eval_source),
                          ("knn_train_source", d.knn_train_source)):  # fmt: skip
        if source and source != "synthetic":
            try:
                resolve_source(source)
            except DataError as e:
                raise ConfigError(f"--data.{field}: {e}") from None
