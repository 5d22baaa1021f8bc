"""Sharded kNN equals brute force over the whole bank, on 1 and 2 ranks; no rank holds the bank."""

import pytest
import torch
import torch.nn.functional as F

from scale.train.knn import knn_accuracy, knn_classify
from tests.helpers import run_ranks

pytestmark = pytest.mark.distributed
KS = (1, 5, 20, 50)


def data(n_bank=301, n_query=97, dim=16, classes=7):
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(classes, dim, generator=g)
    bank_y = torch.randint(0, classes, (n_bank,), generator=g)
    query_y = torch.randint(0, classes, (n_query,), generator=g)
    bank = F.normalize(centres[bank_y] + 1.5 * torch.randn(n_bank, dim, generator=g), dim=1)
    queries = F.normalize(centres[query_y] + 1.5 * torch.randn(n_query, dim, generator=g), dim=1)
    return bank, bank_y, queries, query_y


def brute_force():
    bank, bank_y, queries, query_y = data()
    return {k: knn_accuracy(bank, bank_y, queries, query_y, k=k, temperature=0.07) for k in KS}


def test_one_rank_equals_brute_force_with_small_rounds():
    bank, bank_y, queries, query_y = data()
    assert knn_classify(queries, query_y, bank, bank_y, ks=KS, chunk=10) == pytest.approx(brute_force())


def _sharded(rank, world, out):
    bank, bank_y, queries, query_y = data()
    # Uneven shares, as rank_share gives them: bank 151 / 150, queries 48 / 49.
    b = [(0, 151), (151, 301)][rank]
    q = [(0, 48), (48, 97)][rank]
    got = knn_classify(
        queries[q[0] : q[1]], query_y[q[0] : q[1]], bank[b[0] : b[1]], bank_y[b[0] : b[1]], ks=KS, chunk=16
    )
    torch.save(got, f"{out}/rank{rank}.pt")


def test_two_ranks_equal_brute_force_and_agree(tmp_path):
    run_ranks(_sharded, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0 == r1 == pytest.approx(brute_force())
