"""Both views through each encoder as one batch (the default for plain ViTs) equals the authors'
per-view forwards on every backend: the loss, every rank's gradient pieces, the BatchNorm statistics."""

import pytest
import torch

from scale.train.trainer import Trainer
from tests.distributed.test_ddp_trainer import backend_overrides
from tests.helpers import FixedBatchLoader, run_ranks, tiny_config

pytestmark = pytest.mark.distributed


def _one_step(out_dir, backend, mode, rank, world, checkpointing):
    overrides = {**backend_overrides(backend), "model.view_forward": mode,
                 "parallel.activation_checkpointing": checkpointing}  # fmt: skip
    trainer = Trainer(tiny_config(out_dir, f"{backend}-{mode}", **overrides),
                      loader=FixedBatchLoader(2, 8, world=world, rank=rank))  # fmt: skip
    b = trainer.backend
    assert b.module.joint_views == (mode == "joint")
    x1, x2, _ = next(iter(trainer.loader))
    loss = b.forward_backward(x1, x2)
    grads = [b._local_grad(p) for p in b.module.parameters() if p.requires_grad]
    grads = [None if g is None else g.detach().float().clone() for g in grads]
    buffers = [t.detach().float().clone() for t in b.module.buffers()]
    return float(loss), grads, buffers


def _compare(rank, world, out_dir, backend, checkpointing):
    loss_v, grads_v, buf_v = _one_step(out_dir, backend, "per_view", rank, world, checkpointing)
    loss_j, grads_j, buf_j = _one_step(out_dir, backend, "joint", rank, world, checkpointing)
    assert loss_j == pytest.approx(loss_v, rel=1e-5)
    pairs = [(gv, gj) for gv, gj in zip(grads_v, grads_j, strict=True) if gv is not None]
    assert pairs and all(gj is not None for _, gj in pairs)
    flat_v = torch.cat([gv.flatten() for gv, _ in pairs])
    flat_j = torch.cat([gj.flatten() for _, gj in pairs])
    assert float((flat_j - flat_v).norm() / flat_v.norm()) < 1e-5  # the whole gradient, 1e-5 relative
    for gv, gj in pairs:  # and each piece; a piece whose exact value is 0 (e.g. ahead of a BatchNorm) is noise
        torch.testing.assert_close(gj, gv, rtol=1e-5, atol=1e-6 * float(flat_v.abs().max()))
    for bv, bj in zip(buf_v, buf_j, strict=True):  # running statistics: each view on its own, in order
        torch.testing.assert_close(bj, bv, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "backend,checkpointing",
    [("ddp", False), ("fsdp", True), ("zero3", False), pytest.param("fsdp", False, marks=pytest.mark.slow),
     pytest.param("zero2", True, marks=pytest.mark.slow)],
)  # fmt: skip
def test_joint_views_equal_per_view_forwards(tmp_path, backend, checkpointing):
    run_ranks(_compare, 2, str(tmp_path), backend, checkpointing)


def _gathered_bytes(rank, world, out_dir, queue_dir):
    import torch.distributed as dist

    from scale.train.parallelize import build_model

    results = {}
    for reshard in (True, False):
        for mode in ("per_view", "joint"):
            overrides = {"parallel.backend": "fsdp", "model.view_forward": mode,
                         "parallel.reshard_after_forward": reshard}  # fmt: skip
            trainer = Trainer(tiny_config(out_dir, f"gather-{mode}-{reshard}", **overrides),
                              loader=FixedBatchLoader(2, 8, world=world, rank=rank))  # fmt: skip
            sizes = []
            gather = dist.all_gather_single  # what FSDP2's default all-gather calls

            def counting(output, *args, _gather=gather, _sizes=sizes, **kwargs):
                _sizes.append(output.numel() * output.element_size())
                return _gather(output, *args, **kwargs)

            dist.all_gather_single = counting
            try:
                x1, x2, _ = next(iter(trainer.loader))
                trainer.backend.forward_backward(x1, x2)
            finally:
                dist.all_gather_single = gather
            results[reshard, mode] = sum(sizes)
    m = build_model(tiny_config(out_dir, "count"))
    n = lambda module: 4 * sum(p.numel() for p in module.parameters())  # fp32 parameters  # noqa: E731
    trained, momentum = n(m.base_encoder) + n(m.predictor), n(m.momentum_encoder)
    # docs/scaling.md: resharding gathers the trained units for the forward and again for the backward,
    # the momentum encoder for its forward; without resharding, the trained ones once. Joint views: once
    # per step each. FSDP2 pads each shard to a multiple of the world size: within 2 %.
    assert results[True, "joint"] == pytest.approx(2 * trained + momentum, rel=0.02)
    assert results[False, "joint"] == pytest.approx(trained + momentum, rel=0.02)
    assert results[True, "per_view"] >= 1.85 * results[True, "joint"]  # about twice: every unit per view
    assert results[False, "per_view"] > 1.3 * results[False, "joint"]  # the momentum blocks per view


def test_joint_views_halve_the_parameters_fsdp2_gathers(tmp_path):
    run_ranks(_gathered_bytes, 2, str(tmp_path), str(tmp_path))


def _compiled_vs_eager(rank, world, out_dir, backend):
    from tests.helpers import read_metrics

    losses = {}
    for compiled in (False, True):
        overrides = {**backend_overrides(backend), "model.compile": compiled, "schedule.max_steps": 3,
                     "parallel.activation_checkpointing": True}  # fmt: skip
        trainer = Trainer(tiny_config(out_dir, f"{backend}-{compiled}", **overrides),
                          loader=FixedBatchLoader(4, 8, world=world, rank=rank))  # fmt: skip
        trainer.fit()
        if rank == 0:
            losses[compiled] = [r["loss"] for r in read_metrics(trainer.run_dir)]
    if rank == 0:
        assert losses[True] == pytest.approx(losses[False], rel=1e-5), losses


@pytest.mark.slow  # inductor compiles on 2 ranks: 25-50 s each; the single-process test is in the default run
@pytest.mark.parametrize("backend", ["fsdp", "zero2", "zero3"])
def test_compiled_blocks_under_sharded_backends_train_as_eager(tmp_path, backend):
    run_ranks(_compiled_vs_eager, 2, str(tmp_path), backend)
