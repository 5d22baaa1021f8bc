"""Generated bad input for the evaluation commands (issue 27, item 5), as tests/unit/test_config_fuzz.py
for pretraining: wrong command lines of `scale.linear_probe` and `scale.knn_eval`, each run through
the real `main` in this process. Every one must end in one line that names the argument, before
the model is built (but for a crop size, which only the built backbone tells), and leave everything
already there byte-identical, the earlier evaluation in the default output folder included.

The cases are generated: every numeric argument's rule (`scale.eval.inputs.PROBE_RULES`,
`KNN_RULES`: wrong types, values just outside the range, nan and inf), unparseable lists, every
kind of wrong checkpoint (missing, empty, text, other bytes, directories that hold none), missing,
empty and mismatched data, output folders that cannot be used; plus argparse's own mistakes. A few
go through real processes for the exit status and the one stderr line.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import scale.knn_eval as knn_eval
import scale.linear_probe as linear_probe
from scale.eval.inputs import KNN_RULES, PROBE_RULES, flag
from tests.helpers import random_images, write_image_folder

ROOT = Path(__file__).resolve().parents[2]
PROBE_BASE = ["--train", "demo", "--val", "demo:val", "--epochs", "1", "--batch-size", "128", "--no-augment",
              "--workers", "0", "--no-progress", "--no-tensorboard"]  # fmt: skip
KNN_BASE = ["--train", "demo", "--val", "demo:val", "--workers", "0", "--batch-size", "256"]
RUN = "runs/tiny"
STEP = "tiny-step-00000001"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny pretraining run with one checkpoint (step 1)."""
    from tests.helpers import train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("eval-fuzz"))


@pytest.fixture
def workspace(tmp_path, trained_run, monkeypatch):
    """The folder the commands run in: the run, an earlier evaluation of it by each command (in their
    default output folders), wrong checkpoints and data."""
    shutil.copytree(trained_run, tmp_path / RUN)
    probe_out = tmp_path / "runs" / "linear_probe" / STEP
    probe_out.mkdir(parents=True)
    for name, text in [("linear_probe.json", '{"best": {"top1": 50.0}}'), ("linear_probe.md", "# earlier\n"),
                       ("metrics.jsonl", '{"step": 11, "epoch": 1}\n'), ("probe_settings.json", "{}")]:  # fmt: skip
        (probe_out / name).write_text(text)
    knn_out = tmp_path / "runs" / "knn_eval" / STEP
    knn_out.mkdir(parents=True)
    (knn_out / "knn.json").write_text('{"top1": {"20": 50.0}}')
    (knn_out / "knn.md").write_text("# earlier\n")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.pt").write_bytes(b"")
    (bad / "notes.pt").write_text("these are notes, not weights\n")
    (bad / "junk.pth").write_bytes(bytes(range(200, 256)) * 4)
    (bad / "empty_dir").mkdir()
    (bad / "no_ckpt_run").mkdir()
    (bad / "no_ckpt_run" / "config.json").write_text("{}")
    half = bad / "half_run" / "checkpoints" / "step-00000001"
    half.mkdir(parents=True)
    (half / "client.pt").write_bytes(b"x")  # a checkpoint directory without its model
    (bad / "notes.txt").write_text("x")
    (bad / "no_images" / "a").mkdir(parents=True)
    write_image_folder(bad / "two_classes", random_images(4, 32), labels=[0, 1, 0, 1])
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _snapshot(root: Path) -> dict[str, str]:
    """Every file's bytes (as a hash) and every folder: byte-identical means equal snapshots."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def _set(argv: list[str], option: str, value: str | None = None) -> list[str]:
    """`argv` with `option` set to `value` (replaced where it is there, else added); a flag when None."""
    argv = list(argv)
    if option in argv:
        i = argv.index(option)
        del argv[i : i + (1 if value is None or i + 1 >= len(argv) or argv[i + 1].startswith("--") else 2)]
    return [*argv, option, *([] if value is None else [value])]


def _common_cases(base: list[str]) -> list[tuple[list[str], str]]:
    """The checkpoint, data and output mistakes both commands share: (argv, what the error names)."""
    cases = []
    for ckpt in ("bad/missing.pth", "bad/empty.pt", "bad/notes.pt", "bad/junk.pth", "bad/empty_dir", "bad/no_ckpt_run",
                 "bad/half_run", "bad/half_run/checkpoints/step-00000001", ""):  # fmt: skip
        cases.append(([ckpt, *base], "checkpoint"))
    cases += [
        ([RUN, *base, "--model", "vit_gigantic"], "--model"),
        (["bad/notes.pt", *base, "--model", "vit_small"], "checkpoint"),
        ([f"{RUN}/checkpoints/step-00000001/model.pt", *base, "--random-init"], "--random-init"),
    ]
    for which in ("--train", "--val"):
        for value in ("bad/nowhere", "bad/nowhere/train-{000..009}.tar", "bad/nowhere-*.tar", "bad/notes.txt",
                      "bad/empty_dir", "bad/no_images", ""):  # fmt: skip
            cases.append(([RUN, *_set(base, which, value)], which))
    cases.append(([RUN, *_set(_set(base, "--train", "bad/two_classes"), "--val", "demo:val")], "--val"))
    cases += [
        ([RUN, *base, "--out", "bad/notes.txt"], "--out"),
        ([RUN, *base, "--out", f"{RUN}/probe"], "--out"),  # its metrics.jsonl would be the run's
        ([RUN, *base, "--out", f"{RUN}/checkpoints/step-00000001"], "--out"),
        (
            [
                RUN,
                *_set(_set(base, "--train", "bad/two_classes"), "--val", "bad/two_classes"),
                "--out",
                "bad/two_classes/00000",
            ],
            "--out",
        ),  # inside the data it reads
        ([RUN, *base], "--overwrite"),  # the earlier evaluation in the default folder
        ([f"{RUN}/checkpoints/step-00000001", *base], "--overwrite"),
        ([RUN, *base, "--precision", "fp16"], "--precision"),
        ([RUN, *base, "--encoder", "key_encoder"], "--encoder"),
        ([RUN, *base, "--bogus", "1"], "--bogus"),
        ([RUN, *base, "--batch"], "--batch"),  # abbreviations are refused: --batch-size must be spelt out
        ([RUN, *[a for a in base if a not in ("--train", "demo")]], "--train"),
        ([*base], "checkpoint"),
    ]
    return cases


def probe_cases() -> list[tuple[list[str], str]]:
    cases = []
    for dest, rule in PROBE_RULES.items():
        for value in rule.wrong_values():
            cases.append(([RUN, *_set(PROBE_BASE, flag(dest), value)], flag(dest)))
    for lrs in ("", "a,b", "0", "-1", "3,", "1,1", "nan", "inf,3", "0.3;1"):
        cases.append(([RUN, *PROBE_BASE, "--lrs", lrs], "--lrs"))
    cases += [
        ([RUN, *_set(PROBE_BASE, "--no-augment", None)[:-1], "--labels-per-class", "3"], "--labels-per-class"),
        ([RUN, *PROBE_BASE, "--preempt-signal", "USR9"], "--preempt-signal"),
        ([RUN, *PROBE_BASE, "--preempt-signal", "999"], "--preempt-signal"),
        ([RUN, *PROBE_BASE, "--crop-size", "64", "--out", "fresh"], "--crop-size"),  # only the backbone knows
        ([RUN, *PROBE_BASE, "--epoch", "3"], "--epoch"),
    ]
    return cases + _common_cases(PROBE_BASE)


def knn_cases() -> list[tuple[list[str], str]]:
    cases = []
    for dest, rule in KNN_RULES.items():
        for value in rule.wrong_values():
            cases.append(([RUN, *_set(KNN_BASE, flag(dest), value)], flag(dest)))
    for ks in ("", "0", "-5", "a", "10,10", "10,", "1.5"):
        cases.append(([RUN, *KNN_BASE, "--ks", ks], "--ks"))
    cases.append(([RUN, *KNN_BASE, "--temperature", "-0.07"], "--temperature"))
    return cases + _common_cases(KNN_BASE)


def _run_cases(main, cases, capsys) -> list[str]:
    failures = []
    for argv, needle in cases:
        try:
            main(argv)
        except SystemExit as e:
            err = capsys.readouterr().err
            message = e.code
            if not isinstance(message, str) or "\n" in message.strip() or "Traceback" in err:
                failures.append(f"{argv}: not one line: {message!r} / {err[-300:]!r}")
            elif needle.lower() not in message.lower():
                failures.append(f"{argv}: does not name {needle!r}: {message}")
            continue
        except BaseException as e:  # noqa: BLE001 - anything else escaped the entry point
            failures.append(f"{argv}: escaped: {type(e).__name__}: {e}")
            continue
        failures.append(f"{argv}: accepted without an error")
    return failures


@pytest.mark.parametrize("command", ["linear_probe", "knn_eval"])
def test_generated_wrong_command_lines_each_end_in_one_line_and_write_nothing(workspace, capsys, command):
    main, cases, base, least = {
        "linear_probe": (linear_probe.main, probe_cases(), PROBE_BASE, 90),
        "knn_eval": (knn_eval.main, knn_cases(), KNN_BASE, 55),
    }[command]
    assert len(cases) >= least, len(cases)
    before = _snapshot(workspace)
    failures = _run_cases(main, cases, capsys)
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures)
    assert _snapshot(workspace) == before, "a wrong command line wrote or changed something"
    # The base command itself is right: only the earlier evaluation stops it, and --check says so.
    assert main([RUN, *base, "--out", "elsewhere", "--check"]) == {}
    assert "ok: " in capsys.readouterr().out and _snapshot(workspace) == before


@pytest.mark.parametrize("command, rules", [(linear_probe, PROBE_RULES), (knn_eval, KNN_RULES)])
def test_every_numeric_argument_has_a_rule(command, rules):
    numeric = {a.dest for a in command.parser()._actions if a.type in (int, float) and a.help != argparse.SUPPRESS}
    assert numeric == set(rules), numeric ^ set(rules)


def test_a_world_that_does_not_split_the_batch_is_refused_first(workspace):
    from scale.errors import ConfigError

    args = linear_probe.parse([RUN, *PROBE_BASE])
    with pytest.raises(ConfigError, match="--batch-size 128 does not split over 3 ranks"):
        linear_probe.check(args, world=3)


@pytest.mark.parametrize(
    "module, argv, needle",
    [
        ("scale.linear_probe", [RUN, *PROBE_BASE, "--epochs", "0"], "--epochs"),
        ("scale.linear_probe", ["bad/empty.pt", *PROBE_BASE, "--model", "vit_small"], "empty"),
        ("scale.knn_eval", [RUN, *KNN_BASE, "--temperature", "0"], "--temperature"),
    ],
)
def test_the_real_commands_print_one_line_and_exit_1(workspace, module, argv, needle):
    before = _snapshot(workspace)
    r = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, cwd=workspace,
                       timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert _snapshot(workspace) == before
