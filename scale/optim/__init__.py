"""Optimizers, parameter groups and schedules."""

from scale.optim.optimizers import LARS, Lamb, build_optimizer, param_groups, set_lr_wd
from scale.optim.schedules import cosine, lr_at, momentum_at, weight_decay_at

__all__ = [
    "LARS",
    "Lamb",
    "build_optimizer",
    "cosine",
    "lr_at",
    "momentum_at",
    "param_groups",
    "set_lr_wd",
    "weight_decay_at",
]
