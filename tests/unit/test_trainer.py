import json

import pytest
import torch

from scale.config import ConfigError
from scale.errors import BackendError, TrainingError
from scale.optim import lr_at, momentum_at
from scale.train.step_stats import LogWindow
from scale.train.trainer import Trainer
from tests.helpers import FixedBatchLoader, read_metrics, tiny_config


def make(tmp_path, name="t", loader_kwargs=None, **overrides):
    cfg = tiny_config(tmp_path, name, **overrides)
    loader = FixedBatchLoader(4, cfg.batch.global_batch_size, **(loader_kwargs or {}))
    return Trainer(cfg, loader=loader)


def test_schedules_applied_every_step_match_closed_forms(tmp_path):
    trainer = make(tmp_path)
    d = trainer.derived
    assert (d.steps_per_epoch, d.total_steps, d.warmup_steps) == (4, 12, 4)
    assert d.lr == pytest.approx(1e-3 * 8 / 256)
    trainer.fit()
    rows = read_metrics(trainer.run_dir)
    assert [r["step"] for r in rows] == list(range(1, 13))
    for r in rows:
        t = r["step"] - 1  # the metrics of step t are logged once it is done (step counter t + 1)
        assert r["lr"] == pytest.approx(lr_at(t, d.lr, 4, 12))
        assert r["momentum"] == pytest.approx(momentum_at(t + 1, 12, 0.99, 1.0))
    assert rows[4]["lr"] == pytest.approx(d.lr)  # warmup end: the peak
    assert rows[-1]["lr"] == pytest.approx(lr_at(11, d.lr, 4, 12)) and rows[-1]["lr"] < 0.1 * d.lr
    assert rows[-1]["momentum"] == pytest.approx(1.0)


def test_frozen_params_are_bitwise_unchanged_and_not_in_the_optimizer(tmp_path):
    trainer = make(tmp_path, **{"schedule.max_steps": 3})
    model = trainer.backend.module
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert "base_encoder.patch_embed.proj.weight" in frozen and "base_encoder.pos_embed" in frozen
    in_optimizer = {id(p) for g in trainer.backend.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in model.parameters() if not p.requires_grad)
    trainable_before = model.base_encoder.blocks[0].attn.qkv.weight.detach().clone()
    trainer.fit()
    for name, p in model.named_parameters():
        if name in frozen and name.startswith("base_encoder."):
            assert torch.equal(p, frozen[name]), name
    assert not torch.equal(model.base_encoder.blocks[0].attn.qkv.weight, trainable_before)


def test_nan_loss_is_skipped_without_touching_weights_or_momentum_encoder(tmp_path):
    trainer = make(tmp_path, loader_kwargs={"nan_at": {(0, 2)}}, **{"schedule.max_steps": 2})
    trainer.fit()  # two good steps
    state = {k: v.clone() for k, v in trainer.backend.module.state_dict().items()}
    trainer.cfg.schedule.max_steps = 3
    trainer.fit()  # the third batch holds a NaN
    after = trainer.backend.module.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state), "weights, momentum encoder or BN statistics moved"
    assert trainer.nonfinite_total == 1 and trainer.step == 3
    rows = read_metrics(trainer.run_dir)
    assert rows[-1]["nonfinite_total"] == 1 and rows[-1]["grad_norm"] != rows[-1]["grad_norm"]  # NaN


def test_too_many_nonfinite_steps_stop_with_the_last_checkpoint_intact(tmp_path):
    bad = {(1, i) for i in range(4)}  # every batch of epoch 1
    trainer = make(tmp_path, loader_kwargs={"nan_at": bad}, **{"run.max_nonfinite": 3})
    with pytest.raises(TrainingError, match="3 non-finite steps in a row.*step-00000004"):
        trainer.fit()
    ckpts = sorted(p.name for p in (trainer.run_dir / "checkpoints").iterdir())
    assert ckpts == ["step-00000004"]


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    full = make(tmp_path, "full")
    full.fit()
    expected = [r["loss"] for r in read_metrics(full.run_dir)]
    # Stop mid-epoch at step 6 (checkpoint), then a fresh process-like trainer resumes.
    first = make(tmp_path, "split", **{"schedule.max_steps": 6})
    first.fit()
    second = make(tmp_path, "split")
    assert second.step == 0
    second.fit()
    assert second.step == 12
    got = [r["loss"] for r in read_metrics(second.run_dir)]
    assert len(got) == 12 and got == expected  # bitwise: same data, state, order


def test_run_directory_with_a_different_config_is_refused(tmp_path):
    make(tmp_path, "r", **{"schedule.max_steps": 1}).fit()
    with pytest.raises(ConfigError, match=r"different config \(optim.base_lr: 0.001 -> 0.002"):
        make(tmp_path, "r", **{"optim.base_lr": 0.002})
    make(tmp_path, "r", **{"schedule.max_steps": 2, "run.log_every": 5})  # allowed changes


def test_checkpoints_keep_last_k_and_hold_everything(tmp_path):
    trainer = make(tmp_path, **{"run.ckpt_every": 1, "run.keep_last": 2})
    trainer.fit()
    names = sorted(p.name for p in (trainer.run_dir / "checkpoints").iterdir())
    assert names == ["step-00000011", "step-00000012"]
    client = torch.load(trainer.run_dir / "checkpoints" / "step-00000012" / "client.pt", weights_only=False)
    assert client["step"] == 12 and client["config"]["model"]["embed_dim"] == 32 and "data" in client
    state = torch.load(trainer.run_dir / "checkpoints" / "step-00000012" / "model.pt", weights_only=False)
    assert {"model", "optimizer", "scaler"} <= state.keys()
    assert any(k.startswith("momentum_encoder.") for k in state["model"])
    assert json.loads((trainer.run_dir / "config.json").read_text())["model"]["depth"] == 2


def test_impossible_batch_split_and_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not split"):
        make(tmp_path, **{"batch.global_batch_size": 10, "batch.grad_accum_steps": 3})
    with pytest.raises(BackendError, match="fp16 needs a CUDA GPU"):
        make(tmp_path, **{"parallel.precision": "fp16"})
    with pytest.raises(BackendError, match="needs several ranks"):
        make(tmp_path, **{"parallel.backend": "ddp"})
    with pytest.raises(ValueError, match="optim.name='sgd' is not one of"):
        make(tmp_path, **{"optim.name": "sgd"})


def test_grad_accumulation_counts_micro_batches_and_sees_every_key(tmp_path):
    """With accumulation every micro-batch's keys come first (`batch.keys=global`: each loss sees the
    global batch's keys; equality with one big batch: tests/distributed/test_global_keys.py); the
    step still averages the micro-batch gradients: check the count and the lr schedule."""
    trainer = make(tmp_path, **{"batch.grad_accum_steps": 2, "schedule.max_steps": 2})
    assert trainer.derived.batch_size_per_device == 4 and trainer.derived.negatives_per_loss == 8
    trainer.loader = FixedBatchLoader(8, 4)
    trainer.fit()
    assert trainer.step == 2 and trainer.loader.batches_done == 4


def test_bf16_autocast_trains_on_cpu(tmp_path):
    trainer = make(tmp_path, **{"parallel.precision": "bf16", "schedule.max_steps": 2})
    result = trainer.fit()
    assert trainer.backend.autocast_dtype == torch.bfloat16 and result["loss"] == result["loss"]


@pytest.mark.parametrize("selective", [False, True], ids=["full", "selective"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(tmp_path, selective):
    from scale.parallel.recompute import apply_activation_checkpointing
    from scale.train.parallelize import build_model

    cfg = tiny_config(tmp_path)
    torch.manual_seed(0)
    plain = build_model(cfg)
    ckpt = build_model(cfg)
    ckpt.load_state_dict(plain.state_dict())
    assert apply_activation_checkpointing(ckpt.base_encoder.blocks, selective=selective) == 2
    assert plain.state_dict().keys() == ckpt.state_dict().keys()  # names unchanged
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    a, b = plain(x1, x2), ckpt(x1, x2)
    a.backward()
    b.backward()
    assert torch.equal(a, b)
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=n)


def test_fresh_start_in_an_old_run_directory_sets_old_checkpoints_aside(tmp_path):
    make(tmp_path, "old", **{"run.keep_last": 2}).fit()  # steps 4, 8, 12 -> keeps 8 and 12
    again = make(tmp_path, "old", **{"run.keep_last": 2, "run.resume": "none", "schedule.max_steps": 4})
    again.fit()
    names = sorted(p.name for p in (again.run_dir / "checkpoints").iterdir())
    assert names == ["abandoned-step-00000008", "abandoned-step-00000012", "step-00000004"]
    resumed = make(tmp_path, "old", **{"run.keep_last": 2, "schedule.max_steps": 5})
    resumed.fit()
    assert resumed.step == 5  # resumed from step 4, not from the abandoned step 12
    assert [r["step"] for r in read_metrics(resumed.run_dir)] == [1, 2, 3, 4, 5]  # no stale rows


def test_epoch_end_checkpoint_resumes_in_the_next_epoch(tmp_path):
    first = make(tmp_path, "e", **{"schedule.max_steps": 4, "run.ckpt_every": 4})  # ends on an epoch's last batch
    first.fit()
    client = torch.load(first.run_dir / "checkpoints" / "step-00000004" / "client.pt", weights_only=False)
    assert client["data"] == {"epoch": 1, "batches_done": 0}
    second = make(tmp_path, "e", **{"schedule.max_steps": 6, "run.ckpt_every": 4})
    second.fit()
    assert second.loader.state_dict() == {"epoch": 1, "batches_done": 2}
    assert [r["epoch"] for r in read_metrics(second.run_dir)][-2:] == [1.25, 1.5]


def test_run_settings_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="run.log_every=0 must be > 0"):
        make(tmp_path, **{"run.log_every": 0})


def test_activation_checkpointing_cuts_the_activations_kept_for_backward(tmp_path):
    """Memory effect, measured as the bytes of tensors autograd keeps for the backward pass
    (deterministic, unlike process memory): with checkpointing a block keeps only its input."""
    from scale.parallel.recompute import apply_activation_checkpointing
    from scale.train.parallelize import build_model

    cfg = tiny_config(tmp_path, **{"model.depth": 6, "model.embed_dim": 64, "model.patch_size": 4})

    def saved_bytes(model) -> int:
        seen, total = set(), 0

        def pack(t):
            nonlocal total
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += key[1]
            return t

        x1, x2 = torch.randn(16, 3, 32, 32), torch.randn(16, 3, 32, 32)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x1, x2)
        loss.backward()
        return total

    torch.manual_seed(0)
    plain = build_model(cfg)
    full = saved_bytes(plain)
    apply_activation_checkpointing(plain.base_encoder.blocks)
    checkpointed = saved_bytes(plain)
    assert checkpointed < 0.5 * full, (checkpointed, full)


def test_runs_that_cannot_fit_are_refused_before_building_anything(tmp_path):
    from scale.config import apply_overrides
    from scale.recipes import get_recipe
    from scale.train.memory import activation_bytes

    cfg = apply_overrides(get_recipe("vit_h_300ep"), ["--data.source=synthetic", f"--run.output_dir={tmp_path}"])
    with pytest.raises(BackendError, match=r"model state 12.2 GiB .* would not fit.*--parallel.backend=fsdp"):
        Trainer(cfg)
    assert not (tmp_path / "vit_h_300ep").exists()  # refused before touching the run directory
    # The activation arithmetic of docs/scaling.md: ViT-H/14, one image, two views, bf16.
    from scale.models import resolve_vit_config

    h = resolve_vit_config("vit_huge")
    assert activation_bytes(h, 1, "bf16", False) / 2**30 == pytest.approx(0.75, abs=0.01)  # 32 x 38 x 257 x 1280 x 2
    assert activation_bytes(h, 1, "bf16", True) < 0.14 * activation_bytes(h, 1, "bf16", False)


class _HostReads:
    """Counts tensor -> host conversions (what synchronises with a GPU) while active."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch):
        self.count, self.active, self.where = 0, False, []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(original, name))

    def _wrap(self, original, name):
        def counted(t, *args, **kwargs):
            if self.active:
                self.count += 1
                self.where.append(name)
            return original(t, *args, **kwargs)

        return counted


def test_a_training_step_reads_nothing_back_from_the_device(tmp_path, monkeypatch):
    """With an optimizer that skips on the device (torch's fused AdamW, here its CPU kernel) a step,
    a skipped non-finite one included, converts no tensor to a host value: on a GPU it queues its
    work without waiting, the dense kNN and gradient monitors included. The log row reads everything
    at once (one tolist)."""
    trainer = make(tmp_path, loader_kwargs={"nan_at": {(0, 1)}, "classes": 3},
                   **{"optim.implementation": "torch-fused", "run.log_every": 100, "monitor.knn_every": 1,
                      "monitor.knn_bank_size": 1, "monitor.knn_k": 4})  # fmt: skip
    reads = _HostReads(monkeypatch)
    batches = list(trainer.loader)
    state = {k: v.clone() for k, v in trainer.backend.module.state_dict().items()}
    reads.active = True
    metrics = trainer.train_step([batches[0]])
    trainer.train_step([batches[1]])  # holds a NaN: skipped on the device
    reads.active = False
    assert reads.count == 0, reads.where
    after = trainer.backend.module.state_dict()
    assert any(not torch.equal(state[k], after[k]) for k in state)  # the first step moved the weights
    window = LogWindow()
    window.add(metrics["loss"])
    reads.active = True
    row = trainer._log_row(metrics, window)
    reads.active = False
    assert reads.where == ["tolist"], reads.where  # the one read of a logged step
    assert trainer.nonfinite_total == 1 and row["nonfinite_total"] == 1
    assert 0 <= row["knn_dense_top1"] <= 100  # the dense kNN of step 2 (the bank filled at step 1) came with it


def test_a_run_directory_from_before_a_new_config_field_still_resumes(tmp_path):
    first = make(tmp_path, "old", **{"schedule.max_steps": 2})
    first.fit()
    path = first.run_dir / "config.json"
    saved = json.loads(path.read_text())
    del saved["parallel"]["tf32"]  # as written before the field existed
    path.write_text(json.dumps(saved))
    second = make(tmp_path, "old", **{"schedule.max_steps": 3})
    second.fit()
    assert second.step == 3


def test_nonfinite_steps_in_a_row_and_overflow_counts_continue_over_a_resume(tmp_path):
    """Two non-finite steps end epoch 0 (checkpoint), a third starts epoch 1 after the resume: three
    in a row stop the run, as without the interruption."""
    nan_at = {"nan_at": {(0, 2), (0, 3), (1, 0)}}
    first = make(tmp_path, "row", loader_kwargs=nan_at, **{"run.max_nonfinite": 3, "schedule.max_steps": 4})
    first.fit()
    assert first.nonfinite_total == 2 and first.skips.in_row == 2
    second = make(tmp_path, "row", loader_kwargs=nan_at, **{"run.max_nonfinite": 3})
    with pytest.raises(TrainingError, match="3 non-finite steps in a row at step 4"):
        second.fit()
    assert second.nonfinite_total == 3


def test_a_skip_is_a_loss_scale_overflow_only_while_the_scale_can_explain_it():
    """Under fp16 a skipped step is an overflow while the scale is at least 1, whether the gradients
    overflowed (finite losses) or the activations did (a value beyond 65504 makes the loss itself
    non-finite): skipped, the scale lowered, not a failure. Below 1 the steps are non-finite by
    themselves (counted as failures, so the run stops after run.max_nonfinite in a row)."""
    from scale.parallel.base import SingleProcess

    backend = SingleProcess("fp32")
    assert backend.scaler_overflow(torch.tensor(1.0)) is None  # no loss scaling
    backend.has_loss_scaling = True
    for scale, loss, explained in [(1024.0, 1.0, True), (1024.0, float("nan"), True), (1024.0, float("inf"), True),
                                   (0.5, 1.0, False), (0.5, float("nan"), False)]:  # fmt: skip
        backend.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        backend.scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
        assert bool(backend.scaler_overflow(torch.tensor(loss))) is explained, (scale, loss)


def _ops_after_backward(tmp_path, depth, optimizer):
    """aten operations of everything in a step after the backward (optimizer step, BatchNorm
    restore, momentum update) for a model of `depth` blocks."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket.__name__))
            return func(*args, **(kwargs or {}))

    cfg = tiny_config(tmp_path, f"ops-{depth}-{optimizer}", **{"model.depth": depth, "optim.name": optimizer})
    trainer = Trainer(cfg, loader=FixedBatchLoader(2, 8))
    b = trainer.backend
    x1, x2, _ = next(iter(trainer.loader))
    b.forward_backward(x1, x2)
    b.step(1e-3, 0.05)  # the first step creates the optimizer state, tensor by tensor, once
    saved = b.snapshot_buffers()
    b.forward_backward(x1, x2)
    params = sum(1 for p in b.module.parameters() if p.requires_grad)
    with Count() as count:
        result = b.step(1e-3, 0.05)
        b.restore_buffers(saved, result.applied)
        b.momentum_update(0.99, result.applied)
    return count.ops, params


@pytest.mark.parametrize("optimizer", ["adamw", "lamb"])
def test_the_step_after_backward_has_no_per_parameter_loop(tmp_path, optimizer):
    from collections import Counter

    shallow, p2 = _ops_after_backward(tmp_path, 2, optimizer)
    deep, p6 = _ops_after_backward(tmp_path, 6, optimizer)
    assert p6 > p2 + 40  # 4 blocks more: 48 more trainable tensors
    extra = Counter(deep) - Counter(shallow)
    if optimizer == "lamb":
        # scale's Lamb zeroes non-finite gradients of a skipped step tensor by tensor (torch has no
        # multi-tensor nan_to_num): that one pass is per parameter, everything else multi-tensor.
        assert extra == Counter({"nan_to_num_": p6 - p2})
    else:
        assert not extra, extra  # multi-tensor operations only: as many ops for 6 blocks as for 2
