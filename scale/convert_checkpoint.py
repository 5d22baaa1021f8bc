"""Convert a MoCo v3 checkpoint (the authors' release or scale's) into a timm ViT state dict.

    scale-convert-checkpoint vit-b-300ep.pth.tar vit_b_moco_timm.pth --model vit_base

The output is the backbone alone (no projector, predictor or momentum encoder), keyed as timm's
VisionTransformer, ready for `timm.create_model(..., pretrained_cfg_overlay=dict(file=...))` or
`model.load_state_dict(torch.load(...), strict=False)` before fine-tuning. It is verified by
loading it strictly into `scale.models.build_vit(--model)` (and into timm's equivalent, where
one exists) before it is written.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from scale.models.checkpoints import (
    backbone_state_dict,
    build_timm_vit,
    load_backbone,
    read_checkpoint,
    save_atomic,
)
from scale.models.vit import VIT_ALIASES, VIT_PRESETS, build_vit

log = logging.getLogger("scale.convert")


def convert(src: Path, dst: Path, model: str | None = None, encoder: str = "base_encoder", **vit_overrides) -> dict:
    """Write the timm backbone state dict of checkpoint `src` to `dst`; returns it."""
    ckpt = read_checkpoint(src)
    arch = ckpt.get("arch") if isinstance(ckpt.get("arch"), str) else None
    name = model or arch
    if name is None or (name not in VIT_PRESETS and name not in VIT_ALIASES):
        raise ValueError(
            f"cannot tell the architecture of {src} (arch={arch!r}); pass --model with one of "
            f"{', '.join(sorted(VIT_PRESETS))}"
        )
    sd = backbone_state_dict(ckpt, encoder=encoder)
    backbone = build_vit(name, **vit_overrides)
    load_backbone(backbone, sd)  # strict: names every missing and unexpected key
    try:
        build_timm_vit(backbone.cfg).load_state_dict(sd, strict=True)
    except ValueError as e:  # ViT-BN / conv stem: no timm equivalent
        log.warning("%s; written with timm names, load it with scale.models.build_vit(%r)", e, name)
    save_atomic(sd, dst)
    log.info("wrote %d tensors of %s (%s) to %s", len(sd), name, encoder, dst)
    return sd


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="MoCo v3 checkpoint (.pth.tar from the authors, or scale's)")
    parser.add_argument("dst", type=Path, help="output .pth (timm backbone state dict)")
    parser.add_argument("--model", help="backbone name (default: the checkpoint's 'arch')")
    parser.add_argument("--encoder", default="base_encoder", choices=["base_encoder", "momentum_encoder"])
    parser.add_argument("--img-size", type=int, default=224)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    convert(args.src, args.dst, args.model, args.encoder, img_size=args.img_size)


if __name__ == "__main__":
    main()
