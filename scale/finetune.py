"""End-to-end fine-tuning entry point (`scale-finetune`): a pretrained backbone and a linear classifier
trained together with the DeiT recipe the authors fine-tuned with, through pretraining's trainer and
backends (`scale.eval.finetune`).

    python -m scale.finetune --pretrained runs/fashion_demo                 # the CPU demo (fashion_finetune)
    python -m scale.finetune --recipe fashion_finetune                      # the same backbone at random init
    python -m scale.finetune --recipe fashion_finetune_10pct --pretrained runs/fashion_demo
    torchrun --nproc_per_node 8 scale/finetune.py --recipe vit_b_finetune --pretrained vit-b-300ep.pth.tar
    deepspeed scale/finetune.py --deepspeed ds_configs/zero3.json --recipe vit_l_finetune --pretrained runs/vit_l_300ep
    python -m scale.finetune --recipe cifar10_vit_b_transfer --pretrained vit-b-300ep.pth.tar

`--pretrained` takes a run directory or checkpoint of this project (any backend), the authors'
release, a timm / torchvision state dict or an export folder; without it the backbone starts from
random init (the baseline). Overrides are `--section.field=value` as in pretraining
(`--help-config`: the `finetune` section holds DeiT's options); a wrong field, file or batch split is
a one-line error before anything is built (`--check` runs only the checks). The run directory gets
metrics.jsonl (with top-1 / top-5 of the model and its EMA after each epoch), TensorBoard,
checkpoints (the same command resumes) and results.json.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run by path (`python scale/finetune.py`, the DeepSpeed launcher)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))

from scale import pretrain  # noqa: E402  (torch-free until the checks pass)


def main(argv: list[str] | None = None) -> dict:
    """Parse, check (`scale.preflight`), fine-tune: pretraining's entry with task 'finetune'."""
    return pretrain.main(argv, task="finetune", doc=__doc__)


def cli() -> None:
    """Console-script entry (`scale-finetune`)."""
    main()


if __name__ == "__main__":
    cli()
