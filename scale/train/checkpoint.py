"""Checkpoint directories: written atomically, the newest complete one found for `--resume auto`,
the last K kept.

Layout: RUN/checkpoints/step-00001234/ holding the backend's files (`model.pt` for replicated
backends; sharded backends write their own), `client.pt` (step, epoch, data position, counters,
the resolved config) and `rng-rank{r}.pt` per rank. A checkpoint is written into
`.step-00001234.tmp/` and renamed when every rank has finished, so a directory named `step-*` is
always complete.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / "client.pt").is_file())


def find_resume(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: 'auto' (newest complete, or None), 'none', or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "client.pt").is_file():
        raise FileNotFoundError(f"--run.resume={resume!r} is not a complete checkpoint directory (no client.pt)")
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


def save_checkpoint(backend, run_dir: Path, step: int, client: dict[str, Any], keep_last: int) -> Path:
    """Write a checkpoint of `backend` and `client` state at `step` from every rank; returns it."""
    root = checkpoint_root(run_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    if backend.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    backend.barrier()
    backend.save(tmp)
    torch.save(rng_state(), tmp / f"rng-rank{backend.rank}.pt")
    if backend.is_main:
        torch.save(client, tmp / "client.pt")
    backend.barrier()
    if backend.is_main:
        if final.exists():  # a re-run of the same step: replace it only now that the new one is complete
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint written: %s", final)
    backend.barrier()
    return final


def load_checkpoint(backend, path: Path) -> dict[str, Any]:
    """Restore `backend` from `path`; returns the client state (RNG restored for this rank)."""
    backend.load(path)
    client = torch.load(path / "client.pt", map_location="cpu", weights_only=False)
    rng = path / f"rng-rank{backend.rank}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
    else:
        log.warning("no RNG state for rank %d in %s (different world size?); RNG not restored", backend.rank, path)
    return client
