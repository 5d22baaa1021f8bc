"""The entry point as users launch it: by path with --local_rank, as a module, and under torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scale.pretrain import main

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--data.source=synthetic", "--model.img_size=32", "--model.patch_size=8", "--model.embed_dim=32",
    "--model.depth=2", "--model.num_heads=4", "--model.dim=16", "--model.mlp_dim=64",
    "--batch.global_batch_size=8", "--schedule.max_steps=3", "--run.log_every=1", "--run.progress=false",
    "--run.tensorboard=false",
]  # fmt: skip


def run(cmd, tmp_path, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SCALE_CACHE": str(tmp_path / "cache")}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def test_script_path_with_local_rank(tmp_path):
    out = run([sys.executable, str(ROOT / "scale" / "pretrain.py"), "--local_rank=0", *TINY,
               f"--run.output_dir={tmp_path}", "--run.name=path"], tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "path" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert (tmp_path / "path" / "checkpoints" / "step-00000003" / "client.pt").is_file()


def test_torchrun_two_ranks(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517"]
    out = run([*torchrun, str(ROOT / "scale" / "pretrain.py"), *TINY, f"--run.output_dir={tmp_path}", "--run.name=ddp"],
              tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["loss"] == r["loss"] for r in rows)
    assert "ddp on cpu, 2 rank(s)" in out.stderr
    assert (tmp_path / "ddp" / "checkpoints" / "step-00000003" / "rng-rank1.pt").is_file()


def test_deepspeed_on_one_rank_without_a_launcher(tmp_path):
    """`python -m scale.pretrain --deepspeed ...` (and `deepspeed --num_gpus 1`): one rank, for which
    DeepSpeed still needs a process group."""
    pytest.importorskip("deepspeed")
    out = run([sys.executable, "-m", "scale.pretrain", "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"), *TINY,
               f"--run.output_dir={tmp_path}", "--run.name=ds1"], tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "ds1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in rows)
    assert "deepspeed ZeRO-2 on cpu, 1 rank(s)" in out.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--recipe", "vit_z"], "unknown recipe 'vit_z'"),
        (["--optim.lr=1"], "unknown key 'optim.lr'; valid keys of [optim]"),
        (["--batch.global_batch_size=abc"], "batch.global_batch_size is an int"),
        (["--batch.global_batch_size=10", "--batch.grad_accum_steps=3"], "does not split"),
        (["--epochs=3"], "overrides look like --section.field=value"),
    ],
)
def test_bad_command_lines_fail_with_clear_messages(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*args, f"--run.output_dir={tmp_path}"])
    text = str(e.value.code) + capsys.readouterr().err
    assert message in text


def test_console_script_exits_zero(tmp_path):
    script = Path(sys.executable).parent / "scale-pretrain"
    if not script.exists():
        pytest.skip("package not installed with its console scripts (pip install -e .)")
    out = run([str(script), "--recipe", "vit_h_300ep", "--print-config"], tmp_path)
    assert out.returncode == 0 and json.loads(out.stdout)["model"]["name"] == "vit_huge"


def test_throughput_cli_under_torchrun_with_fsdp(tmp_path):
    from tests.unit.test_benchmarks import TINY_ARGS

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519"]
    out = run([*torchrun, "-m", "benchmarks.throughput", *TINY_ARGS, "--backend", "fsdp", "--out", str(tmp_path)],
              tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "throughput-vit_small-fsdp-2x.json").read_text())
    assert result["world_size"] == 2 and result["img_per_s_per_device"] > 0
