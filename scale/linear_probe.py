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
Results: OUT/linear_probe.{md,json} (written atomically), metrics.jsonl, TensorBoard; default OUT
runs/linear_probe/<run>-step-N (a file: its name). Every argument is checked first, before the model
or the data are touched (`--check` does only that; slurm/launch.sh runs it once before the ranks
start). An earlier evaluation's results in OUT are kept unless --overwrite (which sets them aside);
an unfinished probe of the same settings there is resumed from OUT/probe_state.pt, which the
preemption signal (SIGUSR2) writes before the job requeues itself. docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run by path
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))

from scale.entry import evaluation_entry, run_cli, setup_logging  # noqa: E402  (torch-free)
from scale.errors import ConfigError  # noqa: E402

log = logging.getLogger("scale")


def parser() -> argparse.ArgumentParser:
    # Here and in `main`, the model and the data are touched only after every argument is checked.
    from scale.eval.inputs import OneLineParser, add_checkpoint_args  # torch-free: wrong arguments answer at once

    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
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
    p.add_argument("--out", help="results folder (default runs/linear_probe/<run>-step-N, or the file's name)")
    p.add_argument("--overwrite", action="store_true",
                   help="set an earlier evaluation's files in OUT aside (to OUT/replaced-<time>/)")  # fmt: skip
    p.add_argument("--check", action="store_true",
                   help="check the arguments, checkpoint, data and output folder; exit (slurm/launch.sh runs it "
                        "once before the ranks start)")  # fmt: skip
    p.add_argument("--preempt-signal", default="USR2",
                   help="signal that saves the probe's state and stops it (requeued under SLURM); none")  # fmt: skip
    p.add_argument("--preempt-check-every", type=int, default=20,
                   help="steps between the ranks' checks for the signal (and at every epoch's end)")  # fmt: skip
    p.add_argument("--max-requeues", type=int, default=50,
                   help="do not requeue a SLURM job restarted this many times (0: never requeue)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-tensorboard", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return p


def parse(argv=None) -> argparse.Namespace:
    return parser().parse_args(argv)


@dataclass
class Checked:
    """The command line, checked: what to load, where to write, what makes it this evaluation."""

    checkpoint: Any
    lrs: tuple[float, ...]
    train_src: Any
    val_src: Any
    out: Path
    plan: Any
    identity: dict[str, Any]
    world: int


def check(args, world: int | None = None) -> Checked:
    """Every argument, before the model or the data are touched and before anything is written; a
    `ConfigError` names the argument (one line from `main`)."""
    from scale.eval import inputs

    inputs.check_rules(args, inputs.PROBE_RULES)
    lrs = inputs.parse_lrs(args.lrs)
    inputs.check_signal(args.preempt_signal)
    if args.labels_per_class and not args.no_augment:
        raise ConfigError(f"--labels-per-class {args.labels_per_class} works on cached features: add --no-augment")
    world = world or inputs.world_size(check=args.check)
    if args.batch_size % world:
        raise ConfigError(f"--batch-size {args.batch_size} does not split over {world} ranks; use a multiple of "
                          f"{world}")  # fmt: skip
    # Only now the evaluation stack (torch): the arguments above answer at once.
    from scale.eval.linear_probe import OWNED, RESULTS, SETTINGS

    ckpt = inputs.check_checkpoint(args.checkpoint, args.model, args.random_init)
    train_src, val_src = inputs.check_sources(args.train, args.val)
    identity = {
        "checkpoint": str(ckpt.path), "model": args.model, "encoder": args.encoder, "random_init": args.random_init,
        "train": args.train, "val": args.val, "epochs": args.epochs, "batch_size": args.batch_size,
        "lrs": list(lrs) or None, "momentum": args.momentum, "weight_decay": args.weight_decay, "bn": args.bn,
        "augment": not args.no_augment, "crop_size": args.crop_size, "crop_min": args.crop_min,
        "flip": not args.no_flip, "labels_per_class": args.labels_per_class, "seed": args.seed,
        "eval_every": args.eval_every, "precision": args.precision, "world_size": world,
    }  # fmt: skip
    out = Path(args.out) if args.out else inputs.default_out("linear_probe", ckpt, args.encoder, args.random_init)
    if ckpt.given_run_dir and not args.overwrite:
        out = _unfinished_probe_of_the_run(args, ckpt, identity, out, SETTINGS, RESULTS)
    inputs.check_out_location(out, ckpt, (args.train, args.val))
    plan = inputs.plan_output(out, OWNED, RESULTS, args.overwrite, SETTINGS, identity)
    return Checked(ckpt, lrs, train_src, val_src, out, plan, identity, world)


def _unfinished_probe_of_the_run(args, ckpt, identity, out, settings_name, results) -> Path:
    """CHECKPOINT is a run directory, whose newest checkpoint may have changed since this probe was
    started and stopped (a requeued job, the same command again): the unfinished probe of one of its
    checkpoints with these settings is resumed, on its checkpoint, rather than a new one started."""
    from scale.eval.inputs import read_settings

    folders = [out] if args.out else sorted(out.parent.glob(f"{ckpt.run_dir.name}-step-*"))
    found = []
    for folder in folders:
        earlier = read_settings(folder / settings_name)
        if earlier is None or any((folder / name).exists() for name in results):
            continue
        then = Path(str(earlier.get("checkpoint", "")))
        same = {k: v for k, v in earlier.items() if k != "checkpoint"} == {
            k: v for k, v in identity.items() if k != "checkpoint"}  # fmt: skip
        if same and then.parent == ckpt.path.parent and (then / "client.pt").is_file():
            found.append(((folder / settings_name).stat().st_mtime_ns, folder, then))
    if not found:
        return out
    _, folder, then = max(found)  # the latest started
    if then != ckpt.path:
        log.warning("resuming the unfinished probe of %s in %s on its checkpoint %s (newer: %s; name a checkpoint "
                    "directory to probe another)", ckpt.run_dir, folder, then.name, ckpt.path.name)  # fmt: skip
        ckpt.path = then
        identity["checkpoint"] = str(then)
    return folder


def main(argv=None) -> dict:
    setup_logging()
    args = parse(argv)
    from scale.train.preemption import Preempted, watch_signal

    with evaluation_entry():
        from scale.eval.inputs import check_signal

        # As early as the signal is known: one during the checks or the start-up (the backbone, the
        # feature cache) is acted on at the first check, not fatal.
        check_signal(args.preempt_signal)
        watch = watch_signal(args.preempt_signal, max(1, args.preempt_check_every))
        checked = check(args)
        if args.check:
            print(f"ok: linear probe of {checked.checkpoint.path} on {args.train} / {args.val}, "
                  f"{checked.world} rank(s), results in {checked.plan.describe()}")  # fmt: skip
            return {}
        import torch
        import torch.distributed as dist

        from scale.eval.backbone import backbone_from_args
        from scale.eval.linear_probe import LinearProbe, ProbeSettings
        from scale.models import is_resnet
        from scale.parallel.launch import init_distributed
        from scale.parallel.placement import plan_placement

        init_distributed()
        _, plan = plan_placement()
        device = torch.device("cuda", plan.index) if plan.kind == "cuda" else torch.device("cpu")
        # The checkpoint resolved by the checks: every rank, and a resumed probe, read the same one.
        args.checkpoint = str(checked.checkpoint.path)
        loaded = backbone_from_args(args)
        lrs = checked.lrs or ((0.1,) if is_resnet(loaded.name) else (3.0,))
        crop = args.crop_size or loaded.model.cfg.img_size
        if crop != loaded.model.cfg.img_size:
            raise ConfigError(f"--crop-size {crop}: the backbone was built for {loaded.model.cfg.img_size} px")
        settings = ProbeSettings(
            epochs=args.epochs, batch_size=args.batch_size, base_lrs=lrs, momentum=args.momentum,
            weight_decay=args.weight_decay, batchnorm=args.bn, augment=not args.no_augment, crop_size=crop,
            crop_min=args.crop_min, flip=not args.no_flip, labels_per_class=args.labels_per_class,
            num_workers=args.workers, seed=args.seed, eval_every=args.eval_every, precision=args.precision,
            progress=not args.no_progress, tensorboard=not args.no_tensorboard,
        )  # fmt: skip
        out = checked.out
        probe = LinearProbe(loaded, args.train, args.val, out, settings, device, identity=checked.identity,
                            overwrite=args.overwrite, preempt=watch, requeue=args.max_requeues > 0,
                            max_requeues=args.max_requeues, resolved=(checked.train_src, checked.val_src))  # fmt: skip
        try:
            result = probe.run()
        except Preempted as e:  # its state is saved; requeued under SLURM
            return {"step": e.step, "preempted": True, "requeued": e.requeued}
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
