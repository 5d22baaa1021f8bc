"""The shard format: ImageFolder tree -> webdataset tar shards, with DALI index files and a
manifest (`make_shards`, run by the `scale-make-shards` command: `scale.make_shards`), and reading
them back by index (`read_index`, `iter_shard`).

Layout written to OUT:
    {prefix}-000000.tar, ...   samples `{key}.{jpg|png|...}` (the original bytes, not re-encoded),
                               `{key}.cls` (label as text, webdataset's convention) and
                               `{key}.cls.i32` (label as little-endian int32, for DALI's reader)
    {prefix}-000000.idx, ...   DALI `fn.readers.webdataset` index (format v1.2); scale's reader
                               also uses them to seek to samples. Member names are written with
                               whitespace, control characters and `%` percent-escaped (`%20`), so
                               that a name with spaces stays one field for DALI and for
                               `read_index`; other names are written as DALI's `wds2idx` does
    {prefix}-classes.json      class name -> index (sorted class folder names, as ImageFolder)
    {prefix}-manifest.json     shards with sample counts and sizes, totals, the skipped files and
                               why: a loader's start-up reads this one file, not every shard

The file order is shuffled (seeded) before writing so that every shard mixes classes: a loader
that reads shards sequentially then needs only a modest shuffle buffer. Every image is decoded
once on the way in; unreadable or truncated files are reported and left out.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import tarfile
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote

import numpy as np
import torch
import webdataset as wds
from torchvision.io import ImageReadMode, decode_image
from tqdm import tqdm

from scale.errors import DataError

log = logging.getLogger(__name__)

# What torchvision.io.decode_image and DALI both decode.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
INDEX_VERSION = "v1.2"
LABEL_TEXT_EXT = "cls"
LABEL_BIN_EXT = "cls.i32"


@dataclass(frozen=True)
class IndexedSample:
    """One sample of a shard: its key and, per component extension, (data offset, size) in the tar."""

    key: str
    components: dict[str, tuple[int, int]]


def find_images(root: str | os.PathLike) -> tuple[list[tuple[Path, int]], list[str]]:
    """(path, label) pairs of an ImageFolder tree (root/CLASS/IMAGE), classes sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist or is not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{str(root)!r} has no class sub-directories; expected the ImageNet layout root/CLASS/IMAGE")
    samples = []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.is_file() and path.suffix.lower().lstrip(".") in IMAGE_EXTS:
                samples.append((path, label))
    if not samples:
        raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) under {str(root)!r}")
    return samples, classes


def check_image(data: bytes) -> str | None:
    """None if `data` decodes as an image, else why not."""
    try:
        decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except Exception as e:  # torchvision raises RuntimeError on corrupt or truncated data
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return None


def _read_and_check(path: Path) -> tuple[bytes | None, str | None]:
    try:
        data = path.read_bytes()
    except OSError as e:
        return None, f"unreadable: {e}"
    return data, check_image(data)


def write_index(tar_path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> int:
    """Write the DALI v1.2 index of a webdataset tar (beside it by default); returns the sample count.

    A sample is the run of consecutive members sharing a key (the name up to the first dot of the
    base name), as webdataset and DALI define it.
    """
    tar_path = Path(tar_path)
    idx_path = Path(idx_path) if idx_path else tar_path.with_suffix(".idx")
    samples: list[list[tuple[str, int, int, str]]] = []
    last_key = None
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            if not member.isreg():
                continue
            base = member.name.rsplit("/", 1)[-1]
            if base.startswith(".") or "." not in base:
                continue
            dot = member.name.find(".", member.name.rfind("/") + 1)
            key, ext = member.name[:dot], member.name[dot + 1 :]
            entry = (ext, member.offset_data, member.size, member.name)
            if key != last_key:
                samples.append([entry])
                last_key = key
            else:
                samples[-1].append(entry)
    if not samples:
        raise DataError(f"shard {str(tar_path)!r} holds no samples")
    tmp = idx_path.with_name(idx_path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(f"{INDEX_VERSION} {len(samples)}\n")
        for sample in samples:
            f.write(" ".join(f"{_escape(ext)} {off} {size} {_escape(name)}" for ext, off, size, name in sample) + "\n")
    os.replace(tmp, idx_path)
    return len(samples)


def _escape(field: str) -> str:
    """`field` as one whitespace-free token: whitespace, control characters and `%` as `%XX` of
    their UTF-8 bytes. DALI splits index lines on whitespace and uses the name only to report a
    sample's source, so an escaped name changes nothing it reads; a plain name is left as it is."""
    if all(c.isprintable() and not c.isspace() and c != "%" for c in field):
        return field
    return "".join(
        c
        if c.isprintable() and not c.isspace() and c != "%"
        else "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogateescape"))
        for c in field
    )


def index_path(tar_path: str | os.PathLike) -> Path:
    return Path(tar_path).with_suffix(".idx")


def _uint(field: str) -> bool:
    return field.isascii() and field.isdigit()


def read_index_count(idx_path: str | os.PathLike) -> int:
    """The sample count in an index's header line (without reading the rest)."""
    with open(idx_path, encoding="utf-8", errors="surrogateescape") as f:
        header = f.readline().split()
    if len(header) != 2 or not header[0].startswith("v1") or not _uint(header[1]):
        raise DataError(f"{str(idx_path)!r} is not a DALI webdataset index (header {' '.join(header)!r})")
    return int(header[1])


def shard_prefix(tar_name: str) -> str:
    """The set a shard belongs to: `train` of `train-000012.tar`."""
    return tar_name.removesuffix(".tar").rsplit("-", 1)[0]


def manifest_path(directory: str | os.PathLike, prefix: str) -> Path:
    return Path(directory) / f"{prefix}-manifest.json"


def read_manifest(path: str | os.PathLike) -> dict[str, tuple[int, int | None]]:
    """Shard file name -> (samples, bytes) of a manifest; DataError when it is not one."""
    try:
        manifest = json.loads(Path(path).read_text())
        shards = {}
        for entry in manifest["shards"]:
            samples, size = entry["samples"], entry.get("bytes")
            if not isinstance(samples, int) or samples < 0 or not (size is None or isinstance(size, int)):
                raise ValueError(f"shard {entry.get('file')!r}: samples {samples!r}, bytes {size!r}")
            shards[str(entry["file"])] = (samples, size)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{str(path)!r} is not a shard manifest ({type(e).__name__}: {e})") from None
    return shards


def index_shards(out_dir: str | os.PathLike) -> list[tuple[Path, int]]:
    """(Re)write the index of every `OUT/*.tar` (shards from other tools, or indexes of an older
    version), and the manifest of each set that has none (or whose shards or counts changed), so
    that loaders start from one file per set; returns (shard, samples) pairs."""
    out = Path(out_dir)
    tars = sorted(out.glob("*.tar"))
    if not tars:
        raise DataError(f"no .tar files in {str(out)!r}; give the folder that holds the shards")
    done = [(tar, write_index(tar)) for tar in tars]
    sets: dict[str, list[dict]] = {}
    for tar, count in done:
        sets.setdefault(shard_prefix(tar.name), []).append(
            {"file": tar.name, "samples": count, "bytes": tar.stat().st_size}
        )
    for prefix, shards in sets.items():
        path = manifest_path(out, prefix)
        manifest: dict = {"prefix": prefix, "written_by": "scale-make-shards --index-only"}
        if path.is_file():
            try:
                found = json.loads(path.read_text())
                if not isinstance(found, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as e:
                log.warning("%s cannot be read (%s): writing it anew", path, e)
            else:
                if found.get("shards") == shards:
                    continue
                log.warning("%s lists other shards or counts than the indexes just written: updating them", path)
                manifest = found
        manifest.update(num_samples=sum(s["samples"] for s in shards), shards=shards)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, path)
        log.info("wrote %s: %d shards, %d samples", path, len(shards), manifest["num_samples"])
    return done


def read_index(idx_path: str | os.PathLike) -> list[IndexedSample]:
    """All samples of an index file: those `write_index` writes (names escaped) and those of DALI's
    `wds2idx` or of earlier versions (names as they are, which is the same unless a name holds
    whitespace or `%`: such an index never parsed, and an old name with `%XX` in it is shown
    unescaped, which changes only how the sample is named in logs)."""
    out = []
    with open(idx_path, encoding="utf-8", errors="surrogateescape") as f:
        header = f.readline().split()
        if len(header) != 2 or not header[0].startswith("v1") or not _uint(header[1]):
            raise DataError(f"{str(idx_path)!r} is not a DALI webdataset index (header {' '.join(header)!r})")
        count = int(header[1])
        for line_no, line in enumerate(f, start=2):
            fields = line.split()
            if not fields:
                continue
            if len(fields) % 4 or not all(_uint(fields[i]) and _uint(fields[i + 1]) for i in range(1, len(fields), 4)):
                raise DataError(
                    f"index {str(idx_path)!r} line {line_no} is not `<ext> <offset> <size> <name>` fields (a member "
                    f"name with spaces, written by an older version?); rewrite it with "
                    f"`scale-make-shards --index-only {Path(idx_path).parent}`"
                )
            comps, key = {}, None
            for i in range(0, len(fields), 4):
                ext, off, size, name = fields[i : i + 4]
                name = unquote(name, errors="surrogateescape") if "%" in name else name
                comps[unquote(ext, errors="surrogateescape") if "%" in ext else ext] = (int(off), int(size))
                key = key or name[: name.find(".", name.rfind("/") + 1)]
            out.append(IndexedSample(key, comps))
    if len(out) != count:
        raise DataError(f"index {str(idx_path)!r} says {count} samples but lists {len(out)}; rebuild it")
    return out


# Parsed indexes of this process, most recently used last, bounded by their samples in all (about
# 600 bytes each): a DataLoader worker, a resume that re-reads the samples left in its shuffle
# buffer, or a second source over the same shards parses each index once, not once per use.
INDEX_CACHE_SAMPLES = 1 << 16
_index_cache: OrderedDict[str, list[IndexedSample]] = OrderedDict()
_index_cache_lock = threading.Lock()


def load_index(idx_path: str | os.PathLike) -> list[IndexedSample]:
    """`read_index`, parsed once per process (the most recent indexes up to `INDEX_CACHE_SAMPLES`
    samples; a larger one is still kept while it is the latest). Indexes are immutable while a
    run reads them: the cache never looks at the file again."""
    key = os.fspath(idx_path)
    with _index_cache_lock:
        if key in _index_cache:
            _index_cache.move_to_end(key)
            return _index_cache[key]
    index = read_index(key)
    with _index_cache_lock:
        _index_cache[key] = index
        total = sum(len(v) for v in _index_cache.values())
        while total > INDEX_CACHE_SAMPLES and len(_index_cache) > 1:
            total -= len(_index_cache.popitem(last=False)[1])
    return index


def _bounded_map(pool: ProcessPoolExecutor, fn, samples: list, window: int) -> Iterator:
    """(sample, fn(path)) in order, with at most `window` images in flight: the readers stay busy
    but may not run ahead of the writer by more than that (ImageNet would not fit in memory)."""
    pending: deque = deque()
    todo = iter(samples)
    for sample in todo:
        pending.append((sample, pool.submit(fn, sample[0])))
        if len(pending) >= window:
            break
    while pending:
        sample, future = pending.popleft()
        nxt = next(todo, None)
        if nxt is not None:
            pending.append((nxt, pool.submit(fn, nxt[0])))
        yield sample, future.result()


def label_bytes(label: int) -> bytes:
    return np.int32(label).tobytes()


def make_shards(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    prefix: str = "train",
    max_samples: int = 1_000_000,
    max_bytes: float = 1e9,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int | None = None,
    verify: bool = True,
    progress: bool = True,
) -> dict:
    """Convert the ImageFolder tree `root` into shards in `out_dir`; returns the manifest.

    Args:
        max_samples, max_bytes: a shard is closed when either would be exceeded (default: about 1 GB).
        shuffle, seed: shuffle the file order before writing (recommended for training sets).
        num_workers: processes that read and decode-check images (default: all cores).
    """
    samples, classes = find_images(root)
    final = Path(out_dir)
    final.mkdir(parents=True, exist_ok=True)
    if any(final.glob(f"{prefix}-*")):
        raise DataError(f"{str(final)!r} already holds {prefix}-* files; choose another --prefix or directory")
    # Everything is written to a partial directory first and moved in at the end, so an interrupted
    # run leaves no shards that look complete.
    out = final / f".{prefix}.partial"
    if out.exists():
        log.warning("removing %s left by an interrupted run", out)
        shutil.rmtree(out)
    out.mkdir()
    if shuffle:
        random.Random(seed).shuffle(samples)
    (out / f"{prefix}-classes.json").write_text(json.dumps({c: i for i, c in enumerate(classes)}, indent=1))

    skipped: list[dict] = []
    written = 0
    digest = hashlib.sha1()
    start = time.time()
    pattern = str(out / f"{prefix}-%06d.tar")
    workers = num_workers or os.cpu_count() or 1
    with (
        ProcessPoolExecutor(workers) as pool,
        wds.ShardWriter(pattern, maxcount=max_samples, maxsize=max_bytes, verbose=0) as sink,
        tqdm(total=len(samples), unit="img", disable=not progress, desc=f"sharding {prefix}") as bar,
    ):
        for (path, label), (data, error) in _bounded_map(pool, _read_and_check, samples, window=64 * workers):
            bar.update(1)
            if error is not None:
                skipped.append({"path": str(path), "error": error})
                log.warning("skipping %s: %s", path, error)
                continue
            ext = path.suffix.lower().lstrip(".")
            ext = "jpg" if ext == "jpeg" else ext
            key = f"{written:09d}"
            sink.write({"__key__": key, ext: data, LABEL_TEXT_EXT: str(label), LABEL_BIN_EXT: label_bytes(label)})
            digest.update(data)
            written += 1
    elapsed = time.time() - start
    if not written:
        shutil.rmtree(out)
        raise DataError(f"none of the {len(samples)} images under {str(root)!r} could be decoded")

    shards = []
    for tar in sorted(out.glob(f"{prefix}-*.tar")):
        shards.append({"file": tar.name, "samples": write_index(tar), "bytes": tar.stat().st_size})
    manifest = {
        "prefix": prefix,
        "source": str(Path(root).resolve()),
        "num_samples": written,
        "num_classes": len(classes),
        "shards": shards,
        "skipped": skipped,
        "sha1_of_images": digest.hexdigest(),
        "seconds": round(elapsed, 1),
    }
    (out / f"{prefix}-manifest.json").write_text(json.dumps(manifest, indent=1))
    for path in sorted(out.iterdir()):  # the manifest last: its presence marks a complete set
        if path.name != f"{prefix}-manifest.json":
            os.replace(path, final / path.name)
    os.replace(out / f"{prefix}-manifest.json", final / f"{prefix}-manifest.json")
    out.rmdir()
    out = final
    log.info(
        "wrote %d images in %d shards to %s (%.0f img/s); %d skipped",
        written,
        len(shards),
        out,
        written / max(elapsed, 1e-9),
        len(skipped),
    )
    if verify:
        verify_shards(out, prefix)
    return manifest


def verify_shards(out_dir: str | os.PathLike, prefix: str = "train") -> None:
    """Read every shard back with webdataset and check counts, labels and image bytes against the
    manifest and indexes. Raises DataError on any mismatch."""
    out = Path(out_dir)
    manifest = json.loads((out / f"{prefix}-manifest.json").read_text())
    digest = hashlib.sha1()
    total = 0
    for shard in manifest["shards"]:
        tar = out / shard["file"]
        index = read_index(index_path(tar))
        if len(index) != shard["samples"]:
            raise DataError(f"{tar}: index has {len(index)} samples, manifest {shard['samples']}")
        # Every shard on this process, also when torch.distributed is initialised (webdataset's
        # default node splitter refuses to run there without an explicit one).
        reader = wds.WebDataset(
            str(tar), shardshuffle=False, empty_check=False, nodesplitter=_all_shards, workersplitter=_all_shards
        )
        for n, sample in enumerate(reader):
            entry = index[n]
            image_ext = next(e for e in sample if e in IMAGE_EXTS)
            label_txt = int(sample[LABEL_TEXT_EXT])
            label_bin = int(np.frombuffer(sample[LABEL_BIN_EXT], dtype=np.int32)[0])
            if sample["__key__"].rsplit("/", 1)[-1] != entry.key.rsplit("/", 1)[-1] or label_txt != label_bin:
                raise DataError(f"{tar}: sample {n} does not match its index entry or labels disagree")
            if len(sample[image_ext]) != entry.components[image_ext][1]:
                raise DataError(f"{tar}: sample {n} size differs from its index entry")
            digest.update(sample[image_ext])
            total += 1
    if total != manifest["num_samples"] or digest.hexdigest() != manifest["sha1_of_images"]:
        raise DataError(f"verification of {out}/{prefix}-*.tar failed: {total} samples read back")
    log.info("verified %d samples in %d shards", total, len(manifest["shards"]))


def _all_shards(urls):
    return urls


def iter_shard(
    tar_path: str | os.PathLike,
    index: list[IndexedSample],
    start: int = 0,
    stop: int | None = None,
    opened: Callable[[], BinaryIO] | None = None,
) -> Iterator:
    """(key, {ext: bytes}) of samples [start, stop) of one shard, by seeking with its index; from
    the open shard `opened()` gives for each sample when given (left open: every read seeks first,
    so several readers of one file may interleave), else from a file opened for this call."""
    stop = len(index) if stop is None else stop
    with open(tar_path, "rb") if opened is None else contextlib.nullcontext() as own:
        for sample in index[start:stop]:
            f, comps = own or opened(), {}
            for ext, (off, size) in sample.components.items():
                f.seek(off)
                comps[ext] = f.read(size)
            yield sample.key, comps
