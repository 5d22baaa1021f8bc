"""What the trainer counts between two log rows without reading the device: skipped steps (device
tensors, read with the log row or a checkpoint) and the window of steps a log row summarises."""

from __future__ import annotations

import time

import torch


class SkipCounter:
    """Skipped steps, counted on the device and read on the host only with a log row or checkpoint.

    `pending` holds, since the last read: non-finite steps, fp16 overflows, the current run of
    non-finite steps in a row (carried over reads), the longest run, the last non-finite step + 1.
    """

    def __init__(self, device: torch.device):
        self.pending = torch.zeros(5, dtype=torch.int64, device=device)
        self.nonfinite_total = self.overflow_total = self.in_row = 0

    def add(self, step: int, applied: torch.Tensor | bool, overflow: torch.Tensor | None) -> None:
        p = self.pending
        if isinstance(applied, bool):  # a fill kernel, not a copy from host memory
            applied = torch.full((), applied, dtype=torch.bool, device=p.device)
        skipped = ~applied.to(p.device)
        if overflow is None:
            overflow = torch.zeros((), dtype=torch.bool, device=p.device)
        overflow = overflow.to(p.device)
        nonfinite = (skipped & ~overflow).long()
        run = (p[2] + 1) * nonfinite  # 0 again after a good step
        self.pending = torch.stack(
            [p[0] + nonfinite, p[1] + (skipped & overflow).long(), run, torch.maximum(p[3], run),
             torch.where(nonfinite.bool(), step + 1, p[4])]
        )  # fmt: skip

    def restore(self, nonfinite_total: int, overflow_total: int, in_row: int) -> None:
        """The counts of a checkpoint (a run of non-finite steps in a row continues over a resume)."""
        self.nonfinite_total, self.overflow_total, self.in_row = nonfinite_total, overflow_total, in_row
        self.pending = torch.tensor([0, 0, in_row, in_row, 0], dtype=torch.int64).to(self.pending.device)

    def consume(self, values: list[float]) -> tuple[int, int, int, int]:
        """Take `pending` as read on the host (`values`); returns (new non-finite, new overflows,
        longest run in a row, last non-finite step) and restarts the counts on the device."""
        new_nonfinite, new_overflow, run, worst, last = (int(v) for v in values)
        self.nonfinite_total += new_nonfinite
        self.overflow_total += new_overflow
        self.in_row = run
        self.pending = torch.tensor([0, 0, run, run, 0], dtype=torch.int64).to(self.pending.device, non_blocking=True)
        return new_nonfinite, new_overflow, worst, last - 1


class LogWindow:
    """Accumulates the steps between two log lines (throughput, data time, mean loss)."""

    def __init__(self):
        self.restart()
        self.steps, self.data, self.losses = 0, 0.0, []

    def restart(self) -> None:
        """Start timing afresh (after a checkpoint or evaluation), keeping the losses."""
        self.start, self.steps, self.data = time.perf_counter(), 0, 0.0

    def add(self, loss: torch.Tensor) -> None:
        self.steps += 1
        self.losses.append(loss)

    def mean_loss(self) -> torch.Tensor:
        """The mean loss of the window, on the device (NaN with no steps)."""
        return torch.stack(self.losses).mean() if self.losses else torch.tensor(float("nan"), dtype=torch.float64)
