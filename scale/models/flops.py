"""Analytic multiply-accumulates (MACs) of a ViT or ResNet crop and FLOPs of one MoCo v3 training
image.

Conventions (the paper's Table 3 counts multiply-adds per 224 x 224 crop):
- Counted: every matmul and convolution (patch embedding or conv stem, qkv, the attention
  products QK^T and AV, attention output projection, both MLP layers). Not counted: norms,
  GELU, softmax, additions; they are under 1% of the total at these sizes.
- One training image = 2 crops x (query encoder forward + backward = 3 forward-equivalents,
  momentum encoder forward = 1) = 8 forward passes = 16 x MACs FLOPs (2 FLOPs per MAC).
  The predictor runs on the query side only: 12 x its MACs. Recomputation under activation
  checkpointing is not counted (model FLOPs, not hardware FLOPs). The convention charges the
  frozen patch projection a backward pass that never runs (its weight is frozen and the image needs
  no gradient): half of its share of the total, 0.6% for ViT-S/16, 0.3% for B/16, 0.1% or less
  for L/16, H/14 and the /7 models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from scale.models.resnet import ResNet, ResNetConfig
from scale.models.vit import VisionTransformer, ViTConfig

# Paper Table 3, "FLOPs" column: multiply-adds per 224 x 224 crop, in G (R-50 is its reference row).
PAPER_TABLE3_GMACS = {"resnet50": 4.1, "vit_small": 4.6, "vit_base": 17.5, "vit_large": 61.3, "vit_huge": 166.7}
# FLOPs of one training image per MAC of one crop, backbone (see the module docstring).
TRAIN_FLOPS_PER_MAC = 16
PREDICTOR_TRAIN_FLOPS_PER_MAC = 12


@dataclass(frozen=True)
class ViTMacs:
    """MACs of one crop through the backbone, by part."""

    patch_embed: int
    attn_linear: int
    """qkv and output projection, all blocks."""
    attn_matmul: int
    """QK^T and AV, all blocks (quadratic in tokens)."""
    mlp: int

    @property
    def total(self) -> int:
        return self.patch_embed + self.attn_linear + self.attn_matmul + self.mlp


@dataclass(frozen=True)
class HeadMacs:
    projector: int
    predictor: int


@dataclass(frozen=True)
class TrainingFlops:
    """FLOPs of one training image (two crops), by part."""

    backbone: float
    projector: float
    predictor: float

    @property
    def heads(self) -> float:
        return self.projector + self.predictor

    @property
    def total(self) -> float:
        return self.backbone + self.heads


def _stem_macs(cfg: ViTConfig) -> int:
    if not cfg.conv_stem:
        return cfg.num_patches * cfg.in_chans * cfg.patch_size**2 * cfg.embed_dim
    macs, side, c_in, c_out = 0, cfg.img_size, cfg.in_chans, cfg.embed_dim // 8
    for _ in range(4):
        side = (side + 1) // 2  # stride 2, padding 1, kernel 3
        macs += side * side * c_in * c_out * 9
        c_in, c_out = c_out, c_out * 2
    return macs + side * side * c_in * cfg.embed_dim


def vit_macs(cfg: ViTConfig) -> ViTMacs:
    """Analytic MACs of one crop through the backbone described by `cfg` (no head)."""
    N, D, L = cfg.num_tokens, cfg.embed_dim, cfg.depth
    return ViTMacs(
        patch_embed=_stem_macs(cfg),
        attn_linear=L * (N * D * 3 * D + N * D * D),
        attn_matmul=L * 2 * N * N * D,
        mlp=L * 2 * N * D * cfg.mlp_hidden_dim,
    )


def _conv_side(side: int, kernel: int, stride: int) -> int:
    return (side + 2 * (kernel // 2) - kernel) // stride + 1  # torchvision's padding: kernel // 2


@dataclass(frozen=True)
class Conv:
    """One convolution of a ResNet crop: where it is and what it costs."""

    stage: int
    """0 for the stem, 1-4 for `layer1` ... `layer4`."""
    kind: str
    """'stem', 'conv' (followed by BatchNorm and ReLU), 'last' (the block's last: BatchNorm, then the
    residual add and ReLU) or 'shortcut' (the projection shortcut: BatchNorm, then the add)."""
    outputs: int
    """Elements of its output map (channels x side x side)."""
    macs: int


def resnet_convs(cfg: ResNetConfig) -> list[Conv]:
    """Every convolution of one crop through torchvision's ResNet `cfg`, in order: the 7x7 stem,
    then per stage the blocks' convolutions (the stride on a bottleneck's 3x3, as torchvision's
    v1.5) and the first block's 1x1 projection shortcut."""
    side = _conv_side(cfg.img_size, 7, 2)
    convs = [Conv(0, "stem", 64 * side * side, side * side * cfg.in_chans * 64 * 49)]
    side = _conv_side(side, 3, 2)  # max pool
    c_in, bottleneck = 64, cfg.block.expansion == 4
    for stage, blocks in enumerate(cfg.layers):
        planes = 64 * 2**stage
        c_out = planes * cfg.block.expansion
        for b in range(blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            out = _conv_side(side, 3, stride)
            if bottleneck:  # 1x1 reduce, 3x3 (strided), 1x1 expand
                convs += [Conv(stage + 1, "conv", planes * side * side, side * side * c_in * planes),
                          Conv(stage + 1, "conv", planes * out * out, out * out * planes * planes * 9),
                          Conv(stage + 1, "last", c_out * out * out, out * out * planes * c_out)]  # fmt: skip
            else:  # two 3x3
                convs += [Conv(stage + 1, "conv", planes * out * out, out * out * c_in * planes * 9),
                          Conv(stage + 1, "last", planes * out * out, out * out * planes * planes * 9)]  # fmt: skip
            if stride != 1 or c_in != c_out:  # the projection shortcut
                convs.append(Conv(stage + 1, "shortcut", c_out * out * out, out * out * c_in * c_out))
            side, c_in = out, c_out
    return convs


def resnet_macs(cfg: ResNetConfig) -> int:
    """Analytic MACs of one crop through torchvision's ResNet `cfg` (every convolution, no head)."""
    return sum(c.macs for c in resnet_convs(cfg))


def backbone_macs(cfg: ViTConfig | ResNetConfig) -> int:
    """MACs of one crop through the backbone of `cfg`, ViT or ResNet."""
    return resnet_macs(cfg) if isinstance(cfg, ResNetConfig) else vit_macs(cfg).total


def head_macs(embed_dim: int, dim: int = 256, mlp_dim: int = 4096, projector_layers: int = 3) -> HeadMacs:
    """MACs per crop of the projector (3 layers for a ViT, 2 for a ResNet) and the 2-layer
    predictor (bias-free Linears)."""
    hidden = (projector_layers - 2) * mlp_dim * mlp_dim
    return HeadMacs(
        projector=embed_dim * mlp_dim + hidden + mlp_dim * dim,
        predictor=dim * mlp_dim + mlp_dim * dim,
    )


def moco_training_flops(cfg: ViTConfig | ResNetConfig, dim: int = 256, mlp_dim: int = 4096) -> TrainingFlops:
    """FLOPs of one MoCo v3 training image (two crops, forward + backward + momentum forward)."""
    resnet = isinstance(cfg, ResNetConfig)
    heads = head_macs(cfg.embed_dim, dim, mlp_dim, projector_layers=2 if resnet else 3)
    return TrainingFlops(
        backbone=TRAIN_FLOPS_PER_MAC * backbone_macs(cfg),
        projector=TRAIN_FLOPS_PER_MAC * heads.projector,
        predictor=PREDICTOR_TRAIN_FLOPS_PER_MAC * heads.predictor,
    )


def counted_macs(cfg: ViTConfig | ResNetConfig) -> int:
    """MACs of one crop as torch's FlopCounterMode counts them, on the meta device (no memory).

    An independent check of `vit_macs` and `resnet_macs`: it counts what the real module executes
    (fused SDPA is only counted on meta or CUDA tensors, hence meta).
    """
    with torch.device("meta"):
        model = (ResNet(cfg) if isinstance(cfg, ResNetConfig) else VisionTransformer(cfg)).eval()
        x = torch.empty(1, cfg.in_chans, cfg.img_size, cfg.img_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2
