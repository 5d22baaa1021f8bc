"""Faults injected into single-process runs: a process killed at every point of a checkpoint write,
a disk that fills up (a real 1 MiB tmpfs), a checkpoint damaged after it was written."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from scale.errors import CheckpointWriteError
from scale.train import faults
from scale.train.checkpoint import find_resume, verify_checkpoint
from scale.train.faults import CHECKPOINT_POINTS
from scale.train.trainer import Trainer
from tests.helpers import FixedBatchLoader, read_metrics, tiny_config

STEPS = 6


class Killed(BaseException):
    """Stands for SIGKILL: nothing below the point runs, no handler cleans up."""


def make(tmp_path, name, **overrides):
    cfg = tiny_config(tmp_path, name, **{"schedule.max_steps": STEPS, "run.ckpt_every": 2, **overrides})
    return Trainer(cfg, loader=FixedBatchLoader(4, cfg.batch.global_batch_size))


@pytest.fixture
def hooks(monkeypatch):
    registered = []
    monkeypatch.setattr(faults, "_hooks", registered)
    return registered


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


@pytest.mark.parametrize("point", CHECKPOINT_POINTS)
def test_a_kill_anywhere_in_a_checkpoint_write_never_leaves_one_that_resume_picks(tmp_path, hooks, point):
    reference = make(tmp_path, "reference")
    reference.fit()

    def kill(name, step):
        if name == point and step == 4:
            raise Killed(point)

    hooks.append(kill)
    first = make(tmp_path, "run")
    with pytest.raises(Killed):
        first.fit()
    hooks.clear()
    run = first.run_dir
    ckpts = run / "checkpoints"
    picked = find_resume(run, "auto")
    # Before the rename only the temporary directory exists; after it, step 4 is complete.
    assert picked.name == ("step-00000004" if point == "after-rename" else "step-00000002")
    assert verify_checkpoint(ckpts / "step-00000002") is None  # the previous one is intact
    second = make(tmp_path, "run")
    second.fit()
    assert not [p.name for p in ckpts.iterdir() if p.name.startswith(".")]  # leftovers removed
    assert losses(run) == losses(reference.run_dir)  # every step after the restart, bitwise


def test_a_checkpoint_damaged_after_it_was_written_is_set_aside(tmp_path):
    make(tmp_path, "run", **{"schedule.max_steps": 4}).fit()
    ckpts = tmp_path / "run" / "checkpoints"
    model = ckpts / "step-00000004" / "model.pt"
    model.write_bytes(model.read_bytes()[:100])  # truncated on the disk
    assert "model.pt has 100 bytes" in verify_checkpoint(ckpts / "step-00000004")
    assert find_resume(tmp_path / "run", "auto").name == "step-00000002"
    trainer = make(tmp_path, "run")
    trainer.fit()
    assert (ckpts / "broken-step-00000004").is_dir()  # kept for inspection, never resumed from
    assert losses(tmp_path / "run") == losses(_reference(tmp_path))


def _reference(tmp_path):
    make(tmp_path, "ref").fit()
    return tmp_path / "ref"


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0  # fmt: skip


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: one checkpoint of the tiny model (0.67 MiB) fits, a second beside it does not."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "1024k"):
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN); the injected-error test covers the policy")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_keeps_the_previous_checkpoint_and_training_goes_on(small_disk, caplog):
    trainer = make(small_disk, "run", **{"run.max_ckpt_failures": 5})
    with pytest.raises(CheckpointWriteError, match="final checkpoint") as e:
        trainer.fit()  # step 4 fails (retried at step 6), step 6 is the final one: it must not fail silently
    assert "step-00000002" in str(e.value) and "MiB free" in str(e.value)
    assert trainer.step == STEPS  # it trained on after the failure at step 4
    assert any("could not be written" in r.message and "training goes on" in r.message for r in caplog.records)
    ckpts = small_disk / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002"]  # the partial writes are gone
    assert verify_checkpoint(ckpts / "step-00000002") is None
    assert find_resume(small_disk / "run", "auto").name == "step-00000002"


def test_ckpt_failure_stop_stops_at_the_first_failed_write(tmp_path, hooks):
    def enospc(name, step):
        if name == "after-model" and step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")

    hooks.append(enospc)
    trainer = make(tmp_path, "run", **{"run.ckpt_failure": "stop"})
    with pytest.raises(CheckpointWriteError, match="run.ckpt_failure=stop.*step-00000002"):
        trainer.fit()
    assert trainer.step == 4
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000002"]


def test_retry_writes_at_the_next_interval_and_gives_up_after_max_failures(tmp_path, hooks):
    failing = {4}

    def enospc(name, step):
        if name == "after-model" and step in failing:
            raise OSError(errno.ENOSPC, "No space left on device")

    hooks.append(enospc)
    trainer = make(tmp_path, "run", **{"schedule.max_steps": 8})
    trainer.fit()  # step 4 failed, 6 and 8 were written
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-00000002", "step-00000006", "step-00000008"]
    failing.update({6, 8})
    trainer = make(tmp_path, "again", **{"schedule.max_steps": 12, "run.max_ckpt_failures": 3})
    with pytest.raises(CheckpointWriteError, match="3 failures in a row"):
        trainer.fit()
    assert trainer.step == 8


# ----------------------------------------------------------------------------- corrupt data mid-run


@pytest.fixture
def damaged_shards(tmp_path):
    """6 shards of 16 labelled images, then damaged as a long run meets it: 3 images replaced by
    garbage, the last shard truncated to half its bytes, shard 2 deleted after the run started
    (the caller deletes it). Returns (pattern, shard to delete, samples lost in all)."""
    import io
    import tarfile

    from scale.data.shards import make_shards, read_index, write_index
    from tests.helpers import random_images, write_image_folder

    folder = write_image_folder(tmp_path / "folder", random_images(96, size=20), labels=[i % 4 for i in range(96)])
    out = tmp_path / "shards"
    make_shards(folder, out, "train", max_samples=16, shuffle=False, num_workers=1, progress=False)
    tars = sorted(out.glob("train-*.tar"))
    # Garbage images in shard 0: rewrite it with 3 undecodable payloads.
    members = []
    with tarfile.open(tars[0]) as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read()
            if m.name.endswith((".png", ".jpg", ".jpeg")) and len([x for x in members if x[0].endswith("g")]) < 3:
                data = b"not an image at all" * 10
            members.append((m.name, data))
    with tarfile.open(tars[0], "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    write_index(tars[0])
    # The last shard truncated after its index was written.
    size = tars[-1].stat().st_size // 2
    index = read_index(tars[-1].with_suffix(".idx"))
    truncated = sum(any(off + n > size for off, n in s.components.values()) for s in index)
    with open(tars[-1], "r+b") as f:
        f.truncate(size)
    return str(out / "train-*.tar"), tars[2], 3 + truncated + 16


def _data_run(tmp_path, pattern, **overrides):
    cfg = tiny_config(tmp_path, "data", **{"data.source": pattern, "data.num_workers": 1, "data.shuffle_buffer": 16,
                                           "schedule.max_steps": 12, "run.ckpt_every": 4, **overrides})  # fmt: skip
    return Trainer(cfg)


def test_corrupt_images_a_truncated_and_a_vanished_shard_are_skipped_and_counted(tmp_path, damaged_shards, caplog):
    pattern, doomed, lost = damaged_shards
    trainer = _data_run(tmp_path, pattern, **{"data.max_lost_fraction": 0.5})
    doomed.unlink()  # after the start-up read the indexes
    trainer.fit()
    assert trainer.step == 12 and trainer.loader.num_read == 96
    assert trainer.loader.num_skipped == lost  # every lost sample counted, none twice
    warnings = " ".join(r.message for r in caplog.records)
    # Named in the main process's warnings (the worker also logs "shard ... cannot be read" once).
    assert f"{doomed.name}/#" in warnings and "train-000000.tar/000000000" in warnings
    assert read_metrics(trainer.run_dir)[-1]["data/skipped"] == lost


def test_past_the_lost_fraction_the_run_stops_with_a_clear_message(tmp_path, damaged_shards):
    from scale.errors import DataError

    pattern, doomed, lost = damaged_shards
    trainer = _data_run(tmp_path, pattern, **{"data.max_lost_fraction": 0.05})
    doomed.unlink()
    with pytest.raises(DataError, match=r"samples read so far were lost .* more than --data.max_lost_fraction=0.05"):
        trainer.fit()
    assert trainer.step < 12
    for ckpt in (trainer.run_dir / "checkpoints").glob("step-*"):
        assert verify_checkpoint(ckpt) is None


# ----------------------------------------------------------------------------- stalled ranks


def _heartbeats(monkeypatch, values: dict[int, tuple[int, int]], alive: set[int]):
    import threading

    import torch.distributed as dist

    from scale.train import watchdog

    store = dist.HashStore()
    for rank, (count, step) in values.items():
        store.set(f"{watchdog.PREFIX}{rank}", f"{count} {step}")
    stop = threading.Event()

    def beat():
        n = 100
        while not stop.wait(0.05):
            n += 1
            for rank in alive:
                store.set(f"{watchdog.PREFIX}{rank}", f"{n} {values[rank][1]}")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    monkeypatch.setattr(watchdog, "_store", lambda: store)
    hb = watchdog.Heartbeat(0, 4, timeout_s=5)
    hb.step = 9
    return hb, stop


def test_the_diagnosis_names_frozen_ranks_and_ranks_behind(monkeypatch):
    hb, stop = _heartbeats(monkeypatch, {0: (1, 9), 1: (1, 9), 2: (1, 7)}, alive={0, 1})
    try:
        text = hb.diagnose(RuntimeError("Timed out waiting 5000ms for recv"))
    finally:
        stop.set()
    assert text.startswith("rank 0: a collective failed at step 9 (Timed out waiting 5000ms for recv)")
    assert "rank(s) 2 (heartbeat last at step 7), 3 (never started) stopped responding" in text
    hb, stop = _heartbeats(monkeypatch, {0: (1, 9), 1: (1, 9), 2: (1, 7), 3: (1, 9)}, alive={0, 1, 2, 3})
    try:
        text = hb.diagnose(RuntimeError("Connection reset by peer"))
    finally:
        stop.set()
    assert "every rank is alive, rank(s) [2] behind at step 7" in text


def test_under_torchrun_each_restart_attempt_gets_fresh_process_group_keys(monkeypatch):
    """The agent's store outlives the workers: keys of attempt 0 must not be read by attempt 1."""
    import socket
    from datetime import timedelta

    import torch.distributed as dist

    from scale.parallel.launch import restart_store

    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert restart_store(timedelta(seconds=5)) is None  # not torchrun: env:// as usual
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agent = dist.TCPStore("127.0.0.1", port, 1, is_master=True, timeout=timedelta(seconds=5))  # torchrun's agent
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("WORLD_SIZE", "1")
    stores = []
    for attempt in ("0", "1"):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", attempt)
        stores.append(restart_store(timedelta(seconds=5)))
    stores[0].set("default_pg/0//cpu//0/1", "address of a killed worker")
    assert not stores[1].check(["default_pg/0//cpu//0/1"])
    assert agent.check(["scale/attempt-0/default_pg/0//cpu//0/1"])
