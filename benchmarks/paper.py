"""The paper's reference numbers the benchmarks are set against, and where results are written."""

from __future__ import annotations

from pathlib import Path

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
