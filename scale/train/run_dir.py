"""The run directory (`run.output_dir/run.name`): refused when it holds another run's config
(nothing written before is lost), written with the resolved config, and brought back to a resume
point (newer checkpoints set aside, metric rows past it dropped)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from scale.config import Config
from scale.config.overrides import current_names, flatten
from scale.errors import ConfigError
from scale.train.checkpoint import list_checkpoints

log = logging.getLogger(__name__)

RESUMABLE_CHANGES = {
    "run.resume", "run.progress", "run.tensorboard", "run.log_every", "run.keep_last", "run.ckpt_every",
    "schedule.max_steps", "data.num_workers", "parallel.activation_checkpointing",
    "run.preempt_signal", "run.preempt_check_every", "run.requeue", "run.max_requeues", "run.ckpt_failure",
    "run.max_ckpt_failures", "data.max_lost_fraction", "parallel.timeout_minutes", "model.view_forward",
    "model.compile", "parallel.tune_cpu_malloc", "run.stale_owner_minutes",
    "run.trust_checkpoint_code",
}  # fmt: skip
"""Fields that may differ between a run directory's config and a resumed run's (and every
`monitor.*` field: the monitors change nothing in training)."""

METRIC_FILES = ("metrics.jsonl", "gradients.jsonl", "events.jsonl")


def check_run_dir(run_dir: Path, cfg: Config) -> None:
    """Refuse a run directory that holds a different config (nothing written before is lost)."""
    path = run_dir / "config.json"
    if not path.is_file():
        return
    old, new = current_names(flatten(json.loads(path.read_text()))), flatten(json.loads(cfg.to_json()))
    # A field added to scale after the run started is absent from its config: its default is the
    # behaviour the run had.
    defaults = flatten(json.loads(Config().to_json()))
    old = {**{k: v for k, v in defaults.items() if k not in old}, **old}
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES
                  and not k.startswith("monitor."))  # fmt: skip
    if diff:
        changes = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:8])
        raise ConfigError(
            f"run directory {run_dir} holds a different config ({changes}); use another --run.name or "
            "--run.output_dir, or delete the directory to start over"
        )


def write_config(run_dir: Path, cfg: Config) -> None:
    """config.json of the run, replaced atomically (main rank only)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / ".config.json.tmp"
    tmp.write_text(cfg.to_json())
    tmp.replace(run_dir / "config.json")


def rewind(run_dir: Path, step: int) -> None:
    """Bring the run directory back to `step` (the resume point, 0 for a fresh start): newer
    checkpoints set aside (`abandoned-step-*`), and what the metric files hold after it moved to
    `abandoned/` (the resumed run recomputes it; a fresh start sets aside the files whole, with
    TensorBoard's and the results). Nothing a run wrote is deleted."""
    set_aside_newer(run_dir, step)
    aside = AsideFolder(run_dir, step)
    if step == 0:
        for name in FRESH_START_SET_ASIDE:
            if (run_dir / name).exists():
                aside.move(run_dir / name)
        return
    for name in METRIC_FILES:
        cut_metrics(run_dir / name, step, aside)


FRESH_START_SET_ASIDE = (*METRIC_FILES, "tensorboard", "results.json", "results.md")
"""What a fresh start in an existing run directory sets aside whole (the checkpoints: `set_aside_newer`)."""


class AsideFolder:
    """`RUN/abandoned/<time>-from-step-N/`, created on first use, never an existing one."""

    def __init__(self, run_dir: Path, step: int):
        self.run_dir, self.step, self.path = run_dir, step, None

    def folder(self) -> Path:
        if self.path is None:
            base = self.run_dir / "abandoned" / f"{time.strftime('%Y%m%d-%H%M%S')}-from-step-{self.step}"
            path, n = base, 1
            while True:
                try:
                    path.mkdir(parents=True)
                    break
                except FileExistsError:
                    n += 1
                    path = base.with_name(f"{base.name}-{n}")
            self.path = path
        return self.path

    def move(self, path: Path) -> None:
        target = self.folder() / path.name
        path.rename(target)
        log.warning("fresh start: %s set aside as %s", path.name, target.relative_to(self.run_dir))


def _unique(path: Path) -> Path:
    """`path`, or `path.2`, `path.3`... the first that does not exist."""
    n, candidate = 1, path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def set_aside_newer(run_dir: Path, step: int) -> None:
    """Rename checkpoints newer than `step` (a rollback or a fresh start in an old run directory) to
    `abandoned-step-*` (`.2`, `.3`... after further rollbacks past the same step): kept, but neither
    resumed from nor counted by `keep_last`."""
    for path in list_checkpoints(run_dir):
        if int(path.name.split("-")[1]) > step:
            target = _unique(path.with_name(f"abandoned-{path.name}"))
            log.warning("checkpoint %s is newer than the start step %d: renamed to %s", path.name, step, target.name)
            path.rename(target)


def _row_step(line: bytes) -> int | None:
    """A metrics line's step (0 for a row without one, such as a header); None when it is not a JSON
    object (a line torn by a kill, or damaged)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return int(row.get("step", 0) or 0) if isinstance(row, dict) else None


def _lines_backwards(f, end: int, block: int = 1 << 16):
    """(offset, line) from the end of `f` backwards, reading only as far as the caller goes."""
    pos, tail = end, b""
    while pos > 0:
        read = min(block, pos)
        pos -= read
        f.seek(pos)
        chunk = f.read(read) + tail
        lines = chunk.split(b"\n")
        tail = lines[0]  # may continue in the block before
        offset = pos + len(chunk)
        for line in reversed(lines[1:]):
            offset -= len(line) + 1
            yield offset + 1, line
    yield 0, tail


def _end_line(f, end: int) -> None:
    """A complete last row without its newline gets one: the next row appended must not join it."""
    if end and (f.seek(end - 1), f.read(1))[1] != b"\n":
        f.seek(end)
        f.write(b"\n")


def cut_metrics(path: Path, step: int, aside: AsideFolder) -> None:
    """Move the rows after `step` (and any torn or damaged line among them) from the end of `path` to
    the aside folder, then truncate `path` there: read from the end only as far as the cut (the
    rows are in step order), so a requeue costs the rows since the last checkpoint, not the file
    (gradients.jsonl grows by about 1 KB a step). Written aside and flushed before the truncation:
    a kill between the two leaves the rows in both places, never in neither."""
    if not path.is_file():
        return
    with open(path, "r+b") as f:
        end = f.seek(0, 2)
        cut, torn = end, 0
        for offset, line in _lines_backwards(f, end):
            if not line.strip():
                cut = offset
                continue
            row_step = _row_step(line)
            if row_step is not None and row_step <= step:
                break
            torn += row_step is None
            cut = offset
        if cut == end:
            _end_line(f, end)
            return
        f.seek(cut)
        tail = f.read()
        target = aside.folder() / path.name
        with open(target, "wb") as out:
            out.write(tail)
            out.flush()
            os.fsync(out.fileno())
        f.truncate(cut)
        _end_line(f, cut)
    rows = sum(1 for line in tail.split(b"\n") if line.strip())
    log.warning("%s: %d row(s) after step %d set aside in %s (the resumed run recomputes them)%s", path.name, rows,
                step, target.relative_to(aside.run_dir),
                f"; {torn} of them torn or damaged (not JSON)" if torn else "")  # fmt: skip
