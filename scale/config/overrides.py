"""Setting fields from text: `--section.field=value` overrides parsed and checked against the
field's type, configs read back from their JSON form (older forms included), and `--help-config`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import logging
import math
import types
import typing
from typing import Any

from scale.config.schema import Config, sections
from scale.errors import ConfigError

log = logging.getLogger(__name__)

RENAMED = {
    "run.knn_k": "monitor.knn_k",
    "run.knn_temperature": "monitor.knn_temperature",
    "run.knn_every_epochs": "monitor.heldout_every_epochs",
}
"""Fields renamed since they were introduced: the old name still works on the command line (logged
once) and in config files written before (their runs resume)."""


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """`value` (a string from the command line, or JSON) as the field's type, or a ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if (value is None or (isinstance(value, str) and value.lower() == "none")) and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot parse {value!r}")
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        if len(items) != len(args):
            raise ConfigError(f"{where} takes {len(args)} comma-separated values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(items, args, strict=True))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where} is a bool (true/false), got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} is an int, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} is an int, got {value!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"{where} is an int, got {value!r}")
        return int(f)
    if annotation is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} is a float, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} is a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {annotation}")


_renames_logged: set[str] = set()


def set_field(cfg: Config, dotted: str, value: Any) -> None:
    """Set `section.field` to `value` (parsed and type-checked); an old name (`RENAMED`) sets the new field."""
    if dotted in RENAMED:
        if dotted not in _renames_logged:
            _renames_logged.add(dotted)
            log.info("--%s is now --%s", dotted, RENAMED[dotted])
        dotted = RENAMED[dotted]
    by_name = sections(cfg)
    if "." not in dotted:
        raise ConfigError(f"override {dotted!r} must be SECTION.FIELD; sections: {', '.join(by_name)}")
    section, name = dotted.split(".", 1)
    if section not in by_name:
        raise ConfigError(f"unknown config section {section!r} in {dotted!r}; sections: {', '.join(by_name)}")
    obj = by_name[section]
    hints = typing.get_type_hints(type(obj))
    if name not in hints:
        raise ConfigError(f"unknown key {dotted!r}; valid keys of [{section}]: {', '.join(sorted(hints))}")
    setattr(obj, name, _coerce(value, hints[name], dotted))


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `--section.field=value` (or `section.field=value`) strings."""
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(f"override {item!r} needs a value: --section.field=value")
        key, value = text.split("=", 1)
        set_field(cfg, key, value)
    return cfg


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'name': ...}} -> {'model.name': ...}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def current_names(flat: dict[str, Any]) -> dict[str, Any]:
    """A flattened config of any age under today's field names: an old name (`RENAMED`) is read as
    its new one unless the new one is there too (a config written after the rename)."""
    out = {k: v for k, v in flat.items() if k not in RENAMED}
    for old, new in RENAMED.items():
        if old in flat and new not in flat:
            out[new] = flat[old]
        elif old in flat and flat[old] != flat[new] and (old, new) not in _conflicts_logged:
            _conflicts_logged.add((old, new))
            log.warning("a config written before %s was merged into %s holds %s=%r and %s=%r: %s=%r is used for "
                        "both kNN monitors now", old, new, old, flat[old], new, flat[new], new, flat[new])  # fmt: skip
    return out


_conflicts_logged: set[tuple[str, str]] = set()


def config_from_dict(d: dict[str, Any]) -> Config:
    """A config from `Config.to_dict()`'s form (config.json, a checkpoint's), older forms included."""
    cfg = Config()
    for dotted, value in current_names(flatten(d)).items():
        if dotted in ("recipe", "task"):
            setattr(cfg, dotted, value)
        else:
            set_field(cfg, dotted, value)
    return cfg


def describe(cfg: Config) -> str:
    """Every field with its value and docstring, for --help-config."""
    lines = []
    for section, obj in sections(cfg).items():
        lines.append(f"[{section}]")
        docs: dict[str, str] = {}
        tree = ast.parse(inspect.getsource(type(obj)))
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:] + [None], strict=True):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
        for f in dataclasses.fields(obj):
            lines.append(f"  --{section}.{f.name}={getattr(obj, f.name)!r}  {docs.get(f.name, '')}".rstrip())
    return "\n".join(lines)
