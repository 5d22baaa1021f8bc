"""Who started this process and which device it owns, read from the launcher's environment.

Launchers, and what each sets (seen on a real Slurm 22.05 cluster and in the launchers' sources):

| launcher | rank / world size | local rank | devices visible to each process |
|---|---|---|---|
| torchrun (also under srun, one agent per node) | RANK, WORLD_SIZE | LOCAL_RANK | all of the node's |
| the deepspeed launcher | RANK, WORLD_SIZE | LOCAL_RANK (and --local_rank) | the node's included GPUs |
| srun, one task per GPU | SLURM_PROCID, SLURM_STEP_NUM_TASKS | SLURM_LOCALID | all, or one with --gpus-per-task=1 |
| mpirun (Open MPI) | OMPI_COMM_WORLD_RANK / _SIZE | OMPI_COMM_WORLD_LOCAL_RANK | all |
| plain python (also inside an sbatch script) | - (one process) | - | all |

Two traps this module exists for:
- Inside an sbatch script (and salloc), SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID are set although
  srun started nothing: a plain `python` there is one process, not rank 0 of SLURM_NTASKS. Only
  srun's tasks carry SLURM_STEP_ID (set in every task of a step, absent in the batch script), so
  SLURM_* are read only when it is present. torchrun's workers under srun inherit SLURM_PROCID 0:
  RANK wins over it.
- The device index is the local rank only when every GPU of the node is visible. With one GPU
  visible per process (srun --gpus-per-task=1, or CUDA_VISIBLE_DEVICES set per rank) the local
  rank can be 7 while only cuda:0 exists.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from scale.errors import LaunchError


@dataclass(frozen=True)
class Launch:
    """This process's place in the job."""

    launcher: str
    """'torchrun', 'deepspeed', 'srun', 'srun+torchrun', 'mpirun', 'env' (RANK/WORLD_SIZE set by
    something else) or 'none' (one process)."""
    rank: int
    world_size: int
    local_rank: int | None
    """Index among the processes of this node; None when the environment does not say."""
    local_world_size: int | None
    note: str = ""
    """Anything the user should know about how this was read (logged once)."""

    def env_for_torch(self, device: DevicePlan | None = None) -> dict[str, str]:
        """RANK / WORLD_SIZE / LOCAL_RANK as torch.distributed's env:// initialisation reads them.

        With the CUDA `device` placement chose, LOCAL_RANK is its index among the devices this
        process sees: with one GPU visible per task (srun --gpus-per-task=1, CUDA_VISIBLE_DEVICES
        per rank) that is 0 whatever SLURM_LOCALID says, and DeepSpeed's engine, which calls
        set_device(LOCAL_RANK), would otherwise ask for a device that does not exist here."""
        out = {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size)}
        if device is not None and device.kind == "cuda":
            out["LOCAL_RANK"] = str(device.index)
        elif self.local_rank is not None:
            out["LOCAL_RANK"] = str(self.local_rank)
        if self.local_world_size is not None:
            out["LOCAL_WORLD_SIZE"] = str(self.local_world_size)
        return out


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{name}={value!r} is not an integer; fix or unset it") from None


def tasks_on_node(tasks_per_node: str, node_id: int) -> int | None:
    """Slurm's compressed per-node task counts ('4(x2),3' = 4, 4, 3) at `node_id`."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node_id] if 0 <= node_id < len(counts) else None


def in_srun_step(env: Mapping[str, str]) -> bool:
    """True when srun started this process (or its parent) as a task of a job step."""
    return "SLURM_STEP_ID" in env


def detect_launch(env: Mapping[str, str] | None = None) -> Launch:
    """Read rank, world size and local rank from `env` (default: os.environ)."""
    env = os.environ if env is None else env
    srun = in_srun_step(env)
    if "RANK" in env or "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        if rank is None or world is None:
            raise LaunchError("RANK and WORLD_SIZE must be set together (torchrun and the deepspeed launcher set both)")
        local = _int(env, "LOCAL_RANK")
        local_world = _int(env, "LOCAL_WORLD_SIZE") or _int(env, "LOCAL_SIZE")
        if "TORCHELASTIC_RUN_ID" in env:
            launcher = "srun+torchrun" if srun else "torchrun"
        elif "CROSS_RANK" in env and "LOCAL_SIZE" in env:
            launcher = "deepspeed"
        elif srun and env.get("SLURM_PROCID") == str(rank) and _int(env, "SLURM_STEP_NUM_TASKS") == world:
            launcher = "srun"  # srun's tasks, their RANK/WORLD_SIZE exported from SLURM_* (init_distributed)
        else:
            launcher = "env"
        note = ""
        if local is None and srun and _int(env, "SLURM_STEP_NUM_TASKS") == world:
            # srun started every rank itself (a wrapper exported RANK/WORLD_SIZE from SLURM_*).
            local = _int(env, "SLURM_LOCALID")
            note = "LOCAL_RANK from SLURM_LOCALID"
        elif local is None and "OMPI_COMM_WORLD_LOCAL_RANK" in env:
            local, note = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK"), "LOCAL_RANK from OMPI_COMM_WORLD_LOCAL_RANK"
        return _checked(Launch(launcher, rank, world, local, local_world, note))
    if srun:
        rank = _int(env, "SLURM_PROCID") or 0
        world = _int(env, "SLURM_STEP_NUM_TASKS") or _int(env, "SLURM_NTASKS") or 1
        node = _int(env, "SLURM_NODEID") or 0
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
        local_world = tasks_on_node(per_node, node) if per_node else None
        return _checked(Launch("srun", rank, world, _int(env, "SLURM_LOCALID") or 0, local_world))
    if "OMPI_COMM_WORLD_SIZE" in env:
        return _checked(
            Launch(
                "mpirun",
                _int(env, "OMPI_COMM_WORLD_RANK") or 0,
                _int(env, "OMPI_COMM_WORLD_SIZE") or 1,
                _int(env, "OMPI_COMM_WORLD_LOCAL_RANK"),
                _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE"),
            )
        )
    note = ""
    ntasks = _int(env, "SLURM_NTASKS") or 1
    if ntasks > 1:
        note = (
            f"SLURM_NTASKS={ntasks} but srun did not start this process (no SLURM_STEP_ID): running as one "
            f"process. To train on {ntasks} ranks, start them with `srun python -m scale.pretrain ...` (or "
            "torchrun) inside the job"
        )
    return Launch("none", 0, 1, 0, 1, note)


def _checked(launch: Launch) -> Launch:
    if launch.world_size < 1 or not 0 <= launch.rank < launch.world_size:
        raise LaunchError(
            f"rank {launch.rank} of world size {launch.world_size} ({launch.launcher}): need 0 <= rank < world size"
        )
    if launch.local_rank is not None and launch.local_rank < 0:
        raise LaunchError(f"local rank {launch.local_rank} is negative ({launch.launcher})")
    return launch


@dataclass(frozen=True)
class DevicePlan:
    kind: str
    """'cuda' or 'cpu'."""
    index: int | None
    reason: str


def choose_device(launch: Launch, device_count: int, visible: str | None = None) -> DevicePlan:
    """The device this process owns among the `device_count` CUDA devices it can see.

    `visible` is CUDA_VISIBLE_DEVICES, for the message only.
    """
    shown = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
    if device_count <= 0:
        return DevicePlan("cpu", None, "no CUDA device visible")
    if device_count == 1:
        return DevicePlan("cuda", 0, f"the one CUDA device visible to this process{shown}")
    local = launch.local_rank
    if local is None:
        if launch.world_size == 1:
            return DevicePlan("cuda", 0, f"one process, {device_count} devices visible{shown}: the first")
        raise LaunchError(
            f"rank {launch.rank} of {launch.world_size} sees {device_count} GPUs{shown} but the launcher did not say "
            "which is its own (no LOCAL_RANK): launch with torchrun or srun, set LOCAL_RANK, or make one GPU "
            "visible per process (srun --gpus-per-task=1)"
        )
    if local >= device_count:
        raise LaunchError(
            f"local rank {local} ({launch.launcher}) but only {device_count} GPUs are visible{shown}: start at most "
            f"{device_count} processes per node, or make exactly one GPU visible per process"
        )
    if launch.local_world_size is not None and launch.local_world_size > device_count:
        raise LaunchError(
            f"{launch.local_world_size} processes on this node share {device_count} visible GPUs{shown}: "
            "start one process per GPU"
        )
    return DevicePlan("cuda", local, f"local rank {local} of the {device_count} devices visible{shown}")


def plan_placement(env: Mapping[str, str] | None = None, device_count: int | None = None) -> tuple[Launch, DevicePlan]:
    """(launch, device) for this process; `device_count` defaults to torch.cuda.device_count()."""
    env = os.environ if env is None else env
    launch = detect_launch(env)
    if device_count is None:
        import torch  # here: the rest of this module is read before torch is imported (the entry points)

        device_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return launch, choose_device(launch, device_count, env.get("CUDA_VISIBLE_DEVICES"))
