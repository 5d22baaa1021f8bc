"""DeepSpeed's JSON config, read in one place: parsed with the file, line and column of a mistake,
and resolved against scale's own settings (batch, precision, clipping: filled in where "auto" or
absent, a contradiction an error). The DeepSpeed backend, the pre-flight checks and the memory
model all read it through here. No DeepSpeed import: checking a config needs no DeepSpeed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scale.errors import BackendError
from scale.parallel.settings import BackendSettings

OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")
"""Fields scale sets from its own config (a JSON value other than "auto" that disagrees is an error)."""


def load_ds_json(path: str | Path) -> dict[str, Any]:
    """The JSON object in `path`, or a BackendError naming the file (and the line and column of
    broken JSON) with what to change."""
    p = Path(path)
    if not p.is_file():
        raise BackendError(f"DeepSpeed config {str(p)!r} does not exist; see ds_configs/ for examples")
    try:
        value = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise BackendError(
            f"DeepSpeed config {str(p)!r} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise BackendError(f"DeepSpeed config {str(p)!r} cannot be read: {e}") from None
    if not isinstance(value, dict):
        raise BackendError(f"DeepSpeed config {str(p)!r} must hold a JSON object, not {type(value).__name__}")
    return value


def bundled_config(stage: int) -> Path:
    """`ds_configs/zero{stage}.json` of this checkout (beside the package) or of the working
    directory: the configs `--parallel.backend=auto` and the planner use."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        path = root / "ds_configs" / f"zero{stage}.json"
        if path.is_file():
            return path
    raise BackendError(f"ds_configs/zero{stage}.json not found beside the package or in {Path.cwd()}: "
                       "run from the repository's root or pass --deepspeed PATH")  # fmt: skip


def zero_section(ds: dict[str, Any]) -> dict[str, Any]:
    section = ds.get("zero_optimization", {})
    return section if isinstance(section, dict) else {}


def zero_stage(path: str | Path) -> int:
    """The ZeRO stage of the DeepSpeed config at `path`."""
    return int(zero_section(load_ds_json(path)).get("stage", 0))


def resolve_ds_config(path: str | Path, settings: BackendSettings, precision: str) -> dict[str, Any]:
    """The DeepSpeed JSON with scale's batch, precision and clipping fields filled in or checked
    against `settings`, for a run in the resolved `precision`."""
    ds = load_ds_json(path)
    ds.pop("//", None)
    stage = zero_section(ds).get("stage")
    if "zero_optimization" not in ds:
        raise BackendError(f"{path}: no zero_optimization section (stage 1, 2 or 3)")
    if stage not in (1, 2, 3):
        raise BackendError(f"{path}: zero_optimization.stage must be 1, 2 or 3 (got {stage!r})")
    wanted = {
        "train_batch_size": settings.global_batch_size,
        "train_micro_batch_size_per_gpu": settings.batch_size_per_device,
        "gradient_accumulation_steps": settings.grad_accum_steps,
        "gradient_clipping": float(settings.clip_grad),
    }
    for key, value in wanted.items():
        if key in ds and ds[key] != "auto" and ds[key] != value:
            raise BackendError(
                f'{path}: {key}={ds[key]} contradicts the scale config ({value}); set it to "auto" or change '
                "the matching --batch.* / --optim.clip_grad"
            )
        ds[key] = value
    # The precision policy (docs/training.md): bf16 runs as on one process, by autocast over fp32
    # parameters (DeepSpeed's bf16 mode would store every parameter, the normalisations' included,
    # BatchNorm statistics and the sin-cos table in bf16 and compute without autocast); fp16 uses
    # DeepSpeed's own mode and loss scaler (its ZeRO optimizer takes no torch GradScaler).
    native = {"bf16": False, "fp16": precision == "fp16"}
    for key, wanted_on in native.items():
        section = ds.get(key, {})
        enabled = section.get("enabled", "auto")
        if enabled not in ("auto", wanted_on):
            policy = "scale runs bf16 by autocast over fp32 parameters (the precision policy of docs/training.md)"
            why = policy if key == "bf16" and enabled is True else f"it contradicts --parallel.precision={precision}"
            raise BackendError(f'{path}: {key}.enabled={enabled}: {why}; set it to "auto"')
        ds[key] = {**section, "enabled": wanted_on}
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise BackendError(
                f"{path}: remove the {key!r} section: scale builds the optimizer (--optim.*) and sets the lr every step"
            )
    if int(ds["zero_optimization"].get("zero_hpz_partition_size", 1)) > 1:
        raise BackendError(
            f"{path}: zero_hpz_partition_size > 1 (hpZ) gathers frozen parameters from a secondary copy that "
            "DeepSpeed refreshes only for trained ones, so the momentum encoder's EMA would be ignored; remove it"
        )
    if settings.optimizer != "adamw":
        raise BackendError(
            f"--optim.name={settings.optimizer} under DeepSpeed ZeRO: its per-tensor trust ratios would be computed "
            "on ZeRO's flattened partitions; use --parallel.backend=fsdp (or ddp) for LAMB and LARS"
        )
    return ds
