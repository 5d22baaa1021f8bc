"""Offline kNN evaluation of a frozen backbone on the whole training set (Wu et al. 2018, as the
paper): cosine similarity, k in {10, 20, 100, 200}, weights exp(sim / 0.07).

    python -m scale.knn_eval runs/cpu_demo --train demo --val demo:val
    torchrun --nproc_per_node 8 -m scale.knn_eval runs/vit_b_300ep --train /data/in1k-shards/train-*.tar \\
        --val /data/in1k-shards/val-*.tar

Each rank extracts the features of its share of both sets (Resize + CenterCrop) and keeps them;
the search is sharded (`scale.train.knn`): no rank holds the whole bank. Results: OUT/knn.{md,json}
(default OUT: runs/knn_eval/<run>-step-N), written atomically; an earlier evaluation's are kept
unless --overwrite (which sets them aside). Every argument is checked first (`scale.eval.inputs`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run by path
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))

from scale.entry import evaluation_entry, run_cli, setup_logging  # noqa: E402  (torch-free)

log = logging.getLogger("scale")


RESULTS = ("knn.json", "knn.md")


def parser() -> argparse.ArgumentParser:
    # Here and in `main`, the model and the data are touched only after every argument is checked.
    from scale.eval.inputs import OneLineParser, add_checkpoint_args  # torch-free: wrong arguments answer at once

    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_checkpoint_args(p, "labelled data whose features form the bank", "labelled queries")
    p.add_argument("--ks", default="10,20,100,200")
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--batch-size", type=int, default=256, help="images per rank per forward")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--out", help="results folder (default runs/knn_eval/<run>-step-N, or the file's name)")
    p.add_argument("--overwrite", action="store_true",
                   help="set an earlier evaluation's results in OUT aside (to OUT/replaced-<time>/)")  # fmt: skip
    p.add_argument("--check", action="store_true", help="check the arguments, checkpoint, data and output; exit")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return p


def parse(argv=None) -> argparse.Namespace:
    return parser().parse_args(argv)


def check(args):
    """Every argument, before the model or the data are touched and before anything is written:
    (ks, checkpoint, (train source, val source), output plan)."""
    from scale.eval import inputs

    inputs.check_rules(args, inputs.KNN_RULES)
    ks = inputs.parse_ks(args.ks)
    ckpt = inputs.check_checkpoint(args.checkpoint, args.model, args.random_init)
    sources = inputs.check_sources(args.train, args.val)
    out = Path(args.out) if args.out else inputs.default_out("knn_eval", ckpt, args.encoder, args.random_init)
    inputs.check_out_location(out, ckpt, (args.train, args.val))
    return ks, ckpt, sources, inputs.plan_output(out, RESULTS, RESULTS, args.overwrite)


def main(argv=None) -> dict:
    setup_logging()
    args = parse(argv)
    with evaluation_entry():
        ks, ckpt, (train_src, val_src), plan = check(args)
        if args.check:
            print(f"ok: kNN of {ckpt.path} on {args.train} / {args.val}, results in {plan.describe()}")
            return {}
        return evaluate(args, ks, ckpt, train_src, val_src, plan)


def evaluate(args, ks, ckpt, train_src, val_src, plan) -> dict:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from scale.data.labelled import eval_batches
    from scale.eval.backbone import backbone_from_args
    from scale.eval.inputs import apply_plan, plan_output, write_atomic
    from scale.parallel.launch import init_distributed
    from scale.parallel.placement import plan_placement
    from scale.train.knn import knn_classify

    init_distributed()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    _, placement = plan_placement()
    device = torch.device("cuda", placement.index) if placement.kind == "cuda" else torch.device("cpu")
    comm = device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")
    args.checkpoint = str(ckpt.path)  # resolved by the checks: every rank reads the same checkpoint
    loaded = backbone_from_args(args)
    backbone = loaded.model.to(device)
    dtype = torch.bfloat16 if args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda") \
        else None  # fmt: skip
    seconds, images = 0.0, 0

    @torch.no_grad()
    def features(src) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal seconds, images
        feats, labels = [], []
        for x, y in eval_batches(src, rank=rank, world_size=world, crop_size=backbone.cfg.img_size,
                                 batch_size=args.batch_size, num_workers=args.workers, device=device):  # fmt: skip
            t = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                f = backbone.pooled_features(x).float()
            seconds += time.perf_counter() - t
            images += x.shape[0]
            feats.append(F.normalize(f, dim=1).to(comm))
            labels.append(y.to(comm))
        dim = backbone.cfg.embed_dim
        return (torch.cat(feats) if feats else torch.zeros(0, dim, device=comm),
                torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64, device=comm))  # fmt: skip

    bank, bank_y = features(train_src)
    queries, query_y = features(val_src)
    acc = knn_classify(queries, query_y, bank, bank_y, ks=ks, temperature=args.temperature)
    result = {"checkpoint": loaded.source, "checkpoint_kind": loaded.kind, "pretrain_step": loaded.step,
              "model": loaded.name, "train_source": args.train, "val_source": args.val, "world_size": world,
              "temperature": args.temperature, "top1": {str(k): v for k, v in acc.items()},
              "features_per_s_per_rank": images / max(seconds, 1e-9)}  # fmt: skip
    if rank == 0:
        # Decided again now: another evaluation may have written there while this one ran.
        plan = plan_output(plan.out, RESULTS, RESULTS, args.overwrite)
        aside = apply_plan(plan)
        if aside is not None:
            log.warning("--overwrite: the earlier results %s moved to %s", ", ".join(plan.set_aside), aside)
        lines = [f"# kNN: {loaded.name} from {loaded.source}", "",
                 f"bank {args.train}, queries {args.val}, T = {args.temperature}, {world} rank(s), "
                 f"{result['features_per_s_per_rank']:.0f} frozen features/s per rank.", "",
                 "| k | top-1 |", "|---:|---:|", *(f"| {k} | {v:.2f} |" for k, v in acc.items())]  # fmt: skip
        write_atomic(plan.out / "knn.md", "\n".join(lines) + "\n")
        write_atomic(plan.out / "knn.json", json.dumps(result, indent=1))
        print(f"kNN top-1 of {loaded.source}: " + ", ".join(f"k={k} {v:.2f}%" for k, v in acc.items())
              + f"; {result['features_per_s_per_rank']:.0f} frozen features/s per rank; {plan.out}/knn.md")  # fmt: skip
    return result


def cli() -> None:
    """Console-script entry (`scale-knn-eval`): one-line errors, `--debug` for the traceback."""
    run_cli(main)


if __name__ == "__main__":
    cli()
