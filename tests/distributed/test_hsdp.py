"""HSDP (`--parallel.backend=hsdp`): 4 gloo ranks as a 2 x 2 mesh (sharded in pairs, replicated
across them) give the losses, gradient norms and parameters (the momentum encoder's included) of
one process on the concatenated batch; so does FSDP2 with the base encoder kept gathered, and the
momentum encoder's units free their parameters after the forward either way."""

import pytest
import torch

from scale.train.trainer import Trainer
from tests.helpers import FixedBatchLoader, read_metrics, run_ranks, tiny_config

pytestmark = pytest.mark.distributed

STEPS = 4


def _train(rank, world, out_dir, name, overrides):
    cfg = tiny_config(out_dir, name, **{"schedule.max_steps": STEPS, "optim.clip_grad": 1.0, **overrides})
    trainer = Trainer(cfg, loader=FixedBatchLoader(4, 8, world=world, rank=rank))
    b = trainer.backend
    if overrides.get("parallel.backend") == "hsdp":
        assert b.name == "hsdp" and tuple(b.mesh.shape) == (2, 2)
        # each rank holds half of every tensor (sharded in pairs), the other pair the same halves
        assert b.local_numel(b.module.base_encoder) * 2 == pytest.approx(b.num_params(b.module.base_encoder), rel=0.02)
        assert b.state_bytes(100, 100)["params"] == 4 * 100 / 2
    trainer.fit()
    full = b.full_state_dict()
    if rank == 0:
        torch.save(full, f"{out_dir}/{name}-final.pt")


def _compare(tmp_path, name):
    rows = read_metrics(tmp_path / name)
    ref = read_metrics(tmp_path / "single")
    assert len(rows) == STEPS
    for a, b in zip(rows, ref, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)  # one group's squares, not both
    got = torch.load(tmp_path / f"{name}-final.pt", weights_only=True)
    single = torch.load(tmp_path / "single-final.pt", weights_only=True)
    for key, value in single.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_hsdp_on_a_2x2_mesh_equals_one_process(tmp_path):
    _train(0, 1, str(tmp_path), "single", {"parallel.backend": "single"})
    run_ranks(_train, 4, str(tmp_path), "hsdp", {"parallel.backend": "hsdp", "parallel.shard_size": 2})
    _compare(tmp_path, "hsdp")


def test_fsdp2_keeping_the_base_encoder_gathered_equals_one_process(tmp_path):
    _train(0, 1, str(tmp_path), "single", {"parallel.backend": "single"})
    run_ranks(_train, 2, str(tmp_path), "fsdp", {"parallel.backend": "fsdp", "parallel.reshard_after_forward": False})
    _compare(tmp_path, "fsdp")


def test_a_shard_size_that_does_not_divide_the_ranks_is_refused():
    from scale.parallel.registry import launch_problem

    problem = launch_problem("hsdp", 6, shard_size=4)
    assert problem and "--parallel.shard_size=4 does not divide the 6 ranks" in problem
    assert launch_problem("hsdp", 8, shard_size=4) is None


def _resume(rank, world, out_dir):
    hsdp = {"parallel.backend": "hsdp", "parallel.shard_size": 2}
    full = Trainer(tiny_config(out_dir, "full", **hsdp), loader=FixedBatchLoader(4, 8, world=world, rank=rank))
    full.fit()
    first = Trainer(tiny_config(out_dir, "split", **hsdp, **{"schedule.max_steps": 6}),
                    loader=FixedBatchLoader(4, 8, world, rank))  # fmt: skip
    first.fit()
    second = Trainer(tiny_config(out_dir, "split", **hsdp), loader=FixedBatchLoader(4, 8, world, rank))
    second.fit()
    if rank == 0:
        expected = [r["loss"] for r in read_metrics(full.run_dir)]
        got = [r["loss"] for r in read_metrics(second.run_dir)]
        assert len(got) == 12 and got == expected


@pytest.mark.slow  # ~40 s: three runs on 4 ranks
def test_hsdp_resumes_with_the_uninterrupted_losses(tmp_path):
    run_ranks(_resume, 4, str(tmp_path))
