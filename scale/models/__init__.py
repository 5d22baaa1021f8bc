"""Models: ViT backbones, MoCo v3, FLOPs and weights in other formats. No torch.distributed here."""

from scale.models.moco import KeyGather, LocalKeys, MoCoV3, build_mlp, build_moco
from scale.models.vit import VIT_ALIASES, VIT_PRESETS, VisionTransformer, ViTConfig, build_vit, resolve_vit_config

__all__ = [
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
