"""One job per run directory (`scale.train.run_owner`): a second job is refused naming the holder, a
requeued SLURM job and a torchrun restart take over, a stale holder is replaced. Real processes for
the jobs; the rules themselves in-process."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scale.errors import RunDirInUseError
from scale.train.run_owner import OWNER_FILE, claim_run_dir, continuation, identity

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--data.source=synthetic", "--model.img_size=32", "--model.patch_size=8", "--model.embed_dim=32",
    "--model.depth=2", "--model.num_heads=4", "--model.dim=16", "--model.mlp_dim=64",
    "--batch.global_batch_size=8", "--run.log_every=1", "--run.progress=false", "--run.tensorboard=false",
    "--run.name=shared", "--parallel.backend=single", "--monitor.knn_every=0",
]  # fmt: skip


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    return {**env, "OMP_NUM_THREADS": "1", "SCALE_CACHE": str(tmp_path / "cache"), **extra}


def _job(tmp_path, *extra, env=None):
    return [sys.executable, "-m", "scale.pretrain", *TINY, f"--run.output_dir={tmp_path}", *extra]


def _run(tmp_path, *extra, env=None):
    return subprocess.run(_job(tmp_path, *extra), cwd=ROOT, env=env or _env(tmp_path), capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and " INFO " not in line]


def _plant(run_dir: Path, age_s: float = 0.0, **fields) -> dict:
    """An owner record of a job elsewhere, its heartbeat `age_s` old."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"host": "node-17", "pid": 4242, "pid_start": "1", "slurm_job": None, "slurm_restart": 0,
              "torchrun_agent": None, "torchrun_run_id": None, "torchrun_restart": None,
              "since": time.time() - 3600, "command": "scale.pretrain", "token": "planted", **fields}  # fmt: skip
    path = run_dir / OWNER_FILE
    path.write_text(json.dumps(record))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return record


def test_a_second_job_is_refused_naming_the_holder_and_a_killed_holder_is_replaced(tmp_path):
    run_dir = tmp_path / "shared"
    first = subprocess.Popen(_job(tmp_path, "--schedule.max_steps=100000"), cwd=ROOT, env=_env(tmp_path),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 120
        while not ((run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").stat().st_size):
            assert first.poll() is None, "the first job ended early"
            assert time.time() < deadline, "the first job did not start training"
            time.sleep(0.2)
        second = _run(tmp_path, "--schedule.max_steps=2")
        lines = _error_lines(second.stderr)
        assert second.returncode == 1 and len(lines) == 1, second.stderr[-2000:]
        assert "in use by another job" in lines[0] and f"process {first.pid}" in lines[0], lines[0]
        assert f"host {socket.gethostname()}" in lines[0] and "since" in lines[0]
        assert first.poll() is None, "the refused job disturbed the running one"
        assert json.loads((run_dir / OWNER_FILE).read_text())["pid"] == first.pid
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The holder is gone (killed: its owner file is left): the next job replaces it and runs.
    assert json.loads((run_dir / OWNER_FILE).read_text())["pid"] == first.pid
    third = _run(tmp_path, "--schedule.max_steps=2", "--run.resume=none")
    assert third.returncode == 0, third.stderr[-3000:]
    assert "replacing its stale owner" in third.stderr and f"process {first.pid} on this host is gone" in third.stderr
    assert not (run_dir / OWNER_FILE).exists(), "the directory is given back at the end"


@pytest.mark.slow
def test_a_requeued_slurm_job_takes_over_and_another_job_is_refused(tmp_path):
    run_dir = tmp_path / "shared"
    squeue = tmp_path / "bin" / "squeue"  # SLURM vouches for job 777: it is running
    squeue.parent.mkdir()
    squeue.write_text("#!/bin/sh\necho RUNNING\n")
    squeue.chmod(0o755)
    path = f"{squeue.parent}:{os.environ['PATH']}"
    _plant(run_dir, slurm_job="777")
    other = _run(tmp_path, "--schedule.max_steps=1", env=_env(tmp_path, SLURM_JOB_ID="778", PATH=path))
    lines = _error_lines(other.stderr)
    assert other.returncode == 1 and len(lines) == 1, other.stderr[-2000:]
    assert "host node-17, process 4242, SLURM job 777, since" in lines[0], lines[0]
    requeued = _run(tmp_path, "--schedule.max_steps=1",
                    env=_env(tmp_path, SLURM_JOB_ID="777", SLURM_RESTART_COUNT="1", PATH=path))  # fmt: skip
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert "taking it over from host node-17" in requeued.stderr and "same SLURM job 777" in requeued.stderr
    assert not (run_dir / OWNER_FILE).exists()


def test_a_holder_whose_slurm_job_ended_or_whose_heartbeat_stopped_is_replaced(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    squeue = bin_dir / "squeue"
    squeue.write_text("#!/bin/sh\necho 'slurm_load_jobs error: Invalid job id specified' >&2\nexit 1\n")
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    _plant(tmp_path / "a", slurm_job="777")
    claim_run_dir(tmp_path / "a", stale_minutes=10).release()  # SLURM no longer knows job 777
    _plant(tmp_path / "b", age_s=11 * 60)
    claim_run_dir(tmp_path / "b", stale_minutes=10).release()  # no heartbeat for 11 min
    _plant(tmp_path / "c", age_s=9 * 60)
    with pytest.raises(RunDirInUseError, match="heartbeat 540 s ago"):
        claim_run_dir(tmp_path / "c", stale_minutes=10)
    assert json.loads((tmp_path / "c" / OWNER_FILE).read_text())["token"] == "planted"


def test_a_live_process_on_this_host_is_never_replaced_and_a_reused_pid_is(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _plant(tmp_path / "a", age_s=3600, host=socket.gethostname(), pid=sleeper.pid,
               pid_start=Path(f"/proc/{sleeper.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])  # fmt: skip
        with pytest.raises(RunDirInUseError, match=f"process {sleeper.pid}"):
            claim_run_dir(tmp_path / "a", stale_minutes=10)  # alive, although its heartbeat is an hour old
        _plant(tmp_path / "b", host=socket.gethostname(), pid=sleeper.pid, pid_start="0")
        claim_run_dir(tmp_path / "b", stale_minutes=10).release()  # the pid belongs to another process now
    finally:
        sleeper.kill()
        sleeper.wait()


def test_continuations_take_over(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    me = identity()
    holder = {**me, "pid": me["pid"] + 1, "pid_start": "x", "token": "t"}
    assert "same torchrun agent" in continuation(holder, me)
    assert continuation({**holder, "torchrun_agent": 1}, me) is None  # another agent, rendezvous id 'none'
    assert "rendezvous abc" in continuation({**holder, "torchrun_agent": 1, "host": "n2", "torchrun_run_id": "abc"},
                                            {**me, "torchrun_run_id": "abc"})  # fmt: skip
    assert continuation({**me, "token": "t"}, me) == "the same process"


def test_an_unreadable_owner_file_is_replaced_once_old(tmp_path):
    (tmp_path / "r").mkdir()
    path = tmp_path / "r" / OWNER_FILE
    path.write_text('{"host": "n')  # torn
    os.utime(path, (time.time() - 120, time.time() - 120))
    owner = claim_run_dir(tmp_path / "r", stale_minutes=10)
    assert owner.holds()
    owner.release()
    assert not path.exists()
