"""Checkpoint directories: written atomically, the newest complete one found for `--resume auto`,
the last K kept.

Layout: RUN/checkpoints/step-00001234/ holding the backend's files (`model.pt` for replicated
backends; sharded backends write their own), `client.pt` (step, epoch, data position, counters,
the resolved config), `rng-rank{r}.pt` per rank and `manifest.json` (every file with its size). A
checkpoint is written into `.step-00001234.tmp/`, flushed to the disk and renamed when every rank
has finished, so a directory named `step-*` is complete; the manifest also catches one damaged
afterwards (a truncated or deleted file), which is then set aside, and the one before resumed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException

from scale.errors import CheckpointWriteError, is_write_failure
from scale.safe_load import load_safely
from scale.train.faults import fault_point

MANIFEST = "manifest.json"

log = logging.getLogger(__name__)


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints with a client state, oldest first (`verify_checkpoint` checks the rest)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / "client.pt").is_file())


def find_resume(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: 'auto' (the newest that verifies, or None), 'none', or a path
    (which must verify)."""
    if resume == "none":
        return None
    if resume == "auto":
        for path in reversed(list_checkpoints(run_dir)):
            why = verify_checkpoint(path)
            if why is None:
                return path
            log.warning("checkpoint %s is incomplete (%s); trying the one before", path, why)
        return None
    path = Path(resume)
    why = verify_checkpoint(path)
    if why:
        raise FileNotFoundError(f"--run.resume={resume!r} is not a complete checkpoint directory ({why})")
    return path


def rng_state() -> dict[str, Any]:
    """This process's random generators. On CUDA only the current device's: a resume may see another
    device layout (eight GPUs visible before, one per process now), and each rank uses one device."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, list | tuple):  # checkpoints before: every visible device's state
        index = torch.cuda.current_device()
        if index >= len(cuda):
            log.warning("the checkpoint has no CUDA RNG state for device %d; CUDA RNG not restored", index)
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda)


def _agree_written(backend, error: BaseException | None, tmp: Path, step: int) -> None:
    """Every rank learns whether any rank failed to write its part; if one did, every rank raises
    CheckpointWriteError (naming the first failure it saw) and rank 0 removes the partial write."""
    failed = backend.any_rank(error is not None)
    if not failed:
        return
    if backend.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    if error is None:
        why = "another rank failed to write its part"
    else:
        free = shutil.disk_usage(tmp.parent).free if tmp.parent.exists() else -1
        why = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}; {free / 2**20:.1f} MiB free there"
    raise CheckpointWriteError(f"the checkpoint of step {step} could not be written ({why}); removed {tmp.name}")


def write_manifest(directory: Path) -> None:
    """Record every file of a checkpoint with its size (`verify_checkpoint` checks them on resume)."""
    files = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=0))
    _fsync(tmp)
    tmp.rename(directory / MANIFEST)


def verify_checkpoint(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint (a file missing or of another size than written), or
    None. Checkpoints written before manifests existed pass when client.pt is there."""
    if not (path / "client.pt").is_file():
        return "no client.pt"
    manifest = path / MANIFEST
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable {MANIFEST}: {e}"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    """Flush every file and directory entry of `directory` to the disk (a rename is durable only
    after what it names is)."""
    for p in sorted(directory.rglob("*"), reverse=True):
        _fsync(p)
    _fsync(directory)


def save_checkpoint(backend, run_dir: Path, step: int, client: dict[str, Any], keep_last: int) -> Path:
    """Write a checkpoint of `backend` and `client` state at `step` from every rank; returns it.

    Into `.step-N.tmp/`: the backend's files, each rank's RNG state, the client state, then a
    manifest of every file and its size, flushed to the disk; then renamed to `step-N/`. A process
    killed anywhere in between leaves only the `.tmp` directory, which `--run.resume=auto` never
    picks and the next start removes. A write that fails on any rank (ENOSPC, an I/O error) raises
    CheckpointWriteError on every rank, after the partial write is removed.
    """
    root = checkpoint_root(run_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    error: BaseException | None = None
    if backend.is_main:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            error = e
    _agree_written(backend, error, tmp, step)
    try:
        fault_point("before-model", step)
        backend.save(tmp)
        fault_point("after-model", step)
        torch.save(rng_state(), tmp / f"rng-rank{backend.rank}.pt")
        fault_point("before-client", step)
        if backend.is_main:
            torch.save(client, tmp / "client.pt")
    except (OSError, CheckpointException, RuntimeError) as e:
        if not is_write_failure(e):
            raise
        error = e
    _agree_written(backend, error, tmp, step)
    if backend.is_main:
        try:
            write_manifest(tmp)
            _fsync_tree(tmp)
            fault_point("before-rename", step)
            old = root / f".step-{step:08d}.old"
            if final.exists():  # a re-run of the same step: replaced only now that the new one is complete
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
            tmp.rename(final)
            _fsync(root)
            shutil.rmtree(old, ignore_errors=True)
        except OSError as e:
            error = e
    _agree_written(backend, error, tmp, step)
    fault_point("after-rename", step)
    if backend.is_main:
        for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            _remove(old)
        log.info("checkpoint written: %s", final)
    backend.barrier()
    return final


class FailurePolicy:
    """What a checkpoint write that fails does (`run.ckpt_failure`): 'retry' logs it and training goes
    on (the next interval writes again) unless this was the final or preemption checkpoint or
    `max_failures` failed in a row; 'stop' (or those cases) ends the run with what to do."""

    def __init__(self, run_dir: Path, mode: str, max_failures: int):
        self.run_dir, self.mode, self.max_failures = run_dir, mode, max_failures
        self.in_row = 0  # checkpoint writes failed in a row

    def succeeded(self) -> None:
        self.in_row = 0

    def failed(self, e: CheckpointWriteError, final: bool) -> None:
        """Log the failure, or raise CheckpointWriteError when the run must stop."""
        self.in_row += 1
        ckpts = list_checkpoints(self.run_dir)
        last = f"the last complete checkpoint is {ckpts[-1].name}" if ckpts else "no checkpoint is complete yet"
        if self.mode == "stop" or final or self.in_row >= self.max_failures:
            why = ("run.ckpt_failure=stop" if self.mode == "stop" else "the final checkpoint" if final
                   else f"{self.in_row} failures in a row")  # fmt: skip
            raise CheckpointWriteError(f"{e}; stopping ({why}); {last}. Free space or fix the disk, then "
                                       "run the same command to resume") from None  # fmt: skip
        log.error("%s; %s; training goes on and writes again at the next interval (failure %d of %d "
                  "in a row allowed by run.max_ckpt_failures)", e, last, self.in_row, self.max_failures)  # fmt: skip


def _remove(path: Path) -> None:
    """Delete a checkpoint: renamed out of `step-*` first, so a kill mid-way leaves no partial
    `step-*` directory behind."""
    doomed = path.with_name(f".deleting-{path.name}")
    try:
        path.rename(doomed)
        shutil.rmtree(doomed)
    except OSError as e:
        log.warning("could not delete the old checkpoint %s (%s); delete it by hand", path, e)


def clean_leftovers(run_dir: Path) -> None:
    """Remove what interrupted checkpoint writes and deletions left (`.step-*.tmp`, `.step-*.old`,
    `.deleting-*`), and set aside `step-*` directories that fail verification as `broken-step-*`."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        if p.name.startswith((".step-", ".deleting-")):
            previous = root / p.name[1:].removesuffix(".old")
            if p.name.endswith(".old") and not previous.exists():
                # killed between the two renames of a re-run: the previous one is complete
                p.rename(previous)
                log.warning("restored %s (a re-written checkpoint was interrupted)", previous.name)
                continue
            log.warning("removing %s, left by an interrupted checkpoint write or deletion", p.name)
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith("step-") and p.is_dir():
            why = verify_checkpoint(p)
            if why:
                target = p.with_name(f"broken-{p.name}")
                log.warning("checkpoint %s is incomplete (%s): renamed to %s, not resumed from", p.name, why,
                            target.name)  # fmt: skip
                p.rename(target)


def load_checkpoint(backend, path: Path) -> dict[str, Any]:
    """Restore `backend` from `path`; returns the client state (RNG restored for this rank)."""
    backend.load(path)
    client = load_safely(path / "client.pt")
    rng = path / f"rng-rank{backend.rank}.pt"
    if rng.is_file():
        set_rng_state(load_safely(rng))
    else:
        log.warning("no RNG state for rank %d in %s (different world size?); RNG not restored", backend.rank, path)
    return client
