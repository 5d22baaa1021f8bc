"""`scale.pretrain` with one fault injected, for the fault tests (run under torchrun or the
DeepSpeed launcher like the real entry point):

    SCALE_TEST_FAULT=ACTION:POINT:STEP:RANK[:ATTEMPT] torchrun ... -m tests.faults.inject --recipe ...

ACTION: kill (SIGKILL), stop (SIGSTOP), enospc (OSError ENOSPC). POINT: a checkpoint write point
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


if __name__ == "__main__":
    if os.environ.get("SCALE_TEST_FAULT"):
        _install(os.environ["SCALE_TEST_FAULT"])
    from scale.pretrain import cli

    cli()
