"""The records a reader gives and the scan that reports on a file: plain data, no images.

Kept apart from the image loader and the checks so that the format declarations (and
``data.format`` validation, through :mod:`vlmtune.data.formats.registry`) load without
Pillow or numpy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

RELATIONS: tuple[str, ...] = ("left", "right", "above", "below", "inside", "outside")

# Longest caption, question or answer accepted, in characters (config: data.max_text_chars).
MAX_TEXT_CHARS = 1000

OnError = Literal["raise", "skip"]
Duplicates = Literal["error", "keep", "drop"]


@dataclass(frozen=True)
class ReadOptions:
    """How a file is read, beyond its records: the ``data.*`` keys a reader needs.

    ``image_root``: the folder image paths resolve against (default: the annotation
    file's folder; a folder annotation, e.g. a ``datasets`` folder, is its own root).
    ``format``: ``auto`` detects it from the file's shape. ``split``: for files that hold
    every split (Karpathy, refer, ``datasets`` dicts), the one to take; None takes all.
    ``question_templates`` / ``answer_templates``: counting records without a question
    or answer get one from these (None: the synthetic set's own, ``vlmtune.data.receipts``).
    """

    image_root: str | Path | None = None
    format: str = "auto"
    split: str | None = None
    box_tolerance_px: float = 0.0
    duplicates: Duplicates = "error"
    max_text_chars: int = MAX_TEXT_CHARS
    question_templates: tuple[str, ...] | None = None
    answer_templates: dict[str, tuple[str, ...]] | None = None


# The two kinds of data a format can hold: image-text pairs (retrieval, grounding) and counting.
Kind = Literal["pairs", "counting"]


@dataclass(frozen=True)
class PairRecord:
    """One image-text pair; retrieval and grounding share it."""

    image: Path
    text: str
    image_id: int
    bbox: tuple[float, float, float, float] | None
    relation: int | None
    source: str
    negatives: tuple[str, ...] = ()  # negative captions for this record's image
    negative_images: tuple[Path, ...] = ()  # negative images for this record's caption


@dataclass(frozen=True)
class CountRecord:
    """One counting question about an image."""

    image: Path
    question: str
    answer: str
    count: int
    source: str


@dataclass(frozen=True)
class Problem:
    """One thing wrong (``level="error"``) or worth knowing (``"note"``) in a data file.

    ``where`` is ``"FILE: record N"``, ``"FILE: line N"``, ``"FILE: image entry N"`` or
    just ``"FILE"`` for the file as a whole; ``str(problem)`` is the one-line message.
    """

    where: str
    message: str
    level: Literal["error", "note"] = "error"

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class Scan:
    """What a scan of one annotation file found: the good records and every problem.

    ``n_records`` counts the file's records (list entries, COCO annotations or non-blank
    JSONL lines), good or bad. A record with an error is not in ``records``.
    """

    path: Path
    n_records: int = 0
    records: list[Any] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    # The format the file was read as (``data.format``, or what ``auto`` detected).
    format: str = ""
    # What a reader changed or left out on purpose, by name: boxes clipped within
    # data.box_tolerance_px, duplicates dropped, null boxes skipped, questions templated.
    counts: dict[str, int] = field(default_factory=dict)
    # Records per split, for files that hold several (Karpathy, refer).
    splits: dict[str, int] = field(default_factory=dict)
    # Boxes by the convention the file wrote them in (see vlmtune.data.formats.boxes);
    # every reader converts them to pixel x, y, w, h, and the first one is kept as an
    # example ({"where", "convention", "source", "pixels_xywh"}) for ``data inspect``.
    box_conventions: dict[str, int] = field(default_factory=dict)
    box_example: dict[str, Any] | None = None
    # How a format chose what it read, in words (e.g. which conversation turns are
    # captions), keyed by what it decides; ``data inspect`` prints them.
    rules: dict[str, str] = field(default_factory=dict)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "error"]

    @property
    def notes(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "note"]

    @property
    def bad_sources(self) -> list[str]:
        """The records (and file-level spots) with at least one error, in file order."""
        return list(dict.fromkeys(p.where for p in self.errors))


@dataclass(frozen=True)
class Item:
    """One record as a format reader hands it to the checks.

    ``label`` names it in messages (``record 3``, ``line 4``, ``record 2 sentence 1``);
    ``get()`` returns its fields in the documented pairs or counting shape, or raises
    :class:`~vlmtune.data.formats.fields.Bad` for what is wrong with the record as its
    format has it. ``new`` is False for the further records one source record yields (a
    GeoText sentence), so counts stay per source record.
    """

    label: str
    get: Callable[[], dict[str, Any]]
    new: bool = True
    # The folder this record's image paths resolve against (and must stay inside), where
    # it is not the file's (an InternVL meta entry's ``root``).
    root: Path | None = None


def options_from_config(
    data: Any, counting: Any = None, split: str | None = None, image_root: str | Path | None = None
) -> ReadOptions:
    """ReadOptions from the ``data`` (and ``counting``) config sections; ``image_root``
    overrides data.image_root (the ``--image-root`` option)."""
    return ReadOptions(
        image_root=image_root if image_root is not None else data.image_root,
        format=data.format,
        split=split,
        box_tolerance_px=data.box_tolerance_px,
        duplicates=data.duplicates,
        max_text_chars=data.max_text_chars,
        question_templates=tuple(counting.question_templates) if counting is not None else None,
        answer_templates={k: tuple(v) for k, v in counting.answer_templates.items()} if counting is not None else None,
    )
