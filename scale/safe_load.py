"""Reading the files `scale` writes without running code from them: `torch.load(weights_only=True)`,
whose unpickler builds only tensors and plain data, with NumPy's array reconstruction allowed on
top (the RNG files hold NumPy's generator state). A file that needs anything else (a pickled class
or function, as a shared run directory could hold) is a one-line `CheckpointError`, not executed.

A leaf module: torch and NumPy only.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Any

import numpy as np
import torch

from scale.errors import CheckpointError


def _numpy_globals() -> list[Any]:
    """What NumPy's arrays and dtypes need to be rebuilt (its generator state is one array)."""
    core = getattr(np, "_core", None) or np.core  # NumPy 2 / 1
    out = [np.ndarray, np.dtype, core.multiarray._reconstruct]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:  # NumPy >= 1.25: a class per dtype
        out += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType")]
    return out


SAFE_GLOBALS = _numpy_globals()


def load_safely(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """The object in `path`, built from tensors, plain Python data and NumPy arrays only.

    Raises:
        CheckpointError: the file asks for anything else (the unpickler refused to build it: no code
            from the file ran), or it is not a torch file.
    """
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"unsupported global:? (?:GLOBAL )?([\w.]+)", str(e), re.IGNORECASE)
        if found is None:
            raise CheckpointError(
                f"{path} is not a readable torch file (the unpickler stopped: "
                f"{_first_line(e)}); give a checkpoint that scale or torch.save wrote"
            ) from None
        raise CheckpointError(
            f"{path} holds an object other than tensors and plain data ({found.group(1)}): scale loads checkpoints "
            "without running code from them; rewrite it from a trusted copy"
        ) from None
    except (RuntimeError, EOFError) as e:
        text = str(e)
        if isinstance(e, RuntimeError) and "PytorchStreamReader" not in text and "zip" not in text:
            raise
        raise CheckpointError(f"{path} is not a readable torch file ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    """The informative line of torch's message (it names what the unpickler met)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    chosen = next((line for line in lines if "nsupported" in line), lines[0] if lines else type(e).__name__)
    return chosen[:160]
