"""Models: ViT and ResNet backbones, MoCo v3, FLOPs and weights in other formats. No torch.distributed here."""

from scale.models.moco import (
    KeyGather,
    LocalKeys,
    MoCoV3,
    build_backbone,
    build_mlp,
    build_moco,
    resolve_backbone_config,
)
from scale.models.resnet import RESNET_PRESETS, ResNet, ResNetConfig, build_resnet, is_resnet
from scale.models.vit import VIT_ALIASES, VIT_PRESETS, VisionTransformer, ViTConfig, build_vit, resolve_vit_config

__all__ = [
    "RESNET_PRESETS",
    "ResNet",
    "ResNetConfig",
    "build_backbone",
    "build_resnet",
    "is_resnet",
    "resolve_backbone_config",
    "VIT_ALIASES",
    "VIT_PRESETS",
    "KeyGather",
    "LocalKeys",
    "MoCoV3",
    "ViTConfig",
    "VisionTransformer",
    "build_mlp",
    "build_moco",
    "build_vit",
    "resolve_vit_config",
]
