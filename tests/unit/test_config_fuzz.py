"""Config fuzz: hundreds of generated wrong configurations and command lines, each run through the
real entry point (`scale.pretrain.main`) in this process. Every one must end in one line that
names the field (or file) and says what to change, with no traceback, before anything heavy is
built, and nothing may be written into the existing run directory they all point at.

The cases are generated: a violation of every field rule (`scale.config.RULES`), a wrong type for
every field, misspelt keys of every section, impossible batch splits, contradictory or broken
DeepSpeed JSON, missing files and names; plus a few hand-written command-line mistakes.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import scale.pretrain as pretrain
from scale.config import RULES, Config

ROOT = Path(__file__).resolve().parents[2]


def _field_types() -> dict[str, typing.Any]:
    out = {}
    cfg = Config()
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(obj):
            continue
        for name, hint in typing.get_type_hints(type(obj)).items():
            out[f"{section.name}.{name}"] = hint
    return out


def _wrong_types(hint) -> list[str]:
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    base = args[0]
    if typing.get_origin(base) is tuple:
        return ["0.9", "a,b"]
    return {int: ["abc", "1.5", "1e400"], float: ["abc", "1,0"], bool: ["maybe", "2"]}.get(base, [])


def generate_cases(tmp: Path) -> list[tuple[list[str], str]]:
    """(argv, text the error must contain) for every generated wrong configuration."""
    cases: list[tuple[list[str], str]] = []
    # 1. A violation of every rule (ranges and choices).
    for dotted, rule in RULES.items():
        for value in rule.wrong_values():
            cases.append(([f"--{dotted}={value}"], dotted))
    # 2. A wrong type for every typed field.
    for dotted, hint in _field_types().items():
        for value in _wrong_types(hint):
            cases.append(([f"--{dotted}={value}"], dotted))
    # 3. Misspelt keys of every section, unknown sections, malformed overrides.
    for dotted in list(_field_types())[::4]:
        section, name = dotted.split(".")
        cases.append(([f"--{section}.{name}x=1"], f"{section}.{name}x"))
    for section in ("model", "data", "optim", "schedule", "batch", "parallel", "run", "monitor"):
        cases.append(([f"--{section}s.name=1"], f"{section}s"))
    cases += [(["--model.name"], "needs a value"), (["--recipe", "vit_z_300ep"], "vit_z_300ep")]
    # 4. Impossible batch splits (one process here), and data smaller than one global batch.
    for gb, pd, acc in [(128, 3, 1), (128, 256, 1), (128, 0, 3), (100, 0, 8), (64, 7, 2), (128, 64, 4)]:
        argv = [f"--batch.global_batch_size={gb}", f"--batch.batch_size_per_device={pd}",
                f"--batch.grad_accum_steps={acc}"]  # fmt: skip
        cases.append((argv, "global_batch_size"))
    cases.append((["--batch.global_batch_size=1048576"], "memory"))
    cases.append((["--batch.global_batch_size=1048576", "--parallel.skip_memory_check=true"], "global_batch_size"))
    # 5. Names resolved elsewhere.
    for name in ("vit_gigantic", "vit_b32", "resnet51", ""):
        cases.append(([f"--model.name={name}"], "model"))
    cases.append((["--model.name=resnet50"], "ViT options, which resnet50 does not have"))  # the demo's ViT sizes
    for argv in (["--model.embed_dim=100"], ["--model.img_size=30"], ["--model.embed_dim=36", "--model.num_heads=6"]):
        cases.append((argv, "model"))
    cases += [(["--model.name=vit_bn_l7", "--model.view_forward=joint"], "view_forward=joint"),
              (["--model.view_forward=both"], "view_forward")]  # fmt: skip
    for opt, impl in [("adamw", "apex"), ("adamw", "scale"), ("lamb", "torch"), ("lars", "deepspeed"),
                      ("lars", "torch-fused")]:  # fmt: skip
        cases.append(([f"--optim.name={opt}", f"--optim.implementation={impl}"], "optim.implementation"))
    cases += [
        (["--parallel.precision=fp16"], "precision"),
        (["--parallel.dist_backend=nccl"], "dist_backend"),
        (["--parallel.backend=ddp"], "parallel.backend"),
        (["--parallel.backend=fsdp"], "parallel.backend"),
        (["--parallel.backend=deepspeed"], "deepspeed"),
        (["--parallel.deepspeed_config=ds_configs/zero2.json"], "deepspeed_config"),
        (["--parallel", "zero9"], "zero9"),
        (["--schedule.warmup_epochs=30", "--schedule.epochs=20"], "warmup_epochs"),
        (["--optim.betas=0.9,1.0"], "betas"),
        (["--run.preempt_signal=USR9"], "preempt_signal"),
    ]
    # 6. DeepSpeed JSON: broken, missing, contradicting the scale config.
    ds_dir = tmp / "ds"
    ds_dir.mkdir()
    zero = {"zero_optimization": {"stage": 2}}
    bad_json = {
        "broken": '{"zero_optimization": {"stage": 2},}',
        "empty": "",
        "list": "[1, 2]",
        "batch": json.dumps({**zero, "train_batch_size": 4096}),
        "micro": json.dumps({**zero, "train_micro_batch_size_per_gpu": 3}),
        "accum": json.dumps({**zero, "gradient_accumulation_steps": 4}),
        "clip": json.dumps({**zero, "gradient_clipping": 1.0}),
        "optimizer": json.dumps({**zero, "optimizer": {"type": "Adam"}}),
        "scheduler": json.dumps({**zero, "scheduler": {"type": "WarmupLR"}}),
        "nozero": json.dumps({"train_batch_size": "auto"}),
        "stage4": json.dumps({"zero_optimization": {"stage": 4}}),
        "stage0": json.dumps({"zero_optimization": {"stage": 0}}),
        "bf16": json.dumps({**zero, "bf16": {"enabled": True}}),
        "fp16": json.dumps({**zero, "fp16": {"enabled": True}}),
        "hpz": json.dumps({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}}),
    }
    for name, text in bad_json.items():
        path = ds_dir / f"{name}.json"
        path.write_text(text)
        cases.append((["--deepspeed", str(path)], str(path)))
    cases.append((["--deepspeed", str(ds_dir / "missing.json")], "missing.json"))
    # 7. Missing or wrong files.
    not_tar = tmp / "notes.txt"
    not_tar.write_text("x")
    empty_dir = tmp / "empty"
    empty_dir.mkdir()
    for field in ("source", "eval_source", "knn_train_source"):
        for value in (str(tmp / "nowhere"), str(tmp / "nowhere/train-{000..009}.tar"), str(not_tar), str(empty_dir)):
            other = [] if field == "source" else ["--data.eval_source=demo:val", "--data.knn_train_source=demo"]
            cases.append(([*other, f"--data.{field}={value}"], f"data.{field}"))
    cases += [
        (["--data.eval_source=demo:val", "--data.knn_train_source="], "knn_train_source"),
        (["--data.source=demo", "--data.resampled=true", f"--data.source={empty_dir}"], "data.source"),
        (["--run.resume=" + str(tmp / "no-checkpoint")], "run.resume"),
        (["--run.resume="], "run.resume"),
        (["--run.output_dir=" + str(not_tar)], "output_dir"),
        (["--run.name=a/b"], "run.name"),
    ]
    return cases


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture
def existing_run(tmp_path):
    """An existing run directory (config, metrics, a checkpoint) every case points at."""
    out = tmp_path / "runs"
    run = out / "cpu_demo"
    (run / "checkpoints" / "step-00000010").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"step": 10}\n')
    (run / "checkpoints" / "step-00000010" / "client.pt").write_bytes(b"x")
    return out


def test_at_least_200_wrong_configs_each_end_in_one_line(tmp_path, existing_run, monkeypatch, capsys):
    def accepted(cfg):  # a case that passes every check builds the Trainer (no training) and fails
        from scale.train.trainer import Trainer

        Trainer(cfg)
        raise AssertionError("accepted")

    monkeypatch.setattr(pretrain, "train", accepted)
    cases = generate_cases(tmp_path)
    assert len(cases) >= 200, len(cases)
    before = _snapshot(existing_run)
    failures = []
    for argv, needle in cases:
        own_dir = any(a.startswith("--run.output_dir=") for a in argv)
        full = [*argv, *([] if own_dir else [f"--run.output_dir={existing_run}"]), "--run.progress=false"]
        try:
            pretrain.main(full)
        except SystemExit as e:
            err = capsys.readouterr().err
            # argparse exits 2 after its usage line and one error line
            message = err.strip().splitlines()[-1] if e.code == 2 else e.code
            if not isinstance(message, str) or "\n" in message or "Traceback" in err:
                failures.append((argv, f"not one line: {message!r} / {err[-300:]!r}"))
            elif needle.lower() not in message.lower():
                failures.append((argv, f"does not name {needle!r}: {message}"))
            continue
        except BaseException as e:  # noqa: BLE001 - anything else escaped the entry point
            failures.append((argv, f"escaped: {type(e).__name__}: {e}"))
            continue
        failures.append((argv, "accepted without an error"))
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(f"{a}: {m}" for a, m in failures)
    assert _snapshot(existing_run) == before, "a wrong configuration wrote into the existing run directory"


def test_every_rule_field_exists_and_every_numeric_field_has_a_rule():
    types = _field_types()
    assert set(RULES) <= set(types), set(RULES) - set(types)
    unruled = {k for k, t in types.items() if (t in (int, float) or int in typing.get_args(t)) and k not in RULES}
    # Fields any value of whose type is valid.
    assert not unruled, unruled


def test_the_real_command_prints_one_line_and_debug_the_traceback(tmp_path):
    argv, needle = ["--data.source=/nowhere/train-*.tar"], "data.source"
    cmd = [sys.executable, "-m", "scale.pretrain", *argv, f"--run.output_dir={tmp_path}"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1 and "Traceback" in r.stderr and needle.split(".")[-1] in r.stderr
    assert not any(tmp_path.iterdir()), "nothing is written for a wrong command"


def test_other_commands_end_user_errors_in_one_line(tmp_path):
    cases = [
        ([sys.executable, "-m", "benchmarks.throughput", "--model", "vit_gigantic"], "vit_gigantic"),
        ([sys.executable, "-m", "scale.convert_checkpoint", str(tmp_path / "missing"), str(tmp_path / "o.pth")],
         "missing"),
    ]  # fmt: skip
    for cmd, needle in cases:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
        lines = [line for line in r.stderr.splitlines() if line.strip() and "WARNING" not in line]
        assert r.returncode != 0 and "Traceback" not in r.stderr and needle in lines[-1], (cmd, r.stderr[-800:])


@pytest.mark.parametrize(
    "env, argv, needle",
    [
        ({"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0"}, [], "3 rank(s)"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, ["--parallel.backend=single"], "cannot run on 2 ranks"),
        ({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}, ["--batch.batch_size_per_device=64"], "4 rank(s)"),
        ({"RANK": "1"}, [], "RANK and WORLD_SIZE"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, [], "not an integer"),
    ],
)
def test_launches_that_cannot_work_end_in_one_line_before_any_process_group(monkeypatch, capsys, env, argv, needle):
    import torch.distributed as dist

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(pretrain, "train", lambda cfg: pytest.fail("accepted"))
    with pytest.raises(SystemExit) as e:
        pretrain.main([*argv, "--run.progress=false"])
    assert isinstance(e.value.code, str) and "\n" not in e.value.code and needle in e.value.code, e.value.code
    assert not dist.is_initialized()
