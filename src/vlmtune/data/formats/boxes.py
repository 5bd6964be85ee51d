"""The box contract: every reader converts its boxes to one internal convention.

Inside vlmtune a box is **pixel x, y, w, h of the image as loaded** (EXIF orientation
applied, see :func:`~vlmtune.data.formats.images.image_size`): what
:class:`~vlmtune.data.formats.records.PairRecord` ``bbox`` holds, what the losses
normalise (:mod:`vlmtune.boxes` does the differentiable conversions on tensors). A
format writes its boxes in one of the conventions of :data:`CONVENTIONS`; its reader
names it (an item's ``box_convention``), :func:`to_pixels` converts, the scan counts
boxes per source convention and ``data inspect`` shows both: the source's numbers and
the pixels they became. :func:`from_pixels` is the way back (``data convert``).

"Boxes drift after fine-tuning" is very often a mix-up of these conventions; the
round-trip tests (tests/test_box_contract.py) run every convention through non-square
and EXIF-rotated images.

Plain Python (no torch, Pillow or numpy): the format modules load it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from vlmtune.data.formats.fields import Bad, is_number, pixel_box

# The internal convention.
INTERNAL = "xywh"

# Convention -> what its four numbers are, as messages and ``data inspect`` say it.
CONVENTIONS: dict[str, str] = {
    "xywh": "pixel x, y, w, h (COCO, vlmtune)",
    "xyxy": "pixel x1, y1, x2, y2 (ms-swift bbox_type real)",
    "norm_xyxy": "x1, y1, x2, y2 as fractions 0-1 of the image",
    "norm1000": "x1, y1, x2, y2 in thousandths 0-1000 of the image (InternVL, ms-swift norm1000)",
    "norm_cxcywh": "centre x, y, w, h as fractions 0-1 of the image (GeoText)",
}

# The value range of the normalised conventions, and the slack float rounding may add.
_RANGE = {"norm_xyxy": 1.0, "norm1000": 1000.0, "norm_cxcywh": 1.0}
_SLACK = 1e-3

Box = tuple[float, float, float, float]


def describe(convention: str) -> str:
    return CONVENTIONS[convention]


def four_numbers(value: object, convention: str) -> Box:
    """``value`` as four finite numbers, or Bad naming the convention it should be in."""
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(is_number(v) for v in value):
        raise Bad(f"box must be 4 numbers ({CONVENTIONS[convention]}), got {json.dumps(value)}")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def check_range(box: Sequence[float], convention: str) -> None:
    """Refuse a normalised box outside its convention's range (a pixel box in a 0-1 file...)."""
    top = _RANGE.get(convention)
    if top is None:
        return
    if any(v < -_SLACK * top or v > top * (1 + _SLACK) for v in box):
        span = "0-1000" if convention == "norm1000" else "0-1"
        raise Bad(f"box {json.dumps(list(box))} is not normalised to {span} ({CONVENTIONS[convention]})")


def to_pixels(box: Sequence[float], convention: str, size: tuple[int, int]) -> Box:
    """``box`` in ``convention`` -> pixel x, y, w, h of an image of ``size`` (width, height)."""
    a, b, c, d = (float(v) for v in box)
    w, h = size
    if convention == "xywh":
        return a, b, c, d
    if convention == "xyxy":
        return a, b, c - a, d - b
    if convention == "norm_xyxy":
        return a * w, b * h, (c - a) * w, (d - b) * h
    if convention == "norm1000":
        return a * w / 1000, b * h / 1000, (c - a) * w / 1000, (d - b) * h / 1000
    if convention == "norm_cxcywh":
        return (a - c / 2) * w, (b - d / 2) * h, c * w, d * h
    raise ValueError(f"unknown box convention {convention!r}; one of {', '.join(CONVENTIONS)}")


def from_pixels(box: Sequence[float], convention: str, size: tuple[int, int]) -> Box:
    """Pixel x, y, w, h of an image of ``size`` -> ``box`` in ``convention`` (unrounded)."""
    x, y, bw, bh = (float(v) for v in box)
    w, h = size
    if convention == "xywh":
        return x, y, bw, bh
    if convention == "xyxy":
        return x, y, x + bw, y + bh
    if convention == "norm_xyxy":
        return x / w, y / h, (x + bw) / w, (y + bh) / h
    if convention == "norm1000":
        return x / w * 1000, y / h * 1000, (x + bw) / w * 1000, (y + bh) / h * 1000
    if convention == "norm_cxcywh":
        return (x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h
    raise ValueError(f"unknown box convention {convention!r}; one of {', '.join(CONVENTIONS)}")


def to_norm1000(box: Sequence[float], size: tuple[int, int]) -> list[int]:
    """Pixel x, y, w, h -> InternVL's integer ``[x1, y1, x2, y2]`` in 0-1000, as its
    data and its model write them (rounded, within 0-1000)."""
    return [min(1000, max(0, round(v))) for v in from_pixels(box, "norm1000", size)]


def source_box(value: object, convention: str, size: tuple[int, int] | None, tolerance: float) -> tuple[Box | None, str | None]:
    """A record's box as its format wrote it -> (pixel x, y, w, h, why it was clipped),
    checked against the image (see :func:`~vlmtune.data.formats.fields.pixel_box`).
    None while the image's size is unknown (its own error is reported)."""
    box = four_numbers(value, convention)
    check_range(box, convention)
    if size is None:
        return None, None
    if convention == INTERNAL:
        return pixel_box(box, json.dumps(value), size, tolerance)
    pixels = to_pixels(box, convention, size)
    shown = f"{json.dumps(value)} ({convention}; {[round(v, 2) for v in pixels]} in pixels x, y, w, h)"
    return pixel_box(pixels, shown, size, tolerance)
