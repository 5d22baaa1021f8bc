"""Reading checkpoints without running code from them.

Files `scale` writes, and state dicts of torch, timm and the authors' releases: `torch.load(
weights_only=True)`, whose unpickler builds only tensors and plain data, with NumPy's array
reconstruction allowed on top (the RNG files hold NumPy's generator state). Files that libraries read
with pickle's full unpickler (FSDP2's DCP metadata and its non-tensor entries, DeepSpeed's engine
files) are checked first with a restricted unpickler that builds only their data classes (`check_files`,
`SafeDCPReader`, `SafeDCPPlanner`): a file that passes holds nothing that could run, so the full
unpickler then reads it safely. A file that needs anything else (a pickled function or foreign
class, as a shared run directory could hold) is a one-line `CheckpointError`, and nothing from it
runs, unless the user names the risk: `trust_checkpoint_code()` (the commands'
`--trust-checkpoint-code`, pretraining's `--run.trust_checkpoint_code=true`).

A leaf module: torch and NumPy only (DeepSpeed's data classes when it is installed).
"""

from __future__ import annotations

import dataclasses
import enum
import io
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scale.errors import CheckpointError

log = logging.getLogger(__name__)

TRUST_HINT = (
    "if you trust where it came from, pass --trust-checkpoint-code (pretraining and fine-tuning: "
    "--run.trust_checkpoint_code=true): the file can then run code on this machine"
)
_trusted = False


def trust_checkpoint_code(enabled: bool = True) -> None:
    """Read checkpoints with pickle's full unpickler from now on (the user's explicit choice; logged)."""
    global _trusted
    if enabled and not _trusted:
        log.warning("trusting checkpoint code: checkpoints are read with pickle's full unpickler, so a file from an "
                    "untrusted source can run code on this machine")  # fmt: skip
    _trusted = enabled


def _numpy_globals() -> list[Any]:
    """What NumPy's arrays and dtypes need to be rebuilt (its generator state is one array)."""
    core = getattr(np, "_core", None) or np.core  # NumPy 2 / 1
    out = [np.ndarray, np.dtype, core.multiarray._reconstruct]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:  # NumPy >= 1.25: a class per dtype
        out += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType")]
    return out


def _deepspeed_globals() -> list[Any]:
    """The data classes DeepSpeed pickles into its engine files (ZeRO-1/2/3, fp32/fp16/bf16)."""
    out: list[Any] = []
    for module, names in (("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
                          ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
                          ("deepspeed.utils.tensor_fragment", ("fragment_address",))):  # fmt: skip
        try:
            mod = __import__(module, fromlist=list(names))
        except Exception:  # noqa: BLE001 - DeepSpeed is optional; a broken install just allows nothing extra
            continue
        out += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return out


SAFE_GLOBALS = _numpy_globals()
_library_globals: list[Any] | None = None


def _allowed() -> list[Any]:
    global _library_globals
    if _library_globals is None:
        _library_globals = _deepspeed_globals()
    return SAFE_GLOBALS + _library_globals


def load_safely(path: str | os.PathLike | io.BytesIO, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """The object in `path`, built from tensors, plain Python data, NumPy arrays and DeepSpeed's data
    classes only (anything, after `trust_checkpoint_code()`).

    Raises:
        CheckpointError: the file asks for anything else (the unpickler refused to build it: no code
            from the file ran), or it is not a torch file.
    """
    if _trusted:
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    try:
        with torch.serialization.safe_globals(_allowed()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"unsupported global:? (?:GLOBAL )?([\w.]+)", str(e), re.IGNORECASE)
        if found is None:
            raise CheckpointError(
                f"{_name(path)} is not a readable torch file (the unpickler stopped: "
                f"{_first_line(e)}); give a checkpoint that scale or torch.save wrote"
            ) from None
        raise CheckpointError(
            f"{_name(path)} holds an object other than tensors and plain data ({found.group(1)}): scale loads "
            f"checkpoints without running code from them; {TRUST_HINT}"
        ) from None
    # What torch's readers raise on a file that is no torch file (a text file: KeyError or IndexError).
    except (RuntimeError, EOFError, KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        text = str(e)
        if isinstance(e, RuntimeError) and "PytorchStreamReader" not in text and "zip" not in text:
            raise
        raise CheckpointError(f"{_name(path)} is not a readable torch file ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    """The informative line of torch's message (it names what the unpickler met)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    chosen = next((line for line in lines if "nsupported" in line), lines[0] if lines else type(e).__name__)
    return chosen[:160]


def _name(path: Any) -> str:
    return "an entry of a checkpoint" if isinstance(path, io.BytesIO) else str(path)


# ---------------------------------------------------------------------- files libraries unpickle


def _dcp_allowed(module: str, name: str) -> bool:
    """What DCP's metadata may ask for: its own data classes and enums, torch's dtypes, sizes and
    layouts, paths and ordered dicts."""
    if (module, name) in {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                          ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("builtins", "set"),
                          ("builtins", "frozenset"), ("builtins", "slice")}:  # fmt: skip
        return True
    if module == "torch":
        return isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))
    if module.startswith("torch.distributed.checkpoint."):
        try:
            obj = getattr(__import__(module, fromlist=[name]), name)
        except (ImportError, AttributeError):
            return False
        return isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))
    return False


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if _dcp_allowed(module, name):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


def check_file(path: Path) -> None:
    """Raise CheckpointError if `path` (a torch file or a plain pickle) asks for anything beyond its
    data; builds it with a restricted unpickler (a torch file's tensors memory-mapped, not read)."""
    if _trusted:
        return
    if zipfile.is_zipfile(path):
        load_safely(path, mmap=True)
        return
    try:
        with open(path, "rb") as f:
            _RestrictedUnpickler(f).load()
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = found.group(1) if found else _first_line(e)
        raise CheckpointError(f"{path} asks for {what}, which is not checkpoint data: scale loads checkpoints "
                              f"without running code from them; {TRUST_HINT}") from None  # fmt: skip
    except (EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint file ({_first_line(e)})") from None


def check_files(paths: Sequence[Path], rank: int = 0, world_size: int = 1) -> str | None:
    """This rank's share of `paths` (every `world_size`-th file: each file is checked once over the
    ranks) checked with `check_file`: None, or the first error."""
    for path in list(paths)[rank::world_size]:
        try:
            check_file(path)
        except CheckpointError as e:
            return str(e)
    return None


def safe_dcp_reader(path: str | os.PathLike):
    """A DCP FileSystemReader for `path`, whose metadata files were checked (`check_file`) first: DCP
    unpickles them. (Checked here, not in `read_metadata`: DCP catches that method's errors.)"""
    from torch.distributed.checkpoint import FileSystemReader

    for meta in sorted(Path(path).glob("*.metadata")) + sorted(Path(path).glob(".metadata")):
        check_file(meta)
    return FileSystemReader(str(path))


def safe_dcp_planner(base: type):
    """`base` (a DCP load planner class) whose non-tensor entries are checked (`load_safely`) before
    DCP unpickles them with the full unpickler; `refused` keeps the error (DCP wraps it)."""

    class SafeDCPPlanner(base):
        refused: str | None = None

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                load_safely(value)
            except CheckpointError as e:
                self.refused = f"{read_item.dest_index.fqn!r}: {e}"
                raise
            value.seek(0)
            super().load_bytes(read_item, value)

    return SafeDCPPlanner


def dcp_load_safely(load: Any, path: str | os.PathLike, planner_base: type) -> None:
    """`load(storage_reader=..., planner=...)` (`dcp.load` or one of its forms) with `safe_dcp_reader`
    and `safe_dcp_planner(planner_base)`: a refused file or entry is a CheckpointError, not DCP's
    multi-line CheckpointException."""
    planner = safe_dcp_planner(planner_base)()
    try:
        load(storage_reader=safe_dcp_reader(path), planner=planner)
    except BaseException:  # DCP's CheckpointException is a BaseException
        if planner.refused:
            raise CheckpointError(f"{path}, entry {planner.refused}") from None
        raise
