"""Preemption: a signal asks the run to stop; every rank stops at the same step boundary after a
complete checkpoint, and under SLURM the job requeues itself and resumes from it.

Why each piece is as it is:
- The signal handler only sets a flag (it runs between two bytecodes of whatever the process was
  doing: a checkpoint there could interleave with one being written, or deadlock on a lock).
- The ranks agree at step boundaries: every `run.preempt_check_every` steps one all-reduce (MAX)
  of the flags. Any rank's signal stops all of them at the same step, so none is left alone in a
  collective. It is a host read, hence not every step.
- A signal that arrives while a checkpoint is being written changes nothing in it: the checkpoint
  completes (written under a temporary name, renamed when whole), and the stop follows at the next
  check with a checkpoint of its own (or none, when the last one is of this very step).
- The default signal is SIGUSR2: NCCL reserves SIGUSR1 for itself (submitit moved to USR2 for this
  reason). `#SBATCH --signal=USR2@600` delivers it 10 minutes before the time limit (SLURM does not
  requeue a job that reaches its limit: it ends as TIMEOUT), `scancel --signal=USR2 JOB` on demand,
  and SLURM's preemption with `PreemptMode=REQUEUE` and `preempt_send_user_signal` on preemption.
- `scontrol requeue` ends the job at once: rank 0 calls it only after every rank has finished the
  checkpoint. The rerun keeps the job id and counts SLURM_RESTART_COUNT; past `run.max_requeues`
  the job is not requeued again (a guard against a loop of failing reruns).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time

from scale.config import signal_number

log = logging.getLogger(__name__)


class Preempted(Exception):
    """Training stopped on the preemption signal after a complete checkpoint."""

    def __init__(self, step: int, requeued: bool, message: str):
        super().__init__(message)
        self.step, self.requeued = step, requeued


def restart_count() -> int:
    """How many times SLURM has requeued this job (SLURM_RESTART_COUNT; unset on the first run)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


class PreemptionWatch:
    """Installs the handler; `due(step)` is true on every rank at the first check after a signal."""

    def __init__(self, signal_name: str, check_every: int, any_rank=None):
        self.signum = signal_number(signal_name)
        self.check_every = max(1, check_every)
        self.any_rank = any_rank or (lambda flag: flag)
        self.received: float | None = None  # time of the first signal
        self._previous = None
        if self.signum is not None:
            try:
                self._previous = signal.signal(self.signum, self._handler)
            except ValueError:  # only the main thread may install handlers
                log.warning("%s not handled (trainer built outside the main thread): no preemption stop", self.name)
                self.signum = None

    def _handler(self, signum, frame) -> None:
        if self.received is None:
            self.received = time.time()

    def due(self, step: int) -> bool:
        """Collective on the check steps: call it on every rank at the same steps."""
        if self.signum is None or step % self.check_every:
            return False
        return self.any_rank(self.received is not None)

    def close(self) -> None:
        if self.signum is not None and self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "none"


_watches: dict[int | None, PreemptionWatch] = {}


def watch_signal(signal_name: str, check_every: int) -> PreemptionWatch:
    """The process's watch of `signal_name`, installed on first use and kept (so a signal received
    while the run starts up, before the trainer exists, is not lost: call this as early as the
    config is known). Later calls update the check interval and keep what was received."""
    signum = signal_number(signal_name)
    watch = _watches.get(signum)
    if watch is None:
        watch = _watches[signum] = PreemptionWatch(signal_name, check_every)
    watch.check_every = max(1, check_every)
    return watch


def requeue_slurm_job(max_requeues: int, flag: str = "--run.max_requeues") -> tuple[bool, str]:
    """`scontrol requeue $SLURM_JOB_ID` (rank 0, after the checkpoint). Returns (done, why)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False, "not a SLURM job: run the same command again to resume"
    count = restart_count()
    if count >= max_requeues:
        return False, (f"job {job} has been requeued {count} times ({flag}={max_requeues}): not requeued "
                       "again; resubmit it to resume")  # fmt: skip
    # Said before: the requeue ends this job at once, maybe before anything after it is printed.
    log.warning("requeueing job %s (restart %d of at most %d); it resumes from the checkpoint", job, count + 1,
                max_requeues)  # fmt: skip
    try:
        out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"scontrol requeue {job} failed ({e}); resubmit the job to resume"
    if out.returncode != 0:
        return False, f"scontrol requeue {job} failed: {out.stderr.strip() or out.stdout.strip()}; resubmit to resume"
    return True, f"job {job} requeued (restart {count + 1}); it resumes from this checkpoint"
