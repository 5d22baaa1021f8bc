"""How an epoch is laid out over ranks and DataLoader workers: a pure function of (data, world size,
rank, workers, batch size, seed, epoch), `plan_epoch`; see `scale.data.loader` for the whole story.

- The data is a list of units (shards, or single files of an ImageFolder tree) with known sample
  counts. Each epoch the unit order is shuffled with a seed that depends on (seed, epoch) only, the
  same on every rank, and the samples are concatenated.
- Every rank gets `num_samples // (world_size * batch_size)` batches, the same number on every
  rank; the remainder, under one global batch, is dropped, a different remainder each epoch.
- Rank r reads a contiguous range of that sequence; within it, DataLoader worker k gets the samples
  of exactly the batches it will produce (batch i of a rank comes from worker i % K).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scale.errors import DataError


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of unit `unit`, and the position of `start` in the epoch's order."""

    unit: int
    start: int
    stop: int
    position: int


@dataclass(frozen=True)
class EpochPlan:
    batches_per_rank: int
    worker_batches: list[int]
    """Batches produced by each logical worker (batch i of the rank comes from worker i % K)."""
    worker_segments: list[list[Segment]]


def batches_per_rank(num_samples: int, world_size: int, batch_size: int) -> int:
    n = num_samples // (world_size * batch_size)
    if n == 0:
        raise DataError(
            f"{num_samples} samples do not fill one global batch of {world_size} ranks x {batch_size} per rank; "
            "lower the batch size or use more data"
        )
    return n


def epoch_order(num_units: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The order of the units (shards or files) in `epoch`: a permutation seeded by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_units) if shuffle else np.arange(num_units)


def plan_epoch(
    counts: list[int],
    *,
    world_size: int,
    rank: int,
    num_workers: int,
    batch_size: int,
    epoch: int,
    seed: int,
    shuffle: bool,
    worker: int | None = None,
) -> EpochPlan:
    """Which samples every logical worker of `rank` reads in `epoch` (see the module docstring).

    With `worker`, only that worker's segments are listed (the others are left empty): each
    DataLoader worker plans for itself, and an ImageFolder source has one unit per file.
    """
    K = max(1, num_workers)
    counts_arr = np.asarray(counts, dtype=np.int64)
    nb = batches_per_rank(int(counts_arr.sum()), world_size, batch_size)
    order = epoch_order(len(counts_arr), seed, epoch, shuffle)
    ends = np.cumsum(counts_arr[order])
    starts = ends - counts_arr[order]
    worker_batches = [max(0, (nb - k + K - 1) // K) for k in range(K)]
    segments, a = [], rank * nb * batch_size
    for k in range(K):
        b = a + worker_batches[k] * batch_size
        segs, pos = [], a
        i = int(np.searchsorted(ends, pos, side="right"))
        while pos < b and (worker is None or worker == k):
            lo, hi = pos - int(starts[i]), min(b, int(ends[i])) - int(starts[i])
            segs.append(Segment(int(order[i]), lo, hi, pos))
            pos = int(starts[i]) + hi
            i += 1
        segments.append(segs)
        a = b
    return EpochPlan(nb, worker_batches, segments)


def batches_before(n: int, k: int, K: int) -> int:
    """How many of the first n batches (round-robin over K workers) worker k produced."""
    return max(0, (n - k + K - 1) // K)
