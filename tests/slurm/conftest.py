import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.slurm.cluster import LocalSlurm, missing_binaries


@pytest.fixture(scope="session")
def slurm():
    """A real one-node SLURM cluster for the session (started in ~2 s, stopped by PID after)."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurmctld slurmd "
                    "slurm-client munge (.ci/run does)")  # fmt: skip
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster runs its daemons as root")
    # Not under pytest's tmp folders: munged refuses a socket below a folder without o+x (0700).
    root = Path(tempfile.mkdtemp(prefix="scale-slurm-", dir="/tmp"))
    cluster = LocalSlurm(root)
    try:  # a start that fails half-way stops the daemons it started too
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
