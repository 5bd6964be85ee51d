"""The field checks every format shares: each raises :class:`Bad` with a message that
does not say where; the scan adds the file and the record.

Plain Python (no Pillow, no numpy), so the format modules and the registry load light.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vlmtune.data.formats.records import RELATIONS

if TYPE_CHECKING:
    from pathlib import Path

# Slack for float boxes that touch the image border.
EPS = 1e-6

# Splits of a one-file-all-splits format that make up each of vlmtune's three.
SPLITS = {"train": ("train", "restval"), "val": ("val", "validation", "valid", "dev"), "test": ("test", "testA", "testB")}


class Bad(Exception):
    """A problem found by one check; the scan adds where it is."""


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise Bad("annotation file not found") from None
    except IsADirectoryError:
        raise Bad("is a directory, not an annotation file") from None
    except UnicodeDecodeError as e:
        raise Bad(f"not UTF-8 text: {e}") from None
    except OSError as e:
        raise Bad(f"cannot read: {e.strerror or e}") from None


def type_name(value: Any) -> str:
    """JSON name of a Python value's type, for error messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "number"
    return names.get(type(value), type(value).__name__)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def as_object(rec: Any) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise Bad(f"must be an object, got {type_name(rec)}")
    return rec


def nonempty_str(rec: dict[str, Any], key: str) -> str:
    """A required, non-blank string field, stripped."""
    if key not in rec:
        raise Bad(f"missing '{key}'")
    value = rec[key]
    if not isinstance(value, str):
        raise Bad(f"'{key}' must be a string, got {type_name(value)}")
    if not value.strip():
        raise Bad(f"'{key}' is empty")
    return value.strip()


def not_too_long(text: str, what: str, limit: int) -> str:
    if len(text) > limit:
        raise Bad(f"{what} is {len(text)} characters long, more than data.max_text_chars ({limit})")
    return text


def text_field(rec: dict[str, Any], key: str, limit: int) -> str:
    return not_too_long(nonempty_str(rec, key), f"'{key}'", limit)


def texts(rec: dict[str, Any], limit: int) -> list[str]:
    """The caption(s) of a retrieval record or the text of a grounding record."""
    if "caption" in rec and "text" in rec:
        raise Bad("has both 'caption' and 'text'; use one")
    if "text" in rec:
        return [text_field(rec, "text", limit)]
    if "caption" not in rec:
        raise Bad("missing 'caption' (retrieval) or 'text' (grounding)")
    caption = rec["caption"]
    if isinstance(caption, str):
        return [text_field(rec, "caption", limit)]
    if not isinstance(caption, list):
        raise Bad(f"'caption' must be a string or a list of strings, got {type_name(caption)}")
    if not caption:
        raise Bad("'caption' is an empty list")
    out = []
    for i, c in enumerate(caption):
        if not isinstance(c, str):
            raise Bad(f"caption {i} must be a string, got {type_name(c)}")
        if not c.strip():
            raise Bad(f"caption {i} is empty")
        out.append(not_too_long(c.strip(), f"caption {i}", limit))
    return out


def pixel_bbox(
    rec: dict[str, Any], size: tuple[int, int] | None, tolerance: float = 0.0
) -> tuple[tuple[float, float, float, float] | None, str | None]:
    """An optional [x, y, w, h] pixel box, checked against the image's size when known
    (see :func:`pixel_box` for what is clipped)."""
    box = rec.get("bbox")
    if box is None:
        return None, None
    if not isinstance(box, list) or len(box) != 4 or not all(is_number(v) for v in box):
        raise Bad(f"'bbox' must be 4 numbers [x, y, w, h], got {json.dumps(box)}")
    return pixel_box(tuple(float(v) for v in box), json.dumps(box), size, tolerance)  # type: ignore[arg-type]


def pixel_box(
    box: tuple[float, float, float, float], shown: str, size: tuple[int, int] | None, tolerance: float
) -> tuple[tuple[float, float, float, float], str | None]:
    """A pixel x, y, w, h box checked against the image's size when known.

    Returns (box, why clipped): a box that overruns the image (or starts left of or
    above it) by less than a pixel -- float rounding, as normalised boxes converted to
    pixels have -- is clipped to it (``"subpixel"``), and so is one within ``tolerance``
    pixels (``"tolerance"``, data.box_tolerance_px); a larger overrun is an error.
    """
    x, y, w, h = box
    if w <= 0 or h <= 0:
        raise Bad(f"bbox has zero area (width and height must be > 0): {shown}")
    over_lt = max(-x, -y, 0.0)
    if not _within(over_lt, tolerance):
        raise Bad(f"bbox has negative coordinates {shown}")
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), x + w, y + h
    over = over_lt
    if size is not None:
        img_w, img_h = size
        over_rb = max(x2 - img_w, y2 - img_h, 0.0)
        if not _within(over_rb, tolerance):
            raise Bad(f"bbox {shown} extends outside the image ({img_w}x{img_h} pixels)")
        over = max(over, over_rb)
        x2, y2 = min(x2, float(img_w)), min(y2, float(img_h))
        if x2 <= x1 or y2 <= y1:
            raise Bad(f"bbox {shown} lies outside the image ({img_w}x{img_h} pixels)")
    clipped = (x1, y1, x2 - x1, y2 - y1)
    if max(abs(a - b) for a, b in zip(clipped, box)) <= EPS:
        return box, None
    return clipped, ("subpixel" if over < SUBPIXEL_PX else "tolerance")


# Overruns below this many pixels are float rounding: clipped whatever data.box_tolerance_px says.
SUBPIXEL_PX = 1.0


def _within(overrun: float, tolerance: float) -> bool:
    return overrun <= EPS or overrun < SUBPIXEL_PX or overrun <= tolerance + EPS


def relation(rec: dict[str, Any]) -> int | None:
    """Index of an optional relation label in RELATIONS."""
    rel = rec.get("relation")
    if rel is None:
        return None
    if not isinstance(rel, str) or rel not in RELATIONS:
        raise Bad(f"unknown relation {json.dumps(rel)}; expected one of {', '.join(RELATIONS)}")
    return RELATIONS.index(rel)


def count(rec: dict[str, Any], max_count: int | None) -> int:
    if "count" not in rec:
        raise Bad("missing 'count'")
    count = rec["count"]
    if isinstance(count, str) and re.fullmatch(r"\s*\+?\d+\s*", count):
        count = int(count)  # a count written as text (a CSV cell, a JSON string) is read as its integer
    if isinstance(count, bool) or not isinstance(count, int):
        raise Bad(f"'count' must be an integer (a whole number), got {json.dumps(count)}")
    if count < 0:
        raise Bad(f"'count' is negative ({count})")
    if max_count is not None and count > max_count:
        raise Bad(f"'count' {count} is above max_count {max_count}")
    return count


def load_json(path: Path) -> Any:
    """The parsed JSON of an annotation file."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise Bad(f"not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None


def failing(message: str) -> Callable[[], dict[str, Any]]:
    """An item getter that reports ``message`` for its record."""

    def get() -> dict[str, Any]:
        raise Bad(message)

    return get


def returning(rec: Any) -> Callable[[], Any]:
    """An item getter that gives ``rec`` (a record a reader has already built)."""
    return lambda: rec
