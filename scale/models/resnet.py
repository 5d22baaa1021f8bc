"""ResNet backbones as the authors build them for MoCo v3 (`main_moco.py`, `moco/builder.py`
`MoCo_ResNet`): torchvision's ResNet with `zero_init_residual=True`, whose `fc` MoCo replaces by its
projector. The modules and state-dict keys are torchvision's (`conv1`, `bn1`, `layer1.0.conv1`, ...,
`fc`), so the authors' releases and torchvision's `resnet50` load without renaming.

Shape legend: B batch, C channels, H x W the crop, D the pooled width (2048 for ResNet-50).

Every BatchNorm mixes the samples of a batch, so MoCo runs one forward per view (per-view
statistics, as the authors' Algorithm 1); `scale.parallel` makes each one cross-rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.resnet import ResNet as TorchvisionResNet

from scale.models.vit import head_views

# torchvision's architectures: (block, blocks per stage). MoCo v3's reference is resnet50.
RESNET_PRESETS: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}
RESNET_ALIASES = {"r50": "resnet50", "r101": "resnet101", "r152": "resnet152"}


@dataclass(frozen=True)
class ResNetConfig:
    """Everything that defines a ResNet backbone (torchvision's architecture `name`)."""

    name: str = "resnet50"
    img_size: int = 224
    """Side of the square input crop (the network takes any size; the augmentation uses this one)."""
    zero_init_residual: bool = True
    """Zero the last BatchNorm's scale of every residual branch (the authors' choice)."""
    in_chans: int = 3

    @property
    def block(self) -> type[nn.Module]:
        return RESNET_PRESETS[self.name][0]

    @property
    def layers(self) -> tuple[int, int, int, int]:
        return RESNET_PRESETS[self.name][1]

    @property
    def num_features(self) -> int:
        """Width D of the pooled features (2048 for ResNet-50)."""
        return 512 * self.block.expansion

    @property
    def depth(self) -> int:
        """Residual blocks in all (16 for ResNet-50)."""
        return sum(self.layers)

    @property
    def embed_dim(self) -> int:  # the name the ViT-based code reads the feature width by
        return self.num_features


def is_resnet(name: str) -> bool:
    return RESNET_ALIASES.get(name, name) in RESNET_PRESETS


def resolve_resnet_config(name: str, **overrides) -> ResNetConfig:
    """The config of architecture `name` with `overrides` (img_size, zero_init_residual).

    Raises:
        ValueError: unknown name or an override a ResNet does not have (the ViT options).
    """
    key = RESNET_ALIASES.get(name, name)
    if key not in RESNET_PRESETS:
        raise ValueError(f"unknown ResNet {name!r}; choose one of: {', '.join([*RESNET_PRESETS, *RESNET_ALIASES])}")
    fields = {f.name for f in dataclasses.fields(ResNetConfig)} - {"name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: ViT options, which {key} does not have; drop them")
    cfg = ResNetConfig(name=key, **overrides)
    if cfg.img_size < 32:
        raise ValueError(f"img_size={cfg.img_size}: a ResNet downsamples by 32; use crops of 32 px or more")
    return cfg


class ResNet(TorchvisionResNet):
    """torchvision's ResNet (same modules, same initialisation, same keys) with the interface MoCo
    and the evaluations use: `head` (= torchvision's `fc`, MoCo's projector), `num_features`,
    `pooled_features` and `forward(x, views)`, like `scale.models.vit.VisionTransformer`."""

    head_name = "fc"
    """The attribute MoCo puts its projector in (the authors replace `fc`)."""

    def __init__(self, cfg: ResNetConfig):
        super().__init__(cfg.block, list(cfg.layers), zero_init_residual=cfg.zero_init_residual)
        self.cfg = cfg
        self.num_features = self.embed_dim = self.fc.in_features
        self.fc = nn.Identity()  # the backbone alone ends at the pooled features; MoCo sets its projector
        self.feature_sink: Callable[[torch.Tensor], None] | None = None
        """Called by `forward` with the detached pooled features (B, D) it computed (the dense kNN
        monitor's bank). Not part of the state."""
        self.channels_last = False
        """Run the convolutions on channels-last (NHWC) tensors (`to_channels_last`)."""

    @property
    def head(self) -> nn.Module:
        return self.fc

    def to_channels_last(self) -> ResNet:
        """Weights and inputs in channels-last memory (NHWC: cuDNN's fast layout on tensor cores).
        Same values; the state dict's shapes are unchanged."""
        self.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> the last stage's maps (B, D, H / 32, W / 32)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_pool(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> globally average-pooled features (B, D)."""
        return torch.flatten(self.avgpool(maps), 1)

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> globally average-pooled features (B, D), without the head: for kNN and
        linear probes (the authors' linear classifier takes them). Its own method so that sharding
        wrappers can gather parameters for it (`forward` does not call it: a wrapper would free them
        before the head). A copy, not a view of the pooled maps: FSDP2 hooks its outputs."""
        return self.forward_pool(self.forward_features(x)).clone()

    def forward(self, x: torch.Tensor, views: int = 1) -> torch.Tensor:
        """(V * B, C, H, W) -> head outputs (V * B, F). MoCo calls it once per view (BatchNorm mixes
        samples); with `views` > 1 the head still normalises each view on its own."""
        return head_views(self.fc, self.forward_pool(self.forward_features(x)), views, self.feature_sink)


def build_resnet(name: str, **overrides) -> ResNet:
    """torchvision's architecture `name` as the authors build it (zero-init residuals), without a
    classifier. Builds on the default device (meta works; `reset_parameters` does not exist: build
    on a real device to initialise)."""
    return ResNet(resolve_resnet_config(name, **overrides))
