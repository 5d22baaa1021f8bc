"""Rank, world size and device from each launcher's environment, with the device count mocked.

The environments are what each launcher was seen to set (srun and sbatch on a real Slurm 22.05
cluster; torchrun and the deepspeed launcher from their sources)."""

import pytest

from scale.errors import LaunchError
from scale.parallel.placement import choose_device, detect_launch, plan_placement, tasks_on_node

# The batch script's own environment: set in sbatch although srun started nothing.
SBATCH = {"SLURM_JOB_ID": "12", "SLURM_NTASKS": "16", "SLURM_NPROCS": "16", "SLURM_PROCID": "0",
          "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_GTIDS": "0"}  # fmt: skip


def srun_task(procid, localid, nodeid, ntasks=16, per_node="8(x2)"):
    return {**SBATCH, "SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_PROCID": str(procid),
            "SLURM_LOCALID": str(localid), "SLURM_NODEID": str(nodeid), "SLURM_STEP_NUM_TASKS": str(ntasks),
            "SLURM_NTASKS": str(ntasks), "SLURM_STEP_TASKS_PER_NODE": per_node}  # fmt: skip


def torchrun(rank, local, world=16, local_world=8):
    return {"RANK": str(rank), "LOCAL_RANK": str(local), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(local_world), "GROUP_RANK": str(rank // local_world),
            "TORCHELASTIC_RUN_ID": "none", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}  # fmt: skip


def deepspeed(rank, local, world=16, local_size=8):
    return {"RANK": str(rank), "LOCAL_RANK": str(local), "WORLD_SIZE": str(world), "LOCAL_SIZE": str(local_size),
            "CROSS_RANK": str(rank // local_size), "CROSS_SIZE": "2", "MASTER_ADDR": "n1", "MASTER_PORT": "29500",
            "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}  # fmt: skip


CASES = [
    # (what, environment, visible devices, launcher, rank, world, device index or None for CPU)
    ("torchrun, 2 nodes x 8", torchrun(13, 5), 8, "torchrun", 13, 16, 5),
    ("deepspeed launcher", deepspeed(9, 1), 8, "deepspeed", 9, 16, 1),
    ("srun, all 8 GPUs visible", srun_task(10, 2, 1), 8, "srun", 10, 16, 2),
    ("srun --gpus-per-task=1", {**srun_task(15, 7, 1), "CUDA_VISIBLE_DEVICES": "7"}, 1, "srun", 15, 16, 0),
    ("CUDA_VISIBLE_DEVICES per rank", {**torchrun(7, 7, 8, 8), "CUDA_VISIBLE_DEVICES": "7"}, 1, "torchrun", 7, 8, 0),
    ("srun + torchrun per node", {**srun_task(1, 0, 1, 2, "1(x2)"), **torchrun(12, 4)}, 8, "srun+torchrun", 12, 16, 4),
    ("plain python inside sbatch", SBATCH, 8, "none", 0, 1, 0),
    ("plain python, no GPU", {}, 0, "none", 0, 1, None),
    ("torchrun on CPU", torchrun(1, 1, 2, 2), 0, "torchrun", 1, 2, None),
    (
        "mpirun",
        {
            "OMPI_COMM_WORLD_RANK": "3",
            "OMPI_COMM_WORLD_SIZE": "8",
            "OMPI_COMM_WORLD_LOCAL_RANK": "3",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "8",
        },
        8,
        "mpirun",
        3,
        8,
        3,
    ),  # fmt: skip
    (
        "srun tasks after init_distributed exported RANK",
        {**srun_task(9, 1, 1), "RANK": "9", "WORLD_SIZE": "16"},
        8,
        "srun",
        9,
        16,
        1,
    ),  # fmt: skip
    (
        "RANK from a wrapper, LOCAL_RANK from srun",
        {**srun_task(9, 1, 1), "RANK": "3", "WORLD_SIZE": "16"},
        8,
        "env",
        3,
        16,
        1,
    ),  # fmt: skip
]


@pytest.mark.parametrize("what, env, visible, launcher, rank, world, index", CASES, ids=[c[0] for c in CASES])
def test_launcher_environments_give_rank_world_and_a_visible_device(what, env, visible, launcher, rank, world, index):
    launch, device = plan_placement(env, device_count=visible)
    assert (launch.launcher, launch.rank, launch.world_size) == (launcher, rank, world)
    if index is None:
        assert device.kind == "cpu" and device.index is None
    else:
        assert device.kind == "cuda" and device.index == index < visible
    assert device.reason


def test_plain_python_inside_sbatch_is_one_process_and_says_how_to_start_the_ranks():
    launch = detect_launch(SBATCH)
    expected = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    assert launch.world_size == 1 and launch.env_for_torch() == expected
    assert "SLURM_NTASKS=16" in launch.note and "srun" in launch.note


def test_srun_tasks_export_torch_variables_and_local_world_size():
    launch = detect_launch(srun_task(11, 3, 1, 12, "8,4"))
    assert launch.env_for_torch() == {"RANK": "11", "WORLD_SIZE": "12", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}
    assert tasks_on_node("4(x2),3", 2) == 3 and tasks_on_node("4(x2),3", 1) == 4 and tasks_on_node("bad", 0) is None


@pytest.mark.parametrize(
    "env, visible, message",
    [
        ({"RANK": "3", "WORLD_SIZE": "8"}, 8, "no LOCAL_RANK"),  # every rank would take cuda:0
        (torchrun(9, 9, 16, 10), 8, "local rank 9 .* only 8 GPUs"),
        ({**torchrun(3, 3, 16, 10)}, 8, "10 processes on this node share 8"),
        ({"RANK": "3"}, 8, "RANK and WORLD_SIZE must be set together"),
        ({"RANK": "4", "WORLD_SIZE": "4"}, 8, "need 0 <= rank < world size"),
        ({"RANK": "x", "WORLD_SIZE": "4"}, 8, "RANK='x' is not an integer"),
    ],
)
def test_ambiguous_or_contradictory_launches_are_clear_errors(env, visible, message):
    with pytest.raises(LaunchError, match=message):
        plan_placement(env, device_count=visible)


def test_one_visible_gpu_is_used_whatever_the_local_rank():
    launch = detect_launch(torchrun(7, 7, 8, 8))
    assert choose_device(launch, 1, "5").index == 0
    assert "CUDA_VISIBLE_DEVICES=5" in choose_device(launch, 1, "5").reason


def test_backend_takes_the_visible_device_not_the_local_rank(monkeypatch):
    """CUDA_VISIBLE_DEVICES set per rank on the last GPU of a node: LOCAL_RANK 7, one device
    visible. The backend must use cuda:0 (cuda:7 does not exist in this process)."""
    import torch

    from scale.parallel.base import SingleProcess

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(torch.device(d)))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for key, value in {**torchrun(7, 7, 8, 8), "CUDA_VISIBLE_DEVICES": "7"}.items():
        monkeypatch.setenv(key, value)
    backend = SingleProcess("fp32")
    assert backend.device == torch.device("cuda", 0) and chosen == [torch.device("cuda", 0)]


@pytest.mark.parametrize("what, env, visible, launcher, rank, world, index", CASES, ids=[c[0] for c in CASES])
def test_the_exported_local_rank_is_the_device_this_process_uses(what, env, visible, launcher, rank, world, index):
    """DeepSpeed's engine calls set_device(LOCAL_RANK): with one GPU visible per task (srun
    --gpus-per-task=1, CUDA_VISIBLE_DEVICES per rank) SLURM_LOCALID 7 would be an invalid device
    ordinal. What init_distributed exports is the device placement chose."""
    launch, device = plan_placement(env, device_count=visible)
    exported = launch.env_for_torch(device)
    assert (exported["RANK"], exported["WORLD_SIZE"]) == (str(rank), str(world))
    if index is not None:
        assert exported["LOCAL_RANK"] == str(index)


def test_srun_mode_passes_the_jobs_cpus_per_task_on_to_srun(tmp_path):
    """Slurm 22.05-23.02's srun does not inherit sbatch's --cpus-per-task (each task got one CPU, its
    loader workers sharing one core): slurm/launch.sh passes it on. srun and scontrol are stand-ins
    here that print what they were given."""
    import os
    import stat
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    # python: a stand-in too, so the script's `--check` of the command passes without running anything.
    for tool, body in (("srun", 'echo "srun $*"'), ("scontrol", "echo node1"), ("python", "exit 0")):
        path = tmp_path / tool
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env = {**env, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "node1", "SCALE_ROOT": str(root), "SCALE_ENTRY": "scale.linear_probe",
           "SCALE_PYTHON": str(tmp_path / "python")}  # fmt: skip
    for cpus, expected in (("12", "--cpus-per-task=12"), (None, None)):
        run_env = {**env, "SLURM_CPUS_PER_TASK": cpus} if cpus else env
        out = subprocess.run(["bash", str(root / "slurm" / "launch.sh"), "--x"], env=run_env, capture_output=True,
                             text=True, timeout=60, check=True).stdout  # fmt: skip
        line = next(x for x in out.splitlines() if x.startswith("srun "))
        assert (expected in line.split()) if expected else "--cpus-per-task" not in line, line
