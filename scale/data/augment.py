"""MoCo v3's two asymmetric views (BYOL-style), on torchvision.transforms.v2.

The authors' `main_moco.py`, both views: RandomResizedCrop(224, scale=(0.08, 1)),
ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8, RandomGrayscale(0.2), Gaussian blur (sigma uniform in
[0.1, 2.0]; p 1.0 on view 1, 0.1 on view 2), Solarize (view 2 only, p 0.2), horizontal flip,
ImageNet normalisation, in that order. Everything is configurable through `AugmentConfig`.

Deliberate choices (the DALI pipeline in `dali.py` makes the same ones):
- Images are uint8 CHW tensors until normalisation (`torchvision.io.decode_image`), not PIL.
- Blur: a separable Gaussian kernel of fixed size 2 * ceil(3 * sigma_max) + 1 (13 px for
  sigma_max 2), sigma in pixels. The authors use PIL's GaussianBlur(radius=sigma), also sigma in
  pixels, computed with box-filter passes; a 3-sigma kernel holds 99.7% of the mass.
- Solarize threshold 128 on uint8 (PIL's ImageOps.solarize default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.transforms import v2 as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of the two views. Pairs are (view 1, view 2)."""

    crop_size: int = 224
    """Output side in pixels."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop area fraction range ((0.08, 1) for ViT; the authors' --crop-min)."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """RandomResizedCrop aspect-ratio range."""
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    """ColorJitter brightness, contrast, saturation, hue (hue as a fraction of the colour circle)."""
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: tuple[float, float] = (1.0, 0.1)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: tuple[float, float] = (0.0, 0.2)
    solarize_threshold: int = 128
    flip_p: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        probs = (self.jitter_p, self.grayscale_p, self.flip_p, *self.blur_p, *self.solarize_p)
        if not all(0.0 <= p <= 1.0 for p in probs):
            raise ValueError(f"augmentation probabilities must lie in [0, 1], got {probs}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < min <= max, got {self.blur_sigma}")
        if self.crop_size < 1:
            raise ValueError(f"crop_size must be positive, got {self.crop_size}")

    @property
    def blur_kernel(self) -> int:
        """Odd kernel side covering +-3 sigma_max."""
        return 2 * math.ceil(3 * self.blur_sigma[1]) + 1


def view_transform(cfg: AugmentConfig, view: int, normalize: bool = True) -> T.Compose:
    """The transform of view 0 or 1: uint8 (3, H, W) in, normalised float32 (3, S, S) out
    (uint8 (3, S, S) with `normalize=False`: a quarter of the bytes between processes; see
    `Normalize` for the rest)."""
    if view not in (0, 1):
        raise ValueError(f"view must be 0 or 1, got {view}")
    b, c, s, h = cfg.jitter
    ops: list = [
        T.RandomResizedCrop(cfg.crop_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, antialias=True),
        T.RandomApply([T.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)], p=cfg.jitter_p),
        T.RandomGrayscale(p=cfg.grayscale_p),
        T.RandomApply([T.GaussianBlur(cfg.blur_kernel, sigma=cfg.blur_sigma)], p=cfg.blur_p[view]),
    ]
    if cfg.solarize_p[view] > 0:
        ops.append(T.RandomSolarize(threshold=cfg.solarize_threshold, p=cfg.solarize_p[view]))
    ops.append(T.RandomHorizontalFlip(p=cfg.flip_p))
    if normalize:
        ops += [T.ToDtype(torch.float32, scale=True), T.Normalize(mean=cfg.mean, std=cfg.std)]
    return T.Compose(ops)


class TwoViews:
    """uint8 image (3, H, W) -> (view 1, view 2), each float32 (3, S, S) (uint8 if not `normalize`)."""

    def __init__(self, cfg: AugmentConfig | None = None, normalize: bool = True):
        self.cfg = cfg or AugmentConfig()
        self.view1 = view_transform(self.cfg, 0, normalize)
        self.view2 = view_transform(self.cfg, 1, normalize)

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view1(image), self.view2(image)


class Normalize:
    """uint8 batches (B, 3, S, S) -> float32 scaled to [0, 1] and normalised, on their device: the
    same arithmetic as `ToDtype(scale=True)` + `Normalize`, done after the batch crossed processes
    (or reached the GPU) instead of per image in a worker. The constants are copied to each device
    once: a copy from pageable host memory on every call would synchronise the host with the GPU."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) on `device`, copied there on first use."""
        if device not in self._on_device:
            self._on_device[device] = (self.mean.to(device), self.std.to(device))
        return self._on_device[device]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.constants(x.device)
        x = x.to(torch.float32).div_(255.0)
        return x.sub_(mean).div_(std)
