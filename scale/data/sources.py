"""Where training samples come from: webdataset shards with their DALI index files (`ShardSource`)
or an ImageFolder tree (`FolderSource`), resolved from a `data.source` string (`resolve_source`).
A source knows its units (shards, or single files) with their sample counts, and reads samples
[start, stop) of a unit sequentially; a shard that cannot be read gives its samples as lost.

Start-up touches no shard: the sample counts come from each set's manifest (`PREFIX-manifest.json`,
one file however many shards), and a shard's index and tar are opened only when a worker reads
that shard (10^5 shards on 512 ranks would otherwise be 1.5e8 file operations on a shared
filesystem before the first step). Shards without a manifest fall back to reading every index's
header, with one log line that says how to write the manifest."""

from __future__ import annotations

import glob
import itertools
import logging
import os
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import braceexpand
import numpy as np

from scale.data.demo import ensure_demo_shards
from scale.data.fashion import fashion_shards, is_fashion_spec
from scale.data.shards import (
    IMAGE_EXTS,
    LABEL_BIN_EXT,
    LABEL_TEXT_EXT,
    find_images,
    index_path,
    iter_shard,
    load_index,
    manifest_path,
    read_index_count,
    read_manifest,
    shard_prefix,
)
from scale.errors import DataError

log = logging.getLogger(__name__)

# Shards kept open per process: a resume re-reads the samples left in its shuffle buffer one at a
# time, from the few shards the buffer spans, with one open each instead of one per sample.
OPEN_SHARDS = 8


class Manifests:
    """The manifests of shard sets, each read at most once: (directory, prefix) -> {shard file name:
    (samples, bytes)}, or why there is none."""

    def __init__(self) -> None:
        self._sets: dict[tuple[str, str], dict[str, tuple[int, int | None]] | str] = {}

    def of(self, tar: str | os.PathLike) -> dict[str, tuple[int, int | None]] | str:
        folder, name = os.path.split(tar)  # strings: 10^5 shards' Path objects are slow to hash
        key = (folder, shard_prefix(name))
        if key not in self._sets:
            path = manifest_path(*key)
            try:
                self._sets[key] = read_manifest(path)
            except FileNotFoundError:
                self._sets[key] = f"no {path.name} beside them"
            except (OSError, DataError) as e:
                self._sets[key] = str(e)
        return self._sets[key]

    def entry(self, tar: str | os.PathLike) -> tuple[int, int | None] | None:
        found = self.of(tar)
        return found.get(os.path.basename(tar)) if isinstance(found, dict) else None

    def lookup(self, tars: list[Path]) -> tuple[list[int], list[int | None]] | str:
        """The (counts, sizes) of `tars` from their manifests, or why they cannot all be found there."""
        counts, sizes = [], []
        for tar in tars:
            entry = self.entry(tar)
            if entry is None:
                found = self.of(tar)
                if isinstance(found, str):
                    return found
                return f"{manifest_path(tar.parent, shard_prefix(tar.name)).name} does not list {tar.name}"
            counts.append(entry[0])
            sizes.append(entry[1])
        return counts, sizes


class ShardSource:
    """Webdataset tar shards with DALI index files beside them (`scale-make-shards` writes both)."""

    kind = "shards"

    def __init__(self, tars: list[Path], manifests: Manifests | None = None):
        if not tars:
            raise DataError("no shards given")
        self.tars = list(tars)
        found = (manifests or Manifests()).lookup(self.tars)
        if isinstance(found, tuple):
            self.counts, self.sizes = found
        else:
            self.counts, self.sizes = self._counts_from_indexes(found), [None] * len(self.tars)
        self._files: OrderedDict[int, BinaryIO] = OrderedDict()  # open shards of this process
        self._pid = os.getpid()
        weakref.finalize(self, _close_all, self._files)  # closed with the source, not left to the GC
        self._unreadable: set[Path] = set()  # shards already reported unreadable, per process

    def _counts_from_indexes(self, why: str) -> list[int]:
        """Without a manifest: every shard and index checked and every index header read."""
        tars = self.tars
        missing = [str(t) for t in tars if not t.is_file()]
        if missing:
            raise DataError(f"shard files not found: {', '.join(missing[:5])}")
        no_index = [str(t) for t in tars if not index_path(t).is_file()]
        if no_index:
            raise DataError(
                f"{len(no_index)} shard(s) have no .idx index beside them (e.g. {no_index[0]}); write them with "
                f"`scale-make-shards --index-only {Path(no_index[0]).parent}`"
            )
        log.warning(
            "%d shard(s) in %s without a manifest (%s): every index is read for its sample count, on every rank "
            "at every start; `scale-make-shards --index-only %s` writes the manifest",
            len(tars),
            tars[0].parent,
            why,
            tars[0].parent,
        )
        return [read_index_count(index_path(t)) for t in tars]

    def __repr__(self) -> str:
        return f"{len(self.tars)} shards ({sum(self.counts)} samples) in {self.tars[0].parent}"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": OrderedDict()}  # open files stay with their process

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        weakref.finalize(self, _close_all, self._files)

    def close(self) -> None:
        """Close the shards this process holds open (reading opens them again)."""
        _close_all(self._files)

    def _open(self, unit: int) -> BinaryIO:
        """Shard `unit` open for reading, among this process's last `OPEN_SHARDS` (asked for each
        sample, so a shard closed here is never one a reader still holds). A file inherited
        through fork shares its position with the parent's copy: a new process closes its copies
        (the parent's stay open) and opens its own."""
        if self._pid != os.getpid():
            _close_all(self._files)
            self._pid = os.getpid()
        f = self._files.get(unit)
        if f is None:
            f = self._files[unit] = open(self.tars[unit], "rb")  # noqa: SIM115 (kept open on purpose)
        self._files.move_to_end(unit)
        while len(self._files) > max(1, OPEN_SHARDS):
            self._files.popitem(last=False)[1].close()
        return f

    def read(self, unit: int, start: int, stop: int) -> Iterator[tuple[str, bytes | None, int]]:
        """(key, image bytes, label) of samples [start, stop) of shard `unit`, read sequentially.

        A shard (or its index) that cannot be read, deleted or damaged after the run started, or
        whose index disagrees with the manifest's count, gives its samples as lost (no bytes): they
        are skipped and counted like corrupt images, and the run stops only past
        `data.max_lost_fraction`."""
        tar = self.tars[unit]
        try:
            index = load_index(index_path(tar))
            if len(index) != self.counts[unit]:
                raise DataError(
                    f"its index lists {len(index)} samples, the manifest {self.counts[unit]}; rewrite both with "
                    f"`scale-make-shards --index-only {tar.parent}`"
                )
            samples = iter_shard(tar, index, start, stop, opened=lambda: self._open(unit))
            first = next(samples, None)
        except (OSError, DataError, ValueError) as e:
            if tar not in self._unreadable:
                self._unreadable.add(tar)
                log.warning("shard %s cannot be read (%s): its samples are skipped as lost", tar, e)
            for i in range(start, stop):
                yield f"{tar.name}/#{i}", None, -1
            return
        if first is None:
            return
        for key, comps in itertools.chain([first], samples):
            image = next((comps[e] for e in IMAGE_EXTS if e in comps), None)
            try:
                if LABEL_BIN_EXT in comps:
                    label = int(np.frombuffer(comps[LABEL_BIN_EXT], dtype=np.int32)[0])
                elif LABEL_TEXT_EXT in comps:
                    label = int(comps[LABEL_TEXT_EXT])
                else:
                    label = -1
            except (IndexError, ValueError):  # a truncated shard: the label's bytes are gone
                image, label = None, -1
            yield f"{tar.name}/{key}", image, label

    def read_one(self, unit: int, i: int) -> tuple[str, bytes | None, int]:
        return next(self.read(unit, i, i + 1))


def _close_all(files: OrderedDict) -> None:
    while files:
        files.popitem()[1].close()


class FolderSource:
    """An ImageFolder tree (root/CLASS/IMAGE); each file is a unit of one sample."""

    kind = "folder"

    def __init__(self, root: Path):
        self.root = root
        self.samples, self.classes = find_images(root)
        self.counts = [1] * len(self.samples)

    def __repr__(self) -> str:
        return f"image folder {self.root} ({len(self.samples)} images, {len(self.classes)} classes)"

    def read(self, unit: int, start: int, stop: int) -> Iterator[tuple[str, bytes | None, int]]:
        yield self.read_one(unit, 0)

    def read_one(self, unit: int, i: int) -> tuple[str, bytes | None, int]:
        path, label = self.samples[unit]
        try:
            data = path.read_bytes()
        except OSError:
            data = None
        return str(path), data, label


def expand_pattern(spec: str, manifests: Manifests | None = None) -> list[Path]:
    """Brace (`train-{000000..000146}.tar`) and glob patterns -> sorted paths. Every name a brace
    range spells out must exist: a missing shard is an error, not a silently smaller dataset. A
    name its set's manifest lists counts as existing without a look at the file (a shard deleted
    since is lost when read)."""
    manifests = manifests or Manifests()
    paths, missing = set(), []
    for part in braceexpand.braceexpand(os.path.expanduser(spec)):
        if any(c in part for c in "*?["):
            paths.update(glob.glob(part))
        elif manifests.entry(part) is not None or os.path.exists(part):
            paths.add(part)
        else:
            missing.append(part)
    if missing and paths:
        raise DataError(
            f"{len(missing)} file(s) of {spec!r} do not exist, e.g. {missing[0]}; fix the range or the files"
        )
    return [Path(p) for p in sorted(paths)]


def resolve_source(spec: str) -> ShardSource | FolderSource:
    """`demo`, `demo:train`, `demo:val`, `fashion`, `fashion:test`, `fashion:train@10%` (Fashion-MNIST,
    `scale.data.fashion`), a shard pattern, a directory of shards, or an ImageFolder tree."""
    manifests = Manifests()
    if spec in ("demo", "demo:train", "demo:val"):
        split = spec.split(":")[1] if ":" in spec else "train"
        return ShardSource(sorted(ensure_demo_shards().glob(f"{split}-*.tar")))
    if is_fashion_spec(spec):
        return ShardSource(fashion_shards(spec))
    if any(c in spec for c in "*?[{"):
        tars = expand_pattern(spec, manifests)
        if not tars:
            raise DataError(f"shard pattern {spec!r} matches no files; check the path and the brace range")
        return ShardSource(tars, manifests)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".tar":
        return ShardSource([path], manifests)
    if not path.exists():
        raise DataError(
            f"data path {spec!r} does not exist; give a shard pattern, a shard directory or an image folder"
        )
    if path.is_dir():
        tars = sorted(path.glob("*.tar"), key=str)  # one folder: the order of Paths, faster
        if tars:
            prefixes = sorted({shard_prefix(t.name) for t in tars})
            if len(prefixes) > 1:
                raise DataError(
                    f"{spec!r} holds shards of several sets ({', '.join(prefixes)}); "
                    f"pass one of them, e.g. {path / (prefixes[0] + '-*.tar')}"
                )
            return ShardSource(tars, manifests)
        return FolderSource(path)
    raise DataError(f"data path {spec!r} is neither a .tar shard nor a directory")
