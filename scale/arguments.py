"""What the commands' command lines share, torch-free: a parser whose errors are one line, argument
types that carry their rule (the bad-input tests generate the values each refuses from it), and the
output rules: an output is never its own input nor inside it, an existing file is replaced only with
an explicit flag, and every file is written whole (a temporary file renamed into place) with the
permissions the umask gives.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any


class OutputExistsError(FileExistsError):
    """An output that exists and may not be replaced: the message names it and the flag."""


class Parser(argparse.ArgumentParser):
    """argparse with its error in one line (the usage is one `--help` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (--help shows the usage)\n")


class Number:
    """An argparse type: an int or a finite float within a range. `wrong_values()` lists values that
    break the rule (the generated bad-input tests use them)."""

    def __init__(self, kind: type = int, minimum: float | None = None, maximum: float | None = None,
                 above: float | None = None):  # fmt: skip
        self.kind, self.minimum, self.maximum, self.above = kind, minimum, maximum, above
        self.__name__ = "integer" if kind is int else "number"  # argparse names a type by it

    def rule(self) -> str:
        parts = [f"at least {self.minimum:g}" if self.minimum is not None else "",
                 f"above {self.above:g}" if self.above is not None else "",
                 f"at most {self.maximum:g}" if self.maximum is not None else ""]  # fmt: skip
        what = "an integer" if self.kind is int else "a number"
        return " ".join([what, " and ".join(p for p in parts if p)]).strip()

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {self.rule()}") from None
        if self.kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {self.rule()}")
        if (
            (self.minimum is not None and value < self.minimum)
            or (self.above is not None and value <= self.above)
            or (self.maximum is not None and value > self.maximum)
        ):
            raise argparse.ArgumentTypeError(f"{text} is out of range: give {self.rule()}")
        return value

    def wrong_values(self) -> list[str]:
        out = ["abc", "1.5" if self.kind is int else "nan"]
        if self.minimum is not None:
            out.append(f"{self.minimum - 1:g}")
        if self.above is not None:
            out.append(f"{self.above:g}")
        if self.maximum is not None:
            out.append(f"{self.maximum * 2 + 1:g}")
        return out


def at_least(minimum: int) -> Number:
    return Number(int, minimum=minimum)


POSITIVE = at_least(1)
NON_NEGATIVE = at_least(0)
POSITIVE_FLOAT = Number(float, above=0)
FRACTION = Number(float, above=0, maximum=1)


class NumberList:
    """An argparse type: comma-separated numbers, each by `Number`'s rule, at least one."""

    def __init__(self, item: Number):
        self.item = item
        self.__name__ = "list"

    def __call__(self, text: str) -> list:
        parts = [p.strip() for p in text.split(",")]
        if not text.strip() or any(not p for p in parts):
            raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers, each {self.item.rule()}")
        return [self.item(p) for p in parts]

    def wrong_values(self) -> list[str]:
        return ["", "8,", *(f"8,{v}" for v in self.item.wrong_values())]


class Names:
    """An argparse type: comma-separated names out of `choices`, at least one."""

    def __init__(self, choices: Iterable[str]):
        self.choices = list(choices)
        self.__name__ = "names"

    def __call__(self, text: str) -> list[str]:
        names = [n.strip() for n in text.split(",")]
        unknown = [n for n in names if n not in self.choices]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"{', '.join(repr(n) for n in unknown)} unknown: choose from {', '.join(self.choices)}"
            )
        return names

    def wrong_values(self) -> list[str]:
        return ["", "nosuch", f"{self.choices[0]},nosuch", f"{self.choices[0]},"]


class FileName:
    """An argparse type: a name that becomes part of file names (letters, digits, '_', '.', '-';
    no '/', spaces, leading dot or dash)."""

    PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
    __name__ = "name"

    def __call__(self, text: str) -> str:
        if not self.PATTERN.fullmatch(text):
            raise argparse.ArgumentTypeError(f"{text!r}: give letters, digits, '_', '.' or '-' (no '/', spaces, "
                                             "leading dot or dash)")  # fmt: skip
        return text

    def wrong_values(self) -> list[str]:
        return ["", "a/b", "two words", ".hidden", "-x"]


FILE_NAME = FileName()


class ExistingPath:
    """An argparse type: a path that exists, and is a directory (`kind='dir'`), a file ('file'), or
    either ('any')."""

    def __init__(self, kind: str = "any"):
        self.kind = kind
        self.__name__ = "path"

    def __call__(self, text: str) -> Path:
        path = Path(text)
        if not text or not path.exists():
            raise argparse.ArgumentTypeError(f"{text!r} does not exist")
        if self.kind == "dir" and not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is not a directory")
        if self.kind == "file" and not path.is_file():
            raise argparse.ArgumentTypeError(f"{text} is not a file")
        return path

    def wrong_values(self, tmp: Path) -> list[str]:
        """Paths that break the rule, made under `tmp`."""
        (tmp / "a-file").write_text("x")
        (tmp / "a-folder").mkdir(exist_ok=True)
        out = ["", str(tmp / "missing")]
        out += [str(tmp / "a-file")] if self.kind == "dir" else [str(tmp / "a-folder")] if self.kind == "file" else []
        return out


# ---------------------------------------------------------------------------------- outputs


def is_inside(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def refuse_inside(output: str | os.PathLike, what_out: str, input_: str | os.PathLike, what_in: str,
                  replaced: bool = True) -> None:  # fmt: skip
    """A ValueError when `output` is `input_` or inside it (links resolved), or, when the output is
    `replaced` as a whole, an existing directory that holds the input."""
    out, inp = Path(output), Path(input_)
    if is_inside(out, inp) or (inp.exists() and out.exists() and os.path.samefile(out, inp)):
        raise ValueError(f"{what_out} {output} is {what_in} {input_} or inside it: writing there would change "
                         "the input; choose an output outside it")  # fmt: skip
    if replaced and out.exists() and is_inside(inp, out):
        raise ValueError(f"{what_out} {output} holds {what_in} {input_}: replacing it would lose the input; choose "
                         "another output")  # fmt: skip


def refuse_existing(paths: Iterable[str | os.PathLike], overwrite: bool, flag: str = "--overwrite") -> None:
    """An OutputExistsError for the first of `paths` that exists, unless `overwrite`; an OSError
    where a path cannot be created (a file where its folder should be, no write permission)."""
    for p in map(Path, paths):
        if p.exists() and not overwrite:
            raise OutputExistsError(f"{p} exists; pass {flag} to replace it, or choose another output")
        check_creatable(p)


def check_creatable(path: str | os.PathLike) -> None:
    """An OSError when `path` cannot be written: the nearest existing folder above it must be a
    writable directory."""
    p = Path(path).absolute()
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"cannot write {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {path}: {parent} is not writable")


def write_atomic(path: str | os.PathLike, data: str | bytes | Callable[[IO[bytes]], Any], overwrite: bool) -> Path:
    """Write `data` (text, bytes, or a function writing to a binary file) to `path` whole: a
    temporary file beside it, flushed to disk, then renamed into place, so that a kill leaves either
    the old file or the new one. The file gets the umask's permissions (as `open` gives). Without
    `overwrite` an existing `path` is never replaced (an OutputExistsError), even one that appeared
    while this was writing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:  # mode 0o666 less the umask, as open() gives; tempfile's files would be owner-only
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path, overwrite)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished `tmp` to `path`: a rename when replacing is allowed, else a hard link, which
    fails when `path` exists (no check-then-write race)."""
    if overwrite:
        os.replace(tmp, path)
        return
    exists = OutputExistsError(f"{path} exists; pass --overwrite to replace it, or choose another output")
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise exists from None
    except OSError:  # a filesystem without hard links
        if path.exists():
            raise exists from None
        os.replace(tmp, path)
