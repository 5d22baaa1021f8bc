"""End-to-end fine-tuning entry point (`scale-finetune`): a pretrained backbone and a linear classifier
trained together with the DeiT recipe the authors fine-tuned with, through pretraining's trainer and
backends (`scale.eval.finetune`).

    python -m scale.finetune --pretrained runs/fashion_demo                 # the CPU demo (fashion_finetune)
    python -m scale.finetune --recipe fashion_finetune                      # the same backbone at random init
    python -m scale.finetune --recipe fashion_finetune_10pct --pretrained runs/fashion_demo
    torchrun --nproc_per_node 8 scale/finetune.py --recipe vit_b_finetune --pretrained vit-b-300ep.pth.tar
    deepspeed scale/finetune.py --deepspeed ds_configs/zero3.json --recipe vit_l_finetune --pretrained runs/vit_l_300ep
    python -m scale.finetune --recipe cifar10_vit_b_transfer --pretrained vit-b-300ep.pth.tar

`--pretrained` takes a run directory or checkpoint of this project (any backend), the authors'
release, a timm / torchvision state dict or an export folder; without it the backbone starts from
random init (the baseline). Overrides are `--section.field=value` as in pretraining
(`--help-config`: the `finetune` section holds DeiT's options); a wrong field, file or batch split is
a one-line error before anything is built (`--check` runs only the checks). The run directory gets
metrics.jsonl (with top-1 / top-5 of the model and its EMA after each epoch), TensorBoard,
checkpoints (the same command resumes) and results.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

if __package__ in (None, ""):  # run by path (`python scale/finetune.py`, the DeepSpeed launcher)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))

from scale.config import ConfigError, apply_overrides, describe  # noqa: E402
from scale.entry import launch_rank as _rank  # noqa: E402
from scale.entry import setup_logging, user_errors  # noqa: E402
from scale.pretrain import shorthand_overrides  # noqa: E402
from scale.recipes import FINETUNE_RECIPES, get_recipe  # noqa: E402
from scale.train.preemption import Preempted, watch_signal  # noqa: E402

log = logging.getLogger("scale")


def parse(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--recipe", default="fashion_finetune",
                        help=f"one of: {', '.join(FINETUNE_RECIPES)} (default fashion_finetune)")  # fmt: skip
    parser.add_argument("--pretrained", metavar="CHECKPOINT", default=None,
                        help="backbone to fine-tune (run directory, checkpoint, release, state dict); none: random "
                             "init")  # fmt: skip
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deepspeed", metavar="JSON", default=None, help="DeepSpeed ZeRO config: sets the backend")
    parser.add_argument("--parallel", metavar="BACKEND", default=None,
                        help="shorthand: single, ddp, fsdp, or zero1 / zero2 / zero3")  # fmt: skip
    parser.add_argument("--help-config", action="store_true", help="print every config field and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.add_argument("--check", action="store_true", help="check the command line without training; exit")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (default: one line)")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--") and "." in a.split("=", 1)[0])]
    if bad:
        parser.error(f"unrecognised arguments {bad}; overrides look like --section.field=value (see --help-config)")
    return args, rest


def main(argv: list[str] | None = None) -> dict:
    """Parse, check (`scale.preflight`), fine-tune; a user error is one line and exit status 1."""
    setup_logging()
    args, overrides = parse(argv)
    try:
        if args.recipe not in FINETUNE_RECIPES:
            raise ConfigError(f"--recipe {args.recipe!r} is not a fine-tuning recipe; choose one of: "
                              f"{', '.join(FINETUNE_RECIPES)}")  # fmt: skip
        cfg = get_recipe(args.recipe)
        extra = [f"--finetune.pretrained={args.pretrained}"] if args.pretrained is not None else []
        cfg = apply_overrides(cfg, [*overrides, *extra, *shorthand_overrides(args)])
    except ConfigError as e:
        if args.debug:
            raise
        raise SystemExit(f"config error: {e}") from None
    if args.help_config:
        print(describe(cfg))
        return {}
    if args.print_config:
        print(cfg.to_json())
        return {}
    with user_errors(args.debug):
        try:
            watch_signal(cfg.run.preempt_signal, cfg.run.preempt_check_every)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        from scale.preflight import preflight

        preflight(cfg)
        if args.check:
            print(f"ok: recipe {cfg.recipe}, pretrained {cfg.finetune.pretrained or '(random init)'}, data "
                  f"{cfg.data.source}, backend {cfg.parallel.backend}")  # fmt: skip
            return {}
        return finetune(cfg)


def finetune(cfg) -> dict:
    """Fine-tune `cfg` (checked by `preflight`) to the end or to a preemption."""
    from scale.eval.finetune import FinetuneTrainer

    try:
        trainer = FinetuneTrainer(cfg)
        result = trainer.fit()
        if trainer.backend.is_main and "top1" in result:
            ema = f"; EMA {result['ema_top1']:.2f}% / {result['ema_top5']:.2f}%" if "ema_top1" in result else ""
            print(f"fine-tuned {cfg.model.name} from {cfg.finetune.pretrained or 'random init'}: top-1 / top-5 on "
                  f"{cfg.data.eval_source} {result['top1']:.2f}% / {result['top5']:.2f}%{ema}")  # fmt: skip
        return result
    except Preempted as e:
        if _rank() == 0:
            log.warning("%s", e)
        return {"step": e.step, "preempted": True, "requeued": e.requeued}


def cli() -> None:
    """Console-script entry (`scale-finetune`)."""
    main()


if __name__ == "__main__":
    cli()
