"""``refcoco``: refer's layout (``refs(unc).p`` holding every split, with COCO
``instances.json`` beside it for the boxes and images), or X-VLM's RefCOCO JSON list;
one record per referring object, its sentences as texts, its box."""

from __future__ import annotations

import io
import json
import pickle
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.data.formats.fields import Bad, as_object, load_json
from vlmtune.data.formats.pairs import list_reader
from vlmtune.data.formats.records import Item
from vlmtune.data.formats.registry import Format, Probe
from vlmtune.errors import DataError

if TYPE_CHECKING:
    from vlmtune.data.formats.checker import Checker

PICKLE_SUFFIXES = (".p", ".pkl", ".pickle")

_read_json_list = list_reader("refcoco")


def read_refcoco(ck: Checker, path: Path, data: Any) -> list[Item]:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return refer_items(ck, path)
    return _read_json_list(ck, path, data)


class SafeUnpickler(pickle.Unpickler):
    """Builds only plain data: dict, list, tuple, str, int, float, bool, None (and bytes).

    Those need no class lookup; any pickle that names a class or function (the way code
    runs from a pickle: ``__reduce__`` returning ``os.system``, ...) is refused before
    anything is called.
    """

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"refuses to build '{module}.{name}': only plain data "
            "(dict, list, tuple, str, int, float, bool, None) is read from a pickle"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refuses a persistent id: only plain data is read from a pickle")


def load_plain_pickle(path: Path) -> Any:
    """A pickle of plain data (refer's ``refs(unc).p``), read without running any code.
    Python 2 pickles (refer's own) decode their byte strings as latin-1."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise Bad(f"cannot read: {e.strerror or e}") from None
    try:
        return SafeUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise Bad(f"{e}") from None
    except (EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError, MemoryError) as e:
        raise Bad(f"not a readable pickle: {type(e).__name__}: {e}") from None


def refer_items(ck: Checker, path: Path) -> list[Item]:
    """refer's layout: ``refs(unc).p`` (one entry per referring object, every split) and
    ``instances.json`` beside it (COCO instances: the boxes and image files)."""
    refs = load_plain_pickle(path)
    if not isinstance(refs, list):
        raise Bad("a refs pickle must hold a list of refs")
    inst_path = path.parent / "instances.json"
    if not inst_path.is_file():
        raise Bad(f"refer's instances.json (the boxes and images of the refs) is not beside it: {inst_path}")
    try:
        inst = load_json(inst_path)
    except Bad as e:
        raise DataError(f"{inst_path}: {e}") from None
    if not isinstance(inst, dict) or not isinstance(inst.get("annotations"), list) or not isinstance(inst.get("images"), list):
        raise DataError(f"{inst_path}: not COCO instances (needs 'images' and 'annotations' arrays)")
    anns = {a.get("id"): a for a in inst["annotations"] if isinstance(a, dict)}
    images = {m.get("id"): m for m in inst["images"] if isinstance(m, dict)}
    found = (ck.split_item(f"record {i}", ref, partial(_refer_record, ref, anns, images)) for i, ref in enumerate(refs))
    return [item for item in found if item is not None]


def _refer_record(ref: Any, anns: dict[Any, Any], images: dict[Any, Any]) -> dict[str, Any]:
    ref = as_object(ref)
    ann = anns.get(ref.get("ann_id"))
    if ann is None:
        raise Bad(f"ann_id {json.dumps(ref.get('ann_id'))} is not in instances.json")
    image = images.get(ref.get("image_id", ann.get("image_id")))
    if image is None:
        raise Bad(f"image_id {json.dumps(ref.get('image_id'))} is not in instances.json")
    sentences = ref.get("sentences")
    if not isinstance(sentences, list) or not sentences:
        raise Bad("'sentences' must be a non-empty list")
    texts = []
    for j, s in enumerate(sentences):
        text = (s.get("sent") or s.get("raw")) if isinstance(s, dict) else s
        if not isinstance(text, str):
            raise Bad(f"sentence {j} has no 'sent' or 'raw' text")
        texts.append(text)
    return {"image": image.get("file_name"), "caption": texts, "bbox": ann.get("bbox")}


def _is_pickle(probe: Probe) -> bool:
    return not probe.is_dir and probe.suffix in PICKLE_SUFFIXES


def _has_ref_ids(probe: Probe) -> bool:
    return "ref_id" in probe.keys


REFCOCO = Format(
    "refcoco",
    readers={"pairs": read_refcoco},
    carries={"sentences": "captions", "text": "a text", "bbox": "a box"},
    by_path=_is_pickle,
    by_json=_has_ref_ids,
    detect_rank=40,
)
