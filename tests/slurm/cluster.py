"""A real one-node SLURM cluster in a temporary folder (munged, slurmctld, slurmd on loopback ports),
for the tests of slurm/: the settings that were seen to work on this kind of machine
(shared/SLURM.md): credentials that expire in 5 s and a 1 s scheduler tick, so a requeued job
restarts in seconds; no cgroups; more CPUs than the machine has (config_overrides), so 2-rank jobs
fit. Nothing is written outside the folder; the daemons are stopped by their PIDs.

    python -m tests.slurm.cluster /tmp/slurm-dev     # start one by hand (prints SLURM_CONF); Ctrl-C or kill stops it
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "munged", "mungekey", "sbatch", "sinfo", "squeue", "scontrol", "scancel")


def missing_binaries() -> list[str]:
    found = {name: shutil.which(name) or next((p for p in (f"/usr/sbin/{name}",) if os.path.exists(p)), None)
             for name in DAEMONS}  # fmt: skip
    return [name for name, path in found.items() if path is None]


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _gone(pid: int) -> bool:
    """Whether `pid` has exited. A daemon that exits under a child subreaper (pytest here:
    tests/leftovers.py) is a zombie of it until reaped, and `kill(pid, 0)` still finds a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    if state != "Z":
        return False
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # ours to reap: a daemon, no Popen waits for it
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _real_memory_mb() -> int:
    out = subprocess.run([_binary("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    for field in out.split():
        if field.startswith("RealMemory="):
            return int(field.split("=")[1])
    return 1024


class LocalSlurm:
    """Start with `start()`, stop with `stop()`; `env` holds SLURM_CONF for client commands."""

    def __init__(self, root: Path, cpus: int = 8):
        self.root, self.cpus = Path(root), cpus
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_conf(self) -> None:
        d = self.root
        lines = [
            "ClusterName=scale-test",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny",
            "AuthType=auth/munge",
            f"AuthInfo=socket={d}/munge/munge.socket.2,cred_expire=5",
            "SlurmUser=root",
            f"StateSaveLocation={d}/state",
            f"SlurmdSpoolDir={d}/spool",
            f"SlurmctldPidFile={d}/slurmctld.pid",
            f"SlurmdPidFile={d}/slurmd.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log",
            f"SlurmdLogFile={d}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerParameters=sched_interval=1",
            "MinJobAge=4",
            "MailProg=/bin/true",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "JobRequeue=1",
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_real_memory_mb()} State=UNKNOWN",
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 30.0) -> LocalSlurm:
        d = self.root
        for sub in ("munge", "state", "spool", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)  # munged refuses a socket whose parent folders lack o+x
        os.chmod(d / "munge", 0o755)
        key = d / "munge" / "munge.key"
        subprocess.run([_binary("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        m = d / "munge"
        subprocess.run([_binary("munged"), f"--socket={m}/munge.socket.2", f"--key-file={key}",
                        f"--log-file={m}/munged.log", f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed"],
                       check=True, capture_output=True)  # fmt: skip
        self._write_conf()
        subprocess.run([_binary("slurmctld")], env=self.env, check=True, capture_output=True)
        subprocess.run([_binary("slurmd"), "-N", "localhost"], env=self.env, check=True, capture_output=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True).stdout
            if state.strip() == "idle":
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the local SLURM did not become idle in {timeout:.0f} s (logs in {d / 'log'})")

    def run(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        """A client command (sbatch, squeue, scancel, scontrol, sacct...) against this cluster."""
        env = {**self.env, **kwargs.pop("env", {})}
        return subprocess.run(list(args), env=env, capture_output=True, text=True, **kwargs)

    def stop(self) -> None:
        """Cancel every job, wait for the queue to empty, then stop the daemons by their PIDs."""
        if self.conf.is_file():
            self.run("scancel", "--full", "--user", os.environ.get("USER", "root"))
            # Cancelled jobs leave the queue within seconds; the daemons are stopped after in any case.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.run("squeue", "-h").stdout.strip():
                time.sleep(0.5)
        for pid_file in (self.root / "slurmd.pid", self.root / "slurmctld.pid", self.root / "munge" / "munged.pid"):
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                if _gone(pid):
                    break
                time.sleep(0.1)
            else:  # it did not stop in 10 s
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/slurm-dev")
    cluster = LocalSlurm(root).start()
    print(f"export SLURM_CONF={cluster.conf}", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill PID stops the cluster too
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
