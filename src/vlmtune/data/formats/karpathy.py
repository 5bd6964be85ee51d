"""``karpathy``: Karpathy's split files (``dataset_coco.json``, ``dataset_flickr30k.json``),
every split in one file; one record per image, with its sentences as captions."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.data.formats.fields import Bad, as_object, load_json, nonempty_str, type_name
from vlmtune.data.formats.records import Item
from vlmtune.data.formats.registry import Format, Probe

if TYPE_CHECKING:
    from vlmtune.data.formats.checker import Checker


def read_karpathy(ck: Checker, path: Path, data: Any) -> list[Item]:
    data = load_json(path) if data is None else data
    if not (isinstance(data, dict) and "images" in data):
        raise Bad("format 'karpathy' expects an object with 'images' (dataset_coco.json, dataset_flickr30k.json)")
    return karpathy_items(ck, data)


def karpathy_items(ck: Checker, data: dict[str, Any]) -> list[Item]:
    """Karpathy splits: ``record N`` is the N-th entry of ``images``, with its sentences."""
    images = data.get("images")
    if not isinstance(images, list):
        raise Bad("Karpathy 'images' must be an array")
    found = (ck.split_item(f"record {i}", rec, partial(_karpathy_record, rec)) for i, rec in enumerate(images))
    return [item for item in found if item is not None]


def _karpathy_record(rec: Any) -> dict[str, Any]:
    rec = as_object(rec)
    filename = nonempty_str(rec, "filename")
    folder = rec.get("filepath")
    image = f"{folder}/{filename}" if isinstance(folder, str) and folder.strip() else filename
    sentences = rec.get("sentences")
    if not isinstance(sentences, list) or not sentences:
        raise Bad(f"'sentences' must be a non-empty list, got {type_name(sentences)}")
    captions = []
    for j, s in enumerate(sentences):
        raw = s.get("raw") if isinstance(s, dict) else s
        if raw is None and isinstance(s, dict) and isinstance(s.get("tokens"), list):
            raw = " ".join(map(str, s["tokens"]))
        if not isinstance(raw, str):
            raise Bad(f"sentence {j} has no 'raw' text")
        captions.append(raw)
    return {"image": image, "caption": captions}


def _is_karpathy(probe: Probe) -> bool:
    data = probe.data
    if not isinstance(data, dict):
        return False
    images = data.get("images")
    return isinstance(images, list) and (
        ("dataset" in data) or any(isinstance(r, dict) and "sentences" in r and "filename" in r for r in images[:50])
    )


KARPATHY = Format(
    "karpathy",
    readers={"pairs": read_karpathy},
    carries={"sentences": "captions"},
    by_json=_is_karpathy,
    detect_rank=20,
    object_shape="a Karpathy split file ('images' with 'filename' and 'sentences')",
)
