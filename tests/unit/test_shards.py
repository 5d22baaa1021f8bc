import json
import logging

import numpy as np
import pytest

from scale.data.shards import find_images, make_shards, read_index, verify_shards, write_index
from scale.data.sources import ShardSource
from scale.errors import DataError


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    """Real JPEGs: the demo digits (train split), plus one truncated JPEG and one non-image."""
    from scale.data.demo import _write_image_folders

    root = tmp_path_factory.mktemp("digits")
    _write_image_folders(root)
    train = root / "train"
    good = next((train / "3").glob("*.jpg"))
    data = good.read_bytes()
    (train / "3" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (train / "5" / "garbage.png").write_bytes(b"this is not an image")
    return train


def test_round_trip_keeps_bytes_and_labels_and_skips_corrupt(digits_folder, tmp_path, caplog):
    out = tmp_path / "shards"
    with caplog.at_level(logging.WARNING):
        manifest = make_shards(digits_folder, out, "train", max_samples=500, num_workers=2, progress=False)
    samples, classes = find_images(digits_folder)
    assert len(samples) == 1437 + 2
    assert manifest["num_samples"] == 1437
    assert sorted(s["path"].rsplit("/", 1)[-1] for s in manifest["skipped"]) == ["garbage.png", "truncated.jpg"]
    assert "truncated.jpg" in caplog.text
    assert [s["samples"] for s in manifest["shards"]] == [500, 500, 437]
    assert json.loads((out / "train-classes.json").read_text()) == {str(i): i for i in range(10)}

    # Every good image is in the shards byte for byte, with its label; nothing else is.
    expected = {p.read_bytes(): label for p, label in samples if p.name not in ("truncated.jpg", "garbage.png")}
    src = ShardSource(sorted(out.glob("train-*.tar")))
    seen = {}
    for unit, count in enumerate(src.counts):
        for _, data, label in src.read(unit, 0, count):
            seen[data] = label
    assert seen == expected


def test_index_matches_dalis_own_tool(tmp_path):
    pytest.importorskip("nvidia.dali")
    from wds2idx import IndexCreator

    from tests.helpers import random_images, write_image_folder

    root = write_image_folder(tmp_path / "imgs", random_images(20), ext="jpg")
    make_shards(root, tmp_path / "s", "x", max_samples=8, num_workers=1, progress=False, verify=False)
    for tar in sorted((tmp_path / "s").glob("x-*.tar")):
        theirs = tmp_path / "theirs.idx"
        with IndexCreator(str(tar), str(theirs), verbose=False) as creator:
            creator.create_index()
        assert tar.with_suffix(".idx").read_text() == theirs.read_text()


def test_verification_detects_a_damaged_shard(tmp_path):
    from tests.helpers import random_images, write_image_folder

    root = write_image_folder(tmp_path / "imgs", random_images(12), ext="png")
    out = tmp_path / "s"
    make_shards(root, out, "t", num_workers=1, progress=False)
    tar = out / "t-000000.tar"
    entry = read_index(tar.with_suffix(".idx"))[5]
    offset, size = entry.components["png"]
    raw = bytearray(tar.read_bytes())
    raw[offset + size // 2] ^= 0xFF
    tar.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="verification"):
        verify_shards(out, "t")


def test_index_of_an_empty_or_foreign_tar_is_an_error(tmp_path):
    import tarfile

    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    with pytest.raises(DataError, match="no samples"):
        write_index(empty)


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        make_shards(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-directories"):
        make_shards(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="no images"):
        make_shards(tmp_path / "noimg", tmp_path / "out")
    from tests.helpers import random_images, write_image_folder

    root = write_image_folder(tmp_path / "imgs", random_images(3))
    make_shards(root, tmp_path / "out", num_workers=1, progress=False)
    with pytest.raises(DataError, match="already holds"):  # nothing written before is lost
        make_shards(root, tmp_path / "out", num_workers=1, progress=False)


def test_only_corrupt_images_is_an_error(tmp_path):
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.jpg").write_bytes(np.zeros(10, np.uint8).tobytes())
    with pytest.raises(DataError, match="could be decoded"):
        make_shards(tmp_path / "bad", tmp_path / "out", num_workers=1, progress=False)
    assert list((tmp_path / "out").iterdir()) == []  # nothing half-written is left behind
