"""DALI on the GPU ('mixed' decode, GPU ops). Skipped without CUDA; run with `pytest -m gpu tests/gpu`."""

import pytest
import torch

from scale.data.augment import AugmentConfig
from scale.data.loader import build_loader

pytestmark = pytest.mark.gpu


def test_dali_gpu_batches_match_the_cpu_only_mode_in_shape_and_count(tmp_path, monkeypatch):
    pytest.importorskip("nvidia.dali")
    monkeypatch.setenv("SCALE_CACHE", str(tmp_path))
    aug = AugmentConfig(crop_size=32)
    gpu = build_loader("demo", batch_size=64, augment=aug, backend="dali", device_id=0, world_size=1, rank=0)
    cpu = build_loader("demo", batch_size=64, augment=aug, backend="dali", world_size=1, rank=0)
    gpu_batches, cpu_batches = list(gpu), list(cpu)
    assert len(gpu_batches) == len(cpu_batches) == len(gpu)
    v1, v2, labels = gpu_batches[0]
    assert v1.is_cuda and v2.is_cuda and v1.shape == (64, 3, 32, 32) and v1.dtype == torch.float32
    assert torch.isfinite(v1).all() and not torch.equal(v1, v2)
    gpu_labels = torch.cat([b[2].cpu() for b in gpu_batches])
    assert len(set(gpu_labels.tolist())) == 10
    # Same augmentation distribution: normalised pixel statistics agree closely.
    g = torch.cat([b[0].float().cpu() for b in gpu_batches])
    c = torch.cat([b[0] for b in cpu_batches])
    assert abs(g.mean() - c.mean()) < 0.05 and abs(g.std() / c.std() - 1) < 0.05
