"""Where training samples come from: webdataset shards with their DALI index files (`ShardSource`)
or an ImageFolder tree (`FolderSource`), resolved from a `data.source` string (`resolve_source`).
A source knows its units (shards, or single files) with their sample counts, and reads samples
[start, stop) of a unit sequentially; a shard that cannot be read gives its samples as lost."""

from __future__ import annotations

import glob
import itertools
import logging
import os
from collections.abc import Iterator
from pathlib import Path

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
    read_index,
    read_index_count,
)
from scale.errors import DataError

log = logging.getLogger(__name__)


class ShardSource:
    """Webdataset tar shards with DALI index files beside them (`scale-make-shards` writes both)."""

    kind = "shards"

    def __init__(self, tars: list[Path]):
        if not tars:
            raise DataError("no shards given")
        missing = [str(t) for t in tars if not t.is_file()]
        if missing:
            raise DataError(f"shard files not found: {', '.join(missing[:5])}")
        no_index = [str(t) for t in tars if not index_path(t).is_file()]
        if no_index:
            raise DataError(
                f"{len(no_index)} shard(s) have no .idx index beside them (e.g. {no_index[0]}); write them with "
                f"`scale-make-shards --index-only {Path(no_index[0]).parent}`"
            )
        self.tars = list(tars)
        self.counts = [read_index_count(index_path(t)) for t in self.tars]
        self._index: tuple[int, list] | None = None  # the last shard's index, per process
        self._unreadable: set[Path] = set()  # shards already reported unreadable, per process

    def __repr__(self) -> str:
        return f"{len(self.tars)} shards ({sum(self.counts)} samples) in {self.tars[0].parent}"

    def read(self, unit: int, start: int, stop: int) -> Iterator[tuple[str, bytes | None, int]]:
        """(key, image bytes, label) of samples [start, stop) of shard `unit`, read sequentially.

        A shard (or its index) that cannot be read, deleted or damaged after the run started, gives
        its samples as lost (no bytes): they are skipped and counted like corrupt images, and the
        run stops only past `data.max_lost_fraction`."""
        tar = self.tars[unit]
        try:
            if self._index is None or self._index[0] != unit:
                self._index = (unit, read_index(index_path(tar)))
            samples = iter_shard(tar, self._index[1], start, stop)
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


def expand_pattern(spec: str) -> list[Path]:
    """Brace (`train-{000000..000146}.tar`) and glob patterns -> sorted paths. Every name a brace
    range spells out must exist: a missing shard is an error, not a silently smaller dataset."""
    paths, missing = set(), []
    for part in braceexpand.braceexpand(os.path.expanduser(spec)):
        if any(c in part for c in "*?["):
            paths.update(glob.glob(part))
        elif os.path.exists(part):
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
    if spec in ("demo", "demo:train", "demo:val"):
        split = spec.split(":")[1] if ":" in spec else "train"
        return ShardSource(sorted(ensure_demo_shards().glob(f"{split}-*.tar")))
    if is_fashion_spec(spec):
        return ShardSource(fashion_shards(spec))
    if any(c in spec for c in "*?[{"):
        tars = expand_pattern(spec)
        if not tars:
            raise DataError(f"shard pattern {spec!r} matches no files; check the path and the brace range")
        return ShardSource(tars)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".tar":
        return ShardSource([path])
    if not path.exists():
        raise DataError(
            f"data path {spec!r} does not exist; give a shard pattern, a shard directory or an image folder"
        )
    if path.is_dir():
        tars = sorted(path.glob("*.tar"))
        if tars:
            prefixes = sorted({t.name.rsplit("-", 1)[0] for t in tars})
            if len(prefixes) > 1:
                raise DataError(
                    f"{spec!r} holds shards of several sets ({', '.join(prefixes)}); "
                    f"pass one of them, e.g. {path / (prefixes[0] + '-*.tar')}"
                )
            return ShardSource(tars)
        return FolderSource(path)
    raise DataError(f"data path {spec!r} is neither a .tar shard nor a directory")
