"""MoCo v3 with a ResNet on 2 real gloo ranks, every backend, against one process with the
concatenated batch: what makes a ResNet differ from a ViT here is that every BatchNorm's statistics
are over the global batch (cross-rank, per view), so two ranks of 4 images must equal one of 8."""

import pytest
import torch

from scale.train.trainer import Trainer
from tests.distributed.test_ddp_trainer import backend_overrides
from tests.helpers import FixedBatchLoader, read_metrics, run_ranks, tiny_config

pytestmark = pytest.mark.distributed

STEPS = 3


def resnet_config(out_dir, name, **overrides):
    """ResNet-18 at 32 px with the authors' R-50 recipe (LARS, tau 1.0), tiny heads."""
    cfg = tiny_config(out_dir, name, **overrides)
    m = cfg.model
    m.name, m.patch_size, m.embed_dim, m.depth, m.num_heads, m.temperature = "resnet18", None, None, None, None, 1.0
    if "optim.name" not in overrides:  # DeepSpeed ZeRO takes AdamW only (trust ratios need whole tensors)
        cfg.optim.name, cfg.optim.base_lr, cfg.optim.weight_decay = "lars", 0.3, 1.5e-6
    cfg.schedule.max_steps = STEPS
    return cfg


def _train(rank, world, out_dir, dtype, backends):
    torch.set_default_dtype(dtype)
    for backend in backends:
        name = backend if world > 1 else f"single-{backend}"
        overrides = backend_overrides(backend) if world > 1 else {}
        if backend.startswith("zero"):
            overrides["optim.name"] = "adamw"
        trainer = Trainer(resnet_config(out_dir, name, **overrides),
                          loader=FixedBatchLoader(4, 8, world=world, rank=rank, dtype=dtype))  # fmt: skip
        trainer.fit()
        full = trainer.backend.full_state_dict()  # a collective under FSDP
        if rank == 0:
            torch.save(full, f"{out_dir}/{name}-final.pt")


def _compare(tmp_path, backends, dtype):
    previous = torch.get_default_dtype()
    try:  # one process, the same optimizer per backend
        _train(0, 1, str(tmp_path), dtype, [b for b in backends if b.startswith("zero")][:1] + ["ddp"])
    finally:
        torch.set_default_dtype(previous)
    loss_tol, rtol, atol = (1e-9, 1e-7, 1e-9) if dtype == torch.float64 else (1e-5, 1e-4, 1e-4)
    for backend in backends:
        ref = "single-zero1" if backend.startswith("zero") else "single-ddp"
        got = [r["loss"] for r in read_metrics(tmp_path / backend)]
        want = [r["loss"] for r in read_metrics(tmp_path / ref)]
        assert len(got) == STEPS and got == pytest.approx(want, rel=loss_tol), (backend, got, want)
        mine = torch.load(tmp_path / f"{backend}-final.pt", weights_only=True)
        single = torch.load(tmp_path / f"{ref}-final.pt", weights_only=True)
        stats = 0
        for name, value in single.items():  # weights, momentum encoder and every BatchNorm's running statistics
            torch.testing.assert_close(mine[name], value, rtol=rtol, atol=atol, msg=f"{backend}: {name}")
            stats += "running_var" in name
        assert stats >= 2 * 20  # both encoders' BatchNorms (and the heads') compared


def test_resnet_on_ddp_and_fsdp2_equals_one_process_in_fp64(tmp_path):
    backends = ["ddp", "fsdp"]
    run_ranks(_train, 2, str(tmp_path), torch.float64, backends)
    _compare(tmp_path, backends, torch.float64)


@pytest.mark.slow
def test_resnet_on_zero_1_2_3_equals_one_process(tmp_path):
    backends = ["zero1", "zero2", "zero3"]
    run_ranks(_train, 2, str(tmp_path), torch.float32, backends)
    _compare(tmp_path, backends, torch.float32)


def test_the_papers_monitors_follow_a_resnet(tmp_path):
    """The dense kNN monitor (pooled features of the training forward) and the gradient monitor
    (conv1, every residual block, the heads) on a ResNet, one process."""
    import json

    cfg = resnet_config(tmp_path, "monitors", **{"monitor.knn_every": 1, "monitor.knn_bank_size": 1,
                                                  "monitor.knn_k": 4})  # fmt: skip
    trainer = Trainer(cfg, loader=FixedBatchLoader(4, 8, classes=3))
    trainer.fit()
    rows = [json.loads(r) for r in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    dense = [r for r in rows if "knn_dense_queries" in r]
    assert [r["step"] for r in dense] == [2, 3] and all(r["knn_dense_queries"] == 8 for r in dense)
    grads = [json.loads(r) for r in (trainer.run_dir / "gradients.jsonl").read_text().splitlines()]
    blocks = [f"layer{s}.{i}" for s, n in zip((1, 2, 3, 4), (2, 2, 2, 2), strict=True) for i in range(n)]
    assert grads[0]["layers"] == ["conv1", *blocks, "projector", "predictor"]
    assert [r["step"] for r in grads[1:]] == [1, 2, 3]


def _channels_last(rank, world, out_dir):
    """What `ResNetLayout.prepare` does on CUDA (channels-last inputs and, on DDP, weights), forced on
    CPU tensors: DDP's buckets and the cross-rank BatchNorm take NHWC maps and give the same step."""
    from scale.train import parallelize

    torch.set_default_dtype(torch.float64)

    def prepare(self, model, backend):
        for enc in (model.base_encoder, model.momentum_encoder):
            enc.to_channels_last()

    for name, patch in (("nchw", None), ("nhwc", prepare)):
        original = parallelize.ResNetLayout.prepare
        if patch:
            parallelize.ResNetLayout.prepare = patch
        try:
            trainer = Trainer(resnet_config(out_dir, name, **{"parallel.backend": "ddp"}),
                              loader=FixedBatchLoader(4, 8, world=world, rank=rank, dtype=torch.float64))  # fmt: skip
            if patch:
                assert trainer.backend.module.base_encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
            trainer.fit()
        finally:
            parallelize.ResNetLayout.prepare = original
        if rank == 0:
            torch.save(trainer.backend.full_state_dict(), f"{out_dir}/{name}.pt")


@pytest.mark.slow
def test_channels_last_resnet_on_ddp_equals_channels_first(tmp_path):
    run_ranks(_channels_last, 2, str(tmp_path))
    losses = {n: [r["loss"] for r in read_metrics(tmp_path / n)] for n in ("nchw", "nhwc")}
    assert losses["nhwc"] == pytest.approx(losses["nchw"], rel=1e-9)
    a, b = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("nchw", "nhwc"))
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=1e-7, atol=1e-9, msg=name)
