"""Estimate the memory a run needs per rank before building anything, and refuse runs that cannot
fit: the backend's model state (`scale.parallel.memory`) plus the activations of the model laid out
by `scale.train.parallelize` (docs/scaling.md has the arithmetic)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from scale.config import Config
from scale.errors import BackendError
from scale.models.vit import ViTConfig
from scale.parallel.base import Backend
from scale.train.parallelize import backbone_config, build_model

log = logging.getLogger(__name__)

GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    model_state: float
    """Bytes per rank of parameters, gradients, optimizer state and the momentum encoder."""
    activations: float
    """Bytes per rank the base encoder keeps for its backward (both views, one micro-batch)."""
    available: float
    """Bytes this rank may use: its GPU's memory, or its share of the host's available memory."""

    @property
    def total(self) -> float:
        return self.model_state + self.activations

    def summary(self) -> str:
        return (
            f"model state {self.model_state / GIB:.1f} GiB + activations {self.activations / GIB:.1f} GiB = "
            f"{self.total / GIB:.1f} GiB per rank, {self.available / GIB:.1f} GiB available"
        )


def available_bytes(device: torch.device, world_size: int) -> float:
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return info.get("MemAvailable", info.get("MemTotal", 0)) / max(1, local)


def activation_bytes(
    vit_cfg: ViTConfig, batch_per_device: int, precision: str, activation_checkpointing: bool
) -> float:
    """34 x tokens x width bytes per block per image in 16 bits (Korthikanti et al. 2022, fused
    attention), 2 x tokens x width with checkpointing plus one block being recomputed; two views
    (with joint views the block recomputed holds both, as counted here; per view, one at a time)."""
    scale = 1.0 if precision in ("bf16", "fp16") else 2.0
    per_block = 34 * vit_cfg.num_tokens * vit_cfg.embed_dim * scale
    if activation_checkpointing:
        per_image = 2 * vit_cfg.num_tokens * vit_cfg.embed_dim * scale * vit_cfg.depth + per_block
    else:
        per_image = per_block * vit_cfg.depth
    return 2 * batch_per_device * per_image


def count_params(cfg: Config) -> tuple[int, int]:
    """(trainable, momentum-encoder) parameter counts of the MoCo v3 model of `cfg` (on meta)."""
    with torch.device("meta"):
        model = build_model(cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.momentum_encoder.parameters())


def estimate(cfg: Config, backend: Backend, batch_per_device: int) -> MemoryEstimate:
    trainable, momentum = count_params(cfg)
    return MemoryEstimate(
        model_state=sum(backend.state_bytes(trainable, momentum, cfg.batch.grad_accum_steps).values()),
        activations=activation_bytes(
            backbone_config(cfg), batch_per_device, backend.precision, cfg.parallel.activation_checkpointing
        ),
        available=available_bytes(backend.device, backend.world_size),
    )


def check_memory(cfg: Config, backend: Backend, batch_per_device: int, headroom: float = 0.9) -> MemoryEstimate:
    """Log the estimate; refuse (BackendError) when it exceeds `headroom` of what is available."""
    est = estimate(cfg, backend, batch_per_device)
    log.info("memory estimate: %s", est.summary())
    if est.total > headroom * est.available:
        raise BackendError(
            f"this run needs about {est.summary()}: it would not fit. Shard the model state "
            "(--parallel.backend=fsdp or --deepspeed ds_configs/zero3.json), set "
            "--parallel.activation_checkpointing=true, lower --batch.batch_size_per_device with "
            "--batch.grad_accum_steps, or use more ranks (docs/scaling.md); "
            "--parallel.skip_memory_check=true starts it anyway"
        )
    return est
