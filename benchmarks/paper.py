"""The paper's reference numbers the benchmarks are set against, and where results are written."""

from __future__ import annotations

from pathlib import Path

from scale.arguments import refuse_existing, write_atomic
from scale.models.flops import PAPER_TABLE3_GMACS

RESULTS = Path(__file__).parent / "results"
"""benchmarks/results: the measured tables (markdown and JSON)."""
ROOT = Path(__file__).resolve().parents[1]
IMAGENET_TRAIN = 1_281_167
# Paper Table 3: TPU-v3 devices (cores) and hours per 100 ImageNet epochs.
PAPER_TABLE3_TPU = {"vit_small": (256, 1.2), "vit_base": (256, 2.1), "vit_large": (256, 6.1), "vit_huge": (512, 9.8)}


def paper_view(model: str) -> dict | None:
    """Table 3 as images/s and TFLOP/s per TPU core (16 x MACs per image)."""
    if model not in PAPER_TABLE3_TPU:
        return None
    cores, hours = PAPER_TABLE3_TPU[model]
    img_per_s = IMAGENET_TRAIN * 100 / (hours * 3600 * cores)
    return {"tpu_cores": cores, "hours_per_100_epochs": hours, "img_per_s_per_core": img_per_s,
            "tflops_per_core": img_per_s * 16 * PAPER_TABLE3_GMACS[model] * 1e9 / 1e12}  # fmt: skip


def add_output_args(parser, default: Path | str = RESULTS, what: str = "results directory") -> None:
    """--out and --overwrite: every benchmark writes its results the same way (`write_results`)."""
    parser.add_argument("--out", default=str(default), help=f"{what} ('-' for none)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing results of the same name")


def check_results(out: str | Path, names: list[str], overwrite: bool) -> None:
    """Before anything is measured: results that exist are replaced only with --overwrite, and the
    folder can be written (`--out -`: nothing is written)."""
    if str(out) == "-":
        return
    if Path(out).exists() and not Path(out).is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a results folder (or '-' for none)")
    refuse_existing([Path(out) / n for n in names], overwrite)


def write_results(out: str | Path, files: dict[str, str], overwrite: bool) -> list[Path]:
    """Write `files` (name: text) into `out`, each whole (a temporary file renamed into place);
    none is written if one of them exists and may not be replaced."""
    check_results(out, list(files), overwrite)
    return [write_atomic(Path(out) / name, text, overwrite) for name, text in files.items()]
