"""CUDA-only checks of fine-tuning: bf16 autocast against fp32 on the same batches, the EMA kept in
fp32, the evaluation on the GPU. Skipped without CUDA; run with `pytest -m gpu tests/gpu`."""

import pytest
import torch

from scale.eval.finetune import FinetuneTrainer
from tests.distributed.test_finetune_backends import SoftTargetLoader, _config

pytestmark = pytest.mark.gpu


def _fit(tmp_path, precision):
    cfg = _config(tmp_path, f"ft-{precision}", **{"parallel.precision": precision, "parallel.backend": "single"})
    trainer = FinetuneTrainer(cfg, loader=SoftTargetLoader(4, 16))
    result = trainer.fit()
    return trainer, result


def test_bf16_finetuning_follows_fp32_and_keeps_the_ema_in_fp32(tmp_path):
    fp32, r32 = _fit(tmp_path, "fp32")
    bf16, r16 = _fit(tmp_path, "bf16")
    assert bf16.backend.device.type == "cuda" and bf16.backend.autocast_dtype == torch.bfloat16
    from tests.helpers import read_metrics

    a = [r["loss"] for r in read_metrics(tmp_path / "ft-fp32") if "loss" in r]
    b = [r["loss"] for r in read_metrics(tmp_path / "ft-bf16") if "loss" in r]
    assert b == pytest.approx(a, rel=2e-2)
    ema = bf16.backend.module.momentum_encoder
    assert all(p.dtype == torch.float32 for p in ema.parameters())
    assert 0 <= r16["top1"] <= 100 and abs(r16["top1"] - r32["top1"]) <= 5.0
