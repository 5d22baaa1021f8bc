"""The paper's instruments, on in every run (paper Sec. 4 and appendix, Fig. 1-5):

- **Dense kNN monitor** (`FeatureBank`, `DenseKnn`): a memory bank kept as a queue, filled every
  iteration with the class-token features of the current training crops (the base encoder's
  forward computes them anyway: `VisionTransformer.feature_sink`, no extra forward) and their labels.
  Every `monitor.knn_every` steps the current batch (the first view of every image) is classified by
  weighted kNN against the bank before the batch enters it. The bank is sharded like the data: each
  rank keeps the features of its own images; the queries travel (all-gather), each rank ranks them
  against its part, and only the top-k candidates go back to the query's rank (all-to-all). All of
  it stays on the device: the counts are read with the next log row.
- **Gradient monitor** (`grad_groups`, `Backend.group_grad_norms`): the gradient norm of each layer
  (patch projection when learned, each transformer block, projector, predictor), of whole tensors
  under every backend, on the device, read with the log row.
- **Events** (`SpikeDetector`, `DipDetector`): a layer's gradient above `spike_threshold` times its
  running average is a spike; the delay from a spike in the first layer to the next one in the last
  layers is reported; a dense kNN value that falls below its running average by more than
  `dip_points` (and three standard errors of the measurement) is a dip. Host-side, on read values.

The trainer calls these; they never call the trainer.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from scale.parallel.dist import all_gather_single

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the memory bank


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


def _world() -> tuple[int, int, bool]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


@torch.no_grad()
def sharded_knn_counts(
    queries: torch.Tensor, query_labels: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
    k: int, temperature: float, rows: int = 256,
) -> torch.Tensor:  # fmt: skip
    """(correct, counted) over the queries of every rank, as a float64 device tensor (2,), with no
    host read: weighted kNN (Wu et al. 2018: votes exp(sim / T) of the k most similar bank entries)
    of `queries` (normalised here) against the bank, whose parts are spread over the ranks.

    Every rank must pass the same number of queries. Queries with label < 0 are not counted; bank
    rows with label < 0 are never neighbours. Communication: one all-gather of the queries, one
    all-to-all of k candidates per query and bank rank, one all-reduce of two numbers. Memory is
    bounded by tiles of `rows` queries.
    """
    rank, world, distributed = _world()
    n, D = queries.shape
    device = bank.device
    q = F.normalize(queries.float(), dim=1).to(device)
    if distributed:
        all_q = q.new_empty(world * n, D)
        all_gather_single(all_q, q.contiguous())
    else:
        all_q = q
    bank_labels = bank_labels.to(device)
    kk = min(k, bank.shape[0])
    cand = []
    for i in range(0, all_q.shape[0], rows):
        sims = (all_q[i : i + rows] @ bank.T).masked_fill(bank_labels[None, :] < 0, float("-inf"))
        top_s, top_i = sims.topk(kk, dim=1)
        top_l = torch.where(torch.isfinite(top_s), bank_labels[top_i].to(torch.float32), -1.0)  # exact below 2^24
        cand.append(torch.stack([top_s, top_l], dim=-1))
    cand = torch.cat(cand)  # (world * n, kk, 2): row block r holds rank r's queries
    if distributed:
        got = torch.empty_like(cand)
        dist.all_to_all_single(got, cand.contiguous())  # block b: bank rank b's candidates for my queries
        cand = got.view(world, n, kk, 2).permute(1, 0, 2, 3).reshape(n, world * kk, 2)
    kq = min(k, cand.shape[1])
    y = query_labels.to(device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(0, n, rows):
        s, lab = cand[i : i + rows, :, 0], cand[i : i + rows, :, 1]
        best_s, best_i = s.topk(kq, dim=1)
        best_l = lab.gather(1, best_i)
        weights = torch.where(best_l >= 0, (best_s / temperature).exp(), 0.0)  # (rows, kq)
        # The votes for each neighbour's class without knowing the number of classes: the weight of
        # the neighbours sharing neighbour j's class; the prediction is the class of the best j.
        same = best_l[:, :, None] == best_l[:, None, :]  # (rows, kq, kq)
        votes = (same * weights[:, None, :]).sum(-1).masked_fill(best_l < 0, -1.0)
        predicted = best_l.gather(1, votes.argmax(1, keepdim=True)).squeeze(1)
        yy = y[i : i + rows]
        correct += ((predicted == yy.float()) & (yy >= 0)).sum()
    out = torch.stack([correct, (y >= 0).sum().double()])
    if distributed:
        dist.all_reduce(out)
    return out


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
            counts = sharded_knn_counts(view1, labels, self.bank.features, self.bank.labels, self.k, self.temperature)
            self.pending.append((step, counts))
        self.bank.push(torch.cat([view1, view2]), torch.cat([labels, labels]))

    def take(self) -> list[tuple[int, torch.Tensor]]:
        out, self.pending = self.pending, []
        return out


# ----------------------------------------------------------------------------- gradient groups


def grad_groups(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """(layer name, trainable parameters) of a MoCoV3 model, first layer first: the patch projection
    when it is learned (`patch_embed`), each transformer block (`block.0` ...), the projector and the
    predictor. The class token, position table and final norm are left out (no layer of Fig. 4)."""
    enc = model.base_encoder
    named = [("patch_embed", enc.patch_embed)]
    named += [(f"block.{i}", b) for i, b in enumerate(enc.blocks)]
    named += [("projector", enc.head), ("predictor", model.predictor)]
    out = []
    for name, module in named:
        params = [p for p in module.parameters() if p.requires_grad]
        if params:
            out.append((name, params))
    return out


# ----------------------------------------------------------------------------- events


@dataclass
class SpikeDetector:
    """Spikes in per-layer gradient norms, relative to each layer's running average.

    relative_t = g_t / avg_{t-1}, with avg an exponential average over about `average_steps` values
    (a plain mean until then); none is reported before `warmup` values. A spike starts when the
    relative value exceeds `threshold` and ends when it falls back below it. A spike of the first
    layer opens a window of `window` steps in which the first spike of the last layer (the last block
    and the heads) closes it with the delay between the two.
    """

    names: list[str]
    threshold: float = 3.0
    average_steps: int = 50
    warmup: int = 50
    window: int = 200
    last_layers: int = 3
    avg: list[float] = field(default_factory=list)
    seen: int = 0
    in_spike: list[bool] = field(default_factory=list)
    open_first: int | None = None
    spikes: int = 0

    def __post_init__(self):
        self.avg = self.avg or [0.0] * len(self.names)
        self.in_spike = self.in_spike or [False] * len(self.names)

    def update(self, step: int, norms: list[float]) -> tuple[list[float], list[dict[str, Any]]]:
        """Take one step's norms; returns the relative values and the events of this step."""
        events: list[dict[str, Any]] = []
        rel = [v / a if a > 0 and math.isfinite(v) else float("nan") for v, a in zip(norms, self.avg, strict=True)]
        armed = self.seen >= self.warmup
        last = set(range(max(1, len(self.names) - self.last_layers), len(self.names)))
        for i, r in enumerate(rel):
            spiking = armed and r > self.threshold  # NaN compares False
            if spiking and not self.in_spike[i]:
                self.spikes += 1
                events.append({"step": step, "event": "spike", "layer": self.names[i], "relative": r})
                if i == 0:
                    self.open_first = step
                elif i in last and self.open_first is not None and step - self.open_first <= self.window:
                    events.append({"step": step, "event": "spike_delay", "from_layer": self.names[0],
                                   "to_layer": self.names[i], "from_step": self.open_first,
                                   "delay": step - self.open_first})  # fmt: skip
                    self.open_first = None
            self.in_spike[i] = spiking
        if self.open_first is not None and step - self.open_first > self.window:
            self.open_first = None
        beta = 1.0 - 1.0 / min(self.seen + 1, self.average_steps)
        for i, v in enumerate(norms):
            if math.isfinite(v):
                self.avg[i] = beta * self.avg[i] + (1 - beta) * v
        self.seen += 1
        return rel, events

    def state_dict(self) -> dict[str, Any]:
        return {"avg": self.avg, "seen": self.seen, "in_spike": self.in_spike, "open_first": self.open_first,
                "spikes": self.spikes, "names": self.names}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("names") != self.names:
            return  # another model: start afresh
        self.avg, self.seen, self.in_spike = list(state["avg"]), int(state["seen"]), list(state["in_spike"])
        self.open_first, self.spikes = state["open_first"], int(state["spikes"])


@dataclass
class DipDetector:
    """Dips in the dense kNN curve: a value below the running average (over about `average_points`
    evaluations) by more than `points` and by more than three standard errors of a top-1 measured on
    `n` queries (sqrt(p (1 - p) / n)); ends when the curve is back within that margin."""

    points: float = 3.0
    average_points: int = 10
    warmup: int = 3
    avg: float = 0.0
    seen: int = 0
    in_dip: bool = False
    dips: int = 0

    def update(self, step: int, top1: float, n: float) -> list[dict[str, Any]]:
        events = []
        if self.seen >= self.warmup:
            p = min(max(self.avg / 100.0, 0.0), 1.0)
            margin = max(self.points, 300.0 * math.sqrt(p * (1 - p) / max(n, 1.0)))
            dipping = top1 < self.avg - margin
            if dipping and not self.in_dip:
                self.dips += 1
                events.append({"step": step, "event": "knn_dip", "top1": top1, "average": self.avg,
                               "drop": self.avg - top1})  # fmt: skip
            self.in_dip = dipping
        beta = 1.0 - 1.0 / min(self.seen + 1, self.average_points)
        self.avg = beta * self.avg + (1 - beta) * top1
        self.seen += 1
        return events

    def state_dict(self) -> dict[str, Any]:
        return {"avg": self.avg, "seen": self.seen, "in_dip": self.in_dip, "dips": self.dips}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.avg, self.seen, self.in_dip, self.dips = state["avg"], state["seen"], state["in_dip"], state["dips"]


# ----------------------------------------------------------------------------- one run's monitors


def _round(values: list[float], digits: int = 5) -> list[float | None]:
    return [float(f"{v:.{digits}g}") if math.isfinite(v) else None for v in values]


class RunMonitors:
    """The dense kNN and gradient monitors of one training run, and their events.

    Per step the trainer asks `measure_grads(step)` (then passes it to `Backend.step`) and calls
    `after_step`; at each log row it packs `pending()` into its single device read and hands the
    values back to `consume`, which returns the metric rows and writes gradients.jsonl and
    events.jsonl (main rank).
    """

    def __init__(self, cfg, backend, model: nn.Module, num_samples: int, global_batch: int, per_rank_images: int):
        self.cfg, self.backend = cfg, backend
        self.knn: DenseKnn | None = None
        self.labels_checked = False
        if cfg.knn_every:
            size = cfg.knn_bank_size or max(1, round(cfg.knn_bank_fraction * num_samples))
            steps = bank_steps(size, 2 * global_batch)
            self.knn = DenseKnn(model.base_encoder, steps, 2 * per_rank_images, model.base_encoder.num_features,
                                backend.device, cfg.knn_k, cfg.knn_temperature, cfg.knn_every)  # fmt: skip
            self.bank_size = steps * 2 * global_batch
        groups = grad_groups(model) if cfg.grad_every else []
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
        import json
        from pathlib import Path

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


def describe_event(e: dict[str, Any]) -> str:
    """One line for an event of events.jsonl."""
    if e["event"] == "spike":
        return f"gradient spike at step {e['step']} in {e['layer']}: {e['relative']:.1f}x its running average"
    if e["event"] == "spike_delay":
        return (f"gradient spike of {e['from_layer']} at step {e['from_step']} reached {e['to_layer']} "
                f"{e['delay']} steps later (step {e['step']})")  # fmt: skip
    if e["event"] == "knn_dip":
        return f"dense kNN dip at step {e['step']}: {e['top1']:.1f}% against a running average of {e['average']:.1f}%"
    return str(e)


def event_lines(events: list[dict[str, Any]]) -> list[str]:
    """Log lines for events: the spikes of one step in one line, every other event in its own."""
    lines, by_step = [], {}
    for e in events:
        if e["event"] == "spike":
            by_step.setdefault(e["step"], []).append(e)
        else:
            lines.append((e["step"], describe_event(e)))
    for step, spikes in by_step.items():
        if len(spikes) == 1:
            lines.append((step, describe_event(spikes[0])))
        else:
            worst = max(spikes, key=lambda e: e["relative"])
            text = (f"gradient spike at step {step} in {len(spikes)} layers ({spikes[0]['layer']} first in depth; "
                    f"{worst['layer']} highest, {worst['relative']:.1f}x its running average)")  # fmt: skip
            lines.append((step, text))
    return [text for _, text in sorted(lines, key=lambda t: t[0])]
