"""The preemption stop without SLURM: the signal only sets a flag, the stop comes at a step boundary
after a complete checkpoint, and resuming from it gives the uninterrupted run's losses."""

import os
import signal

import pytest

from scale.train.preemption import Preempted, requeue_slurm_job, watch_signal
from tests.helpers import read_metrics
from tests.unit.test_trainer import make


def test_a_signal_during_a_checkpoint_write_leaves_it_complete_and_stops_after_it(tmp_path, monkeypatch):
    full = make(tmp_path, "full")
    full.fit()
    expected = [r["loss"] for r in read_metrics(full.run_dir)]

    first = make(tmp_path, "split", **{"run.ckpt_every": 3, "run.preempt_check_every": 1})
    backend_save = first.backend.save

    def save_then_signal(directory):  # the signal lands while the checkpoint is being written
        backend_save(directory)
        os.kill(os.getpid(), signal.SIGUSR2)

    monkeypatch.setattr(first.backend, "save", save_then_signal)
    with pytest.raises(Preempted) as stop:
        first.fit()
    assert stop.value.step == 3 and not stop.value.requeued  # not a SLURM job
    assert "run the same command again" in str(stop.value) or "SLURM" in str(stop.value)
    names = sorted(p.name for p in (first.run_dir / "checkpoints").iterdir())
    assert names == ["step-00000003"]  # the one being written when the signal came; no second one
    monkeypatch.undo()

    second = make(tmp_path, "split", **{"run.ckpt_every": 3, "run.preempt_check_every": 1})
    second.fit()
    assert [r["loss"] for r in read_metrics(second.run_dir)] == expected  # bitwise


def test_the_ranks_check_on_the_same_steps_only(tmp_path):
    watch = watch_signal("USR2", 4)
    watch.received = None
    os.kill(os.getpid(), signal.SIGUSR2)
    assert watch.received is not None
    assert [watch.due(s) for s in (1, 2, 3, 4, 8)] == [False, False, False, True, True]
    watch.received = None
    assert not watch.due(8)
    assert not watch_signal("none", 1).due(1)


def test_requeue_needs_a_slurm_job_and_stops_at_the_cap(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    done, why = requeue_slurm_job(50)
    assert not done and "not a SLURM job" in why
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "50")
    done, why = requeue_slurm_job(50)
    assert not done and "requeued 50 times" in why and "resubmit" in why
