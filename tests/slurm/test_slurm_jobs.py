"""The slurm/ scripts submitted for real to a local SLURM cluster (tests/slurm/cluster.py): the
scripts themselves, made to fit one CPU node by sbatch options and tiny config overrides on the
sbatch line, as a user would: 2 tasks, 2 gloo ranks, the bundled digits, a small ViT."""

import json
import os
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.distributed]

ROOT = Path(__file__).resolve().parents[2]
# What makes a paper script fit this machine: one node, 2 tasks, 1 CPU each, no GPUs; 30 minutes, as
# the scripts' time-limit signal comes 10 minutes before the limit.
SBATCH_CPU = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=30"]
TINY = [
    "--model.name=vit_small", "--model.img_size=32", "--model.patch_size=8", "--model.embed_dim=32",
    "--model.depth=2", "--model.num_heads=4", "--model.dim=16", "--model.mlp_dim=64", "--data.source=demo",
    "--data.num_workers=1", "--batch.global_batch_size=64", "--schedule.epochs=2", "--schedule.warmup_epochs=1",
    "--run.log_every=1", "--run.progress=false", "--run.tensorboard=false", "--parallel.precision=fp32",
    "--run.preempt_check_every=1",
]  # fmt: skip


def job_env(tmp_path, **extra):
    return {"SCALE_ROOT": str(ROOT), "SCALE_PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
            "SCALE_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1",
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions")),
            **extra}  # fmt: skip


def submit(slurm, tmp_path, script, *args, wait=True, env=None, sbatch=()):
    """sbatch the real slurm/SCRIPT from `tmp_path` (its output lands there); returns the job id."""
    cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), *SBATCH_CPU, *sbatch, str(ROOT / "slurm" / script),
           *TINY, f"--run.output_dir={tmp_path / 'runs'}", *args]  # fmt: skip
    out = slurm.run(*cmd, cwd=tmp_path, env=env or job_env(tmp_path), timeout=600)
    job = out.stdout.strip().split(";")[0]
    return job, out


def output(tmp_path, script, job) -> str:
    path = tmp_path / f"slurm-{script.removesuffix('.sh')}-{job}.out"
    return path.read_text() if path.is_file() else ""


def metrics(run_dir: Path) -> list[dict]:
    """The rows of metrics.jsonl but the dense kNN monitor's own (`knn_dense_queries`)."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [r for r in rows if "knn_dense_queries" not in r]


def wait_gone(slurm, job, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not slurm.run("squeue", "-h", "-j", job, "-o", "%T").stdout.strip():
            return
        time.sleep(0.5)
    raise TimeoutError(f"job {job} still queued or running after {timeout} s")


def test_sbatch_vit_b_script_trains_on_two_ranks_and_checkpoints(slurm, tmp_path):
    job, out = submit(slurm, tmp_path, "vit_b_300ep.sh", "--schedule.max_steps=4")
    log = output(tmp_path, "vit_b_300ep.sh", job)
    assert out.returncode == 0, out.stderr + log[-3000:]
    assert "launch srun" in log and "ddp on cpu, 2 rank(s)" in log and "(srun)" in log
    run = tmp_path / "runs" / "vit_b_300ep"
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]
    assert (run / "checkpoints" / "step-00000004" / "rng-rank1.pt").is_file()


def test_preempted_job_checkpoints_requeues_and_resumes_with_the_uninterrupted_losses(slurm, tmp_path):
    """scancel --signal=USR2 mid-run: every rank stops at one step boundary after a checkpoint, rank 0
    requeues the job, the rerun (same job id, SLURM_RESTART_COUNT=1) resumes and every loss after it
    equals the uninterrupted run's, bitwise."""
    steps = ["--schedule.max_steps=40"]
    ref_job, _ = submit(slurm, tmp_path, "vit_b_300ep.sh", *steps, "--run.name=reference", wait=False)
    job, _ = submit(slurm, tmp_path, "vit_b_300ep.sh", *steps, "--run.name=preempted", wait=False)
    run = tmp_path / "runs" / "preempted"
    deadline = time.monotonic() + 240
    while len(metrics(run)) < 5:
        assert time.monotonic() < deadline, output(tmp_path, "vit_b_300ep.sh", job)[-3000:]
        time.sleep(0.2)
    assert slurm.run("scancel", "--signal=USR2", job).returncode == 0
    wait_gone(slurm, job)
    wait_gone(slurm, ref_job)
    log = output(tmp_path, "vit_b_300ep.sh", job)
    assert "restart 0" in log and "restart 1" in log, log[-3000:]  # the same output file: --open-mode=append
    # (what rank 0 logs after `scontrol requeue` may be cut off: the requeue ends the job at once)
    assert "SIGUSR2 received" in log and f"requeueing job {job} (restart 1 of at most 50)" in log
    assert f"SLURM restart 1 of job {job}" in log and "resumed from" in log
    stopped = int(log.split("stopping at step ")[1].split()[0])
    assert 5 <= stopped < 40 and (run / "checkpoints" / f"step-{stopped:08d}").is_dir()
    got, expected = metrics(run), metrics(tmp_path / "runs" / "reference")
    assert [r["step"] for r in got] == [r["step"] for r in expected] == list(range(1, 41))
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]


@pytest.mark.slow  # the default suite keeps the other launch modes; 15-minute budget
def test_srun_plus_torchrun_mode_runs_a_job(slurm, tmp_path):
    env = job_env(tmp_path, SCALE_LAUNCH="torchrun")
    job, out = submit(slurm, tmp_path, "vit_b_300ep.sh", "--schedule.max_steps=3", env=env)
    log = output(tmp_path, "vit_b_300ep.sh", job)
    assert out.returncode == 0, out.stderr + log[-3000:]
    assert "launch torchrun" in log and "(srun+torchrun)" in log and "ddp on cpu, 2 rank(s)" in log
    assert [r["step"] for r in metrics(tmp_path / "runs" / "vit_b_300ep")] == [1, 2, 3]


@pytest.mark.slow  # the default suite keeps the other launch modes; 15-minute budget
def test_deepspeed_backend_through_the_same_launcher(slurm, tmp_path):
    pytest.importorskip("deepspeed")
    job, out = submit(slurm, tmp_path, "vit_b_300ep.sh", "--schedule.max_steps=3", "--deepspeed",
                      "ds_configs/zero2.json")  # fmt: skip
    log = output(tmp_path, "vit_b_300ep.sh", job)
    assert out.returncode == 0, out.stderr + log[-3000:]
    assert "deepspeed ZeRO-2 on cpu, 2 rank(s)" in log
    assert [r["step"] for r in metrics(tmp_path / "runs" / "vit_b_300ep-zero2")] == [1, 2, 3]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--optim.lr=1"], "config error: unknown key 'optim.lr'"),
        (["--data.source=/nonexistent/train-{0000..0009}.tar"], "config error: --data.source: shard pattern"),
        (["--recipe", "vit_z"], "config error: unknown recipe 'vit_z'"),
    ],
)
def test_bad_input_fails_at_once_before_any_rank_starts(slurm, tmp_path, args, message):
    job, out = submit(slurm, tmp_path, "vit_b_300ep.sh", *args)
    log = output(tmp_path, "vit_b_300ep.sh", job)
    assert out.returncode != 0 and message in log, log[-3000:]
    assert "process group" not in log and not (tmp_path / "runs").exists()


def test_linear_probe_script_probes_a_run_on_two_ranks(slurm, tmp_path):
    from scale.train.trainer import Trainer
    from tests.helpers import FixedBatchLoader, tiny_config

    Trainer(tiny_config(tmp_path, "run", **{"schedule.max_steps": 1}), loader=FixedBatchLoader(4, 8)).fit()
    args = [str(tmp_path / "run"), "--train", "demo", "--val", "demo:val", "--epochs", "2", "--batch-size", "128",
            "--no-augment", "--workers", "0", "--no-progress", "--out", str(tmp_path / "probe")]  # fmt: skip
    cmd = ["sbatch", "--parsable", "--wait", *SBATCH_CPU, str(ROOT / "slurm" / "linear_probe.sh"), *args]
    out = slurm.run(*cmd, cwd=tmp_path, env=job_env(tmp_path), timeout=600)
    job = out.stdout.strip().split(";")[0]
    log = output(tmp_path, "linear_probe.sh", job)
    assert out.returncode == 0, out.stderr + log[-3000:]
    result = json.loads((tmp_path / "probe" / "linear_probe.json").read_text())
    assert result["world_size"] == 2 and result["pretrain_step"] == 1 and "linear probe of" in log


@pytest.mark.slow  # the default suite keeps the other launch modes; 15-minute budget
def test_finetune_script_finetunes_a_run_on_two_ranks(slurm, tmp_path):
    """slurm/finetune.sh: a pretraining run fine-tuned end to end on 2 ranks (DDP), evaluated at the end."""
    from scale.train.trainer import Trainer
    from tests.helpers import FixedBatchLoader, tiny_config

    Trainer(tiny_config(tmp_path, "run", **{"schedule.max_steps": 1}), loader=FixedBatchLoader(4, 8)).fit()
    job, out = submit(slurm, tmp_path, "finetune.sh", "--pretrained", str(tmp_path / "run"), "--schedule.max_steps=3",
                      "--data.eval_source=demo:val", "--finetune.repeats=1")  # fmt: skip
    log = output(tmp_path, "finetune.sh", job)
    assert out.returncode == 0, out.stderr + log[-3000:]
    assert "ddp on cpu, 2 rank(s)" in log and "fine-tuned vit_small from" in log
    run = tmp_path / "runs" / "vit_b_finetune"
    assert [r["step"] for r in metrics(run) if "loss" in r] == [1, 2, 3]
    result = json.loads((run / "results.json").read_text())
    assert result["pretrained"] == str(tmp_path / "run") and 0 <= result["top1"] <= 100


def _probe_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "features_per_s"} for r in rows]  # all but the timing


@pytest.mark.slow
def test_preempted_probe_saves_requeues_and_resumes_with_the_uninterrupted_results(slurm, tmp_path):
    """slurm/linear_probe.sh on 2 ranks, `scancel --signal=USR2` mid-probe: every rank stops at one
    step after rank 0 saved the heads, optimizer and data position, rank 0 requeues the job, the
    rerun (same job id, SLURM_RESTART_COUNT=1) passes `--check` and resumes; its accuracies and every
    metrics row equal an uninterrupted probe's on 2 ranks."""
    from scale.train.trainer import Trainer
    from tests.helpers import FixedBatchLoader, random_images, tiny_config, write_image_folder

    Trainer(tiny_config(tmp_path, "run", **{"schedule.max_steps": 1}), loader=FixedBatchLoader(4, 8)).fit()
    data = write_image_folder(tmp_path / "data", random_images(256, 36), labels=[i % 4 for i in range(256)])
    # Augmented (a frozen forward per step): 8 steps of 2 x 16 per epoch, 24 epochs.
    args = [str(tmp_path / "run"), "--train", str(data), "--val", str(data), "--epochs", "24", "--batch-size", "32",
            "--crop-min", "0.5", "--eval-every", "4", "--workers", "0", "--no-progress", "--no-tensorboard",
            "--preempt-check-every", "1"]  # fmt: skip

    def sbatch(out):
        cmd = ["sbatch", "--parsable", *SBATCH_CPU, str(ROOT / "slurm" / "linear_probe.sh"), *args, "--out", str(out)]
        return slurm.run(*cmd, cwd=tmp_path, env=job_env(tmp_path), timeout=60).stdout.strip().split(";")[0]

    ref_job, job = sbatch(tmp_path / "ref"), sbatch(tmp_path / "probe")
    out = tmp_path / "probe"
    deadline = time.monotonic() + 240
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
        assert time.monotonic() < deadline, output(tmp_path, "linear_probe.sh", job)[-3000:]
        time.sleep(0.2)  # the first row (step 20) is logged
    assert slurm.run("scancel", "--signal=USR2", job).returncode == 0
    wait_gone(slurm, job)
    wait_gone(slurm, ref_job)
    log = output(tmp_path, "linear_probe.sh", job)
    assert "restart 0" in log and "restart 1" in log, log[-3000:]
    assert log.count("ok: linear probe of") == 2 and "(resuming the unfinished probe there)" in log  # --check
    assert "SIGUSR2 received" in log and f"requeueing job {job} (restart 1 of at most 50)" in log, log[-3000:]
    stopped = int(log.split("stopping the probe at step ")[1].split()[0])
    assert 20 <= stopped < 192 and f"step {stopped} (" in log.split("resuming the probe in")[1], log[-3000:]
    result, reference = (json.loads((tmp_path / d / "linear_probe.json").read_text()) for d in ("probe", "ref"))
    assert result["world_size"] == reference["world_size"] == 2
    assert result["lrs"] == reference["lrs"]
    assert _probe_rows(out) == _probe_rows(tmp_path / "ref")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "0"], "config error: --epochs 0 must be >= 1"),
        (["--lrs", "a"], "config error: --lrs 'a'"),
    ],  # fmt: skip
)
def test_a_bad_probe_command_fails_at_once_before_any_rank_starts(slurm, tmp_path, args, message):
    out = tmp_path / "probe"
    cmd = ["sbatch", "--parsable", "--wait", *SBATCH_CPU, str(ROOT / "slurm" / "linear_probe.sh"), str(tmp_path),
           "--train", "demo", "--val", "demo:val", "--out", str(out), *args]  # fmt: skip
    done = slurm.run(*cmd, cwd=tmp_path, env=job_env(tmp_path), timeout=300)
    log = output(tmp_path, "linear_probe.sh", done.stdout.strip().split(";")[0])
    assert done.returncode != 0 and message in log, log[-3000:]
    assert log.count(message) == 1 and not out.exists()  # once, by the check: no rank started; nothing written
