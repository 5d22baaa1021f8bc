"""Events in the paper's instruments (Sec. 4, Fig. 4-5), detected host-side on values already read:
a layer's gradient above `spike_threshold` times its running average is a spike, and the delay from
a spike in the first layer to the next one in the last layers is reported; a dense kNN value that
falls below its running average by more than `dip_points` (and three standard errors of the
measurement) is a dip."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


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
