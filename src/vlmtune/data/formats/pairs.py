"""``pairs`` and ``grounding``: vlmtune's own JSON lists, the documented shapes.

``pairs``: ``[{"image", "caption": str or [str, ...], "negatives"?, "negative_images"?}]``,
one pair per caption (each carrying the record's negative captions and images).
``grounding``: ``[{"image", "text", "bbox": [x, y, w, h] in pixels, "relation"?}]``.
Both read every field of the documented shapes, so one file may mix them; ``albef`` and
X-VLM's RefCOCO JSON are read the same way (:func:`list_reader`).
"""

from __future__ import annotations

from collections.abc import Collection
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.data.formats.fields import Bad, load_json
from vlmtune.data.formats.records import Item
from vlmtune.data.formats.registry import Format, Probe, Reader, unread_fields

if TYPE_CHECKING:
    from vlmtune.data.formats.checker import Checker

# The fields of the documented pairs and grounding shapes (``box_convention`` names the
# convention of ``bbox`` when it is not pixel x, y, w, h: see vlmtune.data.formats.boxes).
PAIR_FIELDS = frozenset({"image", "caption", "text", "bbox", "box_convention", "relation", "negatives", "negative_images"})


def list_reader(fmt: str) -> Reader:
    """The reader of a JSON list of records in the documented shapes: ``record N`` is
    the N-th entry; a field that carries a target outside those shapes is refused."""

    def read(ck: Checker, path: Path, data: Any) -> list[Item]:
        data = load_json(path) if data is None else data
        if not isinstance(data, list):
            raise Bad(f"format '{fmt}' expects a list of records at the top level")
        return [Item(f"record {i}", partial(checked, rec, PAIR_FIELDS, fmt)) for i, rec in enumerate(data)]

    return read


def checked(rec: Any, used: Collection[str], fmt: str) -> Any:
    """``rec``, after refusing a target-carrying field ``fmt`` does not read."""
    if isinstance(rec, dict):
        unread_fields(rec, used, fmt)
    return rec


def _is_list(probe: Probe) -> bool:
    return isinstance(probe.data, list)


def _has_boxes_or_relations(probe: Probe) -> bool:
    return bool(probe.keys & {"bbox", "relation"})


PAIRS = Format(
    "pairs",
    readers={"pairs": list_reader("pairs")},
    carries={
        "caption": "a caption",
        "bbox": "a box",
        "relation": "a relation",
        "negatives": "negative captions",
        "negative_images": "negative images",
    },
    by_json=_is_list,
    detect_rank=90,
)

GROUNDING = Format(
    "grounding",
    readers={"pairs": list_reader("grounding")},
    carries={"text": "a text", "bbox": "a box", "relation": "a relation"},
    by_json=_has_boxes_or_relations,
    detect_rank=50,
)
