"""Weighted kNN classification (Wu et al. 2018; the paper's kNN monitor, Sec. 4.1 and appendix): the
k nearest bank entries by cosine similarity vote with weights exp(sim / T). One sharded kernel
(`knn_counts`) serves the dense monitor during training (`scale.train.monitors`), the held-out
monitor (`heldout_knn`) and the offline evaluation (`scale.knn_eval`).

Sharded: every rank keeps its own part of the bank (the features of its images) and its own
queries. Queries travel, the bank never does: in rounds, every rank's next queries are
all-gathered, each rank ranks them against its part of the bank, and only the k best candidates
(similarity and label) per query and bank rank go back to the query's rank (all-to-all), which
merges them into the global top k. No rank ever holds the whole bank; the result equals a
brute-force kNN over the whole bank (`knn_accuracy`; tested on 1 and 2 ranks). Everything stays on
the device: the counts are a device tensor, read when the caller wants them (the monitor: with the
next log row).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2 as T

from scale.data.augment import Normalize
from scale.data.labelled import runs_between
from scale.data.sources import ShardSource, resolve_source
from scale.parallel.dist import all_gather_single


def _world() -> tuple[int, int, bool]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


@torch.no_grad()
def knn_counts(
    queries: torch.Tensor, query_labels: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
    ks: tuple[int, ...], temperature: float, rows: int = 256, tile: int = 256,
) -> torch.Tensor:  # fmt: skip
    """(correct for each k of `ks`..., counted) over the queries of every rank, as a float64 device
    tensor (len(ks) + 1,), with no host read.

    `queries` (n, D) and `bank` (N_local, D): L2-normalised features, on the communication device
    (CUDA under NCCL). Every rank must pass the same number n of queries (`pad_queries`). Queries
    with label < 0 are not counted; bank rows with label < 0 are never neighbours. Per round of
    `rows` queries per rank: one all-gather of the queries, one all-to-all of max(ks) candidates per
    query and bank rank; at the end one all-reduce of the counts. Memory is bounded by the round and
    by `tile` rows of similarities and votes at a time.
    """
    rank, world, distributed = _world()
    n, D = queries.shape
    device = bank.device
    kmax = max(ks)
    kk = min(kmax, bank.shape[0])
    q_all = queries.float().to(device)
    y_all = query_labels.to(device)
    bank_labels = bank_labels.to(device)
    never = bank_labels[None, :] < 0
    counts = torch.zeros(len(ks) + 1, dtype=torch.float64, device=device)
    for r0 in range(0, max(n, 1), rows):
        q = q_all[r0 : r0 + rows]
        m = q.shape[0]
        if distributed:
            gathered = q.new_empty(world * m, D)
            all_gather_single(gathered, q.contiguous())  # row block r: rank r's queries
        else:
            gathered = q
        cand = gathered.new_empty(gathered.shape[0], kk, 2)  # (world * m, kk, [similarity, label])
        for t0 in range(0, gathered.shape[0], tile):
            sims = (gathered[t0 : t0 + tile] @ bank.T).masked_fill(never, float("-inf"))  # (tile, N_local)
            top_s, top_i = sims.topk(kk, dim=1)
            top_l = torch.where(torch.isfinite(top_s), bank_labels[top_i].to(torch.float32), -1.0)  # exact < 2^24
            cand[t0 : t0 + tile] = torch.stack([top_s, top_l], dim=-1)
        if kk < kmax:  # a part of the bank smaller than k: padded with non-neighbours, equal shapes everywhere
            cand = torch.cat([cand, cand.new_tensor([float("-inf"), -1.0]).expand(cand.shape[0], kmax - kk, 2)], 1)
        if distributed:
            got = torch.empty_like(cand)
            dist.all_to_all_single(got, cand.contiguous())  # block b: bank rank b's candidates for my queries
            cand = got.view(world, m, kmax, 2).permute(1, 0, 2, 3).reshape(m, world * kmax, 2)
        y = y_all[r0 : r0 + rows]
        for t0 in range(0, m, tile):
            best_s, best_i = cand[t0 : t0 + tile, :, 0].topk(kmax, dim=1)  # sorted: the first k are the top k
            best_l = cand[t0 : t0 + tile, :, 1].gather(1, best_i)
            yy = y[t0 : t0 + tile]
            for j, k in enumerate(ks):
                s, lab = best_s[:, :k], best_l[:, :k]
                weights = torch.where(lab >= 0, (s / temperature).exp(), 0.0)  # (tile, k)
                # The votes for each neighbour's class without knowing the number of classes: the
                # weight of the neighbours sharing neighbour j's class; the prediction is the class
                # of the best j (ties: the nearest such neighbour's class).
                same = lab[:, :, None] == lab[:, None, :]  # (tile, k, k)
                votes = (same * weights[:, None, :]).sum(-1).masked_fill(lab < 0, -1.0)
                predicted = lab.gather(1, votes.argmax(1, keepdim=True)).squeeze(1)
                counts[j] += ((predicted == yy.float()) & (yy >= 0)).sum()
        counts[-1] += (y >= 0).sum()
    if distributed:
        dist.all_reduce(counts)
    return counts


def pad_queries(queries: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`queries` and `labels` padded (label -1: not counted) to the largest count over the ranks, as
    `knn_counts` needs (one small all-reduce read on the host)."""
    _, _, distributed = _world()
    if not distributed:
        return queries, labels
    longest = torch.tensor([queries.shape[0]], device=queries.device)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    pad = int(longest.item()) - queries.shape[0]
    if pad == 0:
        return queries, labels
    return (torch.cat([queries, queries.new_zeros(pad, queries.shape[1])]),
            torch.cat([labels.to(queries.device), labels.new_full((pad,), -1).to(queries.device)]))  # fmt: skip


def knn_classify(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    ks: tuple[int, ...] = (10, 20, 100, 200),
    temperature: float = 0.07,
    chunk: int = 1024,
) -> dict[int, float]:
    """Top-1 accuracy (%) for each k of `ks` over the queries of every rank (any number per rank),
    the same numbers on every rank; `chunk` queries are classified per round over all ranks."""
    _, world, _ = _world()
    queries, query_labels = pad_queries(queries.to(bank.device), query_labels.to(bank.device))
    counts = knn_counts(queries, query_labels, bank, bank_labels, ks, temperature, rows=max(1, chunk // world),
                        tile=512)  # fmt: skip
    values = counts.tolist()
    return {k: 100.0 * c / max(values[-1], 1.0) for k, c in zip(ks, values[:-1], strict=True)}


def knn_accuracy(
    train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, test_labels: torch.Tensor,
    k: int = 200, temperature: float = 0.07, chunk: int = 1024,
) -> float:  # fmt: skip
    """Top-1 accuracy (%) of weighted kNN voting over a whole bank on one process: the plain
    reference the sharded kernel is tested against. Features L2-normalised."""
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


# ----------------------------------------------------------------------------- the held-out monitor


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


def heldout_knn(backend, bank_source: str, query_source: str, crop_size: int, k: int, temperature: float,
                backbone: nn.Module | None = None) -> float:  # fmt: skip
    """kNN top-1 (%) of `backbone` (default: the trained base encoder, as `backend` runs it) with the
    features of `bank_source` as the bank and `query_source` as the queries.

    Every rank extracts the features of its share (sharded models need every rank's forward) and
    keeps them: no rank gathers the bank.
    """
    kwargs = dict(crop_size=crop_size, device=backend.device, autocast_dtype=backend.autocast_dtype,
                  rank=backend.rank, world_size=backend.world_size)  # fmt: skip
    sources = (bank_source, query_source)
    if backbone is None:  # the trained base encoder, as the backend runs it
        backbone = backend.eval_model().base_encoder
        with backend.evaluation(backbone) as features:
            parts = [extract_features(backbone, s, features_fn=features, **kwargs) for s in sources]
    else:
        parts = [extract_features(backbone, s, **kwargs) for s in sources]
    comm = backend.comm_device()
    (bank, bank_y), (queries, query_y) = ((f.to(comm), y.to(comm)) for f, y in parts)
    return knn_classify(queries, query_y, bank, bank_y, ks=(k,), temperature=temperature)[k]
