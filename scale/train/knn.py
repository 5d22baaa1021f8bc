"""The kNN monitor (paper Sec. 4.1 and appendix; Wu et al. 2018): class-token features of labelled
images, cosine similarity, the k nearest neighbours vote with weights exp(sim / T)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scale.data.augment import Normalize
from scale.data.loader import ShardSource, resolve_source


def _share(counts: list[int], rank: int, world_size: int) -> tuple[list[tuple[int, int, int]], int]:
    """This rank's contiguous share of all samples as (unit, start, stop) runs, and the share size
    every rank pads to (so every rank runs the same number of forward passes)."""
    total = sum(counts)
    per_rank = -(-total // world_size)
    lo, hi = min(rank * per_rank, total), min((rank + 1) * per_rank, total)
    runs, offset = [], 0
    for unit, count in enumerate(counts):
        a, b = max(lo, offset), min(hi, offset + count)
        if a < b:
            runs.append((unit, a - offset, b - offset))
        offset += count
    return runs, per_rank


@torch.no_grad()
def extract_features(
    backbone: nn.Module, source: str, crop_size: int, batch_size: int = 256, device: torch.device | None = None,
    autocast_dtype: torch.dtype | None = None, rank: int = 0, world_size: int = 1, features_fn=None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """L2-normalised pooled features (n, D) and labels (n,) of this rank's contiguous share of
    `source` (all of it with one rank), in order. Call on every rank: each runs the same number of
    forwards (the last share is padded), as sharded models need.

    Images are resized (shorter side to crop / 0.875) and centre-cropped, as for evaluation.
    """
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms import v2 as T

    src = resolve_source(source)
    runs, per_rank = _share(src.counts, rank, world_size)
    resize = T.Compose([T.Resize(round(crop_size / 0.875), antialias=True), T.CenterCrop(crop_size)])
    normalize = Normalize()
    device = device or next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    feats, labels, batch = [], [], []
    forwards = -(-per_rank // batch_size)  # the same on every rank

    def flush(images: list[torch.Tensor]) -> None:
        x = normalize(torch.stack(images).to(device))
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            f = (features_fn or backbone.pooled_features)(x)
        feats.append(F.normalize(f.float(), dim=1).cpu())

    for unit, a, b in runs:
        reader = src.read(unit, a, b) if isinstance(src, ShardSource) else [src.read_one(unit, 0)]
        for _, data, label in reader:
            image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            batch.append(resize(image))
            labels.append(label)
            if len(batch) == batch_size:
                flush(batch)
                batch = []
    if batch:
        flush(batch)
    real = len(labels)
    for _ in range(forwards - len(feats)):  # padding forwards: sharded models need them on every rank
        flush([torch.zeros(3, crop_size, crop_size, dtype=torch.uint8)])
    backbone.train(was_training)
    return torch.cat(feats)[:real], torch.tensor(labels, dtype=torch.int64)


def knn_accuracy(
    train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, test_labels: torch.Tensor,
    k: int = 200, temperature: float = 0.07, chunk: int = 1024,
) -> float:  # fmt: skip
    """Top-1 accuracy (%) of weighted kNN voting; features L2-normalised."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, train_feats.shape[0])
    correct = 0
    for i in range(0, test_feats.shape[0], chunk):
        sims = test_feats[i : i + chunk] @ train_feats.T  # (n, N_train)
        top_sims, top_idx = sims.topk(k, dim=1)
        votes = torch.zeros(sims.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[top_idx], (top_sims / temperature).exp())
        correct += int((votes.argmax(1) == test_labels[i : i + chunk]).sum())
    return 100.0 * correct / test_feats.shape[0]
