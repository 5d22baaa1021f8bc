"""The dense kNN monitor (paper Sec. 4 and appendix, Fig. 2): a memory bank kept as a queue, filled
every iteration with the class-token features of the current training crops (the base encoder's
forward computes them anyway: `VisionTransformer.feature_sink`, no extra forward) and their labels.
Every `monitor.knn_every` steps the current batch (the first view of every image) is classified by
weighted kNN against the bank before the batch enters it. The bank is sharded like the data: each
rank keeps the features of its own images, and the sharded kernel (`scale.train.knn.knn_counts`)
ranks every rank's queries against every part. All of it stays on the device: the counts are read
with the next log row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scale.train.knn import knn_counts


def bank_steps(bank_size: int, images_per_step: int) -> int:
    """Whole steps of features the bank holds: `bank_size` rounded to the nearest multiple of the
    features a step adds over all ranks (at least one step). Whole steps make the sharded bank hold
    exactly the entries a single process would (ImageNet, 10%, batch 4096, two crops: 16 steps,
    131,072 features)."""
    return max(1, round(bank_size / images_per_step))


class FeatureBank:
    """A FIFO of this rank's last `steps` steps of L2-normalised features and their labels.

    Slot i holds one step's `per_step` features; a push overwrites the oldest slot. Unfilled rows
    have label -1 (never a neighbour). Kept on `device`, in fp32, allocated at the first push (a run
    whose data has no labels never holds it); not checkpointed (after a resume it refills in `steps`
    steps, during which the monitor waits).
    """

    def __init__(self, steps: int, per_step: int, dim: int, device: torch.device):
        self.steps, self.per_step, self.dim, self.device = steps, per_step, dim, device
        self.features: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.next_slot = 0
        self.pushed = 0  # steps pushed so far (host counter: no device read)

    @property
    def full(self) -> bool:
        return self.pushed >= self.steps

    def __len__(self) -> int:
        return min(self.pushed, self.steps) * self.per_step

    def allocate(self) -> None:
        if self.features is None:
            self.features = torch.zeros(self.steps * self.per_step, self.dim, device=self.device)
            self.labels = torch.full((self.steps * self.per_step,), -1, dtype=torch.int64, device=self.device)

    @torch.no_grad()
    def push(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Enqueue one step's (per_step, D) features (normalised here) and (per_step,) labels."""
        if features.shape[0] != self.per_step:
            raise ValueError(f"a step adds {self.per_step} features per rank, got {features.shape[0]}")
        self.allocate()
        rows = slice(self.next_slot * self.per_step, (self.next_slot + 1) * self.per_step)
        self.features[rows] = F.normalize(features.float(), dim=1)
        self.labels[rows] = labels.to(self.labels.device, non_blocking=True)
        self.next_slot = (self.next_slot + 1) % self.steps
        self.pushed += 1

    def ordered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The entries oldest first (for tests and inspection)."""
        self.allocate()
        n = min(self.pushed, self.steps)
        start = self.next_slot if self.pushed >= self.steps else 0
        order = [(start + i) % self.steps for i in range(n)]
        idx = torch.cat([torch.arange(s * self.per_step, (s + 1) * self.per_step) for s in order]) if order else \
            torch.zeros(0, dtype=torch.int64)  # fmt: skip
        idx = idx.to(self.features.device)
        return self.features[idx], self.labels[idx]


class DenseKnn:
    """The dense kNN monitor of one run: the bank, the features tapped from the base encoder's
    forward, and the pending (step, counts) device tensors that the next log row reads."""

    def __init__(self, encoder: nn.Module, steps: int, per_step: int, dim: int, device: torch.device,
                 k: int, temperature: float, every: int):  # fmt: skip
        self.encoder, self.k, self.temperature, self.every = encoder, k, temperature, every
        self.bank = FeatureBank(steps, per_step, dim, device)
        self.tapped: list[torch.Tensor] = []
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.enabled = True
        encoder.feature_sink = self.tapped.append

    def close(self) -> None:
        self.encoder.feature_sink = None

    def after_step(self, step: int, labels: torch.Tensor) -> None:
        """`step` just ran (1-based) on micro-batches with these `labels` (all micro-batches, in
        order): classify the batch against the bank every `every` steps, then enqueue it."""
        tapped, self.tapped[:] = list(self.tapped), []
        if not self.enabled or not tapped:
            return
        view1 = torch.cat(tapped[0::2])  # MoCoV3.forward runs the base encoder on x1, then x2
        view2 = torch.cat(tapped[1::2])
        labels = labels.to(view1.device, non_blocking=True)
        if self.bank.full and step % self.every == 0:
            queries = F.normalize(view1.float(), dim=1).to(self.bank.device)
            counts = knn_counts(queries, labels, self.bank.features, self.bank.labels, (self.k,), self.temperature)
            self.pending.append((step, counts))
        self.bank.push(torch.cat([view1, view2]), torch.cat([labels, labels]))

    def take(self) -> list[tuple[int, torch.Tensor]]:
        out, self.pending = self.pending, []
        return out
