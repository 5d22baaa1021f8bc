"""Every check a run can make before anything heavy exists: no process group, no model, no data
read. `scale.pretrain` runs it on every rank first (and alone with `--check`), so a wrong field,
name, file or batch split ends in one line that names the field and the fix, and nothing is
written anywhere.

What it checks:
- every field against its rule (`scale.config.RULES`: ranges and choices) and the relations between
  fields (warmup within the epochs, betas, the preemption signal);
- names resolved by other layers: the model preset with its overrides (`resolve_vit_config`), the
  optimizer implementation for the optimizer, the precision on this machine, the backend for the
  launched world size;
- the batch split for the launched world size;
- files: the data sources resolve (shards with their indexes, an image folder), the DeepSpeed JSON
  parses and agrees with the scale config, a `--run.resume` path is a complete checkpoint, the
  output directory is not a file;
- optional packages the config needs (DeepSpeed, DALI) are installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

from scale.config import Config, ConfigError, check_fields

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
    from scale.parallel.launch import launched_world_size

    check_fields(cfg)
    world = launched_world_size() if world_size is None else world_size
    _check_model(cfg)
    _check_optimizer(cfg)
    _check_parallel(cfg, world)
    per_device = _check_batch(cfg, world)
    if cfg.parallel.backend == "deepspeed":
        _check_deepspeed(cfg, world, per_device)
    _check_run(cfg)
    if data:
        _check_data(cfg)


def _check_model(cfg: Config) -> None:
    from scale.models import resolve_vit_config
    from scale.models.moco import resolve_view_forward

    try:
        vit = resolve_vit_config(cfg.model.name, **cfg.model.vit_overrides())
        resolve_view_forward(cfg.model.view_forward, vit.use_bn or vit.conv_stem)
    except ValueError as e:
        raise ConfigError(f"--model.*: {e}") from None
    if cfg.model.compile:
        _check_compile()


def _check_compile() -> None:
    """torch.compile's inductor needs a C++ compiler for CPU code and Triton for CUDA kernels: say so
    now, not at the first step after minutes of start-up."""
    import importlib.util
    import shutil

    import torch

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


def _check_parallel(cfg: Config, world: int) -> None:
    import torch

    from scale.parallel.base import BackendError, resolve_precision

    p = cfg.parallel
    cuda = torch.cuda.is_available()
    try:
        resolve_precision(p.precision, torch.device("cuda" if cuda else "cpu"))
    except BackendError as e:
        raise ConfigError(f"--parallel.precision: {e}") from None
    if p.dist_backend == "nccl" and not cuda:
        raise ConfigError("--parallel.dist_backend=nccl needs CUDA GPUs; use auto or gloo on a CPU")
    if p.backend == "single" and world > 1:
        raise ConfigError(f"--parallel.backend=single cannot run on {world} ranks; use ddp, fsdp or auto")
    if p.backend in ("ddp", "fsdp") and world == 1:
        raise ConfigError(
            f"--parallel.backend={p.backend} needs several ranks: launch with torchrun --nproc_per_node N "
            "(or use single / auto for one process)"
        )
    if p.backend == "deepspeed" and not p.deepspeed_config:
        raise ConfigError("--parallel.backend=deepspeed needs a config: --deepspeed ds_configs/zero2.json")
    if p.deepspeed_config and p.backend != "deepspeed":
        raise ConfigError(
            f"--parallel.deepspeed_config is set but --parallel.backend={p.backend}; use --deepspeed "
            f"{p.deepspeed_config} (it sets both) or drop the config"
        )


def _check_batch(cfg: Config, world: int) -> int:
    b = cfg.batch
    per_device = b.batch_size_per_device or b.global_batch_size // (world * b.grad_accum_steps)
    if per_device < 1 or per_device * world * b.grad_accum_steps != b.global_batch_size:
        raise ConfigError(
            f"--batch.global_batch_size={b.global_batch_size} does not split into {world} rank(s) x "
            f"{b.batch_size_per_device or per_device} per device x {b.grad_accum_steps} accumulation steps; "
            "change --batch.global_batch_size, --batch.batch_size_per_device or --batch.grad_accum_steps"
        )
    return per_device


def read_json_config(path: str | os.PathLike, what: str) -> dict:
    """A JSON object from `path`, or a ConfigError naming the file, line and column."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} does not exist; see ds_configs/ for examples")
    try:
        value = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        raise ConfigError(f"{what} {str(p)!r} is not valid JSON: {e.msg} at {where}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {str(p)!r} cannot be read: {e}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{what} {str(p)!r} must hold a JSON object, not {type(value).__name__}")
    return value


def _check_deepspeed(cfg: Config, world: int, per_device: int) -> None:
    from scale.parallel.base import BackendError
    from scale.parallel.deepspeed import require_deepspeed, resolve_ds_config

    path = cfg.parallel.deepspeed_config
    ds = read_json_config(path, "DeepSpeed config")
    stage = ds.get("zero_optimization", {}).get("stage") if isinstance(ds.get("zero_optimization"), dict) else None
    if stage not in (1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 1, 2 or 3 (got {stage!r})")
    derived = SimpleNamespace(
        global_batch_size=cfg.batch.global_batch_size,
        batch_size_per_device=per_device,
        grad_accum_steps=cfg.batch.grad_accum_steps,
    )
    import torch

    from scale.parallel.base import resolve_precision

    precision = resolve_precision(cfg.parallel.precision, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        resolve_ds_config(path, cfg, derived, precision)
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
    if bool(d.eval_source) != bool(d.knn_train_source):
        raise ConfigError(
            "the kNN monitor needs both --data.eval_source and --data.knn_train_source (or neither); "
            f"got eval_source={d.eval_source!r}, knn_train_source={d.knn_train_source!r}"
        )


def _check_data(cfg: Config) -> None:
    from scale.data.loader import resolve_source
    from scale.data.shards import DataError

    d = cfg.data
    if d.backend == "dali":
        try:
            import nvidia.dali  # noqa: F401
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
