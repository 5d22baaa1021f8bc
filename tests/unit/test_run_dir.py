"""Nothing a run wrote is deleted by a later start (`scale.train.run_dir`): a fresh start sets the
metrics aside whole, a resume moves the rows after its checkpoint aside, a torn last line is set
aside with a log line, a second rollback past the same step works, and the cut reads only the tail."""

import json
import logging
from pathlib import Path

from scale.train import run_dir as run_dir_module
from scale.train.run_dir import AsideFolder, cut_metrics
from scale.train.trainer import Trainer
from tests.helpers import FixedBatchLoader, read_metrics, tiny_config


def make(tmp_path, name="r", **overrides):
    cfg = tiny_config(tmp_path, name, **{"monitor.knn_every": 0, **overrides})
    return Trainer(cfg, loader=FixedBatchLoader(4, cfg.batch.global_batch_size))


def _aside(run_dir: Path, name: str) -> list[str]:
    """The contents of every set-aside copy of `name`, oldest first."""
    return [p.read_text() for p in sorted((run_dir / "abandoned").glob(f"*/{name}"))]


def test_a_fresh_start_sets_the_old_metrics_aside_whole(tmp_path):
    first = make(tmp_path, **{"schedule.max_steps": 3})
    first.fit()
    old = {n: (first.run_dir / n).read_text() for n in ("metrics.jsonl", "gradients.jsonl")}
    again = make(tmp_path, **{"schedule.max_steps": 2, "run.resume": "none"})
    again.fit()
    for name, text in old.items():
        assert _aside(again.run_dir, name) == [text], name  # byte for byte
    assert [r["step"] for r in read_metrics(again.run_dir)] == [1, 2]


def test_a_torn_last_line_is_set_aside_and_the_run_resumes(tmp_path, caplog):
    first = make(tmp_path, **{"schedule.max_steps": 4, "run.ckpt_every": 2})
    first.fit()
    metrics = first.run_dir / "metrics.jsonl"
    rows_before = metrics.read_text()
    with open(metrics, "a") as f:  # a kill in the middle of a write
        f.write('{"step": 5, "loss": 1.2')
    with caplog.at_level(logging.WARNING):
        resumed = make(tmp_path, **{"schedule.max_steps": 6, "run.ckpt_every": 2})
        resumed.fit()
    assert [r["step"] for r in read_metrics(resumed.run_dir)] == [1, 2, 3, 4, 5, 6]
    assert metrics.read_text().startswith(rows_before)
    assert _aside(resumed.run_dir, "metrics.jsonl") == ['{"step": 5, "loss": 1.2']
    assert "1 of them torn or damaged" in caplog.text


def test_a_second_rollback_past_the_same_step_starts(tmp_path):
    make(tmp_path, **{"schedule.max_steps": 4, "run.ckpt_every": 2}).fit()
    step2 = tmp_path / "r" / "checkpoints" / "step-00000002"
    for _ in range(2):  # roll back to step 2 twice: step 4 is set aside twice
        make(tmp_path, **{"schedule.max_steps": 4, "run.ckpt_every": 2, "run.resume": str(step2)}).fit()
    names = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert names == ["abandoned-step-00000004", "abandoned-step-00000004.2", "step-00000002", "step-00000004"]
    assert [r["step"] for r in read_metrics(tmp_path / "r")] == [1, 2, 3, 4]
    assert len(_aside(tmp_path / "r", "metrics.jsonl")) == 2  # rows 3-4 of both earlier runs kept


def test_the_cut_reads_only_the_rows_after_the_resume_point(tmp_path, monkeypatch):
    path = tmp_path / "gradients.jsonl"
    header = json.dumps({"layers": ["a", "b"]}) + "\n"
    rows = "".join(json.dumps({"step": s, "norm": [0.1234, 5.678] * 20}) + "\n" for s in range(1, 20001))
    path.write_text(header + rows)  # about 8 MB, 20,000 steps
    read = []

    class Counting:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def read(self, n=-1):
            data = self.f.read(n)
            read.append(len(data))
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(run_dir_module, "open", lambda *a, **k: Counting(open(*a, **k)), raising=False)  # noqa: SIM115
    inode = path.stat().st_ino
    cut_metrics(path, 19990, AsideFolder(tmp_path, 19990))
    assert sum(read) < 100_000, f"read {sum(read)} bytes of {len(header) + len(rows)}"
    assert path.stat().st_ino == inode  # truncated in place, not rewritten
    kept = path.read_text().splitlines()
    assert len(kept) == 19991 and json.loads(kept[-1])["step"] == 19990
    aside = [json.loads(x)["step"] for x in _aside(tmp_path, "gradients.jsonl")[0].splitlines()]
    assert aside == list(range(19991, 20001))


def test_a_complete_last_row_without_its_newline_gets_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}')
    cut_metrics(path, 2, AsideFolder(tmp_path, 2))
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert not (tmp_path / "abandoned").exists()
