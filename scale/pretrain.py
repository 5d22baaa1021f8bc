"""MoCo v3 pretraining entry point.

    python -m scale.pretrain                                   # the CPU demo (recipe cpu_demo)
    python -m scale.pretrain --recipe vit_b_300ep --data.source=/data/in1k/train-*.tar
    torchrun --nproc_per_node 8 scale/pretrain.py --recipe vit_bn_l7_300ep
    deepspeed scale/pretrain.py --deepspeed ds_configs/zero2.json --recipe vit_l_300ep
    python -m scale.pretrain --recipe vit_s_300ep --help-config   # every field with its docstring

Overrides are `--section.field=value` (see `scale/config.py`); a wrong key, type, value, name or file
is a one-line error naming the field and the fix, found before anything is built or written
(`scale.preflight`; `--check` runs only those checks, `--debug` shows tracebacks). Launchers may pass
`--local_rank`; it is read from the environment instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

if __package__ in (None, ""):  # run by path (`python scale/pretrain.py`, the DeepSpeed launcher)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))

from scale.config import ConfigError, apply_overrides, describe  # noqa: E402
from scale.entry import launch_rank as _rank  # noqa: E402
from scale.entry import setup_logging, user_errors  # noqa: E402
from scale.recipes import FINETUNE_RECIPES, PRETRAIN_RECIPES, get_recipe  # noqa: E402
from scale.train.preemption import Preempted, watch_signal  # noqa: E402  (torch-free, as everything above)

log = logging.getLogger("scale")


def parse(argv: list[str] | None = None, task: str = "pretrain", doc: str | None = None):
    """The command line of `scale.pretrain` or (`task='finetune'`) `scale.finetune`: the recipe,
    the launcher and backend shorthands, the config actions, and `--section.field=value` overrides."""
    recipes, default = (PRETRAIN_RECIPES, "cpu_demo") if task == "pretrain" else (FINETUNE_RECIPES, "fashion_finetune")
    parser = argparse.ArgumentParser(
        description=doc or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--recipe", default=default, help=f"one of: {', '.join(recipes)} (default {default})")
    if task == "finetune":
        parser.add_argument("--pretrained", metavar="CHECKPOINT", default=None,
                            help="backbone to fine-tune (run directory, checkpoint, release, state dict, export "
                                 "folder); none: random init")  # fmt: skip
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--deepspeed",
        metavar="JSON",
        default=None,
        help="DeepSpeed ZeRO config (ds_configs/zero2.json): sets the backend",
    )
    parser.add_argument(
        "--parallel",
        metavar="BACKEND",
        default=None,
        help="shorthand: single, ddp, fsdp, or a DeepSpeed config of ds_configs/ by name (zero1, zero2, zero3, ...)",
    )
    parser.add_argument("--help-config", action="store_true", help="print every config field and exit")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (default: one line)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the command line without training: config, data sources, DeepSpeed config; exit",
    )
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--") and "." in a.split("=", 1)[0])]
    if bad:
        parser.error(f"unrecognised arguments {bad}; overrides look like --section.field=value (see --help-config)")
    return args, rest


def shorthand_overrides(args) -> list[str]:
    """`--deepspeed JSON` and `--parallel NAME` as config overrides."""
    out = []
    if args.parallel:
        name = args.parallel
        if name.startswith("zero"):
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            path = os.path.join(root, "ds_configs", f"{name}.json")
            if not os.path.isfile(path):
                raise ConfigError(f"--parallel {name}: no ds_configs/{name}.json; use single, ddp, fsdp or zero1/2/3")
            out += ["--parallel.backend=deepspeed", f"--parallel.deepspeed_config={path}"]
        else:
            out.append(f"--parallel.backend={name}")
    if args.deepspeed:
        out += ["--parallel.backend=deepspeed", f"--parallel.deepspeed_config={args.deepspeed}"]
    return out


def main(argv: list[str] | None = None, task: str = "pretrain", doc: str | None = None) -> dict:
    """Parse, check everything that can be checked before any process group or model exists
    (`scale.preflight`), then train (`task`: 'pretrain', or 'finetune' for `scale.finetune`). A
    user error ends in one line and exit status 1 (`--debug`: the traceback); nothing is written
    before the checks pass."""
    setup_logging()
    args, overrides = parse(argv, task, doc)
    try:
        wrong = FINETUNE_RECIPES if task == "pretrain" else PRETRAIN_RECIPES
        if args.recipe in wrong and task == "pretrain":
            raise ConfigError(f"--recipe {args.recipe} is a fine-tuning recipe: run it with scale-finetune "
                              f"(python -m scale.finetune --recipe {args.recipe} --pretrained RUN)")  # fmt: skip
        if args.recipe in wrong:
            raise ConfigError(f"--recipe {args.recipe} is a pretraining recipe, not a fine-tuning recipe; choose one "
                              f"of: {', '.join(FINETUNE_RECIPES)}")  # fmt: skip
        cfg = get_recipe(args.recipe)
        pretrained = getattr(args, "pretrained", None)
        extra = [f"--finetune.pretrained={pretrained}"] if pretrained is not None else []
        # The shorthands come last: they win over the defaults a launcher script passes before them.
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
        # Before torch is imported: a preemption signal during the start-up is recorded, not fatal.
        try:
            watch_signal(cfg.run.preempt_signal, cfg.run.preempt_check_every)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        from scale.preflight import preflight  # imports torch: only now that the preemption handler is set

        preflight(cfg)
        if args.check:
            start = f", pretrained {cfg.finetune.pretrained or '(random init)'}" if task == "finetune" else ""
            print(f"ok: recipe {cfg.recipe}{start}, data {cfg.data.source}, backend {cfg.parallel.backend}")
            return {}
        return train(cfg)


def train(cfg) -> dict:
    """Train `cfg` (checked by `preflight`) to the end or to a preemption: MoCo v3 pretraining, or
    fine-tuning when the recipe's task says so."""
    if cfg.task == "finetune":
        return finetune(cfg)
    from scale.train.trainer import Trainer  # the training stack, after the preemption handler (`main`)

    try:
        trainer = Trainer(cfg)
        result = trainer.fit()
        if cfg.data.eval_source and cfg.data.knn_train_source:
            pretrained = trainer.knn_monitor()
            random_init = trainer.knn_random_init()
            result.update(knn_top1=pretrained, knn_top1_random_init=random_init)
            if trainer.backend.is_main:
                print(
                    f"kNN top-1 on {cfg.data.eval_source} (k={cfg.monitor.knn_k}): pretrained {pretrained:.1f}% "
                    f"vs the same backbone at random init {random_init:.1f}%"
                )
        return result
    except Preempted as e:  # a complete checkpoint was written; requeued under SLURM
        if _rank() == 0:
            log.warning("%s", e)
        return {"step": e.step, "preempted": True, "requeued": e.requeued}


def finetune(cfg) -> dict:
    """Fine-tune `cfg` (checked by `preflight`) to the end or to a preemption (`scale.eval.finetune`)."""
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
    """Console-script entry (`scale-pretrain`): exit status 0 on success."""
    main()


if __name__ == "__main__":
    cli()
