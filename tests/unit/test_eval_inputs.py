"""Where the evaluation commands write (issue 27, item 4): the default output folder names the run and
the step, an earlier evaluation's results are never overwritten without --overwrite (which sets
them aside), a probe never appends to another evaluation's metrics, and the same command resumes an
unfinished probe of a run on the checkpoint it started with. Through the real `main`, in this
process, on a tiny run and the digits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import scale.knn_eval as knn_eval
import scale.linear_probe as linear_probe

# 64 small images of 4 classes (tests.helpers), 4 steps of 16 per epoch: each command takes a second.
PROBE = ["--train", "data", "--val", "data", "--epochs", "2", "--batch-size", "16", "--no-augment", "--workers", "0",
         "--no-progress", "--no-tensorboard", "--eval-every", "1"]  # fmt: skip
KNN = ["--train", "data", "--val", "data", "--workers", "0", "--ks", "5,10"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny pretraining run with one checkpoint (step 1)."""
    from tests.helpers import train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("eval-out"))


@pytest.fixture
def two_runs(tmp_path, trained_run, monkeypatch):
    """runs/a and runs/b (other output folders of the same recipe), each with a step-00000001; data/."""
    from tests.helpers import random_images, write_image_folder

    for name in ("a", "b"):
        shutil.copytree(trained_run, tmp_path / "runs" / name)
    write_image_folder(tmp_path / "data", random_images(64, 32), labels=[i % 4 for i in range(64)])
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _metric_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_two_runs_whose_checkpoints_share_a_step_name_get_their_own_results(two_runs):
    results = {}
    for run in ("a", "b"):
        ckpt = f"runs/{run}/checkpoints/step-00000001"
        results[run] = linear_probe.main([ckpt, *PROBE])
        knn_eval.main([ckpt, *KNN])
    for run in ("a", "b"):
        out = two_runs / "runs" / "linear_probe" / f"{run}-step-00000001"
        written = json.loads((out / "linear_probe.json").read_text())
        assert written["checkpoint"] == str(two_runs / "runs" / run / "checkpoints" / "step-00000001")
        assert written["lrs"] == results[run]["lrs"]
        # One probe's rows: 2 epochs, each an evaluation row; no other evaluation's appended.
        assert [r["epoch"] for r in _metric_rows(out) if "val/top1/lr3" in r] == [1, 2]
        knn = json.loads((two_runs / "runs" / "knn_eval" / f"{run}-step-00000001" / "knn.json").read_text())
        assert knn["checkpoint"] == written["checkpoint"]
    assert sorted(p.name for p in (two_runs / "runs" / "linear_probe").iterdir()) == ["a-step-00000001",
                                                                                    "b-step-00000001"]  # fmt: skip


@pytest.mark.parametrize("command", ["linear_probe", "knn_eval"])
def test_an_earlier_result_is_kept_unless_overwrite_which_sets_it_aside(two_runs, capsys, command):
    main, argv = (linear_probe.main, PROBE) if command == "linear_probe" else (knn_eval.main, KNN)
    main(["runs/a", *argv])
    out = two_runs / "runs" / command / "a-step-00000001"
    before = _files(out)
    with pytest.raises(SystemExit) as e:
        main(["runs/a", *argv])
    assert "already holds an evaluation's results" in e.value.code and "--overwrite" in e.value.code
    assert "\n" not in e.value.code and _files(out) == before
    main(["runs/a", *argv, "--overwrite"])
    (aside,) = out.glob("replaced-*")
    assert _files(aside) == before  # set aside whole, byte for byte
    if command == "linear_probe":  # the new metrics hold the new probe's rows only
        assert [r["epoch"] for r in _metric_rows(out) if "val/top1/lr3" in r] == [1, 2]
    results = ("linear_probe.json", "linear_probe.md") if command == "linear_probe" else ("knn.json", "knn.md")
    assert all((out / name).is_file() for name in results)


def test_the_same_command_resumes_the_unfinished_probe_on_its_checkpoint(two_runs, monkeypatch):
    """A probe of runs/a killed in its second epoch; meanwhile the run writes step-00000002. The same
    command resumes the probe of step 1 in its folder (its metrics rows once each), and probes
    nothing else; naming step 2 starts a new probe in a folder of its own."""
    from scale.eval.linear_probe import LinearProbe

    real, count = LinearProbe.train_batch, {"n": 0}

    def killed_at_6(self, feats, labels):
        count["n"] += 1
        if count["n"] == 6:  # in epoch 2 (4 steps per epoch): the state is the end of epoch 1
            raise KeyboardInterrupt("killed")
        return real(self, feats, labels)

    with monkeypatch.context() as m:
        m.setattr(LinearProbe, "train_batch", killed_at_6)
        with pytest.raises(KeyboardInterrupt):
            linear_probe.main(["runs/a", *PROBE])
    ckpts = two_runs / "runs" / "a" / "checkpoints"
    shutil.copytree(ckpts / "step-00000001", ckpts / "step-00000002")
    result = linear_probe.main(["runs/a", *PROBE])
    assert result["checkpoint"] == str(ckpts / "step-00000001")
    out = two_runs / "runs" / "linear_probe" / "a-step-00000001"
    # Each row once: the evaluation of epoch 1 (step 4, kept from before the kill), the last loss and
    # evaluation (step 8); steps 5-6, lost with the kill, were recomputed.
    assert [(r["step"], "val/top1/lr3" in r) for r in _metric_rows(out)] == [(4, True), (8, False), (8, True)]
    assert sorted(p.name for p in out.parent.iterdir()) == ["a-step-00000001"]
    assert linear_probe.main([str(ckpts / "step-00000002"), *PROBE])["checkpoint"] == str(ckpts / "step-00000002")
    assert (out.parent / "a-step-00000002" / "linear_probe.json").is_file()


def test_a_result_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """write_atomic: a write that fails (a full disk at the flush) leaves the earlier file whole and
    no temporary file behind."""
    import os

    from scale.eval.inputs import write_atomic

    path = tmp_path / "linear_probe.json"
    path.write_text('{"old": 1}')

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_atomic(path, '{"new": 2}')
    monkeypatch.undo()
    assert path.read_text() == '{"old": 1}' and [p.name for p in tmp_path.iterdir()] == ["linear_probe.json"]
    write_atomic(path, '{"new": 2}')
    assert path.read_text() == '{"new": 2}'


def test_default_output_names(tmp_path):
    from scale.eval.inputs import Checkpoint, default_out

    ckpt = Checkpoint(tmp_path / "runs" / "vit_b" / "checkpoints" / "step-00001000", "run", tmp_path / "runs" / "vit_b")
    assert default_out("linear_probe", ckpt, "base_encoder", False) == Path("runs/linear_probe/vit_b-step-00001000")
    assert default_out("knn_eval", ckpt, "momentum_encoder", True) == Path(
        "runs/knn_eval/vit_b-step-00001000-momentum_encoder-random-init"
    )
    file = Checkpoint(tmp_path / "runs" / "vit_b" / "checkpoints" / "step-00001000" / "model.pt", "file")
    assert default_out("linear_probe", file, "base_encoder", False).name == "vit_b-step-00001000-model"
    release = Checkpoint(tmp_path / "vit-b-300ep.pth.tar", "file")
    assert default_out("linear_probe", release, "base_encoder", False) == Path("runs/linear_probe/vit-b-300ep")


def test_a_probe_into_a_folder_another_live_probe_holds_is_refused(two_runs):
    """The same probe started twice (two terminals, two sbatch): the second is refused naming the
    first, and leaves the folder alone; the folder is given back at the end."""
    import os
    import socket
    import subprocess
    import sys

    from scale.train.run_owner import OWNER_FILE

    out = two_runs / "probe-out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = Path(f"/proc/{holder.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        record = {"host": socket.gethostname(), "pid": holder.pid, "pid_start": start, "since": 0, "token": "t"}
        (out / OWNER_FILE).write_text(json.dumps(record))
        before = _files(out)
        with pytest.raises(SystemExit, match=f"in use by another job .*process {holder.pid}"):
            linear_probe.main(["runs/a/checkpoints/step-00000001", *PROBE, "--out", str(out)])
        assert _files(out) == before
    finally:
        holder.kill()
        holder.wait()
    linear_probe.main(["runs/a/checkpoints/step-00000001", *PROBE, "--out", str(out)])  # the holder is gone
    assert (out / "linear_probe.json").is_file() and not (out / OWNER_FILE).exists()
    assert os.path.isfile(out / "metrics.jsonl")
