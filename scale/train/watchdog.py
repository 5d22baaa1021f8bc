"""Which rank stopped responding: heartbeats in the process group's store, read when a collective
fails.

Every rank's background thread bumps a counter `scale/heartbeat/RANK` = "COUNT STEP" in the
default store every `interval` seconds (a tenth of the collective timeout, between 0.5 and 30 s).
A frozen process (SIGSTOP, a hung NFS read in the kernel, a GPU stuck so hard that the host
thread cannot run) stops its counter; a process that is alive but stuck in Python or on the
device keeps counting, its step falls behind.

When a collective fails on a rank (the gloo timeout raises after `parallel.timeout_minutes`),
`diagnose` reads every counter twice, two intervals apart, and names the ranks whose counter did
not move (stalled) or whose step is behind the others'. Rank 0's thread also warns as soon as a
rank's counter has been still for half the timeout, so under NCCL, whose watchdog aborts the
process on a timeout, the log has named the rank before the end. Rank 0 reads all counters in
one request per interval; the others only write theirs.
"""

from __future__ import annotations

import logging
import threading
import time

import torch.distributed as dist

log = logging.getLogger(__name__)

PREFIX = "scale/heartbeat/"


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - a private API: without it, no heartbeats
        return None


class Heartbeat:
    """This rank's heartbeat thread (`start`/`stop`), and the diagnosis of a failed collective."""

    def __init__(self, rank: int, world_size: int, timeout_s: float):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.interval = min(30.0, max(0.5, timeout_s / 10))
        self.step = 0
        self._count = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store = _store() if world_size > 1 else None
        self._still: dict[int, tuple[str, float]] = {}  # rank 0: last value seen and since when
        self._warned: set[int] = set()

    def start(self) -> None:
        if self._store is None:
            if self.world_size > 1:
                log.warning("no process-group store: a stalled rank will not be named on a timeout")
            return
        self._beat()
        self._thread = threading.Thread(target=self._run, name="scale-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval)

    def _beat(self) -> None:
        self._count += 1
        self._store.set(f"{PREFIX}{self.rank}", f"{self._count} {self.step}")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
                if self.rank == 0:
                    self._watch()
            except Exception:  # noqa: BLE001 - the store is gone (the job is ending)
                return

    def read(self) -> dict[int, tuple[int, int]]:
        """(count, step) of every rank that has written a heartbeat."""
        keys = [f"{PREFIX}{r}" for r in range(self.world_size)]
        # One request when every rank has written (the usual case), else one check per key.
        present = keys if self._store.check(keys) else [k for k in keys if self._store.check([k])]
        values = self._store.multi_get(present) if present else []
        out = {}
        for key, value in zip(present, values, strict=True):
            count, step = value.decode().split()
            out[int(key.rsplit("/", 1)[1])] = (int(count), int(step))
        return out

    def _watch(self) -> None:
        now = time.monotonic()
        for rank, (count, step) in self.read().items():
            seen, since = self._still.get(rank, (None, now))
            if seen != count:
                self._still[rank] = (count, now)
                self._warned.discard(rank)
            elif now - since > self.timeout_s / 2 and rank not in self._warned:
                self._warned.add(rank)
                log.error("rank %d has not responded for %.0f s (its last step: %d); the collective timeout is %.0f s",
                          rank, now - since, step, self.timeout_s)  # fmt: skip

    def diagnose(self, error: BaseException) -> str:
        """A sentence naming the ranks that stopped responding or fell behind, for `error` (a failed
        collective on this rank)."""
        head = f"rank {self.rank}: a collective failed at step {self.step} ({' '.join(str(error).split())[:200]})"
        if self._store is None:
            return f"{head}; no heartbeats to tell which rank stopped"
        try:
            first = self.read()
            time.sleep(2.5 * self.interval)
            second = self.read()
        except Exception as e:  # noqa: BLE001 - the store's host (rank 0 under srun) may be the stalled one
            return f"{head}; the heartbeat store does not answer ({e}): rank 0, which may host it, is likely stalled"
        stalled = sorted(r for r in range(self.world_size) if r != self.rank and first.get(r) == second.get(r))
        missing = [r for r in stalled if r not in second]
        if stalled:
            named = ", ".join(f"{r} (never started)" if r in missing else f"{r} (heartbeat last at step {second[r][1]})"
                              for r in stalled[:16])  # fmt: skip
            more = f" and {len(stalled) - 16} more" if len(stalled) > 16 else ""
            return (f"{head}; rank(s) {named}{more} stopped responding (no heartbeat for "
                    f"{2.5 * self.interval:.0f} s): check those processes and their hosts")  # fmt: skip
        steps = {r: s for r, (_, s) in second.items()}
        behind = sorted(r for r, s in steps.items() if s < max(steps.values()))
        if behind:
            return f"{head}; every rank is alive, rank(s) {behind[:16]} behind at step {min(steps.values())}"
        return f"{head}; every rank is alive and at the same step: a network or library failure"


def is_collective_failure(e: BaseException) -> bool:
    """Whether `e` comes from a collective or the process group (a timeout, a peer gone)."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return any(k in text for k in ("gloo", "Gloo", "NCCL", "Timed out", "timed out", "Connection reset",
                                   "Connection closed", "Broken pipe", "connectFullMesh"))  # fmt: skip
