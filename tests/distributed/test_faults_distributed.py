"""Faults injected into real 2-rank runs launched as users launch them (torchrun, the DeepSpeed
launcher): a rank frozen with SIGSTOP, a rank killed with SIGKILL, a process killed inside a
sharded checkpoint write (FSDP2/DCP and DeepSpeed formats), a disk error on one rank only."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.distributed.test_sharded_runs import TINY
from tests.helpers import read_metrics

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]


def torchrun(port: int, *args: str, restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
            "--max-restarts", str(restarts), "-m", "tests.faults.inject", *TINY, *args]  # fmt: skip


def run(cmd, fault: str | None = None, until: str | None = None, timeout: float = 300):
    """Run `cmd` in its own session; returns (returncode, stderr, seconds). With `until`, the whole
    session is killed as soon as that text appears on stderr (a frozen rank never exits)."""
    env = {k: v for k, v in os.environ.items() if k != "SCALE_TEST_FAULT"}
    env.update(OMP_NUM_THREADS="1", **({"SCALE_TEST_FAULT": fault} if fault else {}))
    start = time.monotonic()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)  # fmt: skip
    timer = threading.Timer(timeout, lambda: os.killpg(p.pid, signal.SIGKILL))
    timer.start()
    lines = []
    try:
        for line in p.stderr:
            lines.append(line)
            if until and until in line:
                break
    finally:
        timer.cancel()
        try:
            os.killpg(p.pid, signal.SIGCONT)
            if until:
                os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        rest = p.stderr.read() if not until else ""
        p.wait()
        # A rank this run froze (SIGSTOP) lives in torchrun's worker session, out of the group killed
        # above: without this it would stay stopped, holding its memory, until the machine stops.
        for pid in re.findall(r"\[inject\] stop at .* \(pid (\d+)\)", "".join(lines) + rest):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    return p.returncode, "".join(lines) + rest, time.monotonic() - start


def test_a_frozen_rank_makes_the_others_stop_within_the_timeout_naming_it(tmp_path):
    timeout_s = 12
    cmd = torchrun(29571, f"--run.output_dir={tmp_path}", f"--parallel.timeout_minutes={timeout_s / 60}",
                   "--schedule.max_steps=8")  # fmt: skip
    rc, err, seconds = run(cmd, fault="stop:step:3:1", until="stopped responding", timeout=240)
    line = next((x for x in err.splitlines() if "stopped responding" in x), "")
    assert re.search(r"rank\(s\) 1 \(heartbeat last at step [0-3]\) stopped responding", line), err[-3000:]
    assert line.startswith("error: rank 0: a collective failed at step 3"), line
    inject = next(x for x in err.splitlines() if x.startswith("[inject]"))
    assert inject  # the stop happened, and the error came within the timeout plus the diagnosis


@pytest.mark.slow
def test_a_killed_rank_is_restarted_once_by_torchrun_and_every_loss_equals_an_uninterrupted_run(tmp_path):
    args = ["--schedule.max_steps=8", "--run.ckpt_every=2"]
    rc, err, _ = run(torchrun(29572, f"--run.output_dir={tmp_path / 'ref'}", *args))
    assert rc == 0, err[-3000:]
    rc, err, _ = run(torchrun(29573, f"--run.output_dir={tmp_path / 'run'}", *args, restarts=1), fault="kill:step:5:1")
    assert rc == 0, err[-4000:]  # one restart was enough
    assert "[inject] kill at step of step 5 on rank 1" in err and "resumed from" in err
    expected = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "ref" / "cpu_demo")}
    got = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "run" / "cpu_demo")}
    assert got == expected  # steps 5..8 recomputed after the restart from step 4, bitwise


def deepspeed_launcher(port: int, *args: str) -> list[str]:
    launcher = Path(sys.executable).parent / "deepspeed"
    return [str(launcher), "--num_gpus", "2", "--master_port", str(port), str(ROOT / "tests" / "faults" / "inject.py"),
            *TINY, *args]  # fmt: skip


SHARDED = {
    "fsdp": ["--parallel.backend=fsdp"],
    "zero2": ["--deepspeed", str(ROOT / "ds_configs" / "zero2.json")],
}
STEPS = ["--schedule.max_steps=6", "--run.ckpt_every=2"]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Uninterrupted runs of each sharded format: {format: {step: loss}}."""
    out = {}
    for i, (fmt, args) in enumerate(SHARDED.items()):
        tmp = tmp_path_factory.mktemp(f"ref-{fmt}")
        rc, err, _ = run(torchrun(29580 + i, f"--run.output_dir={tmp}", "--run.name=r", *args, *STEPS))
        assert rc == 0, err[-3000:]
        out[fmt] = {r["step"]: r["loss"] for r in read_metrics(tmp / "r")}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("fmt, point, rank", [("fsdp", "after-model", 1), ("fsdp", "before-rename", 0),
                                              ("zero2", "before-client", 1)])  # fmt: skip
def test_a_rank_killed_inside_a_sharded_checkpoint_write_restarts_from_the_previous_one(
    tmp_path, references, fmt, point, rank
):
    cmd = torchrun(29590, f"--run.output_dir={tmp_path}", "--run.name=r", *SHARDED[fmt], *STEPS, restarts=1)
    rc, err, _ = run(cmd, fault=f"kill:{point}:4:{rank}")
    assert rc == 0, err[-4000:]
    assert f"[inject] kill at {point} of step 4 on rank {rank}" in err
    assert "left by an interrupted checkpoint write" in err and "resumed from" in err and "step-00000002" in err
    ckpts = tmp_path / "r" / "checkpoints"
    assert not [p.name for p in ckpts.iterdir() if not p.name.startswith("step-")]
    got = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "r")}
    assert got == references[fmt]  # the restart resumed from step 2: every later loss equal, bitwise


@pytest.mark.slow
def test_under_the_deepspeed_launcher_a_killed_rank_ends_the_job_and_the_same_command_resumes(tmp_path, references):
    """The DeepSpeed launcher restarts nothing (deepspeed/launcher/launch.py: a failed rank makes it
    kill the others and exit); running the same command again resumes from the newest complete
    checkpoint (here: rank 0 killed before renaming step 4's)."""
    cmd = deepspeed_launcher(29595, f"--run.output_dir={tmp_path}", "--run.name=r", *SHARDED["zero2"], *STEPS)
    rc, err, _ = run(cmd, fault="kill:before-rename:4:0")
    assert rc != 0 and "[inject] kill at before-rename of step 4 on rank 0" in err
    assert (tmp_path / "r" / "checkpoints" / ".step-00000004.tmp").is_dir()  # never picked
    rc, err, _ = run(cmd)
    assert rc == 0, err[-4000:]
    assert "resumed from" in err and "step-00000002" in err
    got = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "r")}
    assert got == references["zero2"]


@pytest.mark.slow
def test_a_disk_error_on_one_rank_inside_deepspeeds_write_is_agreed_by_every_rank(tmp_path):
    """Rank 1's DeepSpeed file write fails (ENOSPC) while rank 0's succeeds: both ranks learn it,
    the partial write is removed, training goes on (run.ckpt_failure=retry), the next is written."""
    cmd = torchrun(29596, f"--run.output_dir={tmp_path}", "--run.name=r", *SHARDED["zero2"], *STEPS)
    rc, err, _ = run(cmd, fault="enospc-torch-save:engine:4:1", timeout=300)
    assert rc == 0, err[-4000:]
    assert "the checkpoint of step 4 could not be written" in err and "training goes on" in err
    names = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert names == ["step-00000002", "step-00000006"]
