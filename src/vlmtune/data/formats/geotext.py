"""``geotext``: GeoText-1652, ``[{"image", "caption", "sentences", "bboxes": [cx, cy, w, h] 0-1 or null}]``:
the caption as a retrieval record, and one grounding record per boxed sentence."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.data.formats.fields import Bad, failing, load_json, type_name
from vlmtune.data.formats.records import Item
from vlmtune.data.formats.registry import Format, Probe, unread_fields

if TYPE_CHECKING:
    from vlmtune.data.formats.checker import Checker


def read_geotext(ck: Checker, path: Path, data: Any) -> list[Item]:
    data = load_json(path) if data is None else data
    if not isinstance(data, list):
        raise Bad("format 'geotext' expects a list of records at the top level")
    return [it for i, rec in enumerate(data) for it in geotext_items(ck, i, rec)]


def geotext_items(ck: Checker, i: int, rec: Any) -> Iterator[Item]:
    """GeoText-1652: the caption as a retrieval record, and one grounding record per
    (sentence, box) pair with the normalised centre box converted to pixels; sentences
    whose box is null are skipped and counted."""
    label = f"record {i}"
    if not isinstance(rec, dict):
        yield Item(label, lambda: rec)
        return
    sentences, boxes = rec.get("sentences", []), rec.get("bboxes")
    if not isinstance(sentences, list) or (boxes is not None and not isinstance(boxes, list)):
        yield Item(label, failing(f"'sentences' and 'bboxes' must be lists, got {type_name(sentences)} and {type_name(boxes)}"))
        return
    if boxes is not None and len(boxes) != len(sentences):
        yield Item(label, failing(f"{len(sentences)} sentences but {len(boxes)} bboxes; they pair up one to one"))
        return
    try:
        unread_fields(rec, {"caption", "sentences", "bboxes"}, "geotext")
    except Bad as e:
        yield Item(label, failing(str(e)))
        return
    image, caption = rec.get("image"), rec.get("caption")
    derived: list[tuple[str, dict[str, Any]]] = []
    for j, s in enumerate(sentences):
        if boxes is None:  # a test file without boxes: the sentences are more captions
            derived.append((f"{label} sentence {j}", {"image": image, "text": s}))
        elif boxes[j] is None:
            ck.count("GeoText sentences with a null box skipped")
        else:
            derived.append(
                (f"{label} sentence {j}", {"image": image, "text": s, "bbox": boxes[j], "box_convention": "norm_cxcywh"})
            )
    if caption is not None or not derived:
        what = {"image": image, "caption": caption} if caption is not None else None
        yield Item(label, (lambda: what) if what else failing("no caption and no sentence with a box: nothing to read"))
        new = False
    else:
        new = True
    for lab, r in derived:
        yield Item(lab, _returning(r), new)
        new = False


def _returning(rec: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    return lambda: rec


def _has_geotext_keys(probe: Probe) -> bool:
    return bool(probe.keys & {"bboxes", "sentences"})


GEOTEXT = Format(
    "geotext",
    readers={"pairs": read_geotext},
    carries={"bboxes": "boxes", "sentences": "captions", "caption": "a caption"},
    by_json=_has_geotext_keys,
    detect_rank=30,
)
