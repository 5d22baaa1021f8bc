"""What a config field accepts beyond its type, declared beside the field (`setting`): a range or
choices. `scale.config.schema.check_fields` enforces them; the config fuzz test breaks each one."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rule:
    """A range (`lo`/`hi`, open or closed) or choices."""

    lo: float | None = None
    lo_open: bool = False
    hi: float | None = None
    hi_open: bool = False
    choices: tuple[str, ...] = ()

    def violation(self, value: Any) -> str | None:
        """Why `value` is not accepted, or None."""
        if value is None:
            return None
        if self.choices:  # a bool among string choices reads as 'true' / 'false'
            named = str(value).lower() if isinstance(value, bool) else value
            return None if named in self.choices else f"is not one of: {', '.join(self.choices)}"
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return f"must be {'>' if self.lo_open else '>='} {self.lo:g}" + self._hi()
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return f"must be {'<' if self.hi_open else '<='} {self.hi:g}" + self._lo()
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        return None

    def _hi(self) -> str:
        return "" if self.hi is None else f" and {'<' if self.hi_open else '<='} {self.hi:g}"

    def _lo(self) -> str:
        return "" if self.lo is None else f" and {'>' if self.lo_open else '>='} {self.lo:g}"

    def wrong_values(self) -> list[Any]:
        """Values that break this rule (for the fuzz test)."""
        if self.choices:
            return ["no-such-" + self.choices[0]]
        out = []
        if self.lo is not None:
            out.append(self.lo if self.lo_open else self.lo - 1)
        if self.hi is not None:
            out.append(self.hi if self.hi_open else self.hi + 1)
        return out


def positive() -> Rule:
    return Rule(lo=0, lo_open=True)


def non_negative() -> Rule:
    return Rule(lo=0)


def one_of(*choices: str) -> Rule:
    return Rule(choices=choices)


def setting(default: Any, rule: Rule) -> Any:
    """A dataclass field with `default` that accepts what `rule` allows (read back by `field_rule`)."""
    return dataclasses.field(default=default, metadata={"rule": rule})


def field_rule(f: dataclasses.Field) -> Rule | None:
    return f.metadata.get("rule")
