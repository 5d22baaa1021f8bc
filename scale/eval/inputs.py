"""What the evaluation commands (`scale.linear_probe`, `scale.knn_eval`) check before anything heavy,
and where they write.

- Every numeric argument has a rule (`PROBE_RULES`, `KNN_RULES`; the bad-input tests generate their
  wrong values from them); the checkpoint is looked at without loading it (empty, text, a directory
  without a checkpoint), the data sources are resolved, the output folder is checked. Each failure
  is a `ConfigError` naming the argument: the commands print it as one line and exit 1, having
  built and written nothing.
- The default output folder names the run and the step (`runs/linear_probe/<run>-step-N`): two
  runs whose checkpoints share a step name never meet in one folder.
- An output folder that holds an earlier evaluation's results is refused unless `--overwrite`, which
  sets that evaluation's files aside (`OUT/replaced-<time>/`) rather than deleting them; files the
  commands do not write are never touched. Results are written atomically (a temporary file renamed).

Nothing here imports torch at module level (the checks that need it import it themselves).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scale import arguments
from scale.errors import ConfigError, DataError

TORCH_ZIP = b"PK\x03\x04"
PICKLE = b"\x80"  # torch.save's legacy (pre-zip) format starts with a pickle protocol opcode


@dataclass(frozen=True)
class Rule:
    """The valid range of a numeric argument: `low` (<=, or < when `open_low`), `high` likewise."""

    kind: type
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    hint: str = ""

    def violation(self, value: Any) -> str | None:
        if value is None:
            return None
        if self.kind is float and not math.isfinite(value):
            return "must be a finite number"
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            return f"must be {'>' if self.open_low else '>='} {self.low:g}{self.hint}"
        if self.high is not None and (value > self.high or (self.open_high and value == self.high)):
            return f"must be {'<' if self.open_high else '<='} {self.high:g}{self.hint}"
        return None

    def wrong_values(self) -> list[str]:
        """Command-line values this rule refuses (for the generated bad-input tests)."""
        out = ["abc", "1.5"] if self.kind is int else ["abc", "nan", "inf"]
        if self.low is not None:
            out.append(f"{self.low:g}" if self.open_low else f"{self.low - 1:g}")
        if self.high is not None:
            out.append(f"{self.high:g}" if self.open_high else f"{self.high + 1:g}")
        return out


COMMON_RULES = {
    "workers": Rule(int, 0),
    "batch_size": Rule(int, 1),
}
PROBE_RULES = {
    **COMMON_RULES,
    "epochs": Rule(int, 1),
    "momentum": Rule(float, 0, 1, open_high=True),
    "weight_decay": Rule(float, 0),
    "crop_size": Rule(int, 1),
    "crop_min": Rule(float, 0, 1, open_low=True, hint=" (a fraction of the image area)"),
    "labels_per_class": Rule(int, 0),
    "eval_every": Rule(int, 1),
    "seed": Rule(int, 0),
    "preempt_check_every": Rule(int, 1),
    "max_requeues": Rule(int, 0),
}
KNN_RULES = {
    **COMMON_RULES,
    "temperature": Rule(float, 0, open_low=True, hint=" (the authors': 0.07)"),
}


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_rules(args, rules: dict[str, Rule]) -> None:
    for dest, rule in rules.items():
        value = getattr(args, dest)
        why = rule.violation(value)
        if why:
            raise ConfigError(f"{flag(dest)} {value!r} {why}")


def parse_lrs(text: str | None) -> tuple[float, ...]:
    """`--lrs 0.3,1,3` -> (0.3, 1.0, 3.0); None -> () (the default for the architecture)."""
    if text is None:
        return ()
    try:
        lrs = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--lrs {text!r}: give comma-separated positive numbers, e.g. 0.3,1,3,10") from None
    if not lrs or any(not math.isfinite(x) or x <= 0 for x in lrs):
        raise ConfigError(f"--lrs {text!r}: every base lr must be a positive finite number, e.g. 0.3,1,3,10")
    if len(set(lrs)) < len(lrs):
        raise ConfigError(f"--lrs {text!r}: the base lrs must be distinct (one head each)")
    return lrs


def parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(","))
    except ValueError:
        ks = ()
    if not ks or min(ks) < 1 or len(set(ks)) < len(ks):
        raise ConfigError(f"--ks {text!r}: give distinct comma-separated positive integers, e.g. 10,20,100,200")
    return ks


def check_signal(name: str) -> None:
    from scale.config import signal_number

    try:
        number = signal_number(name)
    except ValueError:
        number = -1
    if number is not None and number not in set(signal.valid_signals()):
        raise ConfigError(f"--preempt-signal {name!r} is not a signal name (USR2, USR1, TERM, ...) or number, or none")


def world_size(check: bool = False) -> int:
    """The launched world size (what the launcher's environment says; 1 for a plain process). With
    `check`, in a SLURM job's batch step (where slurm/launch.sh runs `--check` before srun starts the
    ranks): the job's task count, the world the ranks will have."""
    from scale.parallel.placement import detect_launch

    launch = detect_launch()
    if check and launch.world_size == 1 and "SLURM_JOB_ID" in os.environ and "SLURM_STEP_ID" not in os.environ:
        tasks = os.environ.get("SLURM_NTASKS", "")
        return int(tasks) if tasks.isdigit() and int(tasks) > 0 else 1
    return launch.world_size


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (naming the argument) and exit status 1, as every other
    error of the commands; `--help` is unchanged."""

    def error(self, message: str):
        raise SystemExit(f"error: {message} (--help lists the arguments)")


# ---------------------------------------------------------------------------------------------- checkpoint


@dataclass
class Checkpoint:
    """What `CHECKPOINT` names, found without loading it."""

    path: Path
    """What the loader is given: a run's checkpoint directory (the newest complete one of a run
    directory, resolved once, so every rank and a resumed probe read the same), an export folder or
    a file."""
    kind: str
    """'run' (a checkpoint directory of this project), 'export', 'file'."""
    run_dir: Path | None = None
    """The run directory of a run checkpoint (for the output name, and kept out of `--out`)."""
    given_run_dir: bool = False
    """CHECKPOINT named the run directory (its newest checkpoint), not one checkpoint."""

    @property
    def label(self) -> str:
        """The output folder's name: `<run>-step-N` for a run's checkpoint, else the file's or folder's."""
        if self.kind == "run":
            return f"{self.run_dir.name}-{self.path.name}" if self.run_dir is not None else self.path.name
        name = self.path.name
        for suffix in (".tar", ".pth", ".pt", ".safetensors", ".bin"):
            name = name.removesuffix(suffix)
        step = self.path.parent
        if step.name.startswith("step-") and step.parent.name == "checkpoints":  # a file of a run's checkpoint
            return f"{step.parent.parent.name}-{step.name}-{name}"
        return name or "checkpoint"


def check_checkpoint(spec: str, model: str | None, random_init: bool) -> Checkpoint:
    """The checkpoint argument checked cheaply: it exists; a file is not empty and is a torch or
    safetensors file (not text); a directory is a run directory with a complete checkpoint, a
    checkpoint directory or an export folder. `--model` names an architecture, `--random-init` has
    a run checkpoint."""
    from scale.errors import CheckpointError
    from scale.eval.backbone import resolve_run_checkpoint
    from scale.models import RESNET_PRESETS, is_resnet
    from scale.models.export import is_export
    from scale.models.vit import VIT_ALIASES, VIT_PRESETS

    if model is not None and model not in VIT_PRESETS and model not in VIT_ALIASES and not is_resnet(model):
        raise ConfigError(f"--model {model!r} is not an architecture; use one of "
                          f"{', '.join([*sorted(VIT_PRESETS), *RESNET_PRESETS])}")  # fmt: skip
    path = Path(spec).expanduser()
    if not spec or not path.exists():
        raise ConfigError(f"checkpoint {spec!r} does not exist; give a run directory, a checkpoint directory, an "
                          "export folder or a .pth file")  # fmt: skip
    if path.is_dir():
        if is_export(path):
            found = Checkpoint(path.resolve(), "export")
        else:
            try:
                ckpt = resolve_run_checkpoint(path)
            except CheckpointError as e:
                raise ConfigError(f"checkpoint {spec!r}: {e}") from None
            if ckpt is None:
                raise ConfigError(f"checkpoint {spec!r} is a directory but not a run directory, a checkpoint "
                                  "directory (client.pt) or an export folder")  # fmt: skip
            if not any((ckpt / name).exists() for name in ("model.pt", "dcp", "engine")):
                raise ConfigError(f"checkpoint {str(ckpt)!r} holds no model.pt, dcp/ or engine/: not a complete "
                                  "checkpoint of this project")  # fmt: skip
            ckpt = ckpt.resolve()
            run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
            found = Checkpoint(ckpt, "run", run_dir, given_run_dir=ckpt != path.resolve())
    else:
        check_checkpoint_file(path, spec)
        found = Checkpoint(path.resolve(), "file")
    if random_init and found.kind != "run":
        raise ConfigError("--random-init needs a run checkpoint of this project (its config and seed), not "
                          f"{spec!r}")  # fmt: skip
    return found


def check_checkpoint_file(path: Path, spec: str) -> None:
    """An empty file, a text file or anything but a torch / safetensors file is an error now, not a
    traceback from the unpickler later."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise ConfigError(f"checkpoint {spec!r} cannot be read ({e.strerror or e})") from None
    if not head:
        raise ConfigError(f"checkpoint {spec!r} is an empty file; give a checkpoint that scale or torch.save wrote")
    if head.startswith(TORCH_ZIP) or head.startswith(PICKLE) or _is_safetensors(head):
        return
    try:
        head.decode("utf-8")
        what = "a text file"
    except UnicodeDecodeError:
        what = "neither a torch nor a safetensors file"
    raise ConfigError(f"checkpoint {spec!r} is {what}; give a checkpoint that scale or torch.save wrote")


def _is_safetensors(head: bytes) -> bool:
    # 8 bytes of little-endian header length, then the JSON header.
    return len(head) > 8 and 0 < int.from_bytes(head[:8], "little") < 2**30 and head[8:9] == b"{"


# ---------------------------------------------------------------------------------------------- data


def check_sources(train: str, val: str, labels: bool = True) -> tuple[Any, Any]:
    """The resolved `--train` / `--val` sources (errors name the flag): they exist, hold samples, and
    with `labels` hold labels, the validation classes among the training ones."""
    from scale.data.labelled import check_labels
    from scale.data.sources import resolve_source

    out = []
    for flag_name, spec in (("--train", train), ("--val", val)):
        if not spec.strip():  # not the current folder as an image folder
            raise ConfigError(f"{flag_name} is empty; give shards, an image folder or demo")
        try:
            src = resolve_source(spec)
        except DataError as e:
            raise ConfigError(f"{flag_name}: {e}") from None
        if sum(src.counts) == 0:
            raise ConfigError(f"{flag_name}: {spec} holds no samples; give labelled shards or an image folder")
        out.append(src)
    if labels:
        classes = []
        for flag_name, spec, src in (("--train", train, out[0]), ("--val", val, out[1])):
            try:
                classes.append(check_labels(src, spec))
            except DataError as e:
                raise ConfigError(f"{flag_name}: {e}") from None
        if classes[1] > classes[0]:
            raise ConfigError(
                f"--val: {val} has labels up to {classes[1] - 1} but --train {train} only "
                f"{classes[0]} classes; the validation classes must be among the training ones"
            )
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------- output


def default_out(command: str, ckpt: Checkpoint, encoder: str, random_init: bool) -> Path:
    """runs/<command>/<run>-step-N (or the file's name), with what else changes the backbone."""
    label = ckpt.label
    if encoder != "base_encoder":
        label += f"-{encoder}"
    if random_init:
        label += "-random-init"
    return Path("runs") / command / label


def check_out_location(out: Path, ckpt: Checkpoint, sources: tuple[str, ...]) -> None:
    """`--out` is a folder (or nothing yet) and not inside what is read: the run directory (its
    metrics.jsonl is the run's), the checkpoint or export folder, an image-folder data source."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file, not a folder; choose another path")
    target = out.expanduser().resolve()
    inputs = [p for p in (ckpt.run_dir, ckpt.path if ckpt.kind != "file" else None) if p is not None]
    for spec in sources:
        p = Path(spec).expanduser()
        if p.is_dir():
            inputs.append(p.resolve())
    for folder in inputs:
        if arguments.is_inside(target, folder):
            raise ConfigError(f"--out {str(out)!r} is inside {folder}, which this evaluation reads; write the results "
                              "elsewhere (the default is runs/<command>/<run>-step-N)")  # fmt: skip


@dataclass
class OutputPlan:
    """What to do with an output folder: start afresh, resume the unfinished evaluation it holds, or
    (with --overwrite) set the earlier evaluation's files aside first."""

    out: Path
    resume: bool = False
    set_aside: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.set_aside:
            return f"{self.out} (the earlier evaluation's {', '.join(self.set_aside)} set aside first)"
        return f"{self.out} (resuming the unfinished probe there)" if self.resume else str(self.out)


def plan_output(
    out: Path,
    owned: tuple[str, ...],
    results: tuple[str, ...],
    overwrite: bool,
    settings_file: str | None = None,
    identity: dict[str, Any] | None = None,
) -> OutputPlan:
    """Decide, reading only, what happens to `out`. `owned`: every name the command writes there;
    `results`: its finished results; `settings_file` (the probe's): the settings of the evaluation
    that writes the folder, which a resume must match."""
    present = tuple(name for name in owned if (out / name).exists())
    if not present:
        return OutputPlan(out)
    done = [name for name in results if (out / name).exists()]
    if done:
        if overwrite:
            return OutputPlan(out, set_aside=present)
        raise ConfigError(f"--out {str(out)!r} already holds an evaluation's results ({', '.join(done)}); pass "
                          "--overwrite to set them aside and evaluate again, or choose another --out")  # fmt: skip
    if settings_file is not None and identity is not None:
        earlier = read_settings(out / settings_file)
        if earlier == identity:
            return OutputPlan(out, resume=True)
        if overwrite:
            return OutputPlan(out, set_aside=present)
        if earlier is None:
            why = f"files of another evaluation ({', '.join(present)}) without its {settings_file}"
        else:
            diff = sorted(k for k in earlier.keys() | identity.keys() if earlier.get(k) != identity.get(k))
            why = "an unfinished evaluation with other settings (" + "; ".join(
                f"{k}: {earlier.get(k)!r} -> {identity.get(k)!r}" for k in diff[:4]) + ")"  # fmt: skip
        raise ConfigError(f"--out {str(out)!r} holds {why}; pass --overwrite to set it aside, or choose another --out")
    if overwrite:
        return OutputPlan(out, set_aside=present)
    raise ConfigError(f"--out {str(out)!r} holds files of another evaluation ({', '.join(present)}); pass "
                      "--overwrite to set them aside, or choose another --out")  # fmt: skip


def read_settings(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def apply_plan(plan: OutputPlan) -> Path | None:
    """Create the folder; move the files to set aside into `replaced-<UTC time>/` (returned)."""
    plan.out.mkdir(parents=True, exist_ok=True)
    if not plan.set_aside:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = plan.out / f"replaced-{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = plan.out / f"replaced-{stamp}-{n}"
    target.mkdir()
    for name in plan.set_aside:
        if (plan.out / name).exists():
            os.replace(plan.out / name, target / name)
    return target


def write_atomic(path: Path, text: str) -> None:
    """`text` into `path`, whole (`scale.arguments.write_atomic`): a reader sees the old file or the
    new one, never a torn one. The callers decided beforehand whether `path` may be replaced."""
    arguments.write_atomic(path, text, overwrite=True)


def add_checkpoint_args(parser, train_help: str, val_help: str) -> None:
    """The evaluation CLIs' shared arguments: what to evaluate and on which data."""
    parser.add_argument("checkpoint", help="run directory, checkpoint directory, or .pth / .pth.tar file")
    parser.add_argument("--train", required=True, help=train_help)
    parser.add_argument("--val", required=True, help=val_help)
    parser.add_argument("--model", help="architecture of a checkpoint that does not name it (vit_base, resnet50, ...)")
    parser.add_argument("--encoder", default="base_encoder", choices=["base_encoder", "momentum_encoder"])
    baseline = "the run's architecture at its initial weights (the baseline); needs a run checkpoint"
    parser.add_argument("--random-init", action="store_true", help=baseline)
    trust = ("read checkpoint files with pickle's full unpickler: only for files from a source you trust, since "
             "they can then run code on this machine (default: weights and data only)")  # fmt: skip
    parser.add_argument("--trust-checkpoint-code", action="store_true", help=trust)
