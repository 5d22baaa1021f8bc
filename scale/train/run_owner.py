"""One job per run directory: `RUN/owner.json` names the job that holds it.

The main rank claims the directory before anything is written into it and gives it back when the run
ends. A second job naming the same directory (the same sbatch script submitted twice, the same
command in two terminals) is refused at once with one line naming the holder: host, process, SLURM
job, since when. The holder's own continuations take over: a requeued SLURM job (same job id), a
torchrun restart (same agent, or the same rendezvous id), the same process. A stale holder is
replaced with a log line: its process gone on this host (or its pid reused), its SLURM job no longer
known to `squeue`, or no heartbeat for `run.stale_owner_minutes`.

What it relies on, on shared filesystems (NFSv3+/v4, Lustre, GPFS): `link()` and `rename()` within
one directory are atomic and `link()` fails when the target exists (the classic NFS lock; a lost
reply is detected by the link count); the owner file's modification time is the heartbeat (touched
every `HEARTBEAT_FRACTION` of the stale time), so the nodes' clocks must agree to well within
`run.stale_owner_minutes` (NTP). Where hard links are unsupported, an exclusive create is used
(logged once).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scale.errors import RunDirInUseError

log = logging.getLogger(__name__)

OWNER_FILE = "owner.json"
HEARTBEAT_FRACTION = 0.1
"""The heartbeat is touched every this fraction of the stale time (1 min for the default 10 min)."""
SLURM_ALIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
               "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}  # fmt: skip


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (None: no such process, or no /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (a zombie has ended: only its parent has not reaped it)."""
    if Path("/proc").is_dir():
        fields = _proc_stat(pid)
        return fields is not None and fields[0] != "Z"
    try:  # no /proc (macOS): ask the kernel
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc; None elsewhere): tells a reused pid."""
    fields = _proc_stat(pid)
    return fields[19] if fields else None  # field 22 of stat


def identity() -> dict[str, Any]:
    """This process as an owner record."""
    env = os.environ
    elastic = "TORCHELASTIC_RESTART_COUNT" in env
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": _proc_start(os.getpid()),
        "slurm_job": env.get("SLURM_JOB_ID") or None,
        "slurm_restart": int(env.get("SLURM_RESTART_COUNT", "0") or 0),
        "torchrun_agent": os.getppid() if elastic else None,
        "torchrun_run_id": env.get("TORCHELASTIC_RUN_ID") if elastic else None,
        "torchrun_restart": int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) if elastic else None,
        "since": time.time(),
        "command": " ".join(sys.argv)[:300],
        "token": uuid.uuid4().hex,
    }


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def describe(holder: dict[str, Any]) -> str:
    """'host H, process P, SLURM job J, since T'."""
    parts = [f"host {holder.get('host', '?')}", f"process {holder.get('pid', '?')}"]
    if holder.get("slurm_job"):
        parts.append(f"SLURM job {holder['slurm_job']}")
    if isinstance(holder.get("since"), (int, float)):
        parts.append(f"since {_when(holder['since'])}")
    return ", ".join(parts)


def continuation(holder: dict[str, Any], me: dict[str, Any]) -> str | None:
    """Why `me` continues the holder's job (and takes the directory over), or None."""
    same_host = holder.get("host") == me["host"]
    if same_host and holder.get("pid") == me["pid"] and holder.get("pid_start") == me["pid_start"]:
        return "the same process"
    if holder.get("slurm_job") and holder["slurm_job"] == me["slurm_job"]:
        return f"the same SLURM job {me['slurm_job']}, requeued (restart {me['slurm_restart']})"
    if same_host and holder.get("torchrun_agent") and holder["torchrun_agent"] == me["torchrun_agent"]:
        return f"a restart by the same torchrun agent (process {me['torchrun_agent']})"
    run_id = holder.get("torchrun_run_id")
    if run_id and run_id != "none" and run_id == me["torchrun_run_id"]:
        return f"a restart of the same torchrun rendezvous {run_id}"
    return None


def _slurm_state(job: str) -> str | None:
    """The job's state from squeue; '' when squeue no longer knows it; None when it cannot tell."""
    squeue = shutil.which("squeue")
    if not squeue:
        return None
    try:
        r = subprocess.run([squeue, "-h", "-j", str(job), "-o", "%T"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return "" if "invalid job id" in r.stderr.lower() else None
    return r.stdout.strip().splitlines()[0] if r.stdout.strip() else ""


def staleness(holder: dict[str, Any], heartbeat_age: float, stale_after: float) -> str | None:
    """Why the holder is gone (its process, its SLURM job, its heartbeat), or None if it may be alive."""
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int):
        start = _proc_start(pid)
        if not _alive(pid):
            return f"its process {pid} on this host is gone"
        if start is not None and holder.get("pid_start") is not None and start != holder["pid_start"]:
            return f"its process {pid} on this host is gone (the pid now belongs to another process)"
        return None  # alive on this host: the heartbeat does not overrule a live process (it may be paused)
    if holder.get("slurm_job"):
        state = _slurm_state(holder["slurm_job"])
        if state == "" or (state and state.split()[0] not in SLURM_ALIVE):
            return f"its SLURM job {holder['slurm_job']} is no longer running ({state or 'unknown to squeue'})"
    if heartbeat_age > stale_after:
        return f"no heartbeat for {heartbeat_age / 60:.1f} min (more than {stale_after / 60:g} min)"
    return None


def _read(path: Path) -> tuple[dict[str, Any] | None, float]:
    """The owner record and the heartbeat's age in seconds; (None, age) for an unreadable record,
    (None, -1) when there is none."""
    try:
        age = time.time() - path.stat().st_mtime
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None, -1.0
    except (OSError, ValueError):
        return None, age
    return (record if isinstance(record, dict) else None), age


_no_links_logged = False


def _create(path: Path, record: dict[str, Any]) -> bool:
    """Create `path` holding `record` if it does not exist (atomically, whole); False if it exists."""
    global _no_links_logged
    tmp = path.with_name(f".{path.name}.{record['token']}")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        with contextlib.suppress(OSError):
            if tmp.stat().st_nlink == 2:  # NFS: the link was made but its reply was lost
                return True
        if not _no_links_logged:
            log.info("%s: no hard links here (%s); the run directory's owner file is created exclusively", path, e)
            _no_links_logged = True
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(tmp.read_text())
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _remove_if(path: Path, token: str | None) -> bool:
    """Remove `path` if it still holds `token` (None: an unreadable record). Renamed aside first, so
    two jobs replacing the same stale owner cannot both remove it, nor one remove the other's new
    record (that is put back)."""
    aside = path.with_name(f".{path.name}.replaced-{uuid.uuid4().hex}")
    try:
        path.rename(aside)
    except FileNotFoundError:
        return True  # gone already: try to create it
    try:
        record = json.loads(aside.read_text())
        found = record.get("token") if isinstance(record, dict) else None
    except (OSError, ValueError):
        found = None
    if found != token:  # another job's fresh record: put it back
        with contextlib.suppress(OSError):
            os.link(aside, path)
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


@dataclass
class RunDirOwner:
    """This job's hold on a run directory: a heartbeat thread, `release()` at the end."""

    path: Path
    record: dict[str, Any]
    interval: float
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RunDirOwner:
        self._thread = threading.Thread(target=self._beat, name="run-dir-owner", daemon=True)
        self._thread.start()
        return self

    def holds(self) -> bool:
        record, _ = _read(self.path)
        return record is not None and record.get("token") == self.record["token"]

    def _beat(self) -> None:
        warned = False
        while not self._stop.wait(self.interval):
            if self.holds():
                try:
                    os.utime(self.path)
                except OSError as e:
                    log.warning("could not touch the run directory's heartbeat %s: %s", self.path, e)
            elif not warned:
                record, age = _read(self.path)
                if age < 0:
                    return  # the directory or its owner file was removed under the run: nothing to guard
                holder = describe(record) if record else "an unreadable owner file"
                log.error("the run directory %s was taken over (%s holds it now): another job may be writing into "
                          "it; stop one of them", self.path.parent, holder)  # fmt: skip
                warned = True

    def release(self) -> None:
        """Give the directory back (idempotent); only while this job still holds it."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.holds():
            _remove_if(self.path, self.record["token"])


def claim_run_dir(run_dir: Path, stale_minutes: float) -> RunDirOwner:
    """Take `run_dir` for this job (main rank, before anything is written into it); raises
    RunDirInUseError naming the holder when another live job has it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path, me, stale_after = run_dir / OWNER_FILE, identity(), stale_minutes * 60
    for _ in range(10):
        if _create(path, me):
            return RunDirOwner(path, me, max(1.0, stale_after * HEARTBEAT_FRACTION)).start()
        holder, age = _read(path)
        if age < 0:
            continue  # released meanwhile
        if holder is None:
            # Unreadable: half-written by a job killed in `_create`'s fallback, or damaged.
            if age <= 30:
                time.sleep(1)
                continue
            reason, token = "its owner file is unreadable", None
        else:
            token = holder.get("token")
            reason = continuation(holder, me)
            if reason:
                log.info("run directory %s: taking it over from %s (%s)", run_dir, describe(holder), reason)
            else:
                reason = staleness(holder, age, stale_after)
                if reason is None:
                    raise RunDirInUseError(
                        f"run directory {run_dir} is in use by another job ({describe(holder)}; heartbeat "
                        f"{age:.0f} s ago); wait for it to end, stop it, or use another --run.name"
                    )
                log.warning("run directory %s: replacing its stale owner (%s): %s", run_dir, describe(holder), reason)
        _remove_if(path, token)
    raise RunDirInUseError(f"run directory {run_dir}: could not take its owner file {path} (other jobs keep "
                           "replacing it); use another --run.name")  # fmt: skip
