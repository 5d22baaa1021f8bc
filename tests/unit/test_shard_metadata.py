"""Metadata at scale (issue 27, item 7): start-up reads one manifest, not every shard; each index is
parsed once per process; member names with spaces make an index that parses."""

import builtins
import io
import json
import logging
import os
import tarfile
from pathlib import Path

import pytest
import torch

from scale.data import shards
from scale.data.augment import AugmentConfig
from scale.data.loader import build_loader
from scale.data.shards import make_shards, read_index, write_index
from scale.data.sources import ShardSource, resolve_source
from scale.errors import DataError
from tests.helpers import random_images, write_image_folder

AUG = AugmentConfig(crop_size=16)


class FileCalls:
    """Every path the process stats, opens or lists while active (monkeypatched os and builtins)."""

    NAMES = ((os, "stat"), (os, "lstat"), (os, "open"), (os, "scandir"), (os, "listdir"), (builtins, "open"),
             (io, "open"))  # fmt: skip

    def __init__(self, monkeypatch):
        self.paths: list[str] = []
        for module, name in self.NAMES:
            monkeypatch.setattr(module, name, self._counting(getattr(module, name)))

    def _counting(self, fn):
        def call(path=".", *args, **kwargs):
            self.paths.append(os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path))
            return fn(path, *args, **kwargs)

        return call

    def of(self, *suffixes: str) -> list[str]:
        return [p for p in self.paths if p.endswith(suffixes)]


def fake_shard_set(root: Path, n: int, per_shard: int = 13, manifest: bool = True) -> Path:
    """n shards of a set as far as metadata goes: empty tars, index headers, the manifest."""
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"train-{i:06d}.tar").write_bytes(b"")
        (root / f"train-{i:06d}.idx").write_text(f"v1.2 {per_shard}\n")
    if manifest:
        entries = [{"file": f"train-{i:06d}.tar", "samples": per_shard, "bytes": 0} for i in range(n)]
        (root / "train-manifest.json").write_text(json.dumps({"num_samples": n * per_shard, "shards": entries}))
    return root


@pytest.mark.parametrize("spec", ["{}", "{}/train-{{000000..{last:06d}}}.tar", "{}/train-*.tar"])
def test_start_up_reads_the_manifest_and_touches_no_shard(tmp_path, monkeypatch, spec):
    """Rank 7 of 512 builds its loader: a constant number of file operations however many shards
    (the manifest, the folder listing a directory or glob needs), none on a shard or an index."""
    calls = {}
    for n in (40, 400):
        folder = fake_shard_set(tmp_path / str(n), n)
        counter = FileCalls(monkeypatch)
        loader = build_loader(spec.format(folder, last=n - 1), batch_size=1, world_size=512, rank=7, num_workers=2)
        monkeypatch.undo()
        assert len(loader) == n * 13 // 512
        assert counter.of(".tar", ".idx") == [], counter.of(".tar", ".idx")[:3]
        # Operations on the shard set's folder (other threads of the test process may touch other files).
        calls[n] = len([p for p in counter.paths if p.startswith(str(folder))])
    assert calls[400] == calls[40] <= 8, calls


def test_without_a_manifest_one_line_says_how_to_write_it_and_nothing_changes(tmp_path, caplog):
    folder = write_image_folder(tmp_path / "imgs", random_images(40, size=20), labels=list(range(40)), ext="png")
    make_shards(folder, tmp_path / "s", "train", max_samples=9, num_workers=1, progress=False)
    manifest = tmp_path / "s" / "train-manifest.json"

    def epoch():
        loader = build_loader(str(tmp_path / "s"), batch_size=4, augment=AUG, num_workers=0, world_size=2, rank=1)
        return loader.stream.source.counts, [tuple(b) for b in loader]

    with caplog.at_level(logging.INFO, logger="scale.data"):
        counts, batches = epoch()
    assert not [r for r in caplog.records if r.name == "scale.data.sources"]
    manifest.rename(tmp_path / "aside.json")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="scale.data"):
        old_counts, old_batches = epoch()
    lines = [r.getMessage() for r in caplog.records if r.name == "scale.data.sources"]
    assert len(lines) == 1 and f"scale-make-shards --index-only {tmp_path / 's'}" in lines[0], lines
    assert old_counts == counts == [9, 9, 9, 9, 4]
    for got, expected in zip(old_batches, batches, strict=True):  # the same samples, views and labels
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))

    # `--index-only` (`index_shards`) writes the manifest of a set that has none.
    from scale.data.shards import index_shards

    index_shards(tmp_path / "s")
    written = json.loads(manifest.read_text())
    assert [s["samples"] for s in written["shards"]] == counts and written["num_samples"] == 40
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="scale.data"):
        assert resolve_source(str(tmp_path / "s")).counts == counts
    assert not [r for r in caplog.records if r.name == "scale.data.sources"]


def test_a_shard_whose_index_disagrees_with_the_manifest_is_lost_not_misread(tmp_path, caplog):
    folder = write_image_folder(tmp_path / "imgs", random_images(12, size=20), ext="png")
    make_shards(folder, tmp_path / "s", "train", max_samples=6, num_workers=1, progress=False)
    manifest = tmp_path / "s" / "train-manifest.json"
    data = json.loads(manifest.read_text())
    data["shards"][1]["samples"] = 7  # stale: the index says 6
    manifest.write_text(json.dumps(data))
    src = resolve_source(str(tmp_path / "s"))
    assert src.counts == [6, 7]
    with caplog.at_level(logging.WARNING):
        got = list(src.read(1, 0, 7))
    assert [data for _, data, _ in got] == [None] * 7  # lost, counted as such; never a sample off by one
    assert "the manifest 7" in caplog.text and "--index-only" in caplog.text
    assert all(data is not None for _, data, _ in src.read(0, 0, 6))


@pytest.fixture
def five_shards(tmp_path):
    folder = write_image_folder(tmp_path / "imgs", random_images(40, size=16), labels=list(range(40)), ext="png")
    make_shards(folder, tmp_path / "s", "train", max_samples=8, shuffle=False, num_workers=1, progress=False)
    shards._index_cache.clear() if hasattr(shards, "_index_cache") else None  # other tests' indexes
    return tmp_path / "s"


def test_each_index_is_parsed_once_per_process_over_epochs_and_a_resume(five_shards, monkeypatch):
    """Two epochs, then a resume mid-epoch whose shuffle buffer spans several shards: each index is
    opened once in this process, and each shard at most once by the resume."""

    def make():
        return build_loader(str(five_shards), batch_size=4, augment=AUG, num_workers=0, world_size=1, rank=0,
                            shuffle_buffer=12)  # fmt: skip

    counter = FileCalls(monkeypatch)
    loader = make()
    list(loader), list(loader)
    it = iter(loader)
    next(it), next(it), next(it)
    state, expected = loader.state_dict(), next(it)
    idx = counter.of(".idx")
    assert sorted(idx) == sorted(set(idx)) and len(idx) == 5, idx

    resumed = make()
    resumed.load_state_dict(state)
    before = len(counter.paths)
    got = next(iter(resumed))
    monkeypatch.undo()
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert counter.of(".idx") == idx  # nothing parsed again
    tars = [p for p in counter.paths[before:] if p.endswith(".tar")]
    assert len(tars) == len(set(tars)) <= 5, tars  # one open per shard, not one per buffered sample


def _tar_with_names(path: Path, names: list[str]) -> list[bytes]:
    from PIL import Image

    images = []
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for i, (name, img) in enumerate(zip(names, random_images(len(names), size=20), strict=True)):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            images.append(buf.getvalue())
            for ext, payload in (("png", buf.getvalue()), ("cls", str(i).encode()), ("cls.i32", shards.label_bytes(i))):
                info = tarfile.TarInfo(f"{name}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return images


NAMES = ["a photo 01", "tab\there", "naïve 日本", "100% sure", "%41 literal", "dir with space/x y", "new\nline",
         "wide\u3000space", "plain-name"]  # fmt: skip


def test_member_names_with_spaces_tabs_and_unicode_make_an_index_that_parses(tmp_path):
    tar = tmp_path / "odd-000000.tar"
    images = _tar_with_names(tar, NAMES)
    assert write_index(tar) == len(NAMES)
    lines = tar.with_suffix(".idx").read_text(encoding="utf-8").splitlines()
    assert lines[0] == f"v1.2 {len(NAMES)}" and len(lines) == 1 + len(NAMES)
    for line in lines[1:]:  # DALI's reading: whitespace-separated `ext offset size name` groups
        fields = line.split()
        assert len(fields) == 12 and all(int(fields[i]) % 512 == 0 for i in range(1, 12, 4))
    assert "plain-name.png" in lines[-1]  # a plain name is written as DALI's wds2idx writes it
    index = read_index(tar.with_suffix(".idx"))
    assert [s.key for s in index] == NAMES
    src = ShardSource([tar])
    read = list(src.read(0, 0, len(NAMES)))
    assert [data for _, data, _ in read] == images and [label for *_, label in read] == list(range(len(NAMES)))
    assert [key for key, _, _ in read] == [f"{tar.name}/{n}" for n in NAMES]


def test_the_loaders_read_shards_with_such_names(tmp_path):
    tar = tmp_path / "odd-000000.tar"
    _tar_with_names(tar, NAMES * 2)
    write_index(tar)
    loader = build_loader(str(tar), batch_size=3, augment=AUG, num_workers=0, world_size=1, rank=0)
    assert sorted(int(y) for *_, labels in loader for y in labels) == list(range(2 * len(NAMES)))
    assert loader.num_skipped == 0
    pytest.importorskip("nvidia.dali")  # DALI reads the escaped names as the one field they are
    dali = build_loader(str(tar), batch_size=3, augment=AUG, backend="dali", num_workers=1, world_size=1, rank=0)
    assert sorted(int(y) for *_, labels in dali for y in labels) == list(range(2 * len(NAMES)))


def test_an_old_index_of_such_names_is_a_clear_error_that_says_how_to_rewrite_it(tmp_path):
    idx = tmp_path / "old-000000.idx"
    idx.write_text("v1.2 1\npng 512 100 a photo.png cls 1024 1 a photo.cls\n")
    with pytest.raises(DataError, match=rf"line 2 .*scale-make-shards --index-only {tmp_path}"):
        read_index(idx)


def test_a_forked_worker_opens_its_own_shard_files(five_shards):
    """A DataLoader worker forked while this process holds shards open must not read through the
    inherited file objects (their position is shared with the parent's): it closes its copies and
    opens its own; the parent's stay open and read correctly."""
    import multiprocessing

    source = resolve_source(str(five_shards))
    expected = list(source.read(0, 0, 8))
    held = source._files[0]
    parent_end, child_end = multiprocessing.Pipe()

    def child():
        own = source._open(0)
        child_end.send((own is not held, held.closed, [data for _, data, _ in source.read(0, 0, 8)]))

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    try:
        assert parent_end.poll(60), f"the child sent nothing (exit code {proc.exitcode})"
        separate, inherited_closed, data = parent_end.recv()
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert proc.exitcode == 0 and separate and inherited_closed
    assert data == [d for _, d, _ in expected]
    assert not held.closed and source._files[0] is held and list(source.read(0, 0, 8)) == expected
