"""The trainer on 2 real gloo ranks (DDP, FSDP2) against one process with the concatenated batch."""

import pytest
import torch

from scale.optim import lr_at
from scale.train.trainer import Trainer
from tests.helpers import FixedBatchLoader, read_metrics, run_ranks, tiny_config

pytestmark = pytest.mark.distributed

STEPS = 3
# float64: the two runs differ by reduction order only: losses to 1e-9, parameters to 1e-7.
# float32: losses to 1e-5 relative; parameters to 1e-4 relative plus 2 x (sum of the lrs applied)
# absolute: Adam divides gradient differences by sqrt(v) + eps, so a tensor whose true gradient is
# ~0 (the final norm's bias feeds a BatchNorm that removes any shift) moves by up to ~lr per step
# on rounding noise alone, differently in the two runs.
LR_SUM = sum(lr_at(t, 1e-3 * 8 / 256, 4, 12) for t in range(STEPS))
TOL = {torch.float64: dict(loss=1e-9, param_rtol=1e-7, param_atol=1e-9),
       torch.float32: dict(loss=1e-5, param_rtol=1e-4, param_atol=2 * LR_SUM)}  # fmt: skip


def _train(rank, world, out_dir, dtype, name, backend="auto"):
    torch.set_default_dtype(dtype)
    cfg = tiny_config(out_dir, name, **{"schedule.max_steps": STEPS, "parallel.backend": backend})
    trainer = Trainer(cfg, loader=FixedBatchLoader(4, cfg.batch.global_batch_size, world=world, rank=rank, dtype=dtype))
    assert trainer.backend.name == (backend if backend != "auto" else "ddp" if world > 1 else "single")
    trainer.fit()
    full = trainer.backend.full_state_dict()  # a collective under FSDP
    if rank == 0:
        torch.save(full, f"{out_dir}/{name}-final.pt")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process_on_the_concatenated_batch(tmp_path, dtype, backend):
    run_ranks(_train, 2, str(tmp_path), dtype, "ddp", backend)
    previous = torch.get_default_dtype()
    try:
        _train(0, 1, str(tmp_path), dtype, "single")
    finally:
        torch.set_default_dtype(previous)
    tol = TOL[dtype]
    ddp_losses = [r["loss"] for r in read_metrics(tmp_path / "ddp")]
    single_losses = [r["loss"] for r in read_metrics(tmp_path / "single")]
    assert len(ddp_losses) == STEPS
    for a, b in zip(ddp_losses, single_losses, strict=True):
        assert abs(a - b) <= tol["loss"] * abs(b)
    ddp = torch.load(tmp_path / "ddp-final.pt", weights_only=True)
    single = torch.load(tmp_path / "single-final.pt", weights_only=True)
    moved = 0
    for name, value in single.items():
        torch.testing.assert_close(ddp[name], value, rtol=tol["param_rtol"], atol=tol["param_atol"], msg=name)
        moved += name.startswith("momentum_encoder.") and value.is_floating_point()
    assert moved > 10  # the momentum encoder is compared too


def _resume(rank, world, out_dir):
    cfg_full = tiny_config(out_dir, "full")
    full = Trainer(cfg_full, loader=FixedBatchLoader(4, 8, world=world, rank=rank))
    full.fit()
    first = Trainer(
        tiny_config(out_dir, "split", **{"schedule.max_steps": 6}), loader=FixedBatchLoader(4, 8, world, rank)
    )
    first.fit()
    second = Trainer(tiny_config(out_dir, "split"), loader=FixedBatchLoader(4, 8, world, rank))
    second.fit()
    if rank == 0:
        expected = [r["loss"] for r in read_metrics(full.run_dir)]
        got = [r["loss"] for r in read_metrics(second.run_dir)]
        assert len(got) == 12 and got == expected


@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_resume_gives_the_same_losses(tmp_path, backend):
    run_ranks(_resume, 2, str(tmp_path), backend)


def _shard_sizes(rank, world, out_dir):
    cfg = tiny_config(out_dir, "sizes", **{"parallel.backend": "fsdp", "model.embed_dim": 64})
    trainer = Trainer(cfg, loader=FixedBatchLoader(4, 8, world=world, rank=rank))
    b, model = trainer.backend, trainer.backend.module
    for encoder in (model.base_encoder, model.momentum_encoder):
        full = sum(p.numel() for p in encoder.parameters())  # DTensors report the full size
        local = b.local_numel(encoder)
        assert abs(local / full - 1 / world) < 0.02, (local, full)


def test_fsdp_each_rank_holds_half_of_both_encoders(tmp_path):
    run_ranks(_shard_sizes, 2, str(tmp_path))
