"""Weighted kNN classification (Wu et al. 2018, as in the paper): cosine similarity of L2-normalised
features, the k nearest training samples vote with weights exp(sim / T).

Sharded: every rank keeps the features of its share of the training set (its part of the bank) and
of its share of the queries. Queries travel, the bank never does: in rounds, every rank's next
chunk of queries is all-gathered, each rank finds their top-k in its own part of the bank, and the
candidates (similarities and labels, k per rank and query) are all-gathered and merged into the
global top-k. No rank ever holds the whole bank; the result equals a brute-force kNN over the
whole bank (tested, 1 and 2 ranks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from scale.parallel.dist import all_gather_single


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
