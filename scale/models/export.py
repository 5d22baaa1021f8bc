"""Exports that carry their architecture: a folder with the weights in safetensors and a config.json
from which the consumer builds the right model without guessing.

    out/config.json          timm's (the Hugging Face hub layout): "architecture", "model_args"
                             (every argument: MoCo v3's ViT-S has 12 heads where timm's
                             vit_small_patch16_224 has 6), "pretrained_cfg" (input size, ImageNet
                             mean / std, crop 0.875, bicubic); plus "scale": this project's own
                             description (the backbone's full config, where it came from)
    out/model.safetensors    the backbone (timm's / torchvision's keys), with a classifier `head.*`
                             (`fc.*`) when it has one

    timm.create_model("local-dir:out", pretrained=True)                  # the backbone, as exported
    timm.create_model("local-dir:out", pretrained=True, num_classes=10)  # a new classifier
    scale.models.export.load_export("out")                               # scale's own model

ViT-BN and the convolutional stem have no timm equivalent: their config.json holds only the "scale"
section, and `load_export` (or `scale-finetune --pretrained out`, the probes) builds them. A
ResNet's export is timm's `resnet50` (torchvision's keys and architecture).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scale.errors import CheckpointError
from scale.models.resnet import ResNet, ResNetConfig, build_resnet
from scale.models.vit import VisionTransformer, ViTConfig

log = logging.getLogger(__name__)

WEIGHTS, CONFIG = "model.safetensors", "config.json"
# ImageNet's statistics and DeiT's evaluation crop: what scale's models are trained and evaluated with.
DATA_CONFIG = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "crop_pct": 0.875,
               "interpolation": "bicubic"}  # fmt: skip
_TIMM_VIT_NAMES = {(16, 384): "vit_small_patch16_224", (16, 768): "vit_base_patch16_224",
                   (16, 1024): "vit_large_patch16_224", (14, 1280): "vit_huge_patch14_224"}  # fmt: skip


def timm_model_args(cfg: ViTConfig | ResNetConfig) -> tuple[str, dict[str, Any]] | None:
    """(timm architecture, JSON-serialisable model arguments) that build `cfg`'s backbone in timm
    without a classifier; None where timm has no equivalent (ViT-BN, the conv stem)."""
    if isinstance(cfg, ResNetConfig):
        return cfg.name, {"num_classes": 0}
    if cfg.use_bn or cfg.conv_stem or cfg.norm_eps != 1e-6:  # timm's ViT LayerNorm eps is 1e-6
        return None
    args = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=0,
                embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                qkv_bias=cfg.qkv_bias, class_token=cfg.pool == "cls",
                global_pool="token" if cfg.pool == "cls" else "avg", fc_norm=False, final_norm=cfg.pool == "cls",
                pos_embed="none" if cfg.pos_embed == "none" else "learn")  # fmt: skip
    return _TIMM_VIT_NAMES.get((cfg.patch_size, cfg.embed_dim), "vit_base_patch16_224"), args


def describe(backbone: VisionTransformer | ResNet) -> dict[str, Any]:
    """The backbone's family and full config, as `load_export` rebuilds it."""
    family = "resnet" if isinstance(backbone, ResNet) else "vit"
    return {"family": family, "config": dataclasses.asdict(backbone.cfg)}


def _head_name(backbone: nn.Module) -> str:
    return getattr(backbone, "head_name", "head")


def export_backbone(backbone: VisionTransformer | ResNet, dst: str | os.PathLike, num_classes: int = 0,
                    meta: dict[str, Any] | None = None, overwrite: bool = False) -> Path:  # fmt: skip
    """Write `backbone` as an export folder `dst`, verified before it is moved in: timm builds it
    from the folder alone and gives the same outputs (where timm has the architecture), and
    `load_export` gives back the same weights. An existing `dst` is an error, unless `overwrite` and
    it is an earlier export (no other folder is ever replaced).

    The classifier: the backbone's own when it has one (a fine-tuned model: a Linear head); else,
    with `num_classes`, a zero-initialised one; else none.
    """
    dst = Path(dst)
    if dst.exists() and not (overwrite and is_export(dst)):
        raise CheckpointError(f"{dst} already exists; exports never overwrite"
                              + (" a folder that is not an export" if overwrite else " without --overwrite")
                              + ": choose a new folder")  # fmt: skip
    head = getattr(backbone, _head_name(backbone))
    if isinstance(head, nn.Linear):
        num_classes = head.out_features
        sd = {k: v.detach().cpu().contiguous().clone() for k, v in backbone.state_dict().items()}
    else:
        prefix = f"{_head_name(backbone)}."
        sd = {k: v.detach().cpu().contiguous().clone() for k, v in backbone.state_dict().items()
              if not k.startswith(prefix)}  # fmt: skip
        if num_classes:
            sd[f"{prefix}weight"] = torch.zeros(num_classes, backbone.num_features)
            sd[f"{prefix}bias"] = torch.zeros(num_classes)
    scale_meta = {**describe(backbone), "num_classes": num_classes, **(meta or {})}
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_folder(dst.parent, f".{dst.name}.")
    try:
        timm_arch = timm_model_args(backbone.cfg)
        if timm_arch is not None:
            _write_timm(tmp, sd, *timm_arch, num_classes)
        else:
            from safetensors.torch import save_file

            save_file(sd, str(tmp / WEIGHTS))
        config = json.loads((tmp / CONFIG).read_text()) if (tmp / CONFIG).is_file() else {}
        config["scale"] = scale_meta
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, default=list))
        verify_export(tmp, backbone)
        for f in tmp.iterdir():  # safetensors writes owner-only files: the folder's mode (the umask's) instead
            os.chmod(f, tmp.stat().st_mode & 0o666)
        _move_in(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (%s) to %s", scale_meta["config"].get("name", "vit"),
             f"timm {timm_arch[0]}" if timm_arch else "scale only: no timm equivalent", dst)  # fmt: skip
    return dst


def _new_folder(parent: Path, prefix: str) -> Path:
    """A new folder with the umask's permissions (as mkdir gives; tempfile's are owner-only)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}.tmp"
        try:
            path.mkdir(mode=0o777)
            return path
        except FileExistsError:
            continue


def _move_in(tmp: Path, dst: Path) -> None:
    """Rename the finished folder `tmp` to `dst`; an earlier export there (replaced only with
    --overwrite, checked by the caller) is set aside first and removed once the new one is in."""
    if not dst.exists():
        os.rename(tmp, dst)  # fails if anything but an empty folder appeared there meanwhile
        return
    old = _new_folder(dst.parent, f".{dst.name}.replaced-")
    try:
        os.replace(dst, old)  # `old` is an empty folder: replaced by the earlier export
    except BaseException:
        old.rmdir()
        raise
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_timm(folder: Path, sd: dict[str, torch.Tensor], arch: str, args: dict[str, Any], num_classes: int) -> None:
    import timm
    from timm.models._hub import save_for_hf

    args = {**args, "num_classes": num_classes}
    model = timm.create_model(arch, pretrained=False, **args)
    model.load_state_dict(sd, strict=True)  # timm's names, every key
    save_for_hf(model, str(folder), model_args=args, safe_serialization=True, data_config=dict(DATA_CONFIG))


def is_export(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CONFIG).is_file() and (p / WEIGHTS).is_file()


def read_export_meta(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    try:
        meta = json.loads((p / CONFIG).read_text())["scale"]
        meta["config"], meta["family"]  # noqa: B018 (present)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{p / CONFIG} has no readable 'scale' section ({e}); not an export of scale") from None
    return meta


def build_from_meta(meta: dict[str, Any], **overrides) -> VisionTransformer | ResNet:
    """The backbone an export describes (no weights), with config `overrides` (e.g. img_size)."""
    cfg = dict(meta["config"])
    cfg.update(overrides)
    if meta["family"] == "resnet":
        return build_resnet(cfg.pop("name"), **cfg)
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    return VisionTransformer(ViTConfig(**{k: v for k, v in cfg.items() if k in fields}))


def export_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / WEIGHTS))


def load_export(path: str | os.PathLike, with_head: bool = True, **overrides) -> VisionTransformer | ResNet:
    """scale's backbone from an export folder, loaded strictly; with the export's classifier as a
    Linear head when it has one and `with_head`."""
    meta = read_export_meta(path)
    model = build_from_meta(meta, **overrides)
    sd = export_state_dict(path)
    head = f"{_head_name(model)}."
    if with_head and meta.get("num_classes"):
        from scale.models.classifier import attach_classifier

        attach_classifier(model, int(meta["num_classes"]))
    else:
        sd = {k: v for k, v in sd.items() if not k.startswith(head)}
    model.load_state_dict(sd, strict=True)
    return model


@torch.no_grad()
def verify_export(folder: Path, backbone: VisionTransformer | ResNet) -> None:
    """The consumer's view of an export equals `backbone`: `load_export` gives the same state, and
    where timm has the architecture, timm's model built from the folder alone the same outputs."""
    rebuilt = load_export(folder)
    ours = {k: v for k, v in backbone.state_dict().items() if not k.startswith(f"{_head_name(backbone)}.")}
    theirs = rebuilt.state_dict()
    bad = [k for k, v in ours.items() if k not in theirs or not torch.equal(v.cpu(), theirs[k])]
    if bad:
        raise CheckpointError(f"export check failed: {len(bad)} tensors differ after reloading (e.g. {bad[0]})")
    meta = read_export_meta(folder)
    if timm_model_args(backbone.cfg) is None:
        return
    import timm

    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    size = backbone.cfg.img_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    was = backbone.training
    backbone.eval()
    try:
        head = getattr(backbone, _head_name(backbone))
        expected = backbone(x) if isinstance(head, nn.Linear) else backbone.pooled_features(x)
        if meta.get("num_classes") and not isinstance(head, nn.Linear):
            expected = torch.zeros(2, meta["num_classes"])  # a zero classifier
        got = model(x)
    finally:
        backbone.train(was)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
        raise CheckpointError(f"export check failed: timm's model built from {folder} gives other outputs "
                              f"(max difference {(got - expected).abs().max().item():.3g})")  # fmt: skip
