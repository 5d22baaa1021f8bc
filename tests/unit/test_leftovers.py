"""Every test ends what it starts (`tests/leftovers.py`): a failing test whose launcher left a
stopped worker in its own session (as a frozen torchrun rank is left) does not leave it behind."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

LEAKING_TEST = """
import os, signal, subprocess, sys

def test_a_launcher_leaves_a_stopped_worker_and_fails():
    # The launcher starts its worker in a session of its own and exits: the worker is orphaned.
    code = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], "
            "start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(p.pid)")
    pid = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout)
    os.kill(pid, signal.SIGSTOP)  # a frozen rank
    open(os.environ["LEAK_PID_FILE"], "w").write(str(pid))
    assert False, "this test fails; what it started must end anyway"
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_failing_test_leaves_no_stopped_orphan_behind(tmp_path):
    (tmp_path / "test_leak.py").write_text(textwrap.dedent(LEAKING_TEST))
    pid_file = tmp_path / "pid"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.leftovers",
                        "--rootdir", str(tmp_path), str(tmp_path / "test_leak.py")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "LEAK_PID_FILE": str(pid_file),
                                                    "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert r.returncode == 1 and "1 failed" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    pid = int(pid_file.read_text())
    try:
        assert not _alive(pid), f"the stopped worker {pid} was left behind"
        assert "processes left behind (killed)" in r.stdout and f"{pid} (stopped)" in r.stdout, r.stdout[-2000:]
    finally:
        if _alive(pid):
            os.kill(pid, 9)
