"""Linear probe of a frozen backbone (the paper's protocol: the authors' main_lincls.py).

    python -m scale.linear_probe runs/cpu_demo --train demo --val demo:val --epochs 30 --batch-size 256
    torchrun --nproc_per_node 8 -m scale.linear_probe runs/vit_b_300ep \\
        --train /data/in1k-shards/train-*.tar --val /data/in1k-shards/val-*.tar          # ImageNet, 90 epochs
    python -m scale.linear_probe vit-b-300ep.pth.tar --model vit_base --train ... --val ...  # the authors' release
    python -m scale.linear_probe RUN --train ... --val ... --lrs 0.3,1,3,10,30 --bn       # a sweep in one pass

CHECKPOINT: a run directory of this project (its newest checkpoint), one of its checkpoint
directories (any backend: single, DDP, FSDP2, DeepSpeed ZeRO-1/2/3), the authors' MoCo v3 release,
a timm ViT or a torchvision ResNet state dict (these need --model unless they name their
architecture). A ResNet-50 is probed on its 2048-d pooled features with the authors' settings for it
(base lr 0.1, batch 1024, 90 epochs, SGD momentum 0.9, no weight decay).
Results: OUT/linear_probe.{md,json}, metrics.jsonl, TensorBoard. docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

if __package__ in (None, ""):  # run by path
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))

from scale.entry import evaluation_entry, run_cli, setup_logging  # noqa: E402  (torch-free)

log = logging.getLogger("scale")


def parse(argv=None) -> argparse.Namespace:
    # Here and in `main`, the evaluation stack (torch) is imported after the arguments are read: --help
    # and wrong arguments answer at once.
    from scale.eval.backbone import add_checkpoint_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(
        p,
        "labelled training data: shards, an image folder, or demo",
        "labelled validation data (demo:val for the digits)",
    )
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--batch-size", type=int, default=1024, help="global batch")
    p.add_argument(
        "--lrs",
        help="comma-separated base lrs, one head each (lr = base x batch / 256); default: the "
        "authors' main_lincls.py, 3 for a ViT (their command line), 0.1 for a ResNet (their default)",
    )
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--bn", action="store_true", help="affine-free BatchNorm before the heads (MAE's probe)")
    p.add_argument("--no-augment", action="store_true", help="evaluation crops for training too; features cached")
    p.add_argument("--crop-size", type=int, help="default: the run's img_size, else 224")
    p.add_argument("--crop-min", type=float, default=0.08, help="RandomResizedCrop's smallest area (authors': 0.08)")
    p.add_argument("--no-flip", action="store_true", help="no horizontal flips (e.g. digits, text)")
    p.add_argument("--labels-per-class", type=int, default=0,
                   help="low-shot probe: train on N labelled samples per class (with --no-augment)")  # fmt: skip
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--eval-every", type=int, default=10, help="epochs between evaluations (and the last)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="results folder (default runs/linear_probe/<checkpoint name>)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-tensorboard", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    setup_logging()
    args = parse(argv)
    try:
        lrs = tuple(float(x) for x in (args.lrs or "").split(",") if x.strip())
    except ValueError:
        raise SystemExit(f"error: --lrs {args.lrs!r}: give comma-separated numbers, e.g. 0.3,1,3,10") from None
    import torch
    import torch.distributed as dist

    from scale.eval.backbone import backbone_from_args
    from scale.eval.linear_probe import LinearProbe, ProbeSettings
    from scale.models import is_resnet
    from scale.parallel.launch import init_distributed
    from scale.parallel.placement import plan_placement

    with evaluation_entry():
        init_distributed()
        _, plan = plan_placement()
        device = torch.device("cuda", plan.index) if plan.kind == "cuda" else torch.device("cpu")
        loaded = backbone_from_args(args)
        lrs = lrs or ((0.1,) if is_resnet(loaded.name) else (3.0,))
        crop = args.crop_size or loaded.model.cfg.img_size
        if crop != loaded.model.cfg.img_size:
            raise ValueError(f"--crop-size {crop}: the backbone was built for {loaded.model.cfg.img_size} px")
        settings = ProbeSettings(
            epochs=args.epochs, batch_size=args.batch_size, base_lrs=lrs, momentum=args.momentum,
            weight_decay=args.weight_decay, batchnorm=args.bn, augment=not args.no_augment, crop_size=crop,
            crop_min=args.crop_min, flip=not args.no_flip, labels_per_class=args.labels_per_class,
            num_workers=args.workers, seed=args.seed, eval_every=args.eval_every, precision=args.precision,
            progress=not args.no_progress, tensorboard=not args.no_tensorboard,
        )  # fmt: skip
        name = os.path.basename(os.path.normpath(args.checkpoint)).removesuffix(".tar").removesuffix(".pth")
        out = args.out or os.path.join("runs", "linear_probe", name)
        result = LinearProbe(loaded, args.train, args.val, out, settings, device).run()
        if result and (not dist.is_initialized() or dist.get_rank() == 0):
            best = result["best"]
            print(f"linear probe of {result['checkpoint']}: top-1 {best['top1']:.2f}% top-5 {best['top5']:.2f}% "
                  f"(best base lr {best['base_lr']:g} of {len(result['lrs'])}); {result['features_per_s']:.0f} frozen "
                  f"features/s per rank; {out}/linear_probe.md")  # fmt: skip
        return result


def cli() -> None:
    """Console-script entry (`scale-linear-probe`): one-line errors, `--debug` for the traceback."""
    run_cli(main)


if __name__ == "__main__":
    cli()
