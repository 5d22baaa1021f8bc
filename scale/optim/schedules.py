"""Schedules as pure functions of the optimizer step (applied every iteration, as the authors').

The authors evaluate them at fractional epochs (epoch + i / iters_per_epoch); with
t = step / steps_per_epoch that is the same function of the step.
"""

from __future__ import annotations

import math

__all__ = ["cosine", "lr_at", "momentum_at", "weight_decay_at"]


def cosine(progress: float, start: float, end: float) -> float:
    """Half-cycle cosine from `start` (progress 0) to `end` (progress 1)."""
    progress = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, lr: float, warmup_steps: int, total_steps: int, start_lr: float = 0.0,
          end_lr: float = 0.0) -> float:  # fmt: skip
    """Linear warmup from `start_lr` (0: the authors' pretraining) to `lr` over `warmup_steps`, then a
    half-cycle cosine to `end_lr` at `total_steps` (fine-tuning: DeiT's 1e-6 and 1e-5)."""
    if step < warmup_steps:
        return start_lr + (lr - start_lr) * step / warmup_steps
    return cosine((step - warmup_steps) / max(1, total_steps - warmup_steps), lr, end_lr)


def weight_decay_at(step: int, weight_decay: float, final_weight_decay: float | None, total_steps: int) -> float:
    """Constant (the authors'), or a cosine to `final_weight_decay` when it is given."""
    if final_weight_decay is None:
        return weight_decay
    return cosine(step / max(1, total_steps), weight_decay, final_weight_decay)


def momentum_at(step: float, total_steps: float, base: float = 0.99, final: float = 1.0) -> float:
    """Momentum-encoder coefficient: a half-cycle cosine from `base` at step 0 to `final` at
    `total_steps`; with final = 1 this is the authors' `1 - 0.5 * (1 + cos(pi * t / T)) * (1 - m0)`,
    with t in fractional epochs or steps."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    return cosine(step / total_steps, base, final)
