"""Fashion-MNIST as a dataset of the project: IDX files to shards (from a synthetic IDX set here, so
the default suite needs no Debian package), the class-balanced label subsets, the one-line error
without the dataset, and (slow) the whole evaluation pipeline of benchmarks.fashion on subsets of
the real dataset."""

import gzip
import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from scale.data import fashion
from scale.errors import DataError


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">4B", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    """A 200 + 50 image IDX set of 28 px images in Debian's layout, and a private cache."""
    rng = np.random.default_rng(0)
    idx = tmp_path / "idx"
    idx.mkdir()
    for split, n in (("train", 200), ("test", 50)):
        images, labels = fashion.FILES[split]
        write_idx(idx / images, rng.integers(0, 256, (n, 28, 28)))
        write_idx(idx / labels, np.arange(n) % 10)
    monkeypatch.setenv("SCALE_FASHION_IDX", str(idx))
    monkeypatch.setenv("SCALE_CACHE", str(tmp_path / "cache"))
    return idx


def test_idx_files_become_labelled_shards_with_their_classes(fake_fashion):
    from scale.data.labelled import check_labels
    from scale.data.sources import resolve_source

    src = resolve_source("fashion")
    assert sum(src.counts) == 200 and check_labels(src, "fashion") == 10
    key, data, label = src.read_one(0, 0)
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(data))
    assert image.size == (28, 28) and image.mode == "RGB" and 0 <= label < 10
    test = resolve_source("fashion:test")
    assert sum(test.counts) == 50
    classes = json.loads(next((fashion.cache_root() / fashion.FASHION_NAME).glob("train-classes.json")).read_text())
    assert list(classes) == [f"{i}-{name}" for i, name in enumerate(fashion.CLASSES)]


def test_label_subsets_are_class_balanced_and_fixed(fake_fashion):
    from scale.data.sources import resolve_source

    src = resolve_source("fashion:train@10%")
    labels = [label for unit in range(len(src.counts)) for _, _, label in src.read(unit, 0, src.counts[unit])]
    assert len(labels) == 20 and np.bincount(labels, minlength=10).tolist() == [2] * 10
    assert sum(resolve_source("fashion:train@30").counts) == 30
    _, all_labels = fashion.load_split("train")
    order = fashion.subset_order(all_labels)
    assert np.array_equal(order, fashion.subset_order(all_labels)) and len(set(order)) == 200


@pytest.mark.parametrize("spec", ["fashion:test@10%", "fashion:train@0", "fashion:train@101%", "fashion:val"])
def test_bad_fashion_specs_are_one_line_errors(fake_fashion, spec):
    from scale.data.sources import resolve_source

    with pytest.raises(DataError) as e:
        resolve_source(spec)
    assert "\n" not in str(e.value)


def test_missing_dataset_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALE_FASHION_IDX", str(tmp_path / "none"))
    monkeypatch.setenv("SCALE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        fashion.fashion_shards("fashion")


def test_a_truncated_idx_file_is_named(tmp_path):
    path = tmp_path / "x.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">4B", 0, 0, 8, 1) + struct.pack(">I", 10) + b"\0" * 5)
    with pytest.raises(DataError, match="truncated"):
        fashion.read_idx(path)


@pytest.mark.slow
@pytest.mark.skipif(not (fashion.DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist")  # fmt: skip
def test_fashion_pipeline_end_to_end_on_subsets(tmp_path):
    """The minutes-long version of the committed Fashion-MNIST results: a short fashion_demo
    pretraining, then every evaluation of benchmarks.fashion (kNN, both linear probes, fine-tuning
    with 100% and 10% of the labels, each pretrained and at random init) on subsets."""
    env_run = [sys.executable, "-m", "scale.pretrain", "--recipe", "fashion_demo", "--schedule.max_steps=3",
               "--data.source=fashion:train@600", "--data.knn_train_source=fashion:train@100",
               "--data.eval_source=fashion:train@100", "--batch.global_batch_size=64",
               f"--run.output_dir={tmp_path}", "--run.progress=false", "--data.num_workers=0"]  # fmt: skip
    assert subprocess.run(env_run, capture_output=True).returncode == 0
    report = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "benchmarks.fashion", str(tmp_path / "fashion_demo"), "--smoke",
                           "--out", str(tmp_path / "eval"), "--results", str(report)],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    data = json.loads(report.with_suffix(".json").read_text())
    assert len(data["results"]) == 5 and all(len(by) == 2 for by in data["results"].values())
    assert all(0 <= r["top1"] <= 100 for by in data["results"].values() for r in by.values())
    assert "fine-tuning, 10% of the labels" in report.with_suffix(".md").read_text()
