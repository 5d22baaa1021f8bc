"""The parallel backends by name: one table that the config's rules (`parallel.backend`), the
factory (`scale.parallel.launch.build_backend`), the pre-flight launch checks and the run
directory's default name all read.

Torch-free on purpose: the config and the command line are checked before torch is imported (the
entry point installs its preemption handler first), so a backend's class is imported only when one
is built (`backend_class`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class BackendSpec:
    name: str
    module: str
    """Where the class lives, imported when a backend of this kind is built."""
    class_name: str
    needs_process_group: bool = False
    """DDP and FSDP2 run over a process group: launched on several ranks (torchrun, srun, ...)."""
    max_ranks: int | None = None
    needs_ds_config: bool = False
    run_suffix: str = ""
    """Appended to the recipe's name for the default run directory ('' for the replicated backends,
    which give the same numbers as one process); DeepSpeed's is its JSON's name (`-zero3`)."""


BACKENDS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec("single", "scale.parallel.base", "SingleProcess", max_ranks=1),
        BackendSpec("ddp", "scale.parallel.ddp", "DDPBackend", needs_process_group=True),
        BackendSpec("fsdp", "scale.parallel.fsdp", "FSDPBackend", needs_process_group=True, run_suffix="-fsdp"),
        BackendSpec("hsdp", "scale.parallel.fsdp", "HSDPBackend", needs_process_group=True, run_suffix="-hsdp"),
        BackendSpec("deepspeed", "scale.parallel.deepspeed", "DeepSpeedBackend", needs_ds_config=True),
    )
}

BACKEND_CHOICES = ("auto", *BACKENDS)
"""`parallel.backend` values: 'auto' picks ddp with several ranks, else single (`resolve_backend_name`)."""


def resolve_backend_name(name: str, world_size: int) -> str:
    return ("ddp" if world_size > 1 else "single") if name == "auto" else name


def launch_problem(
    name: str, world_size: int, deepspeed_config: str = "", process_group: bool | None = None, shard_size: int = 0
) -> str | None:
    """Why backend `name` cannot run on `world_size` launched ranks with this DeepSpeed config
    (one line naming the fix), or None when it can. `process_group`: whether one exists (default:
    with several ranks, as `scale.parallel.launch.init_distributed` creates one). `shard_size`:
    HSDP's shard group (0: one node's ranks, checked when the backend is built)."""
    if process_group is None:
        process_group = world_size > 1
    if name not in BACKEND_CHOICES:
        return f"--parallel.backend={name!r} is not one of: {', '.join(BACKEND_CHOICES)}"
    spec = BACKENDS[resolve_backend_name(name, world_size)]
    if spec.max_ranks is not None and world_size > spec.max_ranks:
        return f"--parallel.backend={name} cannot run on {world_size} ranks; use ddp, fsdp or auto"
    if spec.needs_process_group and not process_group:
        return (
            f"--parallel.backend={name} needs several ranks: launch with torchrun --nproc_per_node N "
            "(or use single / auto for one process)"
        )
    if spec.name == "hsdp" and shard_size and world_size % shard_size:
        return (f"--parallel.shard_size={shard_size} does not divide the {world_size} ranks: HSDP replicates whole "
                "shard groups; choose a divisor (0: the ranks of one node)")  # fmt: skip
    if spec.needs_ds_config and not deepspeed_config:
        return f"--parallel.backend={name} needs a config: --deepspeed ds_configs/zero2.json"
    if deepspeed_config and not spec.needs_ds_config:
        return (
            f"--parallel.deepspeed_config is set but --parallel.backend={name}; use --deepspeed "
            f"{deepspeed_config} (it sets both) or drop the config"
        )
    return None


def run_name_suffix(name: str, deepspeed_config: str = "") -> str:
    """The default run directory's suffix for backend `name` (`scale.config.default_run_name`)."""
    spec = BACKENDS.get(name)
    if spec is None:
        return ""
    if spec.needs_ds_config:
        return "-" + (deepspeed_config.rsplit("/", 1)[-1].removesuffix(".json") or spec.name)
    return spec.run_suffix


def backend_class(name: str) -> type:
    """The class of backend `name` ('single', 'ddp', 'fsdp', 'deepspeed'), imported now."""
    spec = BACKENDS.get(name)
    if spec is None:
        raise ValueError(f"unknown backend {name!r}; one of: {', '.join(BACKENDS)}")
    return getattr(importlib.import_module(spec.module), spec.class_name)


def selective_recompute_problem(recompute: bool | str, backend: str, zero_stage: int = 0) -> str | None:
    """Why `--parallel.activation_checkpointing=selective` cannot run on `backend` (one line), or
    None. FSDP2 / HSDP shard each block's normalisation layers as units of their own and ZeRO-3
    hooks every module: their gathers would run inside the recomputed region, where torch's
    selective recompute requires the forward's operations to recur exactly in the backward."""
    if recompute != "selective":
        return None
    if backend in ("fsdp", "hsdp") or (backend == "deepspeed" and zero_stage >= 3):
        name = "ZeRO-3" if backend == "deepspeed" else backend
        return (f"--parallel.activation_checkpointing=selective does not run under {name} (its parameter gathers "
                "inside each block would break the recompute); use true, or ddp / ZeRO-1/2")  # fmt: skip
    return None
