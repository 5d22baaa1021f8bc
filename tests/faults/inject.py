"""`scale.pretrain` with one fault injected, for the fault tests (run under torchrun or the
DeepSpeed launcher like the real entry point):

    SCALE_TEST_FAULT=ACTION:POINT:STEP:RANK[:ATTEMPT] torchrun ... -m tests.faults.inject --recipe ...

ACTION: kill (SIGKILL), stop (SIGSTOP), enospc (OSError ENOSPC) at POINT; or enospc-torch-save:
torch.save fails for files whose path contains POINT in step STEP's checkpoint. POINT: a checkpoint write point
(`scale.train.faults.CHECKPOINT_POINTS`) or `step` (after an optimizer step). The fault happens on
RANK when the run reaches STEP, and only in torchrun attempt ATTEMPT (TORCHELASTIC_RESTART_COUNT,
default 0: the restarted workers run clean).
"""

from __future__ import annotations

import errno
import os
import signal
import sys

from scale.train.faults import on_fault_point


def _install(spec: str) -> None:
    action, point, step, rank, *attempt = spec.split(":")
    if int(os.environ.get("RANK", "0")) != int(rank):
        return
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) != int(attempt[0] if attempt else 0):
        return

    if action == "enospc-torch-save":  # torch.save fails for paths containing POINT, from step STEP on
        _fail_torch_save(point, int(step))
        return

    def hook(name: str, at: int) -> None:
        if name != point or at != int(step):
            return
        print(f"[inject] {action} at {point} of step {at} on rank {rank} (pid {os.getpid()})", file=sys.stderr,
              flush=True)  # fmt: skip
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif action == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device (injected)")

    on_fault_point(hook)


def _fail_torch_save(part: str, from_step: int) -> None:
    """torch.save raises ENOSPC for files whose path contains `part` in the checkpoint of step
    `from_step` (inside DeepSpeed's own write), as a full disk does."""
    import torch

    real = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and part in str(f) and f".step-{from_step:08d}.tmp" in str(f):
            print(f"[inject] ENOSPC writing {f} on rank {os.environ.get('RANK')}", file=sys.stderr, flush=True)
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return real(obj, f, *args, **kwargs)

    torch.save = save


if __name__ == "__main__":
    if os.environ.get("SCALE_TEST_FAULT"):
        _install(os.environ["SCALE_TEST_FAULT"])
    from scale.pretrain import cli

    cli()
