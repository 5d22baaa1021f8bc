"""Model weights in other formats: the authors' MoCo v3 releases, timm ViT state dicts, and our own
(read, checked key by key, exported).

Formats understood:
- official MoCo v3 (`main_moco.py`): `{'epoch', 'arch', 'state_dict', 'optimizer'}` where
  `state_dict` keys are `module.base_encoder.*`, `module.momentum_encoder.*`, `module.predictor.*`,
  the projector stored as the backbone's `head`;
- a bare `MoCoV3.state_dict()` (the same keys without `module.`);
- timm `VisionTransformer` state dicts (raw, or under 'model' / 'state_dict'), classifier
  `head.*` dropped when loading a backbone;
- torchvision ResNet state dicts (and the authors' R-50 releases, whose encoders are torchvision
  ResNets with the projector in `fc`), classifier or projector `fc.*` dropped when loading a
  backbone.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn

from scale.errors import CheckpointError
from scale.models.moco import MoCoV3
from scale.models.resnet import ResNet
from scale.models.vit import VisionTransformer, ViTConfig
from scale.safe_load import load_safely

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
_MOCO_PARTS = ("base_encoder.", "momentum_encoder.", "predictor.")


def read_checkpoint(source: str | os.PathLike | Mapping[str, Any]) -> Mapping[str, Any]:
    """A checkpoint object from a path (loaded on CPU, tensors only) or passed through."""
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; check the path")
    return load_safely(path)


def unwrap_state_dict(ckpt: Mapping[str, Any]) -> StateDict:
    """The tensor dict inside a checkpoint, with a DDP `module.` prefix removed."""
    for key in ("state_dict", "model"):
        if key in ckpt and isinstance(ckpt[key], Mapping):
            ckpt = ckpt[key]
            break
    sd = {k: v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"no tensors found in checkpoint (top-level keys: {sorted(ckpt)[:10]})")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _describe(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def check_keys(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise a CheckpointError naming missing, unexpected and mis-shaped keys."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = sorted(
        f"{k} {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(given)
        if given[k].shape != expected[k].shape
    )
    if missing or unexpected or shapes:
        parts = [f"checkpoint does not match the {what}:"]
        if missing:
            parts.append(f"missing keys: {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_describe(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {_describe(shapes)}")
        parts.append("build the model with the configuration the checkpoint was trained with (name, patch, img_size)")
        raise CheckpointError("\n  ".join(parts))


def load_moco_checkpoint(model: MoCoV3, source: str | os.PathLike | Mapping[str, Any]) -> Mapping[str, Any]:
    """Load an official (or own) MoCo v3 checkpoint into `model`, strictly. Returns the checkpoint."""
    ckpt = read_checkpoint(source)
    sd = unwrap_state_dict(ckpt)
    if not any(k.startswith(_MOCO_PARTS) for k in sd):
        raise CheckpointError(
            "this is not a MoCo v3 checkpoint (no base_encoder./momentum_encoder./predictor. keys); "
            "to load a backbone alone use load_backbone()"
        )
    check_keys(model.state_dict(), sd, "MoCoV3 model")
    model.load_state_dict(sd, strict=True)
    return ckpt


def backbone_state_dict(source: str | os.PathLike | Mapping[str, Any], encoder: str = "base_encoder") -> StateDict:
    """The backbone weights in a MoCo v3 or timm checkpoint, without any head.

    Args:
        encoder: for MoCo v3 checkpoints, which encoder to take ('base_encoder', as the authors'
            linear probe and fine-tuning, or 'momentum_encoder').
    """
    sd = unwrap_state_dict(read_checkpoint(source))
    if any(k.startswith(_MOCO_PARTS) for k in sd):
        prefix = f"{encoder}."
        sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        if not sd:
            raise CheckpointError(
                f"MoCo v3 checkpoint has no {prefix}* keys; encoder must be base_encoder or momentum_encoder"
            )
    if any(k.startswith("fc_norm.") for k in sd):
        raise CheckpointError(
            "checkpoint has fc_norm.* weights: a timm ViT with a LayerNorm after pooling (global_pool='avg' with "
            "fc_norm), which scale's backbones do not have (pool='avg' has no final norm, as in the paper's "
            "ablation); fine-tune it with timm instead"
        )
    head = head_prefix(sd)
    dropped = sorted(k for k in sd if k.startswith(head))
    if dropped:
        log.info("dropping head weights from the checkpoint: %s", _describe(dropped))
    return {k: v for k, v in sd.items() if k not in dropped}


def head_prefix(sd: Mapping[str, Any]) -> str:
    """The key prefix of the head in a backbone state dict: `fc.` for torchvision ResNets (their
    `layer1.*` keys tell), else `head.` (ViTs)."""
    return "fc." if any(k.startswith("layer1.") for k in sd) else "head."


def describe_backbone(model: VisionTransformer | ResNet) -> str:
    if isinstance(model, ResNet):
        return f"backbone ({model.cfg.name}, {model.num_features}-d features)"
    return f"backbone ({model.cfg.embed_dim}-wide, {model.cfg.depth} blocks, patch {model.cfg.patch_size})"


def load_backbone(
    model: VisionTransformer | ResNet, source: str | os.PathLike | Mapping[str, Any], encoder: str = "base_encoder"
) -> None:
    """Load backbone weights (MoCo v3, timm or torchvision checkpoint) into a `build_backbone` model,
    strictly; the model's head is left as it is."""
    sd = backbone_state_dict(source, encoder=encoder)
    head = f"{getattr(model, 'head_name', 'head')}."
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
    check_keys(expected, sd, describe_backbone(model))
    model.load_state_dict(sd, strict=False)


def export_torchvision_state_dict(model: ResNet | MoCoV3, encoder: str = "base_encoder",
                                  num_classes: int = 0) -> StateDict:  # fmt: skip
    """The ResNet backbone as torchvision's state dict (the authors' conversion for fine-tuning and
    detection): every key but the projector; with `num_classes`, a zero-initialised classifier
    `fc.weight` (num_classes, D) and `fc.bias`, so that `torchvision.models.resnet50(num_classes=N)`
    loads it strictly (without: load it into a model whose `fc` is `nn.Identity()`)."""
    backbone = getattr(model, encoder) if isinstance(model, MoCoV3) else model
    if not isinstance(backbone, ResNet):
        raise ValueError(f"a {type(backbone).__name__} is not a ResNet; export it with export_timm_state_dict")
    sd = {k: v.detach().clone().contiguous() for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    if num_classes:
        sd["fc.weight"] = torch.zeros(num_classes, backbone.num_features)
        sd["fc.bias"] = torch.zeros(num_classes)
    return sd


def export_timm_state_dict(model: VisionTransformer | MoCoV3, encoder: str = "base_encoder") -> StateDict:
    """A timm-compatible backbone state dict (no head) for fine-tuning or probing with timm."""
    backbone = getattr(model, encoder) if isinstance(model, MoCoV3) else model
    if isinstance(backbone, ResNet):
        return export_torchvision_state_dict(backbone)  # timm's resnet50 takes torchvision's keys
    if backbone.cfg.use_bn or backbone.cfg.conv_stem:
        log.warning(
            "ViT-BN and conv-stem backbones have no timm VisionTransformer equivalent; the exported keys "
            "follow timm's names but need scale.models.build_vit to load"
        )
    return {k: v.detach().clone().contiguous() for k, v in backbone.state_dict().items() if not k.startswith("head.")}


def official_state(model: MoCoV3, epoch: int = 0, arch: str = "") -> dict[str, Any]:
    """`model` in the authors' checkpoint layout (keys `module.*`, as saved from DDP)."""
    sd = {f"module.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    return {"epoch": epoch, "arch": arch, "state_dict": sd}


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same directory, then rename: never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def timm_kwargs(cfg: ViTConfig) -> dict[str, Any]:
    """Constructor arguments of the timm `VisionTransformer` equivalent to `cfg` (no classifier).

    Raises:
        ValueError: for ViT-BN and the conv stem, which timm's VisionTransformer cannot express.
    """
    if cfg.use_bn or cfg.conv_stem:
        raise ValueError("ViT-BN and conv-stem backbones have no timm VisionTransformer equivalent")
    return dict(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        num_classes=0,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=cfg.qkv_bias,
        norm_layer=partial(nn.LayerNorm, eps=cfg.norm_eps),
        class_token=cfg.pool == "cls",
        global_pool="token" if cfg.pool == "cls" else "avg",
        fc_norm=False,
        final_norm=cfg.pool == "cls",
        pos_embed="none" if cfg.pos_embed == "none" else "learn",
    )


def build_timm_vit(cfg: ViTConfig) -> nn.Module:
    """The timm `VisionTransformer` equivalent to `cfg`; load `export_timm_state_dict` into it."""
    return TimmViT(**timm_kwargs(cfg))
