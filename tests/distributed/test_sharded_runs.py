"""Sharded backends as users run them: the DeepSpeed launcher on CPU, bf16, refusals."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scale.errors import BackendError
from scale.train.trainer import Trainer
from tests.distributed.test_ddp_trainer import backend_overrides
from tests.helpers import FixedBatchLoader, read_metrics, run_ranks, tiny_config

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--data.source=synthetic", "--model.img_size=32", "--model.patch_size=8", "--model.embed_dim=32",
    "--model.depth=2", "--model.num_heads=4", "--model.dim=16", "--model.mlp_dim=64",
    "--batch.global_batch_size=8", "--schedule.max_steps=8", "--schedule.warmup_epochs=0",
    "--optim.base_lr=0.05", "--run.log_every=1", "--run.progress=false", "--run.tensorboard=false",
    "--data.eval_source=", "--data.knn_train_source=",
]  # fmt: skip


@pytest.mark.parametrize("stage", ["zero2", pytest.param("zero3", marks=pytest.mark.slow)])
def test_deepspeed_launcher_on_cpu_logs_falling_loss_and_a_checkpoint(tmp_path, stage):
    launcher = Path(sys.executable).parent / "deepspeed"
    if not launcher.exists():
        pytest.skip("deepspeed is not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", "29561" if stage == "zero2" else "29562",
           str(ROOT / "scale" / "pretrain.py"), "--deepspeed", str(ROOT / "ds_configs" / f"{stage}.json"), *TINY,
           f"--run.output_dir={tmp_path}", f"--run.name={stage}"]  # fmt: skip
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    losses = [r["loss"] for r in read_metrics(tmp_path / stage)]
    assert len(losses) == 8 and losses[-1] < losses[0]
    ckpt = tmp_path / stage / "checkpoints" / "step-00000008"
    assert (ckpt / "client.pt").is_file() and (ckpt / "engine").is_dir()


def _bf16(rank, world, out_dir, backend):
    cfg = tiny_config(out_dir, backend, **backend_overrides(backend),
                      **{"parallel.precision": "bf16", "schedule.max_steps": 3})  # fmt: skip
    trainer = Trainer(cfg, loader=FixedBatchLoader(4, 8, world=world, rank=rank))
    trainer.fit()
    rows = read_metrics(trainer.run_dir)
    assert all(r["loss"] == r["loss"] and r["grad_norm"] == r["grad_norm"] for r in rows)
    b = trainer.backend
    # The precision policy: fp32 parameters (the masters, the momentum encoder's EMA included) under
    # bf16 autocast, on DeepSpeed as on FSDP2 (sharded) and one process.
    assert all(p.dtype == torch.float32 for p in b.module.parameters())
    assert b.autocast_dtype == torch.bfloat16 and b._momentum_masters is None


@pytest.mark.parametrize("backend", ["fsdp", "zero2", "zero3"])
def test_bf16_runs_under_sharded_backends(tmp_path, backend):
    run_ranks(_bf16, 2, str(tmp_path), backend)


@pytest.mark.parametrize("backend", ["fsdp", "zero2"])
def test_fp16_on_cpu_is_refused_with_a_clear_message(tmp_path, backend):
    from scale.parallel.launch import build_backend

    overrides = backend_overrides(backend)
    with pytest.raises(BackendError, match="fp16 needs a CUDA GPU"):
        build_backend(overrides["parallel.backend"], "fp16", overrides.get("parallel.deepspeed_config", ""))


def test_deepspeed_config_contradictions_are_errors(tmp_path):
    from scale.parallel.ds_config import resolve_ds_config
    from scale.parallel.settings import BackendSettings

    settings = BackendSettings(global_batch_size=4096, batch_size_per_device=64, grad_accum_steps=1, clip_grad=0.0)
    ds = resolve_ds_config(ROOT / "ds_configs" / "zero2.json", settings, "bf16")
    # bf16 by autocast over the engine's fp32 parameters (the precision policy): DeepSpeed's bf16 mode off.
    assert ds["train_batch_size"] == 4096 and not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert resolve_ds_config(ROOT / "ds_configs" / "zero2.json", settings, "fp16")["fp16"]["enabled"]
    forced = {**json.loads((ROOT / "ds_configs" / "zero2.json").read_text()), "bf16": {"enabled": True}}
    (tmp_path / "forced.json").write_text(json.dumps(forced))
    with pytest.raises(BackendError, match="autocast over fp32 parameters"):
        resolve_ds_config(tmp_path / "forced.json", settings, "bf16")
    bad = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    bad["train_batch_size"] = 1024
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(BackendError, match="train_batch_size=1024 contradicts the scale config"):
        resolve_ds_config(tmp_path / "bad.json", settings, "bf16")
    bad = {**json.loads((ROOT / "ds_configs" / "zero2.json").read_text()), "optimizer": {"type": "Adam"}}
    (tmp_path / "opt.json").write_text(json.dumps(bad))
    with pytest.raises(BackendError, match="scale builds the optimizer"):
        resolve_ds_config(tmp_path / "opt.json", settings, "fp32")
    with pytest.raises(BackendError, match="does not exist"):
        resolve_ds_config(tmp_path / "missing.json", settings, "fp32")


def _accumulate(rank, world, out_dir, backend):
    overrides = {**backend_overrides(backend), "batch.grad_accum_steps": 2, "schedule.max_steps": 3}
    trainer = Trainer(tiny_config(out_dir, backend, **overrides), loader=FixedBatchLoader(8, 8, world=world, rank=rank))
    assert trainer.derived.batch_size_per_device == 2
    trainer.loader = FixedBatchLoader(8, 4, world=world, rank=rank)  # micro-batches of 2 per rank
    trainer.fit()
    full = trainer.backend.full_state_dict()
    if rank == 0:
        torch.save(full, f"{out_dir}/{backend}.pt")


@pytest.mark.slow  # 24 s; accumulation's invariants in the default suite: tests/distributed/test_global_keys.py
def test_gradient_accumulation_agrees_across_backends(tmp_path):
    for backend in ("ddp", "fsdp", "zero2", "zero3"):
        run_ranks(_accumulate, 2, str(tmp_path), backend)
    reference = [r["loss"] for r in read_metrics(tmp_path / "ddp")]
    ref_state = torch.load(tmp_path / "ddp.pt", weights_only=True)
    for backend in ("fsdp", "zero2", "zero3"):
        losses = [r["loss"] for r in read_metrics(tmp_path / backend)]
        assert losses == pytest.approx(reference, rel=1e-5), backend
        state = torch.load(tmp_path / f"{backend}.pt", weights_only=True)
        for name, value in ref_state.items():
            torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-4, msg=f"{backend} {name}")


def _fsdp_run(rank, world, out_dir, name, steps):
    cfg = tiny_config(out_dir, name, **{"parallel.backend": "fsdp", "schedule.max_steps": steps})
    Trainer(cfg, loader=FixedBatchLoader(4, 8, world=world, rank=rank)).fit()


def test_fsdp_checkpoint_resumes_on_another_world_size(tmp_path):
    """DCP reshards: a 2-rank FSDP2 checkpoint (taken at an epoch end) continues on 1 rank."""
    run_ranks(_fsdp_run, 2, str(tmp_path), "straight", 6)
    run_ranks(_fsdp_run, 2, str(tmp_path), "moved", 4)
    run_ranks(_fsdp_run, 1, str(tmp_path), "moved", 6)
    straight = [r["loss"] for r in read_metrics(tmp_path / "straight")]
    moved = [r["loss"] for r in read_metrics(tmp_path / "moved")]
    assert len(moved) == 6 and moved == pytest.approx(straight, rel=1e-5)


def _ac(rank, world, out_dir, backend, ac):
    overrides = {**backend_overrides(backend), "parallel.activation_checkpointing": ac, "schedule.max_steps": 2}
    Trainer(tiny_config(out_dir, f"{backend}-{ac}", **overrides), loader=FixedBatchLoader(4, 8, world, rank)).fit()


@pytest.mark.parametrize("backend", ["fsdp", pytest.param("zero3", marks=pytest.mark.slow)])
def test_activation_checkpointing_under_sharded_backends(tmp_path, backend):
    run_ranks(_ac, 2, str(tmp_path), backend, False)
    run_ranks(_ac, 2, str(tmp_path), backend, True)
    plain = [r["loss"] for r in read_metrics(tmp_path / f"{backend}-False")]
    checkpointed = [r["loss"] for r in read_metrics(tmp_path / f"{backend}-True")]
    assert checkpointed == pytest.approx(plain, rel=1e-6)


def _knn(rank, world, out_dir, backend, cache):
    import os

    os.environ["SCALE_CACHE"] = cache
    overrides = {**backend_overrides(backend), "parallel.precision": "bf16", "schedule.max_steps": 1,
                 "data.knn_train_source": "demo:val", "data.eval_source": "demo:val", "monitor.knn_k": 5}  # fmt: skip
    trainer = Trainer(tiny_config(out_dir, backend, **overrides), loader=FixedBatchLoader(4, 8, world, rank))
    trainer.fit()
    acc = trainer.knn_monitor()
    assert 0.0 <= acc <= 100.0  # the same number on every rank (broadcast)
    assert trainer.knn_random_init() == trainer.knn_random_init()


@pytest.mark.parametrize("backend", ["fsdp", *(pytest.param(s, marks=pytest.mark.slow) for s in ("zero2", "zero3"))])
def test_knn_monitor_runs_under_sharded_backends_in_bf16(tmp_path, backend):
    run_ranks(_knn, 2, str(tmp_path), backend, str(tmp_path / "cache"))


def _nan_step(rank, world, out_dir, backend):
    overrides = {**backend_overrides(backend), "schedule.max_steps": 2}
    trainer = Trainer(
        tiny_config(out_dir, backend, **overrides), loader=FixedBatchLoader(4, 8, world, rank, nan_at={(0, 2)})
    )
    trainer.fit()
    if backend == "zero3":
        # DeepSpeed 0.19's ZeRO-3 gathers on a stream of its own on GPUs; the momentum update orders
        # its writes before those gathers through this private attribute (None on a CPU).
        from scale.parallel.ds_internals import zero3_gather_stream

        coordinator = trainer.backend.model.optimizer.parameter_offload.get_param_coordinator()
        assert hasattr(coordinator, "_PartitionedParameterCoordinator__allgather_stream")
        assert zero3_gather_stream(trainer.backend.model.optimizer) is None
    before = trainer.backend.full_state_dict()
    trainer.cfg.schedule.max_steps = 3
    trainer.fit()  # the third global batch holds a NaN (on rank 0's half only)
    after = trainer.backend.full_state_dict()
    assert trainer.nonfinite_total == 1
    for name, value in before.items():
        assert torch.equal(after[name], value), name


@pytest.mark.parametrize("backend", ["fsdp", "zero2", "zero3"])
def test_nan_step_is_skipped_on_every_rank_under_sharded_backends(tmp_path, backend):
    run_ranks(_nan_step, 2, str(tmp_path), backend)


def test_lamb_under_zero_is_refused(tmp_path):
    with pytest.raises(Exception, match="per-tensor trust ratios"):
        run_ranks(_lamb_zero, 2, str(tmp_path))


def _lamb_zero(rank, world, out_dir):
    overrides = {**backend_overrides("zero2"), "optim.name": "lamb"}
    Trainer(tiny_config(out_dir, "lamb", **overrides), loader=FixedBatchLoader(4, 8, world, rank))


def _optimizer_run(rank, world, out_dir, backend, optimizer):
    overrides = {**backend_overrides(backend), "optim.name": optimizer, "schedule.max_steps": 3}
    trainer = Trainer(tiny_config(out_dir, backend, **overrides), loader=FixedBatchLoader(4, 8, world, rank))
    trainer.fit()
    full = trainer.backend.full_state_dict()
    if rank == 0:
        torch.save(full, f"{out_dir}/{backend}.pt")


@pytest.mark.parametrize("optimizer", ["lamb", "lars"])
def test_trust_ratio_optimizers_under_fsdp_equal_ddp(tmp_path, optimizer):
    """LAMB/LARS per-tensor trust ratios: FSDP2's DTensor norms cover the whole tensor, so the
    sharded run equals the replicated one."""
    for backend in ("ddp", "fsdp"):
        run_ranks(_optimizer_run, 2, str(tmp_path), backend, optimizer)
    ddp, fsdp = (torch.load(tmp_path / f"{b}.pt", weights_only=True) for b in ("ddp", "fsdp"))
    assert [r["loss"] for r in read_metrics(tmp_path / "fsdp")] == pytest.approx(
        [r["loss"] for r in read_metrics(tmp_path / "ddp")], rel=1e-5
    )
    for name, value in ddp.items():
        torch.testing.assert_close(fsdp[name], value, rtol=1e-4, atol=1e-5, msg=name)


def _zero_run(rank, world, out_dir, stage, name, steps, error_file=""):
    cfg = tiny_config(out_dir, name, **{**backend_overrides(stage), "schedule.max_steps": steps})
    try:
        Trainer(cfg, loader=FixedBatchLoader(4, 8, world=world, rank=rank)).fit()
    except BackendError as e:
        if not error_file:
            raise
        Path(error_file).write_text(str(e))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2"])  # ZeRO-1 takes the same path (measured: it passes too)
def test_deepspeed_checkpoint_on_another_world_size_is_refused_then_resumes_after_conversion(tmp_path, stage):
    """A 2-rank ZeRO checkpoint (taken at an epoch end) on 1 rank: refused with the conversion
    command; after running it, it resumes through DeepSpeed's universal format (plus the momentum
    encoder and BatchNorm statistics, which that format leaves out) and continues the uninterrupted
    run's losses."""
    run_ranks(_zero_run, 2, str(tmp_path), stage, "straight", 6)
    run_ranks(_zero_run, 2, str(tmp_path), stage, "moved", 4)
    error = tmp_path / "error.txt"
    run_ranks(_zero_run, 1, str(tmp_path), stage, "moved", 6, str(error))
    message = error.read_text()
    assert "was written by 2 ranks and this run has 1" in message and "ds_to_universal" in message
    command = message.split("`")[1]
    out = subprocess.run([sys.executable, *command.split()[1:]], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    run_ranks(_zero_run, 1, str(tmp_path), stage, "moved", 6)
    straight = [r["loss"] for r in read_metrics(tmp_path / "straight")]
    moved = [r["loss"] for r in read_metrics(tmp_path / "moved")]
    # 1 and 2 ranks differ only in reduction order (a plain 1- vs 2-rank run agrees to 2e-7).
    assert moved[:4] == straight[:4] and moved == pytest.approx(straight, rel=1e-5)


def test_a_zero3_checkpoint_on_another_world_size_is_refused_with_what_works(tmp_path):
    """The decision alone (the layout detection is exercised by the ZeRO-1/2 test above)."""
    from scale.parallel.deepspeed import DeepSpeedBackend

    backend = object.__new__(DeepSpeedBackend)
    backend.stage, backend.world_size = 3, 1
    with pytest.raises(BackendError, match="ZeRO-3 checkpoint of 2 ranks and this run has 1.*Resume with 2 ranks"):
        backend._load_universal(tmp_path, 2)
