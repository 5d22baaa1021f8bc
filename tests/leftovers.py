"""Every test ends what it starts (a pytest plugin, loaded by tests/conftest.py).

A test that launches real jobs (torchrun, the DeepSpeed launcher, SLURM) can leave processes behind
when it fails or when a rank was stopped on purpose: torchrun's workers run in their own session,
so killing the launcher orphans them, and a SIGSTOPped rank stays stopped, holding its memory, until
the machine stops (750 MB after one run of the suite). Here:

- the pytest process is a child subreaper (Linux), so orphaned descendants are re-parented to it
  instead of to init, and can still be found;
- after each test's call (passed or failed), the descendants it started that are still alive after a
  grace period are killed (SIGKILL; stopped ones included) and named in the summary; after the
  session (fixture teardowns included: the SLURM daemons), every one left is.

Processes of this interpreter's own multiprocessing (DataLoader workers, the resource tracker,
`mp.spawn` ranks) are left to Python unless they are stopped: they end with their owners.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
import warnings
from pathlib import Path

import pytest

PR_SET_CHILD_SUBREAPER = 36
GRACE_S = 10.0
_found: list[str] = []
_waited: dict[str, float] = {}


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state) of `pid`, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[1]), fields[0]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def descendants(root: int | None = None) -> dict[int, str]:
    """{pid: state} of every live (non-zombie) descendant of `root` (default: this process)."""
    root = os.getpid() if root is None else root
    parents: dict[int, list[int]] = {}
    states: dict[int, str] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                parents.setdefault(st[0], []).append(int(name))
                states[int(name)] = st[1]
    out, todo = {}, list(parents.get(root, []))
    while todo:
        pid = todo.pop()
        out[pid] = states.get(pid, "?")
        todo += parents.get(pid, [])
    return {pid: s for pid, s in out.items() if s != "Z"}


def _ours(pid: int, own: str) -> bool:
    """A process of this interpreter's multiprocessing (a fork of pytest, or a spawned helper)."""
    cmd = _cmdline(pid)
    return cmd == own or "multiprocessing" in cmd or "compile_worker" in cmd  # torch.compile's worker pool


def end_leftovers(before: set[int], grace: float = GRACE_S) -> list[str]:
    """Kill the descendants not in `before` still alive after `grace` seconds (multiprocessing's own
    unless stopped); returns 'pid state command' of each one killed."""
    own = _cmdline(os.getpid())
    deadline = time.monotonic() + grace
    while True:
        new = {p: s for p, s in descendants().items() if p not in before}
        left = {p: s for p, s in new.items() if s == "T" or not _ours(p, own)}
        if not left or time.monotonic() >= deadline:
            break
        if all(s == "T" for s in left.values()):
            break  # stopped: they will not end by themselves
        time.sleep(0.2)
    killed = []
    for pid, state in left.items():
        killed.append(f"{pid} ({'stopped' if state == 'T' else state}) {_cmdline(pid)[:160]}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGCONT)
    reap_orphans()
    return killed


def _waited_for() -> set[int]:
    """Children some object of this process will wait for: live Popen and multiprocessing objects."""
    import gc
    import multiprocessing.process
    import subprocess

    pids = set()
    with warnings.catch_warnings():  # isinstance on deprecated module attributes warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, subprocess.Popen) and obj.returncode is None:
                pids.add(obj.pid)
            elif isinstance(obj, multiprocessing.process.BaseProcess) and getattr(obj, "_popen", None) is not None:
                pids.add(obj._popen.pid)
    return pids


def reap_orphans() -> None:
    """Reap the zombies re-parented to this process (orphans: no object here waits for them). Left
    unreaped they look alive to `kill(pid, 0)`; a child a Popen object will wait for is left to it."""
    me = os.getpid()
    zombies = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None and st[0] == me and st[1] == "Z":
                zombies.append(int(name))
    if not zombies:
        return
    known = _waited_for()
    for pid in zombies:
        if pid not in known:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)


def pytest_configure(config):
    with contextlib.suppress(Exception):  # Linux only; elsewhere orphans go to init as before
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    before = set(descendants())
    yield
    start = time.monotonic()
    killed = end_leftovers(before)
    _waited[item.nodeid] = time.monotonic() - start
    _found.extend(f"{item.nodeid}: {k}" for k in killed)


def pytest_sessionfinish(session):
    killed = end_leftovers(set(), grace=2.0)
    _found.extend(f"after the session: {k}" for k in killed)


def pytest_terminal_summary(terminalreporter):
    slow = sorted(((t, n) for n, t in _waited.items() if t > 1.0), reverse=True)
    if slow:
        terminalreporter.section("waited for processes to end after the test")
        terminalreporter.write_line(f"{sum(_waited.values()):.1f} s in all; the longest:")
        for t, n in slow[:10]:
            terminalreporter.write_line(f"{t:5.1f} s {n}")
    if _found:
        terminalreporter.section("processes left behind (killed)")
        for line in _found:
            terminalreporter.write_line(line)
