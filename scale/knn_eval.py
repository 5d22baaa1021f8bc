"""Offline kNN evaluation of a frozen backbone on the whole training set (Wu et al. 2018, as the
paper): cosine similarity, k in {10, 20, 100, 200}, weights exp(sim / 0.07).

    python -m scale.knn_eval runs/cpu_demo --train demo --val demo:val
    torchrun --nproc_per_node 8 -m scale.knn_eval runs/vit_b_300ep --train /data/in1k-shards/train-*.tar \\
        --val /data/in1k-shards/val-*.tar

Each rank extracts the features of its share of both sets (Resize + CenterCrop) and keeps them;
the search is sharded (`scale.train.knn`): no rank holds the whole bank. Results: OUT/knn.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):  # run by path
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))

from scale.entry import evaluation_entry, run_cli, setup_logging  # noqa: E402  (torch-free)


def parse(argv=None) -> argparse.Namespace:
    # Here and in `main`, the evaluation stack (torch) is imported after the arguments are read: --help
    # and wrong arguments answer at once.
    from scale.eval.backbone import add_checkpoint_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p, "labelled data whose features form the bank", "labelled queries")
    p.add_argument("--ks", default="10,20,100,200")
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--batch-size", type=int, default=256, help="images per rank per forward")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--out", help="results folder (default runs/knn_eval/<checkpoint name>)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    setup_logging()
    args = parse(argv)
    try:
        ks = tuple(int(k) for k in args.ks.split(","))
        if not ks or min(ks) < 1:
            raise ValueError
    except ValueError:
        raise SystemExit(f"error: --ks {args.ks!r}: give comma-separated positive integers (10,20,100,200)") from None
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from scale.data.labelled import check_labels, eval_batches
    from scale.data.sources import resolve_source
    from scale.errors import DataError
    from scale.eval.backbone import backbone_from_args
    from scale.parallel.launch import init_distributed
    from scale.parallel.placement import plan_placement
    from scale.train.knn import knn_classify

    with evaluation_entry():
        init_distributed()
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        _, plan = plan_placement()
        device = torch.device("cuda", plan.index) if plan.kind == "cuda" else torch.device("cpu")
        comm = device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")
        loaded = backbone_from_args(args)
        backbone = loaded.model.to(device)
        dtype = torch.bfloat16 if args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda") \
            else None  # fmt: skip
        train_src, val_src = resolve_source(args.train), resolve_source(args.val)
        for src, name in ((train_src, args.train), (val_src, args.val)):
            if sum(src.counts) == 0:
                raise DataError(f"{name} holds no samples")
            check_labels(src, name)
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
            name = os.path.basename(os.path.normpath(args.checkpoint)).removesuffix(".tar").removesuffix(".pth")
            out = args.out or os.path.join("runs", "knn_eval", name)
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "knn.json"), "w") as f:
                json.dump(result, f, indent=1)
            lines = [f"# kNN: {loaded.name} from {loaded.source}", "",
                     f"bank {args.train}, queries {args.val}, T = {args.temperature}, {world} rank(s), "
                     f"{result['features_per_s_per_rank']:.0f} frozen features/s per rank.", "",
                     "| k | top-1 |", "|---:|---:|", *(f"| {k} | {v:.2f} |" for k, v in acc.items())]  # fmt: skip
            with open(os.path.join(out, "knn.md"), "w") as f:
                f.write("\n".join(lines) + "\n")
            print(f"kNN top-1 of {loaded.source}: " + ", ".join(f"k={k} {v:.2f}%" for k, v in acc.items())
                  + f"; {result['features_per_s_per_rank']:.0f} frozen features/s per rank; {out}/knn.md")  # fmt: skip
        return result


def cli() -> None:
    """Console-script entry (`scale-knn-eval`): one-line errors, `--debug` for the traceback."""
    run_cli(main)


if __name__ == "__main__":
    cli()
