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
from scale.models import build_backbone
from scale.models.flops import resnet_convs
from scale.models.resnet import ResNetConfig
from scale.models.vit import ViTConfig
from scale.parallel.base import Backend
from scale.parallel.recompute import recompute_mode
from scale.train.parallelize import backbone_config, build_model

log = logging.getLogger(__name__)

GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    model_state: float
    """Bytes per rank of parameters, gradients, optimizer state and the momentum encoder."""
    activations: float
    """Bytes per rank kept for the backward: the base encoder's activations (both views, one
    micro-batch) and autocast's 16-bit weight copies."""
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
    backbone: ViTConfig | ResNetConfig, batch_per_device: int, precision: str, activation_checkpointing: bool | str
) -> float:
    """Bytes the base encoder keeps for the backward, both views of `batch_per_device` images: a
    ViT's (`vit_activation_bytes`) or a ResNet's (`resnet_activation_bytes`)."""
    if isinstance(backbone, ResNetConfig):
        return resnet_activation_bytes(backbone, batch_per_device, precision, activation_checkpointing)
    return vit_activation_bytes(backbone, batch_per_device, precision, activation_checkpointing)


def resnet_activation_bytes(
    cfg: ResNetConfig, batch_per_device: int, precision: str, activation_checkpointing: bool | str
) -> float:
    """Bytes a ResNet keeps for the backward, both views of `batch_per_device` images.

    Per crop, in units of each convolution's output elements (`scale.models.flops.resnet_convs`) x
    b bytes (2 in bf16/fp16, where cuDNN's BatchNorm and the cross-rank one keep the maps' dtype;
    4 in fp32): a convolution followed by BatchNorm and ReLU keeps the BatchNorm's input and the
    ReLU's output (the next convolution's input, the same tensor): 2; a block's last convolution
    the same (its ReLU after the residual add): 2; the projection shortcut its BatchNorm's input: 1;
    the stem 2, then the max pool's output (b) and its int64 indices (8), and the image (b). With
    recompute each stage keeps its input and one stage is recomputed at a time; selective recompute
    keeps every convolution's output (1) and recomputes one stage's BatchNorms and ReLUs at a time.
    Equal to the saved tensors of the real forward within 2% (tests/unit/test_resnet.py). At the
    step's peak the cross-rank BatchNorm's fp32 arithmetic on the largest map (one crop's layer1
    output) adds 14 + 2b bytes per element of it, as `benchmarks.simulate` measures the real step
    (without this term the simulated peak is 1.06-1.16x the plan; one process needs a little less)."""
    b = 2 if precision in ("bf16", "fp16") else 4
    convs = resnet_convs(cfg)
    weight = {"stem": 2, "conv": 2, "last": 2, "shortcut": 1}
    pool = convs[0].outputs // 4
    stem = b * (2 * convs[0].outputs + pool + cfg.in_chans * cfg.img_size**2) + 8 * pool
    stages = [sum(weight[c.kind] * c.outputs * b for c in convs if c.stage == s) for s in range(1, 5)]
    inputs = [pool * b] + [[c.outputs for c in convs if c.stage == s and c.kind == "last"][-1] * b for s in (1, 2, 3)]
    mode = recompute_mode(activation_checkpointing)
    if mode == "full":
        kept = stem + sum(inputs) + max(stages)
    elif mode == "selective":
        outputs = [sum(c.outputs * b for c in convs if c.stage == s) for s in range(1, 5)]
        kept = stem + sum(inputs) + sum(outputs) + max(st - o for st, o in zip(stages, outputs, strict=True))
    else:
        kept = stem + sum(stages)
    transient = (14 + 2 * b) * max(c.outputs for c in convs)  # one view's BatchNorm at a time
    return batch_per_device * (2 * kept + transient)


def vit_activation_bytes(
    vit_cfg: ViTConfig, batch_per_device: int, precision: str, activation_checkpointing: bool | str
) -> float:
    """Bytes the base encoder's blocks keep for the backward, both views of `batch_per_device` images.

    Per block and image, in units of tokens x width (s x h) bytes, as the blocks run under autocast
    with the residual stream in fp32 (no dropout, fused attention): the two LayerNorms' fp32 inputs
    8; the bf16 inputs of the qkv, proj and fc1 matmuls 2 + 2 + 2 and of fc2 8; attention's q, k, v
    and output 8; GELU's input 8: 38 in bf16/fp16, 68 in fp32 (Korthikanti et al. 2022 count 34 with
    16-bit LayerNorm inputs and dropout masks); ViT-BN's cross-rank BatchNorm keeps its fp32 input,
    as the LayerNorm it replaces (`_CrossRankNorm`: no more). With
    checkpointing each block keeps its fp32 input (4) and one block is recomputed at a time (with
    joint views holding both, as counted here); selective recompute keeps the input and the outputs
    of the matmuls and attention (qkv 6, attention 2, proj 2, fc1 8, fc2 2: 20 in 16 bits) and
    recomputes one block's rest at a time. `benchmarks.simulate` measures the real step at
    0.97-1.02x of this plus `autocast_copy_bytes` and the layout's buffers (docs/scaling.md)."""
    low = precision in ("bf16", "fp16")
    s_h = vit_cfg.num_tokens * vit_cfg.embed_dim
    per_block = (8 + (30 if low else 60)) * s_h
    mode = recompute_mode(activation_checkpointing)
    if mode == "full":
        kept = 4 * s_h * vit_cfg.depth + per_block
    elif mode == "selective":  # the input and the matmul / attention outputs; one block's rest recomputed
        matmuls = (20 if low else 40) * s_h  # qkv 6, attention 2, proj 2, fc1 8, fc2 2 (16-bit)
        kept = (4 * s_h + matmuls) * vit_cfg.depth + per_block - matmuls
    else:
        kept = per_block * vit_cfg.depth
    return 2 * batch_per_device * kept


def autocast_copy_bytes(trainable: int, precision: str, activation_checkpointing: bool | str,
                        casts: bool = True) -> float:  # fmt: skip
    """The 16-bit copies of the trained weights autocast makes in the forward and keeps for the
    backward (its cast cache): 2 bytes per trained parameter where fp32 parameters run under bf16/fp16
    autocast (single, DDP, DeepSpeed's bf16) and the forward is not recomputed; none where the
    weights already are 16-bit (`casts=False`: FSDP2 gathers them in bf16, DeepSpeed's fp16)."""
    if not casts or recompute_mode(activation_checkpointing) != "none" or precision not in ("bf16", "fp16"):
        return 0.0
    return 2.0 * trainable


def count_params(cfg: Config) -> tuple[int, int]:
    """(trainable, momentum-encoder) parameter counts of the MoCo v3 model of `cfg` (on meta); when
    fine-tuning, of the backbone with its classifier (every parameter trained) and of its EMA."""
    if cfg.task == "finetune":
        with torch.device("meta"):
            backbone = build_backbone(cfg.model.name, **cfg.model.vit_overrides())
        trainable = sum(p.numel() for n, p in backbone.named_parameters() if not n.startswith(("head.", "fc.")))
        trainable += (cfg.finetune.num_classes or 1000) * (backbone.num_features + 1)
        return trainable, trainable if cfg.finetune.ema_decay > 0 else 0
    with torch.device("meta"):
        model = build_model(cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.momentum_encoder.parameters())


def _casts_weights(backend: Backend) -> bool:
    """Whether autocast casts fp32 weights on `backend` (FSDP2 gathers them in bf16 already)."""
    return backend.autocast_dtype is not None and backend.name not in ("fsdp", "hsdp")


def estimate(cfg: Config, backend: Backend, batch_per_device: int) -> MemoryEstimate:
    trainable, momentum = count_params(cfg)
    ac = cfg.parallel.activation_checkpointing
    crops = 0.5 if cfg.task == "finetune" else 1.0  # fine-tuning: one crop per image, not MoCo's two views
    return MemoryEstimate(
        model_state=sum(
            backend.state_bytes(trainable, momentum, cfg.batch.grad_accum_steps, cfg.parallel.shard_size).values()
        ),
        activations=activation_bytes(backbone_config(cfg), batch_per_device, backend.precision, ac) * crops
        + autocast_copy_bytes(trainable, backend.precision, ac, casts=_casts_weights(backend)),
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
