"""``counting``: vlmtune's own JSONL, ``{"image", "count", "question"?, "answer"?}`` per line
(the image also as ``file_name``, Hugging Face's name for it, or ``filename``)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.data.formats.fields import Bad, read_text
from vlmtune.data.formats.records import Item
from vlmtune.data.formats.registry import Format, Probe, unread_fields

if TYPE_CHECKING:
    from vlmtune.data.formats.checker import Checker

# The fields of the documented counting shape.
COUNT_FIELDS = frozenset({"image", "count", "question", "answer"})
# Other names of the image field: Hugging Face's convention (imagefolder metadata), and the CSV's.
IMAGE_ALIASES = ("file_name", "filename")


def read_jsonl(ck: Checker, path: Path, data: Any) -> list[Item]:
    """``line N`` (1-based) per non-blank line."""
    items = []
    for n, line in enumerate(read_text(path).splitlines(), start=1):
        if line.strip():
            items.append(Item(f"line {n}", partial(_jsonl_record, line)))
    return items


def _jsonl_record(line: str) -> Any:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise Bad(f"not valid JSON: {e.msg} (column {e.colno})") from None
    if isinstance(rec, dict):
        for alias in IMAGE_ALIASES:
            if alias in rec and "image" not in rec:
                rec["image"] = rec.pop(alias)
            elif alias in rec:
                raise Bad(f"has both 'image' and '{alias}'; use one")
        unread_fields(rec, COUNT_FIELDS, "counting")
    return rec


def _is_jsonl(probe: Probe) -> bool:
    return not probe.is_dir and probe.suffix == ".jsonl"


COUNTING = Format(
    "counting",
    readers={"counting": read_jsonl},
    carries={"count": "a count", "question": "a question", "answer": "an answer"},
    by_path=_is_jsonl,
    detect_rank=40,
)
