"""Process-group start-up from the launcher's environment (torchrun, the DeepSpeed launcher,
SLURM's srun; `scale.parallel.placement` reads it), and the backend factory (`build_backend`, from
the table of `scale.parallel.registry`)."""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from scale.errors import BackendError
from scale.hardware.precision import resolve_precision
from scale.parallel.base import Backend
from scale.parallel.placement import detect_launch, plan_placement
from scale.parallel.registry import backend_class, launch_problem, resolve_backend_name

log = logging.getLogger(__name__)


def launched_world_size() -> int:
    """World size the launcher asked for (`scale.parallel.placement`), 1 without one."""
    return detect_launch().world_size


def init_distributed(dist_backend: str = "auto", timeout_minutes: int = 30) -> None:
    """Initialise the default process group from the environment when several ranks were launched.

    torchrun and the DeepSpeed launcher set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT;
    tasks started by srun get them from SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID (only
    when srun started them: see `scale.parallel.placement`). The CUDA device is chosen among the
    devices this process can see before the group is created (NCCL binds to it).
    """
    launch, device = plan_placement()
    if launch.note:
        log.warning("launch: %s", launch.note)
    if dist.is_initialized() or launch.world_size == 1:
        return
    os.environ.update(launch.env_for_torch(device))
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise BackendError(
                f"{var} is not set ({launch.launcher}, rank {launch.rank} of {launch.world_size}): launch with "
                "torchrun or the deepspeed launcher, or export MASTER_ADDR (the first host of `scontrol show hostnames "
                "$SLURM_JOB_NODELIST`) and MASTER_PORT under srun"
            )
    if dist_backend == "auto":
        dist_backend = "nccl" if device.kind == "cuda" else "gloo"
    if dist_backend not in ("nccl", "gloo"):
        raise BackendError(f"dist_backend {dist_backend!r} is not one of: auto, nccl, gloo")
    if device.kind == "cuda":
        torch.cuda.set_device(device.index)
    timeout = timedelta(minutes=timeout_minutes)
    store = restart_store(timeout)
    if store is not None:
        dist.init_process_group(dist_backend, store=store, rank=launch.rank, world_size=launch.world_size,
                                timeout=timeout)  # fmt: skip
    else:
        dist.init_process_group(dist_backend, timeout=timeout)
    log.info("process group: %s, rank %d of %d (%s)", dist_backend, dist.get_rank(), dist.get_world_size(),
             launch.launcher)  # fmt: skip


def restart_store(timeout: timedelta) -> dist.Store | None:
    """Under torchrun, the process group's store: the agent's, with a prefix of its own for each
    restart attempt (TORCHELASTIC_RESTART_COUNT); None elsewhere (env:// as usual).

    torchrun's agent keeps one store for its whole life (c10d and static rendezvous alike), and
    torch's env:// rendezvous uses the same keys in every attempt (`default_pg/0//cpu//0/RANK`
    for gloo's addresses). The restarted workers then read the addresses the killed ones
    published: gloo's connectFullMesh fails with "connection refused", or both sides listen and
    hang. A later restart worked only by chance. Fresh keys per attempt make the first restart
    work. (Multi-node elastic jobs whose membership changes do not count those restarts in
    TORCHELASTIC_RESTART_COUNT: launch them with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1.)"""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return None
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    world = int(os.environ["WORLD_SIZE"])
    agent = dist.TCPStore(host, port, world, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"scale/attempt-{os.environ['TORCHELASTIC_RESTART_COUNT']}", agent)


def build_backend(name: str, precision: str = "auto", deepspeed_config: str = "") -> Backend:
    """The backend for this process (call `init_distributed` first); `name` is a
    `parallel.backend` value ('auto': ddp with several ranks, else single)."""
    resolve_precision(precision)  # fail early
    world = dist.get_world_size() if dist.is_initialized() else 1
    problem = launch_problem(name, world, deepspeed_config, process_group=dist.is_initialized())
    if problem:
        raise BackendError(problem)
    cls = backend_class(resolve_backend_name(name, world))
    return cls(deepspeed_config, precision) if deepspeed_config else cls(precision)
