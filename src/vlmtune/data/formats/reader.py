"""The reading front: scan a file in its format, then apply the ``data.on_error`` policy.

:func:`scan_pairs` / :func:`scan_counting` choose the format (``data.format``, or what
:func:`~vlmtune.data.formats.registry.detect` finds), let it turn the file into items,
and run every field check on each item; :func:`read_pairs` / :func:`read_counting` are
that scan plus the policy (see :mod:`vlmtune.data.formats`).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import vlmtune.data.formats.fields as fields
from vlmtune.data.formats.checker import Checker
from vlmtune.data.formats.fields import Bad, as_object
from vlmtune.data.formats.records import MAX_TEXT_CHARS, CountRecord, Item, Kind, OnError, PairRecord, ReadOptions, Scan
from vlmtune.data.formats.registry import FORMATS, Probe, detect_probe, format_names
from vlmtune.errors import DataError

log = logging.getLogger(__name__)

# How many skipped records a reader names in its log before "... and N more".
_LOG_FIRST = 5

# What each kind is called in messages.
_TASK = {"pairs": "image-text", "counting": "counting"}


def choose(ck: Checker, path: Path, kind: Kind) -> tuple[str, Any]:
    """The format to read ``path`` with (and its parsed JSON when detection needed it)."""
    fmt, data = ck.opts.format, None
    if fmt == "auto":
        probe = Probe(path)
        fmt = detect_probe(probe)
        data = probe.parsed
        log.info("%s: detected format '%s'", path, fmt)
    elif fmt not in FORMATS:
        raise Bad(f"data.format '{fmt}' is not one of {', '.join(format_names())}")
    if kind not in FORMATS[fmt].kinds:
        task = _TASK[kind]
        raise Bad(f"format '{fmt}' holds no {task} data; {task} reads {', '.join(format_names(kind))}")
    ck.scan.format = fmt
    return fmt, data


def format_items(ck: Checker, path: Path, kind: Kind) -> list[Item]:
    """Items of ``kind`` from a file in any format that holds that kind."""
    if not path.exists() and not ("{" in path.name and "}" in path.name):  # a brace pattern (shards) names no one file
        raise Bad("annotation file not found")
    fmt, data = choose(ck, path, kind)
    return FORMATS[fmt].readers[kind](ck, path, data)


# One checked pair: image, text, bbox, relation, where, negative captions, negative images.
Row = tuple[Path, str, Any, "int | None", str, tuple[str, ...], tuple[Path, ...]]


def _pair_rows(
    ck: Checker,
    label: str,
    texts: list[str] | None,
    image: Path | None,
    bbox: Any,
    relation: int | None,
    negatives: tuple[tuple[str, ...], tuple[Path, ...]],
) -> list[Row]:
    """The pairs of one checked record (one per caption), or [] when it has an error."""
    if not ck.ok or texts is None or image is None:
        return []
    what = "image and text" if bbox is None else "image, text and bbox"
    labels = [label if len(texts) == 1 else f"{label} caption {j}" for j in range(len(texts))]
    keep = []
    for text, lab in zip(texts, labels):
        keep.append(ck.check(ck.unique, ("pair", image, text, bbox), what, lab))
    if not ck.ok:
        return []
    where = f"{ck.path}: {label}"
    return [(image, text, bbox, relation, where, *negatives) for text, k in zip(texts, keep) if k]


def _objects(ck: Checker, items: Iterable[Item]) -> Iterable[tuple[Item, dict[str, Any]]]:
    """Each item that reads as a JSON-like object, with the checker started on it."""
    for it in items:
        ck.start(f"{ck.path}: {it.label}", it.new, it.root)
        rec = ck.check(it.get)
        if rec is not None:
            rec = ck.check(as_object, rec)
        if rec is not None:
            yield it, rec


def _negatives(ck: Checker, rec: dict[str, Any]) -> tuple[tuple[str, ...], tuple[Path, ...]]:
    """A record's negative captions and negative images (ms-swift's embedding records)."""
    texts = ck.check(fields.texts, {"caption": rec["negatives"]}, ck.max_text_chars) if rec.get("negatives") else []
    images = []
    for j, name in enumerate(rec.get("negative_images") or []):
        if not isinstance(name, str):
            ck.error(f"negative image {j} is not a path")
            continue
        path = ck.check(ck.resolve_image, name)
        if path is not None:
            ck.check(ck.image_size, path)
            images.append(path)
    return tuple(texts or ()), tuple(images)


def _scan_pair_items(ck: Checker, items: Iterable[Item]) -> list[Row]:
    """Image-text records in the documented shape, whatever format they came from."""
    rows = []
    for it, rec in _objects(ck, items):
        texts = ck.check(fields.texts, rec, ck.max_text_chars)
        image = ck.check(ck.image_path, rec, "image")
        size = ck.check(ck.image_size, image) if image is not None else None
        bbox = ck.check(ck.box, rec, size) if "bbox" in rec else None
        relation = ck.check(fields.relation, rec)
        negatives = _negatives(ck, rec) if rec.get("negatives") or rec.get("negative_images") else ((), ())
        rows += _pair_rows(ck, it.label, texts, image, bbox, relation, negatives)
    return rows


def _open_scan(path: str | Path, deep: bool, opts: ReadOptions, kind: Kind) -> tuple[Checker, Iterable[Item] | None]:
    """The checker of one file and its items of ``kind`` (read by its format), or None
    for the items when the file itself is the problem (recorded in the scan)."""
    path = Path(path)
    ck = Checker(path, deep, opts.max_text_chars, opts)
    if (why := ck.root_problem()) is not None:
        ck.error(why, str(path))
        return ck, None
    try:
        return ck, format_items(ck, path, kind)
    except Bad as e:
        ck.error(str(e), str(path))
        return ck, None


def scan_pairs(
    path: str | Path, deep: bool = False, max_text_chars: int = MAX_TEXT_CHARS, opts: ReadOptions | None = None
) -> Scan:
    """Check an image-text annotation file (retrieval or grounding, any pair format of
    :mod:`vlmtune.data.formats.registry`); collect every problem.

    ``deep`` decodes every image in full (finds truncated and corrupt files); otherwise
    images are checked from their header. ``records`` holds the good records as
    :class:`PairRecord` (one per caption), ``image_id`` numbering their distinct images
    0..n-1 in order of first appearance.
    """
    ck, items = _open_scan(path, deep, opts or ReadOptions(max_text_chars=max_text_chars), "pairs")
    if items is None:
        return ck.scan
    rows = _scan_pair_items(ck, items)
    ids: dict[Path, int] = {}
    ck.scan.records = [
        PairRecord(image, text, ids.setdefault(image, len(ids)), bbox, rel, where, negs, neg_images)
        for image, text, bbox, rel, where, negs, neg_images in rows
    ]
    return ck.scan


def _fill_from_templates(ck: Checker, rec: dict[str, Any], count: int, image: Path) -> tuple[str | None, str | None]:
    """Question and answer of a counting record; a missing one comes from the templates."""
    # The synthetic set's templates, imported only when a record lacks a question or an
    # answer: receipts is the receipt generator (drawing, fonts), not needed to read.
    from vlmtune.data.receipts import ANSWER_TEMPLATES, QUESTIONS

    question = ck.check(fields.text_field, rec, "question", ck.max_text_chars) if "question" in rec else None
    answer = ck.check(fields.text_field, rec, "answer", ck.max_text_chars) if "answer" in rec else None
    if "question" in rec and "answer" in rec:
        return question, answer
    # A stable choice per image, so a file reads the same every time.
    pick = zlib.crc32(str(image).encode())
    if "question" not in rec:
        qs = ck.opts.question_templates or QUESTIONS
        question = qs[pick % len(qs)]
    if "answer" not in rec:
        templates = ck.opts.answer_templates or ANSWER_TEMPLATES
        key = "zero" if count == 0 else "one" if count == 1 else "many"
        options = templates[key]
        answer = options[pick % len(options)].format(n=count)
    ck.count("questions or answers from counting templates")
    return question, answer


def _scan_count_items(ck: Checker, items: Iterable[Item], max_count: int | None) -> None:
    for it, rec in _objects(ck, items):
        count = ck.check(fields.count, rec, max_count)
        image = ck.check(ck.image_path, rec, "image")
        if image is not None:
            ck.check(ck.image_size, image)
        if count is None or image is None:
            # Still report a bad question or answer given in the record.
            for key in ("question", "answer"):
                if key in rec:
                    ck.check(fields.text_field, rec, key, ck.max_text_chars)
            continue
        question, answer = _fill_from_templates(ck, rec, count, image)
        if not ck.ok:
            continue
        keep = ck.check(ck.unique, ("count", image, question), "image and question", it.label)
        if ck.ok and keep:
            ck.scan.records.append(CountRecord(image, question, answer, count, f"{ck.path}: {it.label}"))  # type: ignore[arg-type]


def scan_counting(
    path: str | Path,
    max_count: int | None = None,
    deep: bool = False,
    max_text_chars: int = MAX_TEXT_CHARS,
    opts: ReadOptions | None = None,
) -> Scan:
    """Check a counting file (JSONL ``{"image", "count", "question"?, "answer"?}`` per line,
    a CSV with a header, or a ``datasets`` layout); collect every problem. ``line N`` is
    1-based (a CSV's header is line 1); blank JSONL lines are skipped."""
    ck, items = _open_scan(path, deep, opts or ReadOptions(max_text_chars=max_text_chars), "counting")
    if items is None:
        return ck.scan
    _scan_count_items(ck, items, max_count)
    return ck.scan


# --------------------------------------------------------------------------- readers


def refusal(scan: Scan, on_error: OnError) -> str | None:
    """Why a reader with this ``data.on_error`` policy refuses the scanned file (the one
    line it raises), or None when it reads it. ``data validate`` asks the same function,
    so what it rejects and what train and evaluate refuse are one decision."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path, errors = scan.path, scan.errors
    whole_file = [p for p in errors if p.where == str(path)]
    if whole_file:
        return str(whole_file[0])  # nothing to skip: the file itself is bad
    if errors and on_error == "raise":
        if len(errors) == 1:
            return str(errors[0])
        return f"{len(errors)} problems in {path}; first: {errors[0]}; run `vlmtune data validate {path}` for the list"
    if not scan.records:
        if errors:
            return f"{path}: no usable records: all {scan.n_records} have problems; first: {errors[0]}"
        left_out = "; ".join(f"{n} {what}" for what, n in scan.counts.items())
        return f"{path}: no records" + (f" ({left_out})" if left_out else "")
    return None


def _apply(scan: Scan, on_error: OnError) -> list[Any]:
    """The reader's policy: raise on any error, or leave bad records out and say which."""
    why = refusal(scan, on_error)
    if why is not None:
        raise DataError(why)
    path, errors = scan.path, scan.errors
    if errors:
        bad = scan.bad_sources
        log.warning("%s: skipped %d of %d records with problems (data.on_error=skip):", path, len(bad), scan.n_records)
        for p in errors[:_LOG_FIRST]:
            log.warning("  skipped %s", p)
        if len(errors) > _LOG_FIRST:
            log.warning("  ... and %d more problems; run `vlmtune data validate %s` for the list", len(errors) - _LOG_FIRST, path)
    return scan.records


def _report(scan: Scan) -> None:
    """Say in the log what was detected and what a reader changed or left out on purpose."""
    if scan.splits:  # the format itself was logged when detected
        splits = f" ({', '.join(f'{k} {v}' for k, v in scan.splits.items())} records by split)" if scan.splits else ""
        log.info("%s: read as format '%s'%s", scan.path, scan.format, splits)
    for what, n in scan.counts.items():
        log.info("%s: %d %s", scan.path, n, what)


def read_pairs(
    path: str | Path, on_error: OnError = "raise", max_text_chars: int = MAX_TEXT_CHARS, opts: ReadOptions | None = None
) -> list[PairRecord]:
    """Read an image-text annotation file (any pair format) into image-text pairs.

    The format is ``opts.format`` or detected from the file's shape (see
    :mod:`vlmtune.data.formats.registry`). A caption list gives one pair per caption.
    ``image_id`` numbers distinct images 0..n-1 in order of first appearance.
    ``on_error``: see the module docstring.
    """
    opts = opts or ReadOptions(max_text_chars=max_text_chars)
    scan = scan_pairs(path, deep=on_error == "skip", opts=opts)
    records = _apply(scan, on_error)
    _report(scan)
    return records


def read_counting(
    path: str | Path,
    max_count: int | None = None,
    on_error: OnError = "raise",
    max_text_chars: int = MAX_TEXT_CHARS,
    opts: ReadOptions | None = None,
) -> list[CountRecord]:
    """Read a counting file: JSONL ``{"image", "count", "question"?, "answer"?}`` per line,
    a CSV with a header, or a ``datasets`` layout.

    Blank lines are skipped; errors name the 1-based line number. ``on_error``: see the
    module docstring.
    """
    opts = opts or ReadOptions(max_text_chars=max_text_chars)
    scan = scan_counting(path, max_count, deep=on_error == "skip", opts=opts)
    records = _apply(scan, on_error)
    _report(scan)
    return records
