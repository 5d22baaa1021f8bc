"""Training on one GPU: bf16 and fp16 (loss-scale skips included), save + resume, host syncs per
step, and the DeepSpeed launcher with ZeRO-1/2/3. Skipped without CUDA."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from scale.train.trainer import Trainer
from tests.helpers import FixedBatchLoader, read_metrics, tiny_config

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]


def _trainer(out_dir, name, precision, **overrides):
    cfg = tiny_config(out_dir, name, **{"parallel.precision": precision, **overrides})
    trainer = Trainer(cfg, loader=FixedBatchLoader(4, cfg.batch.global_batch_size))
    if precision == "fp16":
        # A scale above what fp16 gradients allow: the first steps overflow and are skipped, as at
        # the start of a real fp16 run (2^16 there), until the scaler has halved it enough.
        trainer.backend.scaler = torch.amp.GradScaler("cuda", init_scale=2.0**22)
    return trainer


@pytest.fixture
def deterministic():
    """Deterministic kernels, attention through the math path (fused attention backwards may add
    in any order): two runs of the same steps then give the same bits."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    with sdpa_kernel(SDPBackend.MATH):
        yield
    torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_one_gpu_run_resumes_with_identical_losses(tmp_path, precision, deterministic):
    full = _trainer(tmp_path, "full", precision)
    assert full.backend.device.type == "cuda" and full.optimizer_description == "torch AdamW (fused)"
    full.fit()
    expected = read_metrics(full.run_dir)
    first = _trainer(tmp_path, "split", precision, **{"schedule.max_steps": 6})
    first.fit()
    second = _trainer(tmp_path, "split", precision)
    second.fit()
    got = read_metrics(second.run_dir)
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]
    assert all(r["loss"] == r["loss"] for r in got) and got[-1]["nonfinite_total"] == 0
    if precision == "fp16":  # overflows were skipped, not counted as failures; the count resumes too
        assert 0 < got[-1]["scaler_skips"] == expected[-1]["scaler_skips"] < len(got)


def _count_syncs(trainer, batches, steps):
    """Host syncs (torch.cuda.set_sync_debug_mode warnings) in `steps` training steps."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for i in range(steps):
                trainer.train_step([batches[i % len(batches)]])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return [str(w.message) for w in caught if "synchroniz" in str(w.message)]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_default_gpu_step_makes_no_host_sync(tmp_path, precision):
    """The default step (torch's fused AdamW, pinned batches) queues its work without waiting for
    the device, a skipped non-finite step included; only a log row reads values back."""
    trainer = _trainer(tmp_path, "syncs", precision, **{"run.log_every": 1000})
    loader = FixedBatchLoader(4, 8, nan_at={(0, 3)})
    batches = [tuple(t.pin_memory() for t in b) for b in loader]
    for b in batches[:2]:  # warm-up: allocator, kernels, optimizer state
        trainer.train_step([b])
    syncs = _count_syncs(trainer, batches[2:], 2)  # the second holds a NaN: skipped on the device
    print(f"host syncs in 2 {precision} steps: {len(syncs)}")
    assert syncs == [], syncs[:5]


MATRIX_SCRIPT = """
import json, sys
from scale.train.trainer import Trainer
from tests.helpers import FixedBatchLoader, read_metrics, tiny_config

out, results = sys.argv[-1], {}  # the launcher puts --local_rank=0 first
for stage in (1, 2, 3):
    for precision in ("bf16", "fp16"):
        name = f"zero{stage}-{precision}"
        over = {"parallel.backend": "deepspeed", "parallel.deepspeed_config": f"ds_configs/zero{stage}.json",
                "parallel.precision": precision, "schedule.max_steps": 6}
        Trainer(tiny_config(out, name, **over), loader=FixedBatchLoader(4, 8)).fit()
        over["schedule.max_steps"] = 8
        t = Trainer(tiny_config(out, name, **over), loader=FixedBatchLoader(4, 8))  # resumes at step 6
        t.fit()
        rows = read_metrics(t.run_dir)
        results[name] = {"steps": [r["step"] for r in rows], "losses": [r["loss"] for r in rows],
                         "optimizer": t.optimizer_description, "skipped": rows[-1]["scaler_skips"]}
json.dump(results, open(f"{out}/matrix.json", "w"))
"""


def test_deepspeed_launcher_on_one_gpu_zero_1_2_3_in_bf16_and_fp16(tmp_path):
    """`deepspeed --num_gpus 1` with each ZeRO stage in bf16 and fp16: finite losses, torch's fused
    AdamW as DeepSpeed's client optimizer, a resume that continues the steps."""
    pytest.importorskip("deepspeed")
    script = tmp_path / "matrix.py"
    script.write_text(MATRIX_SCRIPT)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", "29571",
           str(script), str(tmp_path)]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    results = json.loads((tmp_path / "matrix.json").read_text())
    assert len(results) == 6
    for name, r in results.items():
        assert r["steps"] == list(range(1, 9)), name
        assert all(x == x and x < 1e3 for x in r["losses"]), (name, r["losses"])
        assert r["optimizer"] == "torch AdamW (fused)", name
    print(json.dumps({k: v["losses"][-1] for k, v in results.items()}))


def test_zero3_momentum_encoder_matches_one_gpu_in_fp32(tmp_path):
    """ZeRO-3 writes the momentum encoder's partitions between steps while DeepSpeed gathers on its
    own stream: the run must match the single-GPU one (fp32, TF32 off), or the EMA raced the gather.
    At base lr 0.05 an EMA error shows: one applied twice (one rank, persistent parameters sharing
    their partition's storage) moved the momentum encoder 1.99x as far and the loss 1% by step 5."""
    pytest.importorskip("deepspeed")
    from tests.distributed.test_gpu_paths import HIGH_LR, momentum_drift

    script = tmp_path / "z3.py"
    script.write_text(
        "import sys, torch\n"
        "from scale.train.trainer import Trainer\n"
        "from tests.helpers import FixedBatchLoader, tiny_config\n"
        "from tests.distributed.test_gpu_paths import HIGH_LR\n"
        "out = sys.argv[-1]\n"
        "over = {'parallel.backend': 'deepspeed', 'parallel.deepspeed_config': 'ds_configs/zero3.json',\n"
        "        'parallel.precision': 'fp32', 'parallel.tf32': 'false', **HIGH_LR}\n"
        "t = Trainer(tiny_config(out, 'z3', **over), loader=FixedBatchLoader(4, 8))\n"
        "initial = {k: v.clone() for k, v in t.backend.full_state_dict().items()}\n"
        "t.fit()\n"
        "torch.save({'initial': initial, 'final': t.backend.full_state_dict()}, f'{out}/z3.pt')\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", "29573",
           str(script), str(tmp_path)]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    over = {"parallel.precision": "fp32", "parallel.tf32": "false", **HIGH_LR}
    single = Trainer(tiny_config(tmp_path, "one", **over), loader=FixedBatchLoader(4, 8))
    initial = {k: v.clone() for k, v in single.backend.full_state_dict().items()}
    single.fit()
    assert [r["loss"] for r in read_metrics(tmp_path / "z3")] == pytest.approx(
        [r["loss"] for r in read_metrics(tmp_path / "one")], rel=2e-5
    )
    _, want = momentum_drift({"initial": initial, "final": single.backend.full_state_dict()})
    _, have = momentum_drift(torch.load(tmp_path / "z3.pt", weights_only=True))
    assert have.norm() / want.norm() == pytest.approx(1.0, abs=0.02)
