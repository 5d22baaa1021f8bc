"""2 real ranks x 2 DataLoader workers: disjoint samples that cover the epoch, equal batch counts."""

import pytest
import torch
import torch.distributed as dist

from scale.data.augment import AugmentConfig
from scale.data.loader import build_loader
from scale.data.shards import make_shards
from tests.helpers import random_images, run_ranks, write_image_folder

pytestmark = pytest.mark.distributed


def _epoch_labels(rank: int, world: int, shards: str, result_file: str) -> None:
    # world size and rank come from the initialised process group
    loader = build_loader(shards, batch_size=5, augment=AugmentConfig(crop_size=16), num_workers=2, seed=7)
    assert len(loader) == 66 // (2 * 5)
    for epoch in range(2):
        labels = torch.tensor([int(y) for _, _, ys in loader for y in ys])
        counts = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(counts, torch.tensor([labels.numel()]))
        assert len({int(c) for c in counts}) == 1  # equal batch counts on every rank
        gathered = [torch.zeros_like(labels) for _ in range(world)]
        dist.all_gather(gathered, labels)
        every = torch.cat(gathered).tolist()
        assert len(every) == len(set(every)) == 60  # disjoint, 66 - 6 dropped (under one global batch)
        if rank == 0:
            with open(result_file, "a") as f:
                f.write(f"{epoch}:{sorted(every)}\n")


def test_two_ranks_two_workers_disjoint_cover_equal(tmp_path):
    folder = write_image_folder(tmp_path / "imgs", random_images(66, size=20), ext="png")
    make_shards(folder, tmp_path / "shards", "train", max_samples=9, num_workers=1, progress=False)
    result = tmp_path / "result.txt"
    run_ranks(_epoch_labels, 2, str(tmp_path / "shards"), str(result))
    epochs = result.read_text().splitlines()
    assert len(epochs) == 2 and epochs[0].split(":")[1] != epochs[1].split(":")[1]  # other remainder dropped
