"""Schedules as pure functions of the optimizer step (applied every iteration, as the authors').

The authors evaluate them at fractional epochs (epoch + i / iters_per_epoch); with
t = step / steps_per_epoch that is the same function of the step.
"""

from __future__ import annotations

import math

from scale.models.moco import momentum_schedule

__all__ = ["cosine", "lr_at", "momentum_at", "weight_decay_at"]


def cosine(progress: float, start: float, end: float) -> float:
    """Half-cycle cosine from `start` (progress 0) to `end` (progress 1)."""
    progress = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then a half-cycle cosine to 0 at `total_steps`."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    return cosine((step - warmup_steps) / max(1, total_steps - warmup_steps), lr, 0.0)


def weight_decay_at(step: int, weight_decay: float, final_weight_decay: float | None, total_steps: int) -> float:
    """Constant (the authors'), or a cosine to `final_weight_decay` when it is given."""
    if final_weight_decay is None:
        return weight_decay
    return cosine(step / max(1, total_steps), weight_decay, final_weight_decay)


def momentum_at(step: int, total_steps: int, base: float = 0.99, final: float = 1.0) -> float:
    """Momentum-encoder coefficient: cosine from `base` to `final` (scale.models.momentum_schedule)."""
    return momentum_schedule(step, total_steps, base, final)
