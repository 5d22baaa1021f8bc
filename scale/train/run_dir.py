"""The run directory (`run.output_dir/run.name`): refused when it holds another run's config
(nothing written before is lost), written with the resolved config, and brought back to a resume
point (newer checkpoints set aside, metric rows past it dropped)."""

from __future__ import annotations

import json
import logging
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
    "model.compile", "parallel.tune_cpu_malloc",
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
    checkpoints set aside, metric rows after it dropped (the resumed run recomputes them)."""
    set_aside_newer(run_dir, step)
    for name in METRIC_FILES:
        truncate_metrics(run_dir / name, step)


def set_aside_newer(run_dir: Path, step: int) -> None:
    """Rename checkpoints newer than `step` (a rollback or a fresh start in an old run directory) to
    `abandoned-step-*`: kept, but neither resumed from nor counted by `keep_last`."""
    for path in list_checkpoints(run_dir):
        if int(path.name.split("-")[1]) > step:
            target = path.with_name(f"abandoned-{path.name}")
            log.warning("checkpoint %s is newer than the start step %d: renamed to %s", path.name, step, target.name)
            path.rename(target)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows after `step` (they are about to be recomputed by the resumed run)."""
    if not path.is_file():
        return
    rows = path.read_text().splitlines()
    kept = [r for r in rows if r.strip() and json.loads(r).get("step", 0) <= step]
    if len(kept) != len(rows):
        path.write_text("".join(r + "\n" for r in kept))
