"""`--parallel.activation_checkpointing=selective` (the matmul and attention outputs kept, the rest
recomputed): the losses and parameters of no recompute, under DDP and ZeRO-2 on 2 ranks; refused
with one line where the sharded backends gather inside each block."""

import pytest
import torch

from scale.config import ConfigError
from scale.train.trainer import Trainer
from tests.distributed.test_ddp_trainer import backend_overrides
from tests.helpers import FixedBatchLoader, read_metrics, run_ranks, tiny_config

pytestmark = pytest.mark.distributed


def _train(rank, world, out_dir, backend, recompute, bn=False):
    name = f"{backend}-{recompute}"
    cfg = tiny_config(out_dir, name, **{"schedule.max_steps": 3, "parallel.activation_checkpointing": recompute,
                                        "model.use_bn": bn, **backend_overrides(backend)})  # fmt: skip
    trainer = Trainer(cfg, loader=FixedBatchLoader(4, 8, world=world, rank=rank))
    trainer.fit()
    full = trainer.backend.full_state_dict()
    if rank == 0:
        torch.save(full, f"{out_dir}/{name}.pt")


@pytest.mark.parametrize("backend", ["ddp", pytest.param("zero2", marks=pytest.mark.slow)])
def test_selective_recompute_equals_no_recompute(tmp_path, backend):
    if backend == "zero2":
        pytest.importorskip("deepspeed")
    run_ranks(_train, 2, str(tmp_path), backend, "false")
    run_ranks(_train, 2, str(tmp_path), backend, "selective")
    plain = [r["loss"] for r in read_metrics(tmp_path / f"{backend}-false")]
    selective = [r["loss"] for r in read_metrics(tmp_path / f"{backend}-selective")]
    assert selective == pytest.approx(plain, rel=1e-6)
    a = torch.load(tmp_path / f"{backend}-false.pt", weights_only=True)
    b = torch.load(tmp_path / f"{backend}-selective.pt", weights_only=True)
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_selective_recompute_of_vit_bn_blocks_equals_no_recompute(tmp_path):
    # cross-rank BatchNorm inside the recomputed blocks: its sums recorded in the forward and
    # replayed in the recompute, under selective recompute's own dispatch modes
    run_ranks(_train, 2, str(tmp_path), "ddp", "false", True)
    run_ranks(_train, 2, str(tmp_path), "ddp", "selective", True)
    plain = [r["loss"] for r in read_metrics(tmp_path / "ddp-false")]
    assert [r["loss"] for r in read_metrics(tmp_path / "ddp-selective")] == pytest.approx(plain, rel=1e-6)
    a = torch.load(tmp_path / "ddp-false.pt", weights_only=True)
    b = torch.load(tmp_path / "ddp-selective.pt", weights_only=True)
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["fsdp", "hsdp"])
def test_selective_recompute_under_per_block_gathers_is_refused_before_building(tmp_path, backend):
    from scale.preflight import preflight

    cfg = tiny_config(tmp_path, "refused", **{"parallel.backend": backend,
                                              "parallel.activation_checkpointing": "selective"})  # fmt: skip
    with pytest.raises(ConfigError, match=f"selective does not run under {backend}"):
        preflight(cfg, world_size=2, data=False)
