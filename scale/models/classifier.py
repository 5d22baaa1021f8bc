"""End-to-end fine-tuning's model: a backbone with a linear classifier as its head, the soft-target
loss (mixup / cutmix / label smoothing give soft targets), and the model EMA of the DeiT recipe.

It has the shape the backends and `scale.train.parallelize` already lay out for MoCo: `base_encoder`
(the trained backbone and its classifier), `momentum_encoder` (the EMA: a copy that the backends
move after every applied optimizer step, sharded like the base encoder wherever that is sharded,
in fp32), `model(images, targets)` returning the loss and `momentum_pairs()`. So fine-tuning runs
through the same trainer and backends as pretraining (`scale.eval.finetune`).

timm's ModelEmaV3 arithmetic: ema = decay * ema + (1 - decay) * model over the parameters; the
buffers (BatchNorm statistics of ViT-BN or a ResNet) are copied from the model, not averaged
(timm's `exclude_buffers`), before the EMA is evaluated (`sync_buffers`).
"""

from __future__ import annotations

import copy

import torch
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from scale.models.resnet import ResNet
from scale.models.vit import VisionTransformer


def attach_classifier(backbone: VisionTransformer | ResNet, num_classes: int) -> nn.Linear:
    """Replace `backbone`'s head (MoCo's projector, or nothing) by a linear classifier, initialised as
    timm's ViT head (truncated normal, std 0.02; zero bias), and return it."""
    head = nn.Linear(backbone.num_features, num_classes)
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    setattr(backbone, getattr(backbone, "head_name", "head"), head)
    return head


class Classifier(nn.Module):
    """A classifier and its EMA; `forward(images, targets)` is the mean soft-target cross-entropy."""

    joint_views = False

    def __init__(self, backbone: VisionTransformer | ResNet, num_classes: int, ema: bool = True):
        super().__init__()
        attach_classifier(backbone, num_classes)
        self.num_classes = num_classes
        self.base_encoder = backbone
        self.momentum_encoder = None
        if ema:
            self.momentum_encoder = copy.deepcopy(backbone)
            self.momentum_encoder.requires_grad_(False)
        self.criterion = SoftTargetCrossEntropy()

    def forward(self, images: torch.Tensor, targets: torch.Tensor, keys=None, keys_only: bool = False) -> torch.Tensor:
        """Mean soft-target cross-entropy of the logits against `targets` (B, classes), in fp32 or wider."""
        if keys is not None or keys_only:
            raise ValueError("a classifier has no contrastive keys; fine-tune with --batch.keys=micro")
        logits = self.base_encoder(images)
        if logits.dtype in (torch.float16, torch.bfloat16):  # the loss in fp32 (at least) whatever the matmuls'
            logits = logits.float()
        return self.criterion(logits, targets.to(logits.dtype))

    def momentum_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(EMA params, model params) that the EMA moves, matched by name: the trainable ones (the
        others are equal in both by construction)."""
        if self.momentum_encoder is None:
            return [], []
        base = dict(self.base_encoder.named_parameters())
        pairs = [(k, base[n]) for n, k in self.momentum_encoder.named_parameters() if base[n].requires_grad]
        return [k for k, _ in pairs], [q for _, q in pairs]

    @torch.no_grad()
    def sync_buffers(self) -> None:
        """Copy the model's buffers (BatchNorm statistics) into the EMA (timm's exclude_buffers)."""
        if self.momentum_encoder is None:
            return
        for k, q in zip(self.momentum_encoder.buffers(), self.base_encoder.buffers(), strict=True):
            k.copy_(q)
