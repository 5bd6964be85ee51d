"""``coco``: COCO captions, ``{"images": [...], "annotations": [...]}``, one pair per annotation."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.data.formats.fields import Bad, as_object, load_json, nonempty_str
from vlmtune.data.formats.records import Item
from vlmtune.data.formats.registry import Format, Probe, unread_fields

if TYPE_CHECKING:
    from vlmtune.data.formats.checker import Checker


def read_coco(ck: Checker, path: Path, data: Any) -> list[Item]:
    data = load_json(path) if data is None else data
    if not (isinstance(data, dict) and "images" in data and "annotations" in data):
        raise Bad("format 'coco' expects an object with 'images' and 'annotations' (COCO captions)")
    return coco_items(ck, data)


def _coco_image_entry(entry: Any, files: dict[int, Any]) -> tuple[int, str]:
    entry = as_object(entry)
    key = entry.get("id")
    if not isinstance(key, int) or isinstance(key, bool):
        raise Bad("missing or non-integer 'id'")
    if key in files:
        raise Bad(f"duplicate image id {key}")
    return key, nonempty_str(entry, "file_name")


def _coco_image_id(ann: dict[str, Any], files: dict[int, Any], bad_ids: set[int]) -> int:
    if "image_id" not in ann:
        raise Bad("missing 'image_id'")
    key = ann["image_id"]
    if not isinstance(key, bool) and isinstance(key, int) and key in bad_ids:
        raise Bad(f"image_id {key} refers to a bad entry of 'images' (reported above)")
    if isinstance(key, bool) or not isinstance(key, int) or key not in files:
        raise Bad(f"image_id {json.dumps(key)} is not in 'images'")
    return key


def coco_items(ck: Checker, data: dict[str, Any]) -> list[Item]:
    """COCO captions: ``record N`` is the N-th entry of ``annotations``."""
    images, annotations = data["images"], data["annotations"]
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise Bad("COCO 'images' and 'annotations' must be arrays")
    files: dict[int, dict[str, Any]] = {}
    bad_ids: set[int] = set()
    for j, entry in enumerate(images):
        try:
            key, _ = _coco_image_entry(entry, files)
            files[key] = entry
        except Bad as e:
            ck.error(str(e), f"{ck.path}: image entry {j}")
            if isinstance(entry, dict) and isinstance(entry.get("id"), int) and entry["id"] not in files:
                bad_ids.add(entry["id"])

    def get(ann: Any) -> dict[str, Any]:
        if not isinstance(ann, dict):
            return ann
        unread_fields(ann, {"caption"}, "coco")
        key = _coco_image_id(ann, files, bad_ids)
        if "caption" not in ann:
            raise Bad(
                "missing 'caption'"
                + (
                    " (this looks like COCO instances, which carry no text; "
                    "for RefCOCO use refer's refs(...).p with data.format=refcoco)"
                    if "bbox" in ann
                    else ""
                )
            )
        return {"image": files[key].get("file_name"), "caption": ann["caption"]}

    return [Item(f"record {i}", partial(get, ann)) for i, ann in enumerate(annotations)]


def _is_coco(probe: Probe) -> bool:
    return isinstance(probe.data, dict) and "images" in probe.data and "annotations" in probe.data


COCO = Format(
    "coco",
    readers={"pairs": read_coco},
    carries={"caption": "a caption"},
    by_json=_is_coco,
    detect_rank=10,
    object_shape="COCO captions ('images' and 'annotations')",
)
