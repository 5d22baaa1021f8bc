"""The trainer on 2 real gloo ranks (DDP, FSDP2) against one process with the concatenated batch."""

import json
from pathlib import Path

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


ROOT = Path(__file__).resolve().parents[2]


def backend_overrides(backend: str) -> dict:
    """Config overrides selecting `backend` ('ddp', 'fsdp', 'zero1', 'zero2', 'zero3')."""
    if backend.startswith("zero"):
        return {
            "parallel.backend": "deepspeed",
            "parallel.deepspeed_config": str(ROOT / "ds_configs" / f"{backend}.json"),
        }
    return {"parallel.backend": backend}


def _train(rank, world, out_dir, dtype, name, backend="auto"):
    torch.set_default_dtype(dtype)
    cfg = tiny_config(out_dir, name, **{"schedule.max_steps": STEPS, **backend_overrides(backend)})
    trainer = Trainer(cfg, loader=FixedBatchLoader(4, cfg.batch.global_batch_size, world=world, rank=rank, dtype=dtype))
    expected = {
        "auto": "ddp" if world > 1 else "single",
        "zero1": "deepspeed",
        "zero2": "deepspeed",
        "zero3": "deepspeed",
    }
    assert trainer.backend.name == expected.get(backend, backend)
    trainer.fit()
    full = trainer.backend.full_state_dict()  # a collective under FSDP
    if rank == 0:
        torch.save(full, f"{out_dir}/{name}-final.pt")


@pytest.mark.parametrize(
    "backend, dtype",
    [(b, torch.float32) for b in ("ddp", "fsdp", "zero1", "zero2", "zero3")]
    + [(b, torch.float64) for b in ("ddp", "fsdp")],  # DeepSpeed keeps fp32 as its widest dtype
    ids=lambda v: {torch.float32: "fp32", torch.float64: "fp64"}.get(v, v),
)
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


def _resume(rank, world, out_dir, backend):
    b = backend_overrides(backend)
    full = Trainer(tiny_config(out_dir, "full", **b), loader=FixedBatchLoader(4, 8, world=world, rank=rank))
    full.fit()
    first = Trainer(
        tiny_config(out_dir, "split", **b, **{"schedule.max_steps": 6}), loader=FixedBatchLoader(4, 8, world, rank)
    )
    first.fit()
    second = Trainer(tiny_config(out_dir, "split", **b), loader=FixedBatchLoader(4, 8, world, rank))
    assert second.step == 0
    second.fit()
    if rank == 0:
        expected = [r["loss"] for r in read_metrics(full.run_dir)]
        got = [r["loss"] for r in read_metrics(second.run_dir)]
        assert len(got) == 12 and got == expected


@pytest.mark.parametrize("backend", ["ddp", "fsdp", "zero1", "zero2", "zero3"])
def test_resume_gives_the_same_losses(tmp_path, backend):
    run_ranks(_resume, 2, str(tmp_path), backend)


def _shard_sizes(rank, world, out_dir, backend):
    overrides = backend_overrides(backend)
    if backend == "zero3":  # a tiny model: partition every parameter, however small
        ds = json.loads(Path(overrides["parallel.deepspeed_config"]).read_text())
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        path = Path(out_dir) / "zero3-all.json"
        path.write_text(json.dumps(ds))
        overrides["parallel.deepspeed_config"] = str(path)
    cfg = tiny_config(out_dir, "sizes", **overrides, **{"model.embed_dim": 64})
    trainer = Trainer(cfg, loader=FixedBatchLoader(4, 8, world=world, rank=rank))
    b, model = trainer.backend, trainer.backend.module
    for encoder in (model.base_encoder, model.momentum_encoder):
        full = b.num_params(encoder)
        local = b.local_numel(encoder)
        assert abs(local / full - 1 / world) < 0.02, (local, full)


@pytest.mark.parametrize("backend", ["fsdp", "zero3"])
def test_each_rank_holds_half_of_both_encoders(tmp_path, backend):
    run_ranks(_shard_sizes, 2, str(tmp_path), backend)
