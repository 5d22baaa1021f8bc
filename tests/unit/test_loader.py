import io
import tarfile

import numpy as np
import pytest
import torch

from scale.data.augment import AugmentConfig
from scale.data.epoch_plan import plan_epoch
from scale.data.loader import build_loader
from scale.data.shards import make_shards, write_index
from scale.data.sources import resolve_source
from scale.data.synthetic import SyntheticLoader
from scale.errors import DataError
from scale.views import adjacent
from tests.helpers import random_images, write_image_folder

AUG = AugmentConfig(crop_size=16)


@pytest.fixture(scope="module")
def unique_shards(tmp_path_factory):
    """70 images, one class each (label = sample id), in 5 shards of 14; plus the same as a folder."""
    tmp = tmp_path_factory.mktemp("unique")
    folder = write_image_folder(tmp / "folder", random_images(70, size=20), ext="png")
    make_shards(folder, tmp / "shards", "train", max_samples=14, shuffle=False, num_workers=1, progress=False)
    return tmp


@pytest.mark.parametrize("counts", [[14] * 5, [3, 50, 7, 1, 22, 9], [1] * 37])
@pytest.mark.parametrize("world, workers, batch", [(1, 1, 4), (2, 2, 3), (4, 3, 2), (3, 1, 5)])
def test_plan_is_disjoint_equal_and_covers_all_but_the_remainder(counts, world, workers, batch):
    total = sum(counts)
    for epoch in (0, 1):
        seen, per_rank = [], []
        for rank in range(world):
            plan = plan_epoch(
                counts,
                world_size=world,
                rank=rank,
                num_workers=workers,
                batch_size=batch,
                epoch=epoch,
                seed=3,
                shuffle=True,
            )
            assert sum(plan.worker_batches) == plan.batches_per_rank
            per_rank.append(plan.batches_per_rank)
            for k, segs in enumerate(plan.worker_segments):
                n = sum(s.stop - s.start for s in segs)
                assert n == plan.worker_batches[k] * batch
                for s in segs:
                    assert 0 <= s.start < s.stop <= counts[s.unit]
                    seen += [(s.unit, i) for i in range(s.start, s.stop)]
        assert len(set(per_rank)) == 1 and per_rank[0] == total // (world * batch)
        assert len(seen) == len(set(seen)) == world * per_rank[0] * batch
        assert total - len(seen) < world * batch  # only the drop_last remainder is left out


def test_plan_shuffles_units_per_epoch_and_is_the_same_on_every_rank():
    counts = [10] * 20
    kwargs = dict(world_size=1, rank=0, num_workers=1, batch_size=5, seed=0, shuffle=True)
    e0, e1 = plan_epoch(counts, epoch=0, **kwargs), plan_epoch(counts, epoch=1, **kwargs)
    assert [s.unit for s in e0.worker_segments[0]] != [s.unit for s in e1.worker_segments[0]]
    assert plan_epoch(counts, epoch=0, **kwargs) == e0


def labels_of(loader):
    return [int(y) for _, _, labels in loader for y in labels]


@pytest.mark.parametrize("source", ["shards", "folder"])
def test_epoch_covers_every_sample_once_with_workers(unique_shards, source):
    loader = build_loader(str(unique_shards / source), batch_size=8, augment=AUG, num_workers=2, world_size=1, rank=0)
    assert len(loader) == 70 // 8
    epoch0 = labels_of(loader)
    assert len(epoch0) == len(set(epoch0)) == 64
    epoch1 = labels_of(loader)
    assert len(set(epoch1)) == 64 and epoch1 != epoch0  # reshuffled
    assert loader.state_dict()["epoch"] == 2


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop_after", [3, 8])  # mid-epoch, and exactly at the epoch boundary
def test_resume_from_reported_position_gives_the_same_next_batch(unique_shards, workers, stop_after):
    def make():
        return build_loader(
            str(unique_shards / "shards"),
            batch_size=8,
            augment=AUG,
            num_workers=workers,
            world_size=1,
            rank=0,
            shuffle_buffer=20,
        )

    first = make()
    it = iter(first)
    for _ in range(stop_after):
        next(it)
    state = first.state_dict()
    expected = next(it) if stop_after < len(first) else next(iter(first))
    resumed = make()
    resumed.load_state_dict(state)
    got = next(iter(resumed))
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_resampled_mode_has_equal_batches_and_resumes(unique_shards):
    def make():
        return build_loader(
            str(unique_shards / "shards"),
            batch_size=8,
            augment=AUG,
            num_workers=2,
            world_size=2,
            rank=1,
            resampled=True,
        )

    loader = make()
    assert len(loader) == 70 // 16
    it = iter(loader)
    next(it)
    state, expected = loader.state_dict(), next(it)
    again = make()
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(next(iter(again)), expected, strict=True))


def test_corrupt_sample_is_skipped_counted_and_batches_stay_equal(tmp_path):
    images = random_images(16, size=20)
    tar_path = tmp_path / "bad-000000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i, img in enumerate(images):
            buf = io.BytesIO()
            from PIL import Image

            Image.fromarray(img).save(buf, format="PNG")
            data = buf.getvalue() if i != 5 else buf.getvalue()[:40]  # sample 5 truncated
            for ext, payload in (("png", data), ("cls", str(i).encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    write_index(tar_path)
    loader = build_loader(str(tar_path), batch_size=4, augment=AUG, num_workers=0, world_size=1, rank=0, shuffle=False)
    labels = labels_of(loader)
    assert len(labels) == 16  # the count is kept: the corrupt sample is replaced by the previous good one
    assert 5 not in labels and labels.count(4) == 2
    assert loader.num_skipped == 1 and loader.metrics()["data/skipped"] == 1.0


def test_changed_layout_refuses_mid_epoch_resume(unique_shards):
    loader = build_loader(str(unique_shards / "shards"), batch_size=8, augment=AUG, num_workers=2, world_size=1, rank=0)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    other = build_loader(str(unique_shards / "shards"), batch_size=4, augment=AUG, num_workers=2, world_size=1, rank=0)
    with pytest.raises(DataError, match="batch_size: saved 8 vs now 4"):
        other.load_state_dict(state)


def test_bad_sources_give_clear_errors(tmp_path, unique_shards):
    with pytest.raises(DataError, match="does not exist"):
        resolve_source(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-directories"):
        resolve_source(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="matches no files"):
        resolve_source(str(tmp_path / "train-{000000..000009}.tar"))
    (tmp_path / "two").mkdir()
    for name in ("train-000000.tar", "val-000000.tar"):
        (tmp_path / "two" / name).write_bytes(b"")
    with pytest.raises(DataError, match="several sets"):
        resolve_source(str(tmp_path / "two"))
    (tmp_path / "noidx").mkdir()
    (tmp_path / "noidx" / "a-000000.tar").write_bytes(b"")
    with pytest.raises(DataError, match="--index-only"):
        resolve_source(str(tmp_path / "noidx"))
    with pytest.raises(DataError, match="lower the batch size"):
        build_loader(str(unique_shards / "shards"), batch_size=64, augment=AUG, world_size=2, rank=0)
    with pytest.raises(ValueError, match="data backend"):
        build_loader(str(unique_shards / "shards"), batch_size=4, backend="ffcv", world_size=1, rank=0)


def test_brace_pattern_selects_shards(unique_shards):
    src = resolve_source(str(unique_shards / "shards" / "train-{000000..000002}.tar"))
    assert src.counts == [14, 14, 14]


def test_synthetic_loader_shapes_and_epoch_length():
    loader = SyntheticLoader(batch_size=4, crop_size=16, num_samples=40, world_size=2)
    batches = list(loader)
    assert len(batches) == len(loader) == 5
    v1, v2, labels = batches[0]
    assert v1.shape == v2.shape == (4, 3, 16, 16) and torch.all(labels == -1)
    assert adjacent(v1, v2)  # one buffer: one transfer, and the joint forward's input as it is


def test_both_views_come_from_one_buffer_normalised_once(unique_shards):
    from scale.views import join_views

    loader = build_loader(str(unique_shards / "shards"), batch_size=8, augment=AUG, num_workers=2, world_size=1,
                          rank=0)  # fmt: skip
    x1, x2, _ = next(iter(loader))
    assert adjacent(x1, x2) and x1.dtype == torch.float32
    joint = join_views(x1, x2)
    assert joint.data_ptr() == x1.data_ptr() and joint.shape == (16, *x1.shape[1:])  # a view, no copy
    assert not torch.equal(x1, x2)  # two different augmentations


def test_dali_cpu_loader_equal_batches_and_coverage(unique_shards):
    pytest.importorskip("nvidia.dali")
    per_rank = []
    for rank in range(2):
        loader = build_loader(
            str(unique_shards / "shards"),
            batch_size=8,
            augment=AUG,
            backend="dali",
            num_workers=1,
            world_size=2,
            rank=rank,
        )
        labels = labels_of(loader)
        assert len(labels) == len(loader) * 8 == 32
        per_rank.append(set(labels))
        v1, v2, _ = next(iter(loader))
        assert v1.shape == (8, 3, 16, 16) and v1.dtype == torch.float32
    assert not per_rank[0] & per_rank[1]  # disjoint ranks


def test_dali_resume_gives_the_same_next_batch(unique_shards):
    pytest.importorskip("nvidia.dali")

    def make():
        return build_loader(
            str(unique_shards / "shards"),
            batch_size=8,
            augment=AUG,
            backend="dali",
            num_workers=1,
            world_size=1,
            rank=0,
        )

    first = make()
    it = iter(first)
    next(it), next(it)
    state, expected = first.state_dict(), next(it)
    again = make()
    again.load_state_dict(state)
    got = next(iter(again))
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_missing_dali_says_how_to_install(monkeypatch, unique_shards):
    import sys

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(ImportError, match="pip install nvidia-dali"):
        build_loader(str(unique_shards / "shards"), batch_size=4, backend="dali", world_size=1, rank=0)


def test_demo_set_is_cached_and_split(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALE_CACHE", str(tmp_path))
    train, val = resolve_source("demo"), resolve_source("demo:val")
    assert sum(train.counts) == 1437 and sum(val.counts) == 360 and len(train.counts) == 4
    mtime = (tmp_path / "demo-digits-v1" / "train-manifest.json").stat().st_mtime
    resolve_source("demo")
    assert (tmp_path / "demo-digits-v1" / "train-manifest.json").stat().st_mtime == mtime  # written once
    labels = np.array([label for u, c in enumerate(val.counts) for _, _, label in val.read(u, 0, c)])
    assert set(labels) == set(range(10))


def test_uint8_handover_normalises_exactly_like_torchvision():
    from torchvision.transforms import v2 as T

    from scale.data.augment import IMAGENET_MEAN, IMAGENET_STD, Normalize

    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    reference = T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    torch.testing.assert_close(Normalize()(x), reference(x), rtol=0, atol=1e-6)


def test_dali_reshuffles_between_epochs(unique_shards):
    pytest.importorskip("nvidia.dali")
    loader = build_loader(
        str(unique_shards / "shards"), batch_size=8, augment=AUG, backend="dali", num_workers=1, world_size=1, rank=0,
        shuffle_buffer=4,
    )  # fmt: skip
    first, second = labels_of(loader), labels_of(loader)
    common = sorted(set(first) & set(second))
    rank_corr = np.corrcoef([first.index(x) for x in common], [second.index(x) for x in common])[0, 1]
    assert rank_corr < 0.5, rank_corr  # not the same order again


def test_foreign_shards_without_binary_labels(tmp_path):
    """Shards from other tools: `.cls` text labels only (torchvision reads them; DALI gives -1)."""
    from PIL import Image

    tar_path = tmp_path / "other-000000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i, img in enumerate(random_images(12, size=20)):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG")
            for ext, payload in (("jpg", buf.getvalue()), ("cls", str(i % 3).encode())):
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    write_index(tar_path)
    tv = build_loader(str(tar_path), batch_size=4, augment=AUG, num_workers=0, world_size=1, rank=0)
    assert sorted(labels_of(tv)) == sorted(i % 3 for i in range(12))
    pytest.importorskip("nvidia.dali")
    dali = build_loader(str(tar_path), batch_size=4, augment=AUG, backend="dali", num_workers=1, world_size=1, rank=0)
    assert labels_of(dali) == [-1] * 12


def test_brace_range_with_a_missing_shard_is_an_error(unique_shards):
    with pytest.raises(DataError, match="do not exist"):
        resolve_source(str(unique_shards / "shards" / "train-{000000..000009}.tar"))


def test_elastic_resume_at_an_epoch_boundary(unique_shards):
    loader = build_loader(str(unique_shards / "shards"), batch_size=8, augment=AUG, num_workers=0, world_size=1, rank=0)
    labels_of(loader)
    state = loader.state_dict()
    assert state["batches_done"] == 0 and state["epoch"] == 1
    other = build_loader(str(unique_shards / "shards"), batch_size=4, augment=AUG, num_workers=2, world_size=2, rank=1)
    other.load_state_dict(state)  # a new layout is fine at a boundary
    assert other.epoch == 1 and len(labels_of(other)) == len(other) * 4


def test_dali_ranks_draw_their_own_augmentations_and_each_replays_its_own_on_resume(tmp_path):
    """Every sample is the same image, so two ranks see identical inputs: their views may only
    differ through their random draws (seeded by (seed, epoch, rank)). A rank resumed mid-epoch
    hands out exactly the views it would have."""
    pytest.importorskip("nvidia.dali")
    image = random_images(1, size=20, seed=7)[0]
    folder = write_image_folder(tmp_path / "same", [image] * 32, labels=list(range(32)), ext="png")
    make_shards(folder, tmp_path / "shards", "train", max_samples=8, shuffle=False, num_workers=1, progress=False)

    def make(rank):
        return build_loader(str(tmp_path / "shards"), batch_size=4, augment=AUG, backend="dali", num_workers=1,
                            world_size=2, rank=rank, seed=3)  # fmt: skip

    views = {rank: [(v1.clone(), v2.clone()) for v1, v2, _ in make(rank)] for rank in (0, 1)}
    assert len(views[0]) == len(views[1]) == 4
    for (a1, a2), (b1, b2) in zip(views[0], views[1], strict=True):
        assert not torch.equal(a1, b1) and not torch.equal(a2, b2)
    for rank in (0, 1):
        first = make(rank)
        it = iter(first)
        next(it), next(it)
        resumed = make(rank)
        resumed.load_state_dict(first.state_dict())
        for (e1, e2), (g1, g2, _) in zip(views[rank][2:], resumed, strict=True):
            assert torch.equal(e1, g1) and torch.equal(e2, g2)
