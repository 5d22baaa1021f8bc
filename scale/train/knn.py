"""The kNN monitor (paper Sec. 4.1 and appendix; Wu et al. 2018): class-token features of labelled
images, cosine similarity, the k nearest neighbours vote with weights exp(sim / T).

`knn_classify` is sharded: every rank keeps the features of its share of the training set (its
part of the bank) and of its share of the queries. Queries travel, the bank never does: in rounds,
every rank's next chunk of queries is all-gathered, each rank finds their top-k in its own part of
the bank, and the candidates (similarities and labels, k per rank and query) are all-gathered and
merged into the global top-k. No rank ever holds the whole bank; the result equals a brute-force
kNN over the whole bank (`knn_accuracy`; tested, 1 and 2 ranks). The monitor and the offline
evaluation (`scale.knn_eval`) both use it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from scale.data.augment import Normalize
from scale.data.labelled import runs_between
from scale.data.loader import ShardSource, resolve_source
from scale.parallel.dist import all_gather_single


def _share(counts: list[int], rank: int, world_size: int) -> tuple[list[tuple[int, int, int]], int]:
    """This rank's contiguous share of all samples as (unit, start, stop) runs, and the share size
    every rank pads to (so every rank runs the same number of forward passes)."""
    total = sum(counts)
    per_rank = -(-total // world_size)
    return runs_between(counts, min(rank * per_rank, total), min((rank + 1) * per_rank, total)), per_rank


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


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(t: torch.Tensor, world: int) -> torch.Tensor:
    """(n, ...) on every rank -> (world * n, ...), in rank order (the same n everywhere)."""
    if world == 1:
        return t
    out = t.new_empty((world * t.shape[0], *t.shape[1:]))
    all_gather_single(out, t.contiguous())
    return out


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if _world()[1] > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def local_topk(queries: torch.Tensor, bank: torch.Tensor, k: int, rows: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest cosine similarities of each query in `bank` (and their indices), sorted;
    padded with -inf / -1 when the bank holds fewer than k. Tiled over queries to bound memory."""
    sims, idx = [], []
    kk = min(k, bank.shape[0])
    for i in range(0, queries.shape[0], rows):
        s = queries[i : i + rows] @ bank.T  # (rows, N_local)
        top = s.topk(kk, dim=1) if kk else (s[:, :0], s[:, :0].long())
        sims.append(top[0])
        idx.append(top[1])
    sims, idx = torch.cat(sims), torch.cat(idx)
    if kk < k:
        pad = k - kk
        sims = torch.cat([sims, sims.new_full((sims.shape[0], pad), float("-inf"))], dim=1)
        idx = torch.cat([idx, idx.new_full((idx.shape[0], pad), -1)], dim=1)
    return sims, idx


@torch.no_grad()
def knn_classify(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    ks: tuple[int, ...] = (10, 20, 100, 200),
    temperature: float = 0.07,
    chunk: int = 1024,
) -> dict[int, float]:
    """Top-1 accuracy (%) for each k of `ks`, over the queries of every rank. Call on every rank with
    this rank's queries and part of the bank (L2-normalised features, on the communication device:
    CUDA under NCCL). Returns the same numbers on every rank."""
    rank, world = _world()
    device = bank.device
    kmax = max(ks)
    query_labels, bank_labels = query_labels.to(device), bank_labels.to(device)
    local_max = torch.tensor([query_labels.max().item() if len(query_labels) else -1,
                              bank_labels.max().item() if len(bank_labels) else -1], device=device)  # fmt: skip
    num_classes = int(_all_reduce(local_max, dist.ReduceOp.MAX if world > 1 else None).max()) + 1
    per_round = max(1, chunk // world)  # queries of each rank per round
    rounds = torch.tensor([-(-queries.shape[0] // per_round)], device=device)
    rounds = int(_all_reduce(rounds, dist.ReduceOp.MAX if world > 1 else None))
    correct = torch.zeros(len(ks), dtype=torch.float64, device=device)
    count = torch.zeros(1, dtype=torch.float64, device=device)
    D = bank.shape[1] if bank.ndim == 2 else queries.shape[1]
    for r in range(rounds):
        q = queries[r * per_round : (r + 1) * per_round]
        y = query_labels[r * per_round : (r + 1) * per_round]
        n = q.shape[0]
        q_pad = torch.cat([q, q.new_zeros(per_round - n, D)]) if n < per_round else q  # (per_round, D)
        all_q = _all_gather(q_pad, world)  # (world * per_round, D)
        sims, idx = local_topk(all_q, bank, kmax)
        labels = torch.where(idx >= 0, bank_labels[idx.clamp(min=0)], -1)  # (world * per_round, kmax)
        sims_all = _all_gather(sims, world).view(world, world, per_round, kmax)  # [bank rank, query rank]
        labels_all = _all_gather(labels, world).view(world, world, per_round, kmax)
        mine_s = sims_all[:, rank].permute(1, 0, 2).reshape(per_round, world * kmax)[:n]  # (n, world * kmax)
        mine_l = labels_all[:, rank].permute(1, 0, 2).reshape(per_round, world * kmax)[:n]
        top_s, top_i = mine_s.topk(kmax, dim=1)  # sorted: the first k are the top k
        top_l = mine_l.gather(1, top_i)
        for j, k in enumerate(ks):
            weights = (top_s[:, :k] / temperature).exp() * (top_l[:, :k] >= 0)
            votes = torch.zeros(n, num_classes, dtype=weights.dtype, device=device)
            votes.scatter_add_(1, top_l[:, :k].clamp(min=0), weights)
            correct[j] += (votes.argmax(1) == y).sum()
        count += n
    _all_reduce(correct)
    _all_reduce(count)
    total = float(count.item())
    return {k: 100.0 * float(c) / max(total, 1.0) for k, c in zip(ks, correct.tolist(), strict=True)}
