"""The kNN monitor (paper Sec. 4.1 and appendix; Wu et al. 2018): class-token features of labelled
images, cosine similarity, the k nearest neighbours vote with weights exp(sim / T)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scale.data.augment import Normalize
from scale.data.loader import ShardSource, resolve_source


@torch.no_grad()
def extract_features(
    backbone: nn.Module, source: str, crop_size: int, batch_size: int = 256, device: torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """L2-normalised pooled features (N, D) and labels (N,) of every sample of `source`, in order.

    Images are resized (shorter side to crop / 0.875) and centre-cropped, as for evaluation.
    """
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms import v2 as T

    src = resolve_source(source)
    resize = T.Compose([T.Resize(round(crop_size / 0.875), antialias=True), T.CenterCrop(crop_size)])
    normalize = Normalize()
    device = device or next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    feats, labels, batch, batch_labels = [], [], [], []

    def flush():
        x = normalize(torch.stack(batch).to(device))
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            f = backbone.forward_head(backbone.forward_features(x), pre_logits=True)
        feats.append(F.normalize(f.float(), dim=1).cpu())
        labels.extend(batch_labels)
        batch.clear()
        batch_labels.clear()

    for unit, count in enumerate(src.counts):
        reader = src.read(unit, 0, count) if isinstance(src, ShardSource) else [src.read_one(unit, 0)]
        for _, data, label in reader:
            image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            batch.append(resize(image))
            batch_labels.append(label)
            if len(batch) == batch_size:
                flush()
    if batch:
        flush()
    backbone.train(was_training)
    return torch.cat(feats), torch.tensor(labels, dtype=torch.int64)


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
