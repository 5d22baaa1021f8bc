"""Optimizers, parameter groups and schedules."""

from scale.optim.optimizers import (
    LARS,
    Lamb,
    build_optimizer,
    layer_decay_scale,
    param_groups,
    set_lr_wd,
    supports_device_skip,
)
from scale.optim.schedules import cosine, lr_at, momentum_at, weight_decay_at

__all__ = [
    "LARS",
    "Lamb",
    "build_optimizer",
    "cosine",
    "lr_at",
    "momentum_at",
    "layer_decay_scale",
    "param_groups",
    "set_lr_wd",
    "supports_device_skip",
    "weight_decay_at",
]
