"""The config field helper: a default, its help text and its bounds in one place.

Each field's metadata is the one home of what ``config explain`` shows, what validation
checks (:func:`check_bounds`) and what the CLI flags that mirror a key accept
(:func:`key_bounds`). Torch-free and import-free of the rest of vlmtune, so the task
packages can declare their own sections with it.
"""

from __future__ import annotations

import copy
import dataclasses
import reprlib
import typing
from dataclasses import dataclass, field
from typing import Any


def setting(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    **kw: Any,
) -> Any:
    """A config field: its default, its help text and (numbers, lists of numbers) its
    bounds ``low`` / ``high``, inclusive unless ``low_open`` / ``high_open``. ``None``
    values of an optional field are not bounded. Mutable defaults go through a factory."""
    meta = {"help": help, "bounds": Bounds(low, high, low_open, high_open) if low is not None or high is not None else None}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


_REPR = reprlib.Repr()  # keyword arguments only from Python 3.12
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 8, 8, 120, 120


def short(value: Any, limit: int = 200) -> str:
    """``repr(value)`` for an error message, bounded: a YAML alias bomb is a small file
    whose full repr would not fit in memory, let alone on one line."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass(frozen=True)
class Bounds:
    """Where a number may lie: [low, high], either end open or absent."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def text(self) -> str:
        """As a message says it: ``>= 1``, ``> 0``, ``between 1 and 64``, ``in [0, 1)``."""
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            if self.low_open or self.high_open:
                return f"in {'(' if self.low_open else '['}{_num(lo)}, {_num(hi)}{')' if self.high_open else ']'}"
            return f"between {_num(lo)} and {_num(hi)}"
        if lo is not None:
            return f"{'>' if self.low_open else '>='} {_num(lo)}"
        assert hi is not None, "a Bounds without either end"  # setting() builds one only with an end
        return f"{'<' if self.high_open else '<='} {_num(hi)}"


def field_bounds(f: dataclasses.Field[Any]) -> Bounds | None:
    return f.metadata.get("bounds")


def check_bounds(obj: Any, prefix: str = "") -> None:
    """Every bounded field of the dataclass ``obj`` and its nested sections (lists of
    sections included) holds its bounds; a number outside is a ConfigError naming the key."""
    from vlmtune.errors import ConfigError

    for f in dataclasses.fields(obj):
        key, value, bounds = prefix + f.name, getattr(obj, f.name), field_bounds(f)
        if dataclasses.is_dataclass(value):
            check_bounds(value, key + ".")
        elif isinstance(value, list) and value and all(dataclasses.is_dataclass(v) for v in value):
            for i, v in enumerate(value):
                check_bounds(v, f"{key}[{i}].")
        if bounds is None or value is None:
            continue
        if isinstance(value, dict):  # a mapping's values, each named by its key (loss.box)
            for name, v in value.items():
                if not bounds.holds(v):
                    raise ConfigError(f"{key}.{name}: must be {bounds.text()}, got {short(v, 60)}")
            continue
        values = value if isinstance(value, list) else [value]
        if not all(bounds.holds(v) for v in values):
            what = "every item must be" if isinstance(value, list) else "must be"
            raise ConfigError(f"{key}: {what} {bounds.text()}, got {short(value, 60)}")


def key_bounds(cls: type, key: str) -> Bounds | None:
    """The bounds of the dotted ``key`` (``data.synthetic.image_size``) under the
    dataclass ``cls``: what a CLI flag that mirrors the key accepts."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        f = {g.name: g for g in dataclasses.fields(cls)}[part]
        if i == len(parts) - 1:
            return field_bounds(f)
        cls = hints[part]
    return None  # pragma: no cover
