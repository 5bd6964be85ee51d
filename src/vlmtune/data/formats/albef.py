"""``albef``: the JSON lists of ALBEF, X-VLM and LAVIS (``image`` under an image root,
``caption``, and ids such as ``image_id``), read as the documented pairs and grounding shapes."""

from __future__ import annotations

from vlmtune.data.formats.pairs import list_reader
from vlmtune.data.formats.registry import Format, Probe


def _has_more_keys(probe: Probe) -> bool:
    return bool(probe.keys - {"image", "caption", "text"})


ALBEF = Format(
    "albef",
    readers={"pairs": list_reader("albef")},
    carries={"caption": "a caption", "text": "a text", "bbox": "a box"},
    by_json=_has_more_keys,
    detect_rank=80,
)
