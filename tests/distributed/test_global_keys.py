"""`--batch.keys=global`: with gradient accumulation every micro-batch's keys are computed first, so
each loss contrasts the global batch's keys. With BatchNorm-free heads (a test-only change of the
model) the losses and gradients equal the unaccumulated step; with the paper's heads they differ
only by the heads' per-micro-batch BatchNorm statistics (measured in docs/training.md)."""

import contextlib
import json

import pytest
import torch
from torch import nn

from scale.train.trainer import Trainer
from tests.helpers import FixedBatchLoader, run_ranks, tiny_config

pytestmark = pytest.mark.distributed


@contextlib.contextmanager
def _without_head_batchnorm(active: bool):
    """Build the models of this process with Identity in place of the heads' BatchNorms."""
    import scale.train.parallelize as parallelize

    build = parallelize.build_model
    if not active:
        yield
        return

    def build_without(cfg):
        model = build(cfg)
        for head in (model.base_encoder.head, model.momentum_encoder.head, model.predictor):
            for i, layer in enumerate(head):
                if isinstance(layer, nn.BatchNorm1d):
                    head[i] = nn.Identity()
        return model

    parallelize.build_model = build_without
    try:
        yield
    finally:
        parallelize.build_model = build


def _step(rank, world, out_dir, accum, keys, batchnorm):
    """Loss and gradients of one step of 8 images over `world` ranks in `accum` micro-batches."""
    backend = "ddp" if world > 1 else "single"
    cfg = tiny_config(out_dir, f"{backend}-{accum}-{keys}-{batchnorm}", **{
        "parallel.backend": backend, "batch.grad_accum_steps": accum, "batch.keys": keys})  # fmt: skip
    with _without_head_batchnorm(not batchnorm):
        trainer = Trainer(cfg, loader=FixedBatchLoader(4, 8, world=world, rank=rank))
    assert trainer.derived.negatives_per_loss == (8 if keys == "global" else 8 // accum)
    x1, x2, labels = next(iter(FixedBatchLoader(1, 8, world=world, rank=rank)))
    micro = list(zip(x1.chunk(accum), x2.chunk(accum), labels.chunk(accum), strict=True))
    b = trainer.backend
    global_keys = trainer._global_keys(micro)
    losses = [
        b.forward_backward(m1, m2, accum, last=i == accum - 1, keys=None if global_keys is None else global_keys[i])
        for i, (m1, m2, _) in enumerate(micro)
    ]  # fmt: skip
    loss = torch.stack(losses).mean()
    if world > 1:  # the mean over the ranks: the loss of the global batch
        torch.distributed.all_reduce(loss)
        loss /= world
    grads = {n: p.grad.clone() for n, p in b.module.named_parameters() if p.grad is not None}
    if rank == 0:
        torch.save({"loss": loss.item(), "grads": grads}, f"{out_dir}/{world}-{accum}-{keys}-{batchnorm}.pt")


def _run(tmp_path, world, accum, keys, batchnorm):
    if world == 1:
        _step(0, 1, str(tmp_path), accum, keys, batchnorm)
    else:
        run_ranks(_step, world, str(tmp_path), accum, keys, batchnorm)
    return torch.load(tmp_path / f"{world}-{accum}-{keys}-{batchnorm}.pt", weights_only=True)


def _relative(a, b):
    """|a - b| / |b| over all gradients as one vector."""
    diff = torch.cat([(a[n] - b[n]).flatten() for n in b])
    return (diff.norm() / torch.cat([b[n].flatten() for n in b]).norm()).item()


@pytest.mark.parametrize("world", [1, 2])
def test_global_keys_under_accumulation_equal_the_unaccumulated_step(tmp_path, world):
    reference = _run(tmp_path, world, 1, "global", False)
    accumulated = _run(tmp_path, world, 2, "global", False)
    assert accumulated["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    assert accumulated["grads"].keys() == reference["grads"].keys()
    assert _relative(accumulated["grads"], reference["grads"]) < 1e-6
    # each micro-batch's own keys (the old behaviour): a different loss
    micro = _run(tmp_path, world, 2, "micro", False)
    assert micro["loss"] != pytest.approx(reference["loss"], rel=1e-3)


def test_with_the_papers_heads_only_the_batchnorm_statistics_differ(tmp_path):
    reference = _run(tmp_path, 1, 1, "global", True)
    accumulated = _run(tmp_path, 1, 2, "global", True)
    micro = _run(tmp_path, 1, 2, "micro", True)
    report = {
        "loss_relative_difference_global_keys": abs(accumulated["loss"] / reference["loss"] - 1),
        "loss_relative_difference_micro_keys": abs(micro["loss"] / reference["loss"] - 1),
        "grad_relative_difference_global_keys": _relative(accumulated["grads"], reference["grads"]),
        "grad_relative_difference_micro_keys": _relative(micro["grads"], reference["grads"]),
    }
    print(json.dumps(report))
    # the BatchNorm statistics of 4 images instead of 8 change the step, but the global keys bring
    # the loss closer to the unaccumulated one than each micro-batch's own keys do
    assert report["loss_relative_difference_global_keys"] > 1e-6
    assert report["loss_relative_difference_global_keys"] < report["loss_relative_difference_micro_keys"]
