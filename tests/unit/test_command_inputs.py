"""Bad input for every command besides pretraining (whose fuzz is tests/unit/test_config_fuzz.py):
the checkpoint converter, make-shards, scale-plot, the benchmarks, and fine-tuning's command line.

Each command's wrong command lines are generated from its parser: every argument whose type carries
a rule (`scale.arguments`) gets the values that rule refuses (zero, negative, not a number, a
missing path, a file where a folder is expected...), every choice a name outside it, plus a few
hand-written lines per command. Each line runs through the command's real entry (`run_cli(main)`,
as its console script) in this process, with the command's heavy first step replaced by a tripwire
(a line that passes every check would start the benchmark: it must not). Each must end with exit
status non-zero, exactly one line on stderr naming the argument, no traceback, and nothing written:
the folder every output points into, holding earlier results, stays byte-identical. A sample of
lines runs as real processes too, where the torch-free commands must answer before importing torch.

Then the output rules: the converter never writes into or over its input, never replaces a file
without --overwrite, writes whole files with the umask's permissions; make-shards refuses an output
inside its input; the memory benchmark exits non-zero on a failed configuration and leaves existing
results as they were; scale-plot skips, counts and logs malformed rows.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scale.arguments import ExistingPath
from scale.entry import run_cli

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


class Accepted(BaseException):  # noqa: N818 - not an error: a line that passed every check
    """Raised by the tripwire that replaces a command's heavy first step."""


def tripwire(*args, **kwargs):
    raise Accepted()


def snapshot(*roots: Path) -> dict[str, tuple[int, str, int]]:
    """Every file and folder under `roots`: size, content hash, mode."""
    out = {}
    for root in roots:
        for p in sorted([root, *root.rglob("*")]) if root.exists() else []:
            st = p.lstat()
            digest = hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            out[str(p)] = (st.st_size if p.is_file() else 0, digest, st.st_mode)
    return out


def run_inprocess(module, argv: list[str], capsys) -> tuple[object, str]:
    """(exit code, everything on stderr) of the command's console-script entry on `argv`."""
    capsys.readouterr()
    try:
        run_cli(module.main, argv)
    except SystemExit as e:
        err = capsys.readouterr().err
        if isinstance(e.code, str):  # Python prints it on the way out
            err += e.code + "\n"
        return (1 if isinstance(e.code, str) else e.code), err
    return 0, capsys.readouterr().err


def one_line_failures(code, err: str, needle: str) -> str | None:
    """Why (code, stderr) is not a one-line refusal naming `needle`, or None."""
    lines = [line for line in err.splitlines() if line.strip()]
    if code in (0, None):
        return f"exit status {code!r}"
    if "Traceback" in err:
        return f"traceback: {err[-400:]!r}"
    if len(lines) != 1:
        return f"{len(lines)} lines on stderr: {err[-400:]!r}"
    if needle.lower() not in lines[0].lower():
        return f"does not name {needle!r}: {lines[0]}"
    return None


# ------------------------------------------------------------------ generated from the parsers

INTERNAL = {"--local_rank", "--worker", "--result"}
"""Options a launcher or the command itself passes (hidden from --help)."""
ANY_VALUE = {"--seed"}
"""Numeric options any value of whose type is valid."""


def option_name(action: argparse.Action) -> str:
    longs = [s for s in action.option_strings if s.startswith("--")]
    return longs[0] if longs else (action.metavar or action.dest)


def generated(parser: argparse.ArgumentParser, base: list[str], tmp: Path) -> list[tuple[list[str], str]]:
    """(argv, the argument's name) for each value each argument's rule refuses."""
    cases = []
    positionals = [a for a in parser._actions if not a.option_strings]
    for action in parser._actions:
        name = option_name(action)
        if isinstance(action, argparse._HelpAction) or name in INTERNAL:
            continue
        rule = action.type
        if hasattr(rule, "wrong_values"):
            values = rule.wrong_values(tmp) if isinstance(rule, ExistingPath) else rule.wrong_values()
        elif action.choices:
            values = ["nosuch"]
        else:
            continue
        for value in values:
            if action.option_strings:
                argv = [*base, f"{name}={value}"]
            else:  # a positional: its place in `base`
                argv = list(base)
                argv[positionals.index(action)] = value
            cases.append((argv, name))
    return cases


def numeric_without_rule(parser: argparse.ArgumentParser) -> list[str]:
    return [option_name(a) for a in parser._actions
            if a.type in (int, float) and option_name(a) not in INTERNAL | ANY_VALUE]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real run directory of the tiny model (2 steps, one checkpoint)."""
    from scale.train.trainer import Trainer
    from tests.helpers import FixedBatchLoader, tiny_config

    out = tmp_path_factory.mktemp("runs")
    Trainer(tiny_config(out, "run", **{"schedule.max_steps": 2}), loader=FixedBatchLoader(4, 8)).fit()
    return out / "run"


def _image_tree(root: Path) -> Path:
    from tests.helpers import random_images, write_image_folder

    return write_image_folder(root, random_images(4, size=8), labels=[0, 0, 1, 1])


def _plot_run(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "metrics.jsonl").write_text('{"step": 1, "epoch": 0.5, "loss": 2.0, "lr": 0.1, "momentum": 0.99}\n')
    return root


def command_table(tmp: Path, tiny_run: Path) -> dict[str, dict]:
    """Per command: its module, a line every check accepts (`base`), the heavy first step the
    tripwire replaces, hand-written wrong lines, and where outputs would go."""
    existing = tmp / "existing"  # earlier results every output that names a folder points into
    existing.mkdir()
    for name in ("memory.json", "memory.md", "data.json", "data.md", "scaling.md", "scaling.json", "flops.md",
                 "throughput-vit_small-single-1x.json", "simulate-vit_base.json", "stability.md",
                 "plan-vit_small-64x80g.md", "compare-vit_small-single-1x.md", "fashion.md"):  # fmt: skip
        (existing / name).write_text("earlier result\n")
    a_file = tmp / "a-file"
    a_file.write_text("x")
    (tmp / "empty.pth").write_bytes(b"")
    (tmp / "text.pth").write_text("a checkpoint, surely\n")
    (tmp / "nonempty").mkdir()
    new = str(tmp / "new")  # an output folder that does not exist: nothing may create it
    images = _image_tree(tmp / "images")
    plot_run = _plot_run(tmp / "plotrun")
    fashion_run = tmp / "fashionrun"
    fashion_run.mkdir()
    (fashion_run / "config.json").write_text("{}")
    tiny = ["--model", "vit_small", "--img-size", "32", "--patch-size", "8", "--embed-dim", "32", "--depth", "2",
            "--num-heads", "4", "--dim", "16", "--mlp-dim", "64", "--batch-size", "8",
            "--precision", "fp32"]  # fmt: skip
    step = sorted((tiny_run / "checkpoints").glob("step-*"))[-1]
    return {
        "scale.convert_checkpoint": dict(
            base=[str(tiny_run), new + "/export"],
            heavy=[("scale.convert_checkpoint", "convert")],
            hand=[
                ([str(tiny_run), str(step / "model.pt")], "DST"),  # the issue's own example
                ([str(tiny_run), str(step / "model.pt"), "--overwrite"], "DST"),
                ([str(tiny_run), str(tiny_run)], "DST"),
                ([str(tiny_run), str(tiny_run / "export")], "DST"),
                ([str(tiny_run), str(tiny_run.parent), "--overwrite"], "DST"),  # a folder holding SRC
                ([str(a_file), str(a_file), "--format", "deit"], "DST"),
                ([str(tiny_run), str(a_file)], "DST"),  # exists, no --overwrite
                ([str(tiny_run), str(tmp / "nonempty"), "--overwrite"], "DST"),  # not an export: never replaced
                ([str(tiny_run), str(tmp / "nonempty"), "--format", "moco", "--overwrite"], "DST"),
                ([str(tiny_run), str(a_file / "x")], "a-file"),
                ([str(tiny_run), new + "/x", "--format", "deit", "--num-classes", "10"], "--num-classes"),
            ],
            real=[  # through the real `convert`: the checkpoint is read
                ([str(tmp / "empty.pth"), new + "/o.pth", "--format", "moco"], "empty.pth"),
                ([str(tmp / "text.pth"), new + "/o.pth", "--format", "moco"], "text.pth"),
                ([str(tmp / "nonempty"), new + "/o"], "nonempty"),
                ([str(tiny_run), new + "/o", "--model", "vit_gigantic"], "--model"),
            ],
        ),
        "scale.make_shards": dict(
            base=[str(images), new],
            heavy=[("scale.data.shards", "make_shards"), ("scale.data.shards", "index_shards")],
            hand=[
                ([str(images), str(images)], "OUT"),
                ([str(images), str(images / "shards")], "OUT"),
                ([str(images), str(a_file)], "OUT"),
                ([new], "ROOT"),
                (["--index-only", str(images), new], "--index-only"),
                (["--index-only", str(tmp / "nonempty")], "OUT"),
            ],
        ),
        "scale.plot": dict(
            base=[str(plot_run), "--out", new],
            heavy=[("scale.plot", "plot_runs")],
            hand=[([str(tmp / "nonempty")], "metrics.jsonl"), ([str(plot_run), "--out", str(a_file)], "--out")],
        ),
        "benchmarks.throughput": dict(
            base=[*tiny, "--steps", "1", "--out", new],
            heavy=[("benchmarks.throughput", "init_distributed")],
            hand=[
                ([*tiny, "--steps", "0", "--out", new], "--steps"),  # the ZeroDivisionError
                ([*tiny, "--out", str(existing)], "throughput-vit_small-single-1x.json"),
                ([*tiny, "--out", str(existing), "--compare", "reference,joint"], "compare-vit_small-single-1x"),
                ([*tiny, "--out", new, "--compare", "reference", "--backend", "ddp"], "--compare"),
                ([*tiny, "--out", str(a_file)], "--out"),
                ([*tiny, "--out", new, "--model", "vit_gigantic"], "vit_gigantic"),
                ([*tiny, "--out", new, "--set=--model.nosuch=1"], "model.nosuch"),
            ],
        ),
        "benchmarks.memory": dict(
            base=[*tiny, "--models", "vit_small", "--backends", "ddp", "--ac", "off", "--out", new],
            heavy=[("benchmarks.memory", "run_one")],
            hand=[
                (
                    [*tiny, "--models", "vit_small", "--backends", "ddp", "--ac", "off", "--out", str(existing)],
                    "memory.json",
                )
            ],  # fmt: skip
        ),
        "benchmarks.data": dict(
            base=["--num-images", "12", "--batch-size", "4", "--out", new],
            heavy=[("benchmarks.data", "run")],
            hand=[
                (["--num-images", "8", "--batch-size", "4", "--out", new], "--num-images"),
                (["--out", str(existing)], "data.md"),
            ],  # fmt: skip
        ),
        "benchmarks.flops": dict(
            base=["--out", new + "/flops.md"],
            heavy=[("benchmarks.flops", "build_table")],
            hand=[(["--out", str(existing / "flops.md")], "flops.md"), (["--out", str(existing)], "--out")],
        ),
        "benchmarks.plan": dict(
            base=["--model", "vit_small", "--gpus", "64", "--gpu-memory", "80", "--simulate", "none", "--out", new],
            heavy=[("benchmarks.plan", "candidates")],
            hand=[
                (["--model", "vit_small", "--gpus", "96", "--out", new], "--global-batch"),
                (
                    ["--model", "vit_small", "--gpus", "64", "--out", new, "--measured", str(tmp / "text.pth")],
                    "--measured",
                ),
            ],  # fmt: skip
        ),
        "benchmarks.requeue_cost": dict(
            base=["--steps", "10", "--back", "1"],
            heavy=[("benchmarks.requeue_cost", "_whole_file")],
            hand=[(["--steps", "5", "--back", "5"], "--back")],
        ),
        "benchmarks.scaling": dict(
            base=["--models", "vit_small", "--gpus", "8", "--out", new],
            heavy=[("benchmarks.scaling", "project_model")],
            hand=[(["--gpus", "96", "--out", new], "--gpus"), (["--out", str(existing)], "scaling.md")],
        ),
        "benchmarks.simulate": dict(
            base=["--model", "vit_small", "--parallel", "ddp", "--world-size", "8", "--batch-size", "2", "--out", new],
            heavy=[("benchmarks.simulate", "simulate")],
            hand=[
                (["--model", "vit_gigantic", "--out", new], "vit_gigantic"),
                (["--model", "vit_base", "--out", str(existing)], "simulate-vit_base.json"),
            ],  # fmt: skip
        ),
        "benchmarks.stability": dict(
            base=["--out", new],
            heavy=[("benchmarks.stability", "run_one")],
            hand=[(["--out", str(existing)], "stability.md"), (["--out", "-"], "--out")],
        ),
        "benchmarks.fashion": dict(
            base=[str(fashion_run), "--out", new, "--results", new + "/fashion"],
            heavy=[("benchmarks.fashion", "steps")],
            hand=[
                ([str(tmp / "nonempty"), "--out", new], "config.json"),
                ([str(fashion_run), "--out", new, "--results", str(existing / "fashion")], "fashion.md"),
                ([str(fashion_run), "--out", str(fashion_run / "eval")], "--out"),
            ],  # fmt: skip
        ),
        "benchmarks.gpu_probes": dict(
            base=["step", "--out", new],
            heavy=[("torch.cuda", "is_available")],
            hand=[],
        ),
    }


COMMANDS = ["scale.convert_checkpoint", "scale.make_shards", "scale.plot", "benchmarks.throughput",
            "benchmarks.memory", "benchmarks.data", "benchmarks.flops", "benchmarks.plan", "benchmarks.requeue_cost",
            "benchmarks.scaling", "benchmarks.simulate", "benchmarks.stability", "benchmarks.fashion",
            "benchmarks.gpu_probes"]  # fmt: skip


@pytest.mark.parametrize("name", COMMANDS)
def test_wrong_command_lines_end_in_one_line_and_write_nothing(name, tmp_path, tiny_run, monkeypatch, capsys):
    module = importlib.import_module(name)
    spec = command_table(tmp_path, tiny_run)[name]
    heavy = [(importlib.import_module(where), attr) for where, attr in spec["heavy"]]
    originals = [(mod, attr, getattr(mod, attr)) for mod, attr in heavy]
    for mod, attr in heavy:
        monkeypatch.setattr(mod, attr, tripwire)
    parser = module.parser()
    assert not numeric_without_rule(parser), f"numeric arguments without a rule: {numeric_without_rule(parser)}"
    cases = [*generated(parser, spec["base"], tmp_path), *spec["hand"]]
    before = snapshot(tmp_path, RESULTS, tiny_run)
    # The base line passes every check: the wrong ones below fail for their own reason.
    with pytest.raises(Accepted):
        run_cli(module.main, spec["base"])
    real = spec.get("real", [])
    assert len(cases) >= 5, cases
    failures = []
    for i, (argv, needle) in enumerate([*cases, *real]):
        with monkeypatch.context() as m:
            if i >= len(cases):  # the checkpoint's content is checked by the real conversion
                for mod, attr, original in originals:
                    m.setattr(mod, attr, original)
            try:
                code, err = run_inprocess(module, argv, capsys)
            except Accepted:
                failures.append((argv, "accepted: passed every check"))
                continue
        why = one_line_failures(code, err, needle)
        if why:
            failures.append((argv, why))
    n = len(cases) + len(real)
    assert not failures, f"{len(failures)} of {n}:\n" + "\n".join(f"{a}: {w}" for a, w in failures)
    assert snapshot(tmp_path, RESULTS, tiny_run) == before, "a wrong command line wrote something"


def test_every_command_has_a_generated_table_of_at_least_200_lines_in_all(tmp_path, tiny_run):
    table = command_table(tmp_path, tiny_run)
    counts = {}
    for name in COMMANDS:
        spec = table[name]
        parser = importlib.import_module(name).parser()
        counts[name] = len(generated(parser, spec["base"], tmp_path)) + len(spec["hand"]) + len(spec.get("real", []))
    assert all(n >= 5 for n in counts.values()) and sum(counts.values()) >= 200, counts


# ------------------------------------------------------------------ real processes


def _python(code_or_module: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *code_or_module], capture_output=True, text=True, cwd=cwd, timeout=300)


PROBE = """import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit as e:
    print("torch imported:", "torch" in sys.modules, file=sys.__stdout__)
    raise
"""


def test_the_real_commands_answer_in_one_line_and_the_torch_free_ones_before_importing_torch(tmp_path):
    """As console scripts run them: a separate process, its real stderr and exit status."""
    (tmp_path / "text.pth").write_text("x\n")
    images = _image_tree(tmp_path / "images")
    before = snapshot(tmp_path)
    for module, argv, needle in [
        ("scale.convert_checkpoint", [str(tmp_path / "text.pth"), str(tmp_path / "text.pth")], "DST"),
        (
            "scale.convert_checkpoint",
            [str(tmp_path / "text.pth"), str(tmp_path / "o"), "--img-size", "0"],
            "--img-size",
        ),
        ("scale.make_shards", [str(images), str(images / "shards")], "OUT"),
        ("scale.make_shards", [str(images), str(tmp_path / "s"), "--max-samples", "-1"], "--max-samples"),
        ("scale.plot", [str(tmp_path / "no-run")], "RUN_DIR"),
    ]:
        r = _python(["-c", PROBE, module, *argv])
        assert one_line_failures(r.returncode, r.stderr, needle) is None, (module, argv, r.stderr)
        assert "torch imported: False" in r.stdout, (module, argv, r.stdout)
    r = _python(["-m", "benchmarks.throughput", "--steps", "0", "--out", str(tmp_path / "new")])  # the line
    assert r.returncode == 2 and one_line_failures(r.returncode, r.stderr, "--steps") is None, r.stderr
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ outputs


def _tree(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mode & 0o777 for p in folder.rglob("*")}


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_converter_writes_whole_files_with_the_umasks_permissions_and_replaces_only_when_asked(
    tmp_path, tiny_run, umask, capsys
):
    from scale import convert_checkpoint as cc

    old = os.umask(umask)
    try:
        out = tmp_path / "out"
        cc.main([str(tiny_run), str(out / "m.pth.tar"), "--format", "moco"])
        cc.main([str(tiny_run), str(out / "export")])
    finally:
        os.umask(old)
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    modes = _tree(out)
    assert modes == {"m.pth.tar": file_mode, "export": dir_mode, "config.json": file_mode,
                     "model.safetensors": file_mode}, {k: oct(v) for k, v in modes.items()}  # fmt: skip
    before = snapshot(out)
    for dst, fmt in ((out / "m.pth.tar", "moco"), (out / "export", "timm")):
        code, err = run_inprocess(cc, [str(tiny_run), str(dst), "--format", fmt], capsys)
        assert one_line_failures(code, err, "--overwrite") is None, err
    assert snapshot(out) == before  # refused: byte-identical
    # --overwrite replaces them, whole, with the same permissions, and leaves no temporary file
    old = os.umask(umask)
    try:
        cc.main([str(tiny_run), str(out / "m.pth.tar"), "--format", "moco", "--encoder", "momentum_encoder",
                 "--overwrite"])  # fmt: skip
        cc.main([str(tiny_run), str(out / "export"), "--num-classes", "3", "--overwrite"])
    finally:
        os.umask(old)
    assert _tree(out) == modes
    assert json.loads((out / "export" / "config.json").read_text())["scale"]["num_classes"] == 3


def test_a_failed_write_leaves_the_earlier_output_whole(tmp_path, tiny_run, monkeypatch):
    import torch

    from scale import convert_checkpoint as cc

    dst = tmp_path / "m.pth.tar"
    cc.main([str(tiny_run), str(dst), "--format", "moco"])
    before = snapshot(tmp_path)

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        cc.main([str(tiny_run), str(dst), "--format", "moco", "--overwrite"])
    assert snapshot(tmp_path) == before  # the earlier file, and no temporary file beside it


@pytest.mark.parametrize("fmt", ["moco", "deit", "timm"])
def test_the_converter_never_writes_over_or_into_its_own_input(tmp_path, tiny_run, fmt, capsys):
    """`scale-convert-checkpoint RUN RUN/checkpoints/step-N/model.pt` (the issue's example), with
    and without --overwrite: refused, the run byte-identical."""
    from scale import convert_checkpoint as cc

    model = sorted((tiny_run / "checkpoints").glob("step-*"))[-1] / "model.pt"
    before = snapshot(tiny_run)
    lines = ([str(tiny_run), str(model)], [str(tiny_run), str(model), "--overwrite"],
             [str(tiny_run), str(tiny_run / "converted")], [str(model.parent), str(model.parent / "x")])  # fmt: skip
    for argv in lines:
        code, err = run_inprocess(cc, [*argv, "--format", fmt], capsys)
        assert one_line_failures(code, err, "inside it") is None, (argv, err)
    assert snapshot(tiny_run) == before


def test_make_shards_refuses_an_output_inside_its_input(tmp_path, capsys):
    from scale import make_shards

    images = _image_tree(tmp_path / "images")
    before = snapshot(tmp_path)
    for out in (images, images / "shards", images / "00000" / "shards"):
        code, err = run_inprocess(make_shards, [str(images), str(out), "--workers", "1"], capsys)
        assert one_line_failures(code, err, "inside it") is None, (out, err)
    assert snapshot(tmp_path) == before


MEMORY_TINY = ["--img-size", "32", "--patch-size", "8", "--embed-dim", "32", "--depth", "2", "--num-heads", "4",
               "--dim", "16", "--mlp-dim", "64", "--batch-size", "4", "--precision", "fp32", "--models", "vit_small",
               "--ac", "off"]  # fmt: skip


def test_the_memory_benchmark_exits_non_zero_on_a_failed_configuration_and_keeps_earlier_results(tmp_path):
    """A configuration whose ranks fail (DDP on one process: the launch refuses it) makes the sweep
    exit non-zero, and does not replace the results already there, even where replacing them is
    asked for (--keep: reuse their rows and rewrite them; --overwrite takes the same path)."""
    from benchmarks.memory import main

    (tmp_path / "memory.json").write_text('{"rows": []}\n')
    (tmp_path / "memory.md").write_text("# the committed table\n")
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([*MEMORY_TINY, "--backends", "ddp", "--nproc", "1", "--out", str(tmp_path), "--keep"])
    assert isinstance(e.value.code, str) and "1 of 1 configurations failed: vit_small ddp" in e.value.code
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ scale-plot


def test_scale_plot_skips_counts_and_logs_malformed_rows(tmp_path, caplog, capsys):
    """A row without its step, a step that is text, a non-JSON line, a list, a kNN row without its
    accuracy, gradients of the wrong width, an event without its fields: skipped, counted and
    logged; the good rows are plotted."""
    from scale import plot

    run = tmp_path / "run"
    run.mkdir()
    good = [{"step": s, "epoch": s / 4, "loss": 2.0 - s / 10, "lr": 0.1, "momentum": 0.99} for s in range(1, 9)]
    good += [{"step": s, "knn_dense_queries": 8, "knn_dense_top1": 40.0 + s} for s in range(2, 9, 2)]
    bad = ['{"loss": 1.0, "lr": 0.1}', '{"step": "ten", "loss": 1.0}', '{"step": 9, "loss": "nan?"}', "[1, 2]",
           '{"step": 9, "knn_dense_queries": 8}', '{"step": 10, "loss": 1.0, "lr": 0.1, "momen']  # fmt: skip
    (run / "metrics.jsonl").write_text("\n".join([*map(json.dumps, good), *bad]))
    grads = [{"layers": ["patch_embed", "block.0", "block.1", "projector"]}]
    grads += [{"step": s, "relative": [1.0, 1.1, 0.9, 1.0]} for s in range(1, 9)]
    (run / "gradients.jsonl").write_text("\n".join([*map(json.dumps, grads), '{"step": 9, "relative": [1.0]}',
                                                    '{"step": 10, "relative": "x"}']))  # fmt: skip
    events = [{"event": "spike", "step": 3, "layer": "block.0", "relative": 4.0}, {"event": "spike", "step": 4},
              {"event": "knn_dip", "step": 4, "top1": "low"}, {"step": 5}]  # fmt: skip
    (run / "events.jsonl").write_text("\n".join(map(json.dumps, events)))
    with caplog.at_level("WARNING", logger="scale.plot"):
        paths = plot.main([str(run), "--out", str(tmp_path / "plots")])
    assert sorted(p.name for p in paths) == ["gradients-run.png", "knn.png", "training.png"]
    out = capsys.readouterr().out
    assert "4 dense kNN points" in out and "8 gradient rows" in out and "1 layer spikes" in out
    assert "11 malformed rows skipped" in out, out  # 6 metrics + 2 gradients + 3 events
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "metrics.jsonl: skipped 6 of 18 rows" in warned and "line 13: no 'step'" in warned, warned
    assert "events.jsonl: skipped 3 of 4 rows" in warned and "gradients.jsonl: skipped 1 of 11 rows" in warned
    assert "skipped 1 gradient rows whose layer count is not the header's 4" in warned


@pytest.mark.parametrize(
    "content, needle",
    [("", "no usable rows yet"), ("not json\n[]\n", "no usable rows (2 malformed"), (None, "no metrics.jsonl")],
)
def test_scale_plot_on_a_run_without_usable_metrics_is_one_line(tmp_path, capsys, content, needle):
    from scale import plot

    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    before = snapshot(tmp_path)
    code, err = run_inprocess(plot, [str(run)], capsys)
    assert one_line_failures(code, err, needle) is None, err
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ fine-tuning

FINETUNE_VALID = {
    ("--model.embed_dim=100",): "fashion_finetune's ViT has 4 heads: 100 splits",
    ("--model.embed_dim=36", "--model.num_heads=6"): "valid for fashion_finetune's ViT (learned positions)",
    ("--data.eval_source=demo:val", "--data.knn_train_source="): "fine-tuning has no held-out kNN",
}
"""Pretraining's wrong lines that are right for the fine-tuning recipe."""
TRAINER_CHECKED = {("--batch.global_batch_size=1048576",),
                   ("--batch.global_batch_size=1048576", "--parallel.skip_memory_check=true")}  # fmt: skip
"""Caught when the trainer is built, in pretraining too (its fuzz's tripwire builds the Trainer)."""


def test_finetunings_command_line_gets_pretrainings_checks(tmp_path, monkeypatch, capsys):
    """`scale.finetune` is `scale.pretrain.main(task='finetune')`: pretraining's generated wrong
    lines (tests/unit/test_config_fuzz.py) on the fine-tuning recipe end in one line naming the
    field, and write nothing into an existing fine-tuning run directory."""
    import scale.pretrain as pretrain
    from scale import finetune
    from tests.unit.test_config_fuzz import generate_cases

    monkeypatch.setattr(pretrain, "train", tripwire)
    out = tmp_path / "runs"
    (out / "fashion_finetune" / "checkpoints").mkdir(parents=True)
    (out / "fashion_finetune" / "metrics.jsonl").write_text('{"step": 1}\n')
    cases = generate_cases(tmp_path)
    before = snapshot(out)
    failures, accepted = [], set()
    for argv, needle in cases:
        own_dir = any(a.startswith("--run.output_dir=") for a in argv)
        full = ["--data.source=demo", "--data.eval_source=demo:val", *argv, "--run.progress=false",
                *([] if own_dir else [f"--run.output_dir={out}"])]  # fmt: skip
        capsys.readouterr()
        try:
            finetune.main(full)
        except Accepted:
            accepted.add(tuple(argv))
            continue
        except SystemExit as e:
            err = capsys.readouterr().err
            message = err.strip().splitlines()[-1] if e.code == 2 else e.code
            why = one_line_failures(e.code, message if isinstance(message, str) else "", needle)
            if why:
                failures.append((argv, why))
            continue
        failures.append((argv, "returned"))
    assert not failures, "\n".join(f"{a}: {w}" for a, w in failures)
    assert accepted == set(FINETUNE_VALID) | TRAINER_CHECKED, accepted ^ (set(FINETUNE_VALID) | TRAINER_CHECKED)
    assert snapshot(out) == before


def test_finetuning_refuses_a_pretrained_file_that_is_no_checkpoint_before_writing(tmp_path, capsys):
    from scale import finetune

    for name, content in (("empty.pth", b""), ("notes.pth", b"a checkpoint, surely\n")):
        (tmp_path / name).write_bytes(content)
        out = tmp_path / f"runs-{name}"
        argv = ["--data.source=demo", "--data.eval_source=demo:val", "--schedule.max_steps=1",
                "--run.progress=false", f"--run.output_dir={out}", "--pretrained", str(tmp_path / name)]  # fmt: skip
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            finetune.main(argv)
        assert one_line_failures(1, str(e.value.code), name) is None, e.value.code
        assert not out.exists(), "the run directory was created for a command that cannot start"


def test_the_planner_prints_its_plan_and_keeps_an_existing_result(tmp_path, capsys, caplog):
    """The documented planner commands work as shown while their results are committed: the plan is
    printed, the existing result is kept byte for byte (a line says so), --overwrite replaces it."""
    from benchmarks import plan

    argv = ["--model", "vit_small", "--gpus", "64", "--gpu-memory", "80", "--simulate", "none", "--out", str(tmp_path)]
    plan.main(argv)
    first = (tmp_path / "plan-vit_small-64x80g.md").read_text()
    (tmp_path / "plan-vit_small-64x80g.md").write_text("earlier\n")
    capsys.readouterr()
    plan.main(argv)
    assert "Chosen:" in capsys.readouterr().out and "not replaced" in caplog.text
    assert (tmp_path / "plan-vit_small-64x80g.md").read_text() == "earlier\n"
    plan.main([*argv, "--overwrite"])
    assert (tmp_path / "plan-vit_small-64x80g.md").read_text() == first
