"""``csv``: counting as a CSV with a header: ``filename``/``image``, ``count``/``receipt_count``,
``question``?, ``answer``?; one record per row, ``line N`` counting the header as line 1."""

from __future__ import annotations

import csv
import io
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.data.formats.counting import COUNT_FIELDS
from vlmtune.data.formats.fields import Bad, read_text
from vlmtune.data.formats.records import Item
from vlmtune.data.formats.registry import Format, Probe, unread_fields

if TYPE_CHECKING:
    from vlmtune.data.formats.checker import Checker


def read_csv(ck: Checker, path: Path, data: Any) -> list[Item]:
    return [Item(label, partial(count_row, rec, "csv")) for label, rec in _csv_rows(path)]


def count_row(rec: dict[str, Any], fmt: str) -> dict[str, Any]:
    """A CSV or ``datasets`` row in the counting shape: ``filename``/``file_name`` is the
    image, ``receipt_count`` the count; empty question or answer cells mean none given."""
    if "__bad__" in rec:
        raise Bad(rec["__bad__"])
    rec = dict(rec)
    for alias in ("filename", "file_name", "image_path"):
        if alias in rec and "image" not in rec:
            rec["image"] = rec.pop(alias)
    if "receipt_count" in rec:
        if "count" in rec:
            raise Bad("has both 'count' and 'receipt_count'; use one")
        rec["count"] = rec.pop("receipt_count")
    for key in ("question", "answer"):
        if key in rec and (rec[key] is None or (fmt == "csv" and isinstance(rec[key], str) and not rec[key].strip())):
            del rec[key]
    unread_fields(rec, COUNT_FIELDS, fmt)
    if "image" not in rec:
        raise Bad("missing 'image' (or 'filename' / 'file_name')")
    return rec


def _csv_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    text = read_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    if not header:
        raise Bad("empty CSV: expected a header line such as filename,receipt_count")
    header = [h.strip() for h in header]
    reader.fieldnames = header
    if not {"filename", "image", "file_name"} & set(header) or not {"count", "receipt_count"} & set(header):
        raise Bad(
            f"CSV header {','.join(header)} needs an image column (filename or image) and a count column (count or receipt_count)"
        )
    rows = []
    for rec in reader:
        line = reader.line_num
        if None in rec:
            rows.append((f"line {line}", {"__bad__": f"{len(rec[None]) + len(header)} cells but the header has {len(header)}"}))
            continue
        if all(v is None or not str(v).strip() for v in rec.values()):
            continue
        rows.append((f"line {line}", {k: (v.strip() if isinstance(v, str) else v) for k, v in rec.items()}))
    return rows


def _is_csv(probe: Probe) -> bool:
    return not probe.is_dir and probe.suffix == ".csv"


CSV = Format(
    "csv",
    readers={"counting": read_csv},
    carries={"count": "a count", "receipt_count": "a count", "question": "a question", "answer": "an answer"},
    by_path=_is_csv,
    detect_rank=20,
)
