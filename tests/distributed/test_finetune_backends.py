"""Fine-tuning on 2 real gloo ranks, every backend, against one process with the concatenated
batch: the classifier, its EMA (sharded like the model under FSDP2 and ZeRO-3) and the evaluation
(each rank its share of the validation set, padded forwards, counts summed) give one process's
numbers."""

import pytest
import torch

from scale.eval.finetune import FinetuneTrainer
from tests.distributed.test_ddp_trainer import backend_overrides
from tests.helpers import FixedBatchLoader, read_metrics, run_ranks
from tests.unit.test_finetune import tiny_finetune_config

pytestmark = pytest.mark.distributed

STEPS, CLASSES = 3, 5


class SoftTargetLoader(FixedBatchLoader):
    """FixedBatchLoader's images with soft targets (a softmax of the global batch's random logits) in
    place of the second view: what the fine-tuning loader yields after mixup."""

    def _batch(self, epoch, i):
        x, _, labels = super()._batch(epoch, i)
        g = torch.Generator().manual_seed(epoch * 7919 + i)
        logits = torch.randn(self.global_batch, CLASSES, generator=g, dtype=self.dtype)
        rows = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return x, torch.softmax(logits, 1)[rows], labels


def _config(out_dir, name, **overrides):
    # No drop path: its masks are drawn per rank, so 2 ranks cannot equal one process with it.
    return tiny_finetune_config(out_dir, name, **{"schedule.max_steps": STEPS, "finetune.drop_path": 0.0,
                                                  "finetune.num_classes": CLASSES, "data.eval_source": "demo:val",
                                                  "finetune.ema_decay": 0.5, **overrides})  # fmt: skip


def _train(rank, world, out_dir, dtype, backends):
    torch.set_default_dtype(dtype)
    for backend in backends:
        name = backend if world > 1 else f"single-{backend}"
        overrides = backend_overrides(backend) if world > 1 else {}
        cfg = _config(out_dir, name, **overrides)
        trainer = FinetuneTrainer(cfg, loader=SoftTargetLoader(4, 16, world=world, rank=rank, dtype=dtype))
        trainer.fit()
        full = trainer.backend.full_state_dict()  # a collective under FSDP
        if rank == 0:
            torch.save(full, f"{out_dir}/{name}-final.pt")


def _compare(tmp_path, backends, dtype):
    previous = torch.get_default_dtype()
    try:
        _train(0, 1, str(tmp_path), dtype, ["ddp"])
    finally:
        torch.set_default_dtype(previous)
    loss_tol, rtol, atol = (1e-9, 1e-7, 1e-9) if dtype == torch.float64 else (1e-5, 1e-4, 1e-5)
    want_rows = read_metrics(tmp_path / "single-ddp")
    want = [r["loss"] for r in want_rows if "loss" in r]
    single = torch.load(tmp_path / "single-ddp-final.pt", weights_only=True)
    assert any(k.startswith("momentum_encoder.") for k in single)  # the EMA is compared too
    for backend in backends:
        rows = read_metrics(tmp_path / backend)
        got = [r["loss"] for r in rows if "loss" in r]
        assert len(got) == STEPS and got == pytest.approx(want, rel=loss_tol), (backend, got, want)
        for key in ("top1", "top5", "ema_top1", "ema_top5"):  # every validation image counted once
            assert rows[-1][key] == pytest.approx(want_rows[-1][key], abs=1e-9), (backend, key)
        mine = torch.load(tmp_path / f"{backend}-final.pt", weights_only=True)
        for name, value in single.items():
            torch.testing.assert_close(mine[name], value, rtol=rtol, atol=atol, msg=f"{backend}: {name}")


def test_finetuning_on_ddp_and_fsdp2_equals_one_process_in_fp64(tmp_path):
    backends = ["ddp", "fsdp"]
    run_ranks(_train, 2, str(tmp_path), torch.float64, backends)
    _compare(tmp_path, backends, torch.float64)


@pytest.mark.slow
def test_finetuning_on_zero_1_2_3_equals_one_process(tmp_path):
    backends = ["zero1", "zero2", "zero3"]
    run_ranks(_train, 2, str(tmp_path), torch.float32, backends)
    _compare(tmp_path, backends, torch.float32)


def _resume(rank, world, out_dir, backends):
    """Per backend: 3 steps in one go, and 1 step + a resume to 3 (the EMA and the optimizer state
    come back from the sharded checkpoint)."""
    torch.set_default_dtype(torch.float64)
    for backend in backends:
        for name, steps in ((f"{backend}-straight", STEPS), (f"{backend}-split", 1), (f"{backend}-split", STEPS)):
            cfg = _config(out_dir, name, **{**backend_overrides(backend), "schedule.max_steps": steps,
                                            "data.eval_source": ""})  # fmt: skip
            trainer = FinetuneTrainer(cfg, loader=SoftTargetLoader(4, 16, world=world, rank=rank))
            trainer.fit()
            full = trainer.backend.full_state_dict()
            if rank == 0 and steps == STEPS:
                torch.save(full, f"{out_dir}/{name}.pt")


def test_finetuning_resumes_exactly_on_ddp_and_fsdp2(tmp_path):
    backends = ["ddp", "fsdp"]
    run_ranks(_resume, 2, str(tmp_path), backends)
    for backend in backends:
        straight, split = (read_metrics(tmp_path / f"{backend}-{k}") for k in ("straight", "split"))
        assert [r["loss"] for r in split] == [r["loss"] for r in straight], backend
        a, b = (torch.load(tmp_path / f"{backend}-{k}.pt", weights_only=True) for k in ("straight", "split"))
        for name, value in a.items():
            assert torch.equal(b[name], value), (backend, name)
