"""Convert a MoCo v3 checkpoint for the tools that fine-tune or probe it.

    scale-convert-checkpoint runs/vit_b_300ep vit_b_timm                          # timm export folder
    scale-convert-checkpoint runs/vit_b_300ep vit_b_timm1k --num-classes 1000     # + a zero classifier
    scale-convert-checkpoint runs/fashion_finetune fashion_vit                    # a fine-tuned classifier
    scale-convert-checkpoint runs/vit_b_300ep vit_b_deit.pth --format deit        # DeiT's main.py --finetune
    scale-convert-checkpoint runs/vit_b_300ep vit_b_moco.pth.tar --format moco    # the authors' main_lincls.py
    scale-convert-checkpoint vit-b-300ep.pth.tar vit_b_timm --model vit_base      # the authors' release
    scale-convert-checkpoint r-50-1000ep.pth.tar r50_tv.pth --format torchvision  # torchvision's resnet50

SRC: a run directory of this project (its newest checkpoint) or one of its checkpoint directories,
from any backend (single, DDP, FSDP2, DeepSpeed ZeRO-1/2/3), pretraining or fine-tuning, the authors'
release, or a timm state dict. Formats:
- `timm` (default): an export folder that carries its architecture (`scale.models.export`):
  config.json with timm's architecture and every model argument (MoCo v3's ViT-S has 12 heads,
  timm's vit_small_patch16_224 6) and model.safetensors. `timm.create_model("local-dir:OUT",
  pretrained=True[, num_classes=N])` builds the right model; timm's train.py takes `--model
  local-dir:OUT --pretrained`. A fine-tuning run's export keeps its classifier; `--num-classes N`
  adds a zero-initialised one to a backbone. ViT-BN and the conv stem, which timm cannot build,
  get scale's description only (`load_export`, `scale-finetune --pretrained OUT`).
- `deit`: `{'model': backbone, 'arch', 'model_args'}` without the head, as the authors'
  convert_to_deit.py writes it; refused where DeiT's models differ (ViT-S's 12 heads, ViT-BN).
- `torchvision` (ResNets): the backbone as torchvision's `resnet50` state dict, without `fc` (load it
  into a model whose `fc` is `nn.Identity()`, or the authors' main_lincls.py way, non-strictly), or
  with `--num-classes N` a zero-initialised `fc` that `resnet50(num_classes=N)` loads strictly; the
  authors' conversion for fine-tuning and detection.
- `moco`: the whole MoCo v3 model in the authors' layout (`{'epoch', 'arch', 'state_dict':
  {'module.base_encoder.*', 'module.momentum_encoder.*', 'module.predictor.*'}}`), for their
  main_lincls.py and main_moco.py --resume.
Each output is verified before it is written: strictly into scale's own model, and as the consumer
loads it (timm's model built from the export folder alone gives the same outputs). DST is never SRC
or inside it; an existing DST is replaced only with --overwrite; files are written whole (renamed
into place) with the umask's permissions.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from pathlib import Path

# torch-free: the command line and the paths are checked before the model stack is imported (in `convert`)
from scale.arguments import (
    NON_NEGATIVE,
    POSITIVE,
    OutputExistsError,
    Parser,
    check_creatable,
    refuse_inside,
    write_atomic,
)
from scale.entry import run_cli
from scale.errors import CheckpointError

log = logging.getLogger("scale.convert")
FORMATS = ("timm", "deit", "moco", "torchvision")
EXPORT_FILES = ("config.json", "model.safetensors")  # what makes a folder an export (scale.models.export)


def check_paths(src: str | os.PathLike, dst: str | os.PathLike, fmt: str = "timm", overwrite: bool = False) -> None:
    """Refuse, before anything is read: a missing SRC; a DST that is SRC, inside it or holds it; an
    existing DST without `overwrite` (and with it, anything but a file for a file format or an
    export folder for timm: --overwrite never removes other folders); a DST that cannot be created."""
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise FileNotFoundError(f"SRC {src} does not exist; give a run directory, a checkpoint directory or a file")
    if src.is_file() and src.stat().st_size == 0:
        raise CheckpointError(f"SRC {src} is empty (0 bytes): a save or copy that did not finish? give a whole file")
    refuse_inside(dst, "DST", src, "SRC")
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"DST {dst} exists; pass --overwrite to replace it, or choose a new name")
        if fmt == "timm" and not all((dst / f).is_file() for f in EXPORT_FILES):
            raise OutputExistsError(f"DST {dst} exists and is not an export folder ({' and '.join(EXPORT_FILES)}): "
                                    "--overwrite replaces only an earlier export; choose a new name")  # fmt: skip
        if fmt != "timm" and not dst.is_file():
            raise IsADirectoryError(f"DST {dst} is a folder; --format {fmt} writes a file: choose a file name")
    check_creatable(dst)


def _source_state(src: Path, model: str | None) -> tuple[dict, str, dict | None, int]:
    """(checkpoint mapping, architecture name, the run's config or None, epoch) of `src`."""
    from scale.eval.backbone import architecture, resolve_run_checkpoint, run_model_state
    from scale.safe_load import load_safely

    ckpt_dir = resolve_run_checkpoint(src) if src.is_dir() else None
    if ckpt_dir is not None:
        client = load_safely(ckpt_dir / "client.pt")
        try:
            config = client["config"]
            name = config["model"]["name"]
            steps_per_epoch = max(1, int(client.get("derived", {}).get("steps_per_epoch", 1)))
            epoch = int(client["step"]) // steps_per_epoch
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{ckpt_dir / 'client.pt'} is not a client state scale wrote (no {e}); give a "
                                  "checkpoint directory of a scale run") from None  # fmt: skip
        sd, _ = run_model_state(ckpt_dir)
        return {"state_dict": sd}, name, config, epoch
    if src.is_dir():
        raise CheckpointError(f"SRC {src} is a folder but no run or checkpoint directory of scale (no "
                              "checkpoints/step-*/client.pt); give a run directory, one of its step-* folders, or "
                              "a checkpoint file")  # fmt: skip
    try:
        ckpt = load_safely(src)
    except (CheckpointError, OSError):
        raise
    except Exception as e:  # noqa: BLE001 - the unpickler's own errors on a file that is no torch file (a KeyError for text)
        raise CheckpointError(f"SRC {src} is not a readable torch file ({type(e).__name__}: {str(e)[:120]}); give a "
                              "checkpoint that scale or torch.save wrote") from None  # fmt: skip
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"SRC {src} holds a {type(ckpt).__name__}, not a checkpoint (a mapping of tensors)")
    name = architecture(ckpt, model, src)
    return ckpt, name, None, int(ckpt.get("epoch", 0)) if isinstance(ckpt.get("epoch"), int) else 0


def _check_model_name(model: str | None) -> None:
    from scale.models import RESNET_PRESETS, VIT_ALIASES, VIT_PRESETS, is_resnet

    if model is not None and model not in VIT_PRESETS and model not in VIT_ALIASES and not is_resnet(model):
        raise ValueError(f"--model {model!r} unknown: one of {', '.join([*sorted(VIT_PRESETS), *RESNET_PRESETS])}")


def convert(
    src: Path,
    dst: Path,
    model: str | None = None,
    encoder: str = "base_encoder",
    fmt: str = "timm",
    num_classes: int = 0,
    overwrite: bool = False,
    **vit_overrides,
) -> dict:
    """Write checkpoint `src` to `dst` in format `fmt`; returns what was written. `dst` is never
    `src` or inside it, and an existing `dst` is replaced only with `overwrite`."""
    import torch

    from scale.config import config_from_dict
    from scale.models import ResNet, build_backbone
    from scale.models.export import export_backbone, timm_model_args
    from scale.models.formats import backbone_state_dict, load_backbone

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
    src, dst = Path(src), Path(dst)
    check_paths(src, dst, fmt, overwrite)
    _check_model_name(model)
    ckpt, name, config, epoch = _source_state(src, model)
    if config is not None:
        vit_overrides = {**config_from_dict(config).model.vit_overrides(), **vit_overrides}
    backbone = build_backbone(name, **vit_overrides)
    resnet = isinstance(backbone, ResNet)
    if fmt in ("deit", "torchvision") and resnet == (fmt == "deit"):
        raise ValueError(f"--format {fmt} is for {'ViTs' if fmt == 'deit' else 'ResNets'}; {name} takes "
                         f"{'torchvision, timm or moco' if resnet else 'timm, deit or moco'}")  # fmt: skip
    if fmt == "moco":
        out = _moco(ckpt, name, config, epoch, vit_overrides)
    elif fmt == "timm":
        finetuned = config is not None and config.get("task") == "finetune"
        _load_for_export(backbone, ckpt, encoder, finetuned)
        meta = {"model": name, "source": str(src), "encoder": encoder, "epoch": epoch,
                "task": config.get("task", "pretrain") if config else None}  # fmt: skip
        export_backbone(backbone, dst, num_classes, meta, overwrite=overwrite)
        return {"folder": str(dst)}
    else:
        sd = backbone_state_dict(ckpt, encoder=encoder)
        load_backbone(backbone, sd)  # strict: names every missing and unexpected key
        if resnet:
            out = _torchvision(backbone, num_classes)
        else:
            _verify_deit(backbone, sd)
            out = {"model": sd, "arch": name, "model_args": timm_model_args(backbone.cfg)[1]}
    write_atomic(dst, lambda f: torch.save(out, f), overwrite)
    log.info("wrote %s (%s format, %s) to %s", name, fmt, encoder if fmt != "moco" else "whole model", dst)
    return out


def _load_for_export(backbone, ckpt: dict, encoder: str, finetuned: bool) -> None:
    """The backbone's weights, strictly; a fine-tuning run's with its classifier."""
    from scale.models.formats import (
        backbone_state_dict,
        check_keys,
        describe_backbone,
        head_prefix,
        load_backbone,
        unwrap_state_dict,
    )

    if not finetuned:
        load_backbone(backbone, backbone_state_dict(ckpt, encoder=encoder))
        return
    from scale.models.classifier import attach_classifier

    prefix = f"{encoder}."
    sd = {k[len(prefix) :]: v for k, v in unwrap_state_dict(ckpt).items() if k.startswith(prefix)}
    head = head_prefix(sd)
    if f"{head}weight" not in sd:
        raise CheckpointError(f"the fine-tuning checkpoint has no {prefix}{head}weight (its classifier)")
    attach_classifier(backbone, sd[f"{head}weight"].shape[0])
    check_keys(backbone.state_dict(), sd, describe_backbone(backbone))
    backbone.load_state_dict(sd, strict=True)


def _torchvision(backbone, num_classes: int) -> dict:
    """torchvision's keys, verified by a strict load into torchvision's own architecture."""
    import torchvision
    from torch import nn

    from scale.models.formats import export_torchvision_state_dict

    out = export_torchvision_state_dict(backbone, num_classes=num_classes)
    model = getattr(torchvision.models, backbone.cfg.name)(num_classes=num_classes or 1000)
    if not num_classes:
        model.fc = nn.Identity()
    model.load_state_dict(out, strict=True)
    return out


# Heads of timm's ViT models by width (DeiT-Ti/S/B, ViT-L/H): DeiT's main.py builds one of these by name.
TIMM_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}


def _verify_deit(backbone, sd: dict) -> None:
    """DeiT's main.py builds its model by name (`--model deit_small_patch16_224`), which must have the
    backbone's architecture: ViT-BN and the conv stem have none, and MoCo v3's ViT-S (12 heads) is
    not DeiT-S (6 heads, the same weight shapes: it would load and compute something else). Then as
    main.py --finetune loads it: non-strictly into a model with a classifier, which must then miss
    exactly the classifier."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from scale.models.export import timm_model_args
    from scale.models.formats import timm_kwargs

    cfg = backbone.cfg
    if timm_model_args(cfg) is None:
        raise ValueError("--format deit: DeiT has no model for ViT-BN or the conv stem; use --format timm "
                         "(an export folder that scale.models.export.load_export builds)")  # fmt: skip
    if TIMM_HEADS.get(cfg.embed_dim, cfg.num_heads) != cfg.num_heads:
        raise ValueError(f"--format deit: this backbone has {cfg.num_heads} heads but DeiT's and timm's "
                         f"{cfg.embed_dim}-wide ViT has {TIMM_HEADS[cfg.embed_dim]} (same weight shapes: it would "
                         "load and compute something else); use --format timm, a folder that timm builds with "
                         "the right number of heads (timm.create_model('local-dir:OUT', pretrained=True))")  # fmt: skip
    model = TimmViT(**{**timm_kwargs(cfg), "num_classes": 1000})
    msg = model.load_state_dict(sd, strict=False)
    if set(msg.missing_keys) != {"head.weight", "head.bias"} or msg.unexpected_keys:
        raise CheckpointError(f"DeiT layout check failed: missing {msg.missing_keys}, unexpected {msg.unexpected_keys}")


def _moco(ckpt: dict, name: str, config: dict | None, epoch: int, vit_overrides: dict) -> dict:
    from scale.models import build_moco
    from scale.models.formats import load_moco_checkpoint, official_state

    if config is not None:
        m = config["model"]
        moco = build_moco(name, dim=m["dim"], mlp_dim=m["mlp_dim"], temperature=m["temperature"], **vit_overrides)
    else:
        moco = build_moco(name, **vit_overrides)
    load_moco_checkpoint(moco, ckpt)  # strict over both encoders and the predictor
    return official_state(moco, epoch=epoch, arch=name)


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="scale-convert-checkpoint", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("src", metavar="SRC", type=Path,
                   help="run / checkpoint directory, or a .pth.tar (the authors') / .pth file")  # fmt: skip
    p.add_argument("dst", metavar="DST", type=Path,
                   help="output folder (timm) or file (deit, torchvision, moco); never inside SRC")  # fmt: skip
    p.add_argument("--format", default="timm", choices=FORMATS)
    p.add_argument("--model", help="backbone name (default: the run's, or the checkpoint's 'arch')")
    p.add_argument("--encoder", default="base_encoder", choices=["base_encoder", "momentum_encoder"])
    p.add_argument("--num-classes", type=NON_NEGATIVE, default=0,
                   help="timm / torchvision formats: add a zero classifier of N classes")  # fmt: skip
    p.add_argument("--img-size", type=POSITIVE, help="default: the run's, else 224")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST (a file, or an earlier export)")
    p.add_argument("--trust-checkpoint-code", action="store_true",
                   help="read SRC with pickle's full unpickler: only for files from a source you trust, since they "
                   "can then run code on this machine (default: weights and data only)")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    if args.num_classes and args.format in ("deit", "moco"):
        p.error(f"argument --num-classes: --format {args.format} has no classifier; leave --num-classes out")
    check_paths(args.src, args.dst, args.format, args.overwrite)  # before torch is imported
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.trust_checkpoint_code:
        from scale.safe_load import trust_checkpoint_code

        trust_checkpoint_code()  # the user's explicit choice, logged
    overrides = {"img_size": args.img_size} if args.img_size else {}
    return convert(args.src, args.dst, args.model, args.encoder, args.format, args.num_classes, args.overwrite,
                   **overrides)  # fmt: skip


def cli() -> None:
    """Command-line entry: one-line errors, `--debug` for the traceback."""
    run_cli(main)


if __name__ == "__main__":
    cli()
