"""The monitors under every backend: per-layer gradient norms of whole tensors and the sharded
dense kNN equal one process's values on the same global batches."""

import json

import pytest

from scale.train.trainer import Trainer
from tests.distributed.test_ddp_trainer import backend_overrides
from tests.helpers import FixedBatchLoader, run_ranks, tiny_config

pytestmark = pytest.mark.distributed

MONITORS = {"monitor.knn_every": 1, "monitor.knn_bank_size": 1, "monitor.knn_k": 4, "monitor.grad_every": 1,
            "model.random_patch_proj": False, "schedule.max_steps": 3, "run.log_every": 3}  # fmt: skip


def _train(rank, world, out_dir, backend):
    cfg = tiny_config(out_dir, backend, **{**MONITORS, **backend_overrides(backend)})
    Trainer(cfg, loader=FixedBatchLoader(4, 8, world=world, rank=rank, classes=3)).fit()


def _series(run_dir):
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    knn = [(r["step"], r["knn_dense_top1"], r["knn_dense_queries"]) for r in rows if "knn_dense_queries" in r]
    grads = [json.loads(r) for r in (run_dir / "gradients.jsonl").read_text().splitlines()]
    return knn, grads[0]["layers"], [g["norm"] for g in grads[1:]]


@pytest.mark.slow  # ~27 s: four backends on 2 ranks
def test_gradient_norms_and_dense_knn_equal_one_process_under_every_backend(tmp_path):
    _train(0, 1, str(tmp_path), "single")
    ref_knn, layers, ref_norms = _series(tmp_path / "single")
    assert len(ref_knn) == 2 and all(q == 8 for _, _, q in ref_knn)  # the global batch, once the bank is full
    for backend in ("fsdp", "zero1", "zero2", "zero3"):
        run_ranks(_train, 2, str(tmp_path), backend)
        knn, names, norms = _series(tmp_path / backend)
        assert names == layers, backend
        assert knn == ref_knn, backend  # the bank sharded over 2 ranks finds the same neighbours
        for step, (got, want) in enumerate(zip(norms, ref_norms, strict=True), 1):
            assert got == pytest.approx(want, rel=1e-4), f"{backend} step {step}"
