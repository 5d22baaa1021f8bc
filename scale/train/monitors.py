"""The paper's instruments, on in every run (paper Sec. 4 and appendix, Fig. 1-5):

- **Dense kNN monitor** (`scale.train.dense_knn`): a queue of the training crops' features, the
  current batch classified against it every `monitor.knn_every` steps, sharded like the data.
- **Gradient monitor** (`Backend.group_grad_norms`): the gradient norm of each layer the model's
  layout names (`scale.train.parallelize.grad_groups`: for a ViT the patch projection when learned,
  each transformer block, projector, predictor), of whole tensors under every backend, on the
  device, read with the log row.
- **Events** (`scale.train.events`): gradient spikes and their delay to the last layers, dense kNN
  dips; host-side, on read values.

The trainer calls these; they never call the trainer.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scale.config.schema import MonitorConfig
from scale.parallel.base import Backend
from scale.train.dense_knn import DenseKnn, bank_steps
from scale.train.events import DipDetector, SpikeDetector, event_lines

log = logging.getLogger(__name__)


def _round(values: list[float], digits: int = 5) -> list[float | None]:
    return [float(f"{v:.{digits}g}") if math.isfinite(v) else None for v in values]


class RunMonitors:
    """The dense kNN and gradient monitors of one training run, and their events.

    Per step the trainer asks `measure_grads(step)` (then passes it to `Backend.step`) and calls
    `after_step`; at each log row it packs `pending()` into its single device read and hands the
    values back to `consume`, which returns the metric rows and writes gradients.jsonl and
    events.jsonl (main rank).
    """

    def __init__(self, cfg: MonitorConfig, backend: Backend, encoder: nn.Module,
                 layers: list[tuple[str, list[nn.Parameter]]], num_samples: int, global_batch: int,
                 per_rank_images: int):  # fmt: skip
        """`encoder`: the base encoder (its features fill the dense kNN bank); `layers`: the gradient
        monitor's (name, parameters), first layer first (`scale.train.parallelize.grad_groups`)."""
        self.cfg, self.backend = cfg, backend
        self.knn: DenseKnn | None = None
        self.labels_checked = False
        if cfg.knn_every:
            size = cfg.knn_bank_size or max(1, round(cfg.knn_bank_fraction * num_samples))
            steps = bank_steps(size, 2 * global_batch)
            self.knn = DenseKnn(encoder, steps, 2 * per_rank_images, encoder.num_features, backend.device, cfg.knn_k,
                                cfg.knn_temperature, cfg.knn_every)  # fmt: skip
            self.bank_size = steps * 2 * global_batch
        groups = layers if cfg.grad_every else []
        self.layer_names = [name for name, _ in groups]
        backend.grad_groups = [params for _, params in groups]
        self.spikes = SpikeDetector(self.layer_names, cfg.spike_threshold, cfg.average_steps, cfg.average_steps,
                                    cfg.spike_window)  # fmt: skip
        self.dips = DipDetector(cfg.dip_points)
        self.grad_pending: list[tuple[int, torch.Tensor]] = []
        self.last_knn = float("nan")
        self.files: dict[str, Any] = {}

    def describe(self) -> str:
        parts = []
        if self.knn:
            parts.append(f"dense kNN every {self.cfg.knn_every} steps against a bank of {self.bank_size} features "
                         f"({self.knn.bank.steps} steps of 2 crops), k={self.cfg.knn_k}, "
                         f"T={self.cfg.knn_temperature}")  # fmt: skip
        else:
            parts.append("dense kNN off")
        if self.layer_names:
            parts.append(f"gradient norms of {len(self.layer_names)} layers every {self.cfg.grad_every} step(s), "
                         f"spikes above {self.cfg.spike_threshold}x the running average")  # fmt: skip
        else:
            parts.append("gradient monitor off")
        return "monitors: " + "; ".join(parts)

    def measure_grads(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based) measures the per-layer gradient norms."""
        return bool(self.layer_names) and step % self.cfg.grad_every == 0

    def after_step(self, step: int, micro_batches: list, group_norms: torch.Tensor | None) -> None:
        if group_norms is not None:
            self.grad_pending.append((step, group_norms))
        if self.knn is None:
            return
        labels = torch.cat([torch.as_tensor(mb[2]).reshape(-1) for mb in micro_batches])
        if not self.labels_checked:  # once: a host read of the first batch's labels, agreed by all ranks
            self.labels_checked = True
            has = (labels.numpy() >= 0).any() if labels.device.type == "cpu" else (labels >= 0).any()  # once
            if not self.backend.any_rank(bool(has)):
                if self.backend.is_main:
                    log.warning("the training data has no labels: the dense kNN monitor is off for this run")
                self.knn.close()
                self.knn = None
                return
        self.knn.after_step(step, labels)

    def close(self) -> None:
        if self.knn:
            self.knn.close()
        for f in self.files.values():
            f.close()
        self.files = {}

    # -------------------------------------------------------------- reading

    def pending(self) -> tuple[list[torch.Tensor], Any]:
        """Device tensors to read (flattened, float64) and the layout to give back to `consume`."""
        knn = self.knn.take() if self.knn else []
        grads, self.grad_pending = self.grad_pending, []
        tensors = [c.double().reshape(-1) for _, c in knn] + [g.double().reshape(-1) for _, g in grads]
        return tensors, ([s for s, _ in knn], [s for s, _ in grads])

    def consume(self, values: list[float], layout, run_dir, write: bool) -> list[tuple[int, dict[str, Any]]]:
        """Take the values read for `pending()`; returns metric rows [(step, row)] of the dense kNN,
        writes the gradient norms and events (if `write`) and logs the events."""
        knn_steps, grad_steps = layout
        rows, events, grad_rows = [], [], []
        i = 0
        for step in knn_steps:
            correct, counted = values[i : i + 2]
            i += 2
            if counted <= 0:
                continue
            top1 = 100.0 * correct / counted
            self.last_knn = top1
            rows.append((step, {"knn_dense_top1": top1, "knn_dense_queries": int(counted)}))
            events += self.dips.update(step, top1, counted)
        G = len(self.layer_names)
        for step in grad_steps:
            norms = values[i : i + G]
            i += G
            rel, ev = self.spikes.update(step, norms)
            events += ev
            grad_rows.append({"step": step, "norm": _round(norms), "relative": _round(rel, 4)})
        events.sort(key=lambda e: e["step"])
        if write:
            self._write(run_dir, "gradients.jsonl", grad_rows, header={"layers": self.layer_names})
            self._write(run_dir, "events.jsonl", events)
            for line in event_lines(events):
                log.warning("%s", line)
        return rows

    def _write(self, run_dir, name: str, rows: list[dict[str, Any]], header: dict[str, Any] | None = None) -> None:
        if not rows:
            return
        f = self.files.get(name)
        if f is None:
            path = Path(run_dir) / name
            new = not path.is_file() or path.stat().st_size == 0
            f = self.files[name] = open(path, "a", buffering=1)  # noqa: SIM115 (lives as long as the run)
            if new and header:
                f.write(json.dumps(header) + "\n")
        f.write("".join(json.dumps(r) + "\n" for r in rows))

    def summary(self) -> dict[str, Any]:
        """Counts for the log row."""
        out = {"grad_spikes": self.spikes.spikes, "knn_dips": self.dips.dips}
        return {"knn_dense_top1": self.last_knn, **out} if math.isfinite(self.last_knn) else out

    def state_dict(self) -> dict[str, Any]:
        return {"spikes": self.spikes.state_dict(), "dips": self.dips.state_dict(), "last_knn": self.last_knn}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        self.spikes.load_state_dict(state["spikes"])
        self.dips.load_state_dict(state["dips"])
        self.last_knn = state.get("last_knn", float("nan"))
