"""What the dense kNN and gradient monitors cost per training step, measured: two trainers of the
same model in one process, one with the monitors at their most frequent (kNN and gradient norms
every step) against a full ImageNet-size bank, one with them off, stepped alternately on the same
batches (so machine noise hits both alike).

    python -m benchmarks.monitor_cost                         # ViT-B/16, 224 px, batch 8, 4 pairs
    python -m benchmarks.monitor_cost --model vit_small --batch 8 --pairs 6

Prints the mean step time of each and the overhead; at the default knn_every=20 the kNN part is
amortised over 20 steps (reported too). Writes benchmarks/results/monitor-cost-MODEL.md.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from scale.config import apply_overrides
from scale.entry import run_cli, setup_logging
from scale.recipes import get_recipe
from scale.train.knn import knn_counts
from scale.train.trainer import Trainer


class _LabelledBatches:
    """Random 224 px batches with labels, the EpochLoader interface the trainer needs."""

    def __init__(self, batch: int, img: int, n: int = 1000):
        g = torch.Generator().manual_seed(0)
        self.batches = [(torch.randn(batch, 3, img, img, generator=g), torch.randn(batch, 3, img, img, generator=g),
                         torch.randint(1000, (batch,), generator=g)) for _ in range(2)]  # fmt: skip
        self.n = n

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter(self.batches)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def metrics(self):
        return {}


def _trainer(model: str, batch: int, monitors: bool, bank: int, out: str):
    cfg = get_recipe("vit_b_300ep")
    apply_overrides(cfg, [
        f"--model.name={model}", f"--batch.global_batch_size={batch}", "--parallel.precision=fp32",
        "--data.source=synthetic", "--data.eval_source=", "--data.knn_train_source=", "--run.tensorboard=false",
        f"--run.output_dir={out}", f"--run.name=cost-{'on' if monitors else 'off'}",
        "--parallel.skip_memory_check=true",
        f"--monitor.knn_every={1 if monitors else 0}", f"--monitor.grad_every={1 if monitors else 0}",
        f"--monitor.knn_bank_size={bank}",
    ])  # fmt: skip
    t = Trainer(cfg, loader=_LabelledBatches(batch, cfg.model.img_size))
    if monitors:  # a full bank of `bank` features (ImageNet's 10% on one rank), as late in a run
        knn = t.monitors.knn
        knn.bank.allocate()
        knn.bank.pushed = knn.bank.steps
        knn.bank.labels.random_(0, 1000)
        knn.bank.features.normal_()
        knn.bank.features.div_(knn.bank.features.norm(dim=1, keepdim=True))
    return t


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.monitor_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--bank", type=int, default=131072, help="bank features held by this rank")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    setup_logging()
    # The two trainers' run folders: new, private (mode 0700) and removed at the end, never a fixed
    # /tmp name that another user of a shared node could have made first.
    with tempfile.TemporaryDirectory(prefix="scale-monitor-cost-", ignore_cleanup_errors=True) as tmp:
        text = _measure(args, tmp)
    print(text)
    path = Path(args.out) / f"monitor-cost-{args.model}.md"
    path.write_text(text)
    print(f"wrote {path}")


def _measure(args: argparse.Namespace, tmp: str) -> str:
    on, off = _trainer(args.model, args.batch, True, args.bank, tmp), _trainer(args.model, args.batch, False, 1, tmp)
    batch = on.loader.batches[0]
    times: dict[str, list[float]] = {"on": [], "off": []}
    for i in range(args.pairs + 1):  # the first pair warms up
        for name, t in (("on", on), ("off", off)) if i % 2 == 0 else (("off", off), ("on", on)):
            start = time.perf_counter()
            t.train_step([batch])
            if name == "on":
                tensors, _ = t.monitors.pending()  # the read that a log row does, charged to the monitors
                torch.cat(tensors).tolist() if tensors else None
            times[name].append(time.perf_counter() - start)
    mean_on, mean_off = statistics.median(times["on"][1:]), statistics.median(times["off"][1:])
    # The parts alone (what the paired steps' noise can hide): the kNN of one batch against the full
    # bank plus its push, and the per-layer norms (one foreach norm over tensors of the gradients' sizes).

    knn, feats = on.monitors.knn, torch.randn(args.batch, on.backbone_cfg.embed_dim)
    params = [p.detach() for group in on.backend.grad_groups for p in group]
    parts = {"knn": [], "norms": []}
    for _ in range(5):
        start = time.perf_counter()
        queries = torch.nn.functional.normalize(feats, dim=1)
        knn_counts(queries, batch[2], knn.bank.features, knn.bank.labels, (knn.k,), knn.temperature).tolist()
        knn.bank.push(torch.cat([feats, feats]), torch.cat([batch[2], batch[2]]))
        parts["knn"].append(time.perf_counter() - start)
        start = time.perf_counter()
        torch.stack(torch._foreach_norm(params)).tolist()
        parts["norms"].append(time.perf_counter() - start)
    knn_s, norms_s = min(parts["knn"]), min(parts["norms"])
    overhead = (mean_on - mean_off) / mean_off
    noise = max(abs(a - b) / b for a, b in zip(times["on"][1:], times["off"][1:], strict=True))
    knn_every = 20
    lines = [
        f"# Monitor cost: {args.model}, batch {args.batch}, fp32, bank of {args.bank} features",
        "",
        f"Measured {datetime.date.today()} on {platform.processor() or platform.machine()} ({torch.get_num_threads()} "
        f"threads), `python -m benchmarks.monitor_cost --model {args.model} --batch {args.batch} --pairs {args.pairs} "
        f"--bank {args.bank}`; steps alternate between the two trainers, the first pair is warm-up.",
        "",
        "| monitors | median step (s) | steps (s) |",
        "|---|---:|---|",
        f"| off | {mean_off:.3f} | {', '.join(f'{x:.2f}' for x in times['off'][1:])} |",
        f"| dense kNN + gradient norms every step | {mean_on:.3f} | {', '.join(f'{x:.2f}' for x in times['on'][1:])} |",
        "",
        f"Overhead with both every step: {100 * overhead:+.2f}% of the step (machine noise included: the paired "
        f"steps differ by up to {100 * noise:.1f}%).",
        "",
        f"The parts alone (best of 5): kNN of the batch against the bank + push {1000 * knn_s:.1f} ms "
        f"({100 * knn_s / mean_off:.2f}% of a step), per-layer gradient norms {1000 * norms_s:.1f} ms "
        f"({100 * norms_s / mean_off:.2f}%). At the defaults (kNN every {knn_every} steps, norms every step): "
        f"{100 * (knn_s / knn_every + norms_s) / mean_off:.2f}% of the step.",
    ]
    return "\n".join(lines) + "\n"


def cli() -> None:
    """Command-line entry: one-line errors, `--debug` for the traceback."""
    run_cli(main)


if __name__ == "__main__":
    cli()
