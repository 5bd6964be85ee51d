"""The format registry: what each annotation format is, and everything derived from it.

A format is declared once, as a :class:`Format` in its own module: its name, the kinds of
data it holds (a reader per kind), the fields it reads that carry targets, and how it is
detected. :mod:`vlmtune.data.formats.catalog` registers the built-in ones, one line each.
The lists of names (``data.format``'s choices, which formats hold pairs or counting
data), the carriers table of the unread-field check and :func:`detect` are all read
from :data:`FORMATS`, so a new format is its module plus its line in the catalog.

Plain Python (no Pillow, numpy or torch): config validation can ask :func:`format_names`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.data.formats.fields import Bad, load_json, type_name
from vlmtune.data.formats.records import Item, Kind

if TYPE_CHECKING:
    from vlmtune.data.formats.checker import Checker

# What ``data.format`` takes besides a format's name.
AUTO = "auto"

# Fields that carry a target no vlmtune format reads: a record holding one is refused
# rather than read without it (field -> what it carries).
UNREAD_TARGETS: dict[str, str] = {
    "boxes": "boxes",
    "objects": "boxes",
    "segmentation": "a mask",
    "keypoints": "keypoints",
    "relations": "relations",
}

# A format's reader for one kind: the checker of the file, the path and the file's parsed
# JSON when detection already parsed it (None otherwise) -> the file's items.
Reader = Callable[["Checker", Path, Any], list[Item]]


@dataclass
class Probe:
    """What detection looks at: the path's name and type, and (read on first use) its JSON.

    ``data`` raises :class:`~vlmtune.data.formats.fields.Bad` for a file that is not
    valid JSON; ``keys`` is every key of the records of a top-level list (empty otherwise).
    """

    path: Path
    given: Any = None

    @cached_property
    def name(self) -> str:
        return self.path.name.lower()

    @cached_property
    def suffix(self) -> str:
        return self.path.suffix.lower()

    @cached_property
    def is_dir(self) -> bool:
        return self.path.is_dir()

    @cached_property
    def data(self) -> Any:
        return load_json(self.path) if self.given is None else self.given

    @property
    def parsed(self) -> Any:
        """The JSON if detection has read it, else None (the format's reader reads it then)."""
        return self.__dict__.get("data")

    @cached_property
    def first_line(self) -> str:
        """The first non-blank line of a text file ('' for a folder, a binary or an
        unreadable file); a few formats (JSONL conversations, Flickr30k's token file)
        are told apart by it."""
        if self.is_dir:
            return ""
        try:
            with open(self.path, encoding="utf-8-sig") as f:
                for _, line in zip(range(1000), f):
                    if line.strip():
                        return line.rstrip("\r\n")
        except (OSError, UnicodeDecodeError, ValueError):
            pass
        return ""

    @cached_property
    def first_record(self) -> dict[str, Any]:
        """The first record of a JSONL file (empty when it is none)."""
        if self.suffix != ".jsonl" or not self.first_line:
            return {}
        try:
            rec = json.loads(self.first_line)
        except json.JSONDecodeError:
            return {}
        return rec if isinstance(rec, dict) else {}

    @cached_property
    def keys(self) -> set[str]:
        recs = [r for r in self.data if isinstance(r, dict)] if isinstance(self.data, list) else []
        return set().union(*(r.keys() for r in recs)) if recs else set()


@dataclass(frozen=True)
class Format:
    """One annotation format.

    ``readers``: per kind it holds (``"pairs"``, ``"counting"``), the function that turns a
    file into items. ``carries``: the fields it reads that carry a target (field -> what,
    e.g. ``{"bbox": "a box"}``); a record in another format holding one of them is refused
    with a message naming this format. Detection asks ``by_path`` (the name, suffix or
    folder alone; nothing read) of every format first, then ``by_json`` (the parsed
    top level, through the :class:`Probe`), each stage in ``detect_rank`` order (lower
    first; equal ranks in registration order; ``by_path`` may also look at
    :attr:`Probe.first_line` / :attr:`Probe.first_record`, one line of the file): a shape
    that is a special case of another ranks before it (``albef``, any list with more keys, is 80; ``pairs``, any list, 90).
    ``folder_shape`` / ``object_shape`` describe the folders / JSON objects it claims,
    for the message when none claims one. ``kind_of``: for a format holding both kinds,
    which one a file holds (``data validate`` asks; a ``datasets`` layout's columns say).
    """

    name: str
    readers: Mapping[Kind, Reader]
    carries: Mapping[str, str] = field(default_factory=dict)
    by_path: Callable[[Probe], bool] | None = None
    by_json: Callable[[Probe], bool] | None = None
    detect_rank: int = 50
    folder_shape: str = ""
    object_shape: str = ""
    kind_of: Callable[[Checker, Path], Kind] | None = None

    @property
    def kinds(self) -> tuple[Kind, ...]:
        return tuple(self.readers)


class Registry:
    """The registered formats by name, in registration order (the order ``data.format``
    lists them)."""

    def __init__(self) -> None:
        self._formats: dict[str, Format] = {}
        self._carriers: dict[str, tuple[str, tuple[str, ...]]] | None = None

    def register(self, fmt: Format) -> Format:
        if fmt.name in self._formats or fmt.name == AUTO:
            raise ValueError(f"data format '{fmt.name}' is already registered")
        self._formats[fmt.name] = fmt
        self._carriers = None
        return fmt

    def unregister(self, name: str) -> None:
        del self._formats[name]
        self._carriers = None

    @contextmanager
    def registered(self, fmt: Format) -> Iterator[Format]:
        """``fmt`` registered for the block only (a test's toy format)."""
        self.register(fmt)
        try:
            yield fmt
        finally:
            self.unregister(fmt.name)

    def __iter__(self) -> Iterator[Format]:
        return iter(list(self._formats.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._formats

    def __getitem__(self, name: str) -> Format:
        return self._formats[name]

    def names(self, kind: Kind | None = None) -> tuple[str, ...]:
        """The formats' names (those holding ``kind`` when given), in registration order."""
        return tuple(f.name for f in self._formats.values() if kind is None or kind in f.kinds)

    def carriers(self) -> dict[str, tuple[str, tuple[str, ...]]]:
        """Field -> (what it carries, the formats that read it), for every field that
        carries a target: those the formats declare, and those none reads."""
        if self._carriers is None:
            table: dict[str, tuple[str, tuple[str, ...]]] = {k: (what, ()) for k, what in UNREAD_TARGETS.items()}
            for f in self._formats.values():
                for key, what in f.carries.items():
                    seen, readers = table.get(key, (what, ()))
                    table[key] = (seen, (*readers, f.name))
            self._carriers = table
        return self._carriers


FORMATS = Registry()


def format_names(kind: Kind | None = None) -> tuple[str, ...]:
    """The values ``data.format`` accepts: ``"auto"`` and every registered format's name
    (with ``kind``: only the formats holding that kind, without ``"auto"``)."""
    return FORMATS.names(kind) if kind is not None else (AUTO, *FORMATS.names())


def carriers() -> dict[str, tuple[str, tuple[str, ...]]]:
    """The carriers table (see :meth:`Registry.carriers`), derived from the registry."""
    return FORMATS.carriers()


def unread_fields(rec: dict[str, Any], used: Collection[str], fmt: str) -> None:
    """Refuse a field that carries boxes, relations, captions or counts ``fmt`` ignores."""
    table = FORMATS.carriers()
    for key in rec:
        if key in table and key not in used:
            what, readers = table[key]
            where = (
                f"format {' or '.join(repr(r) for r in readers)} reads it (data.format=...)"
                if readers
                else "no vlmtune format reads it; remove it or convert the file"
            )
            raise Bad(f"field '{key}' carries {what} that format '{fmt}' does not read; {where}")


def detect(path: Path, data: Any = None) -> str:
    """The format of ``path`` from its name and shape (``data``: its parsed JSON, if any)."""
    return detect_probe(Probe(path, data))


def _in_detection_order() -> list[Format]:
    return sorted(FORMATS, key=lambda f: f.detect_rank)


def detect_by_path(probe: Probe) -> str | None:
    """The format that claims ``probe`` by its path alone (nothing read), or None."""
    return next((f.name for f in _in_detection_order() if f.by_path is not None and f.by_path(probe)), None)


def detect_probe(probe: Probe) -> str:
    """The format that claims ``probe``: by path first, then by its JSON (see :class:`Format`)."""
    by_path = detect_by_path(probe)
    if by_path is not None:
        return by_path
    ordered = _in_detection_order()
    if probe.is_dir:
        shapes = " nor ".join(f.folder_shape for f in ordered if f.folder_shape)
        raise Bad(f"is a folder but not {shapes}")
    for f in ordered:
        if f.by_json is not None and f.by_json(probe):
            return f.name
    if isinstance(probe.data, dict):
        shapes = " nor ".join(f.object_shape for f in ordered if f.object_shape)
        raise Bad(f"top level is an object but not {shapes}; expected a list of records")
    raise Bad(f"top level must be a list of records, got {type_name(probe.data)}")
