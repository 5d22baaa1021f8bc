"""Metrics on rank 0: JSON lines, TensorBoard, and a progress bar with images/s and ETA (the peaks
that MFU is measured against: `scale.hardware.peaks`)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)


class MetricsLogger:
    """Writes metrics rows on the main rank; a no-op elsewhere."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        if not enabled:
            return
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 (lives as long as the run)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard may be missing

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed (pip install tensorboard): metrics go to metrics.jsonl only")

    def log(self, step: int, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **row}) + "\n")
        if self.tb:
            for key, value in row.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


class Progress:
    """A tqdm bar over optimizer steps on the main rank (ETA, images/s), or periodic log lines."""

    def __init__(self, total: int, initial: int, enabled: bool, bar: bool):
        self.enabled, self.total = enabled, total
        self.bar = None
        self.start, self.start_step = time.time(), initial
        if enabled and bar:
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc="pretrain")

    def update(self, step: int, postfix: dict[str, str]) -> None:
        if not self.enabled:
            return
        if self.bar:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(postfix, refresh=False)

    def line(self, step: int, text: str) -> None:
        """A log line with the ETA (when there is no bar)."""
        if not self.enabled or self.bar:
            return
        done = step - self.start_step
        rate = done / max(time.time() - self.start, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        log.info("step %d/%d %s ETA %s", step, self.total, text, _hms(eta))

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def _hms(seconds: float) -> str:
    if seconds != seconds:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
