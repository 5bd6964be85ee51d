"""The annotation formats users download, read as they ship.

Each reader turns one file (or folder) into :class:`~vlmtune.data.formats.Item` s in the
documented pairs shape (``image``, ``caption`` or ``text``, ``bbox`` in pixels,
``relation``) or counting shape (``image``, ``count``, ``question``, ``answer``); the
checks of :mod:`vlmtune.data.formats` then run on them unchanged, so every format gets
the same errors, notes and ``data.on_error`` policy.

| format | what | records |
|---|---|---|
| ``pairs`` | JSON list ``{"image", "caption": str or [str]}`` | one per caption |
| ``grounding`` | JSON list ``{"image", "text", "bbox": [x, y, w, h] px, "relation"?}`` | one per record |
| ``coco`` | COCO captions ``{"images": [...], "annotations": [...]}`` | one per annotation |
| ``karpathy`` | ``dataset_coco.json`` / ``dataset_flickr30k.json`` (every split) | one per image, its sentences |
| ``albef`` | ALBEF / X-VLM / LAVIS JSON lists (``image`` under an image root, ``caption``, ids) | as pairs / grounding |
| ``refcoco`` | refer's ``refs(...).p`` + ``instances.json`` (every split), or X-VLM's RefCOCO JSON | one per ref, its sentences, its box |
| ``geotext`` | GeoText-1652 ``{"image", "caption", "sentences", "bboxes": [cx, cy, w, h] 0-1 or null}`` | the caption, and one grounding record per boxed sentence |
| ``counting`` | JSONL ``{"image", "count", "question"?, "answer"?}`` | one per line |
| ``csv`` | CSV with a header: ``filename``/``image``, ``count``/``receipt_count``, ``question``?, ``answer``? | one per row |
| ``hf`` | ``datasets``: a ``save_to_disk`` folder, a parquet file, an imagefolder with ``metadata.jsonl`` | one per row |

Nothing is dropped without a word: a field that carries boxes, relations, captions or
counts which the chosen format does not read is an error naming the field and the
format that reads it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import pickle
from pathlib import Path
from typing import Any, Callable, Iterator

from vlmtune.data.formats import (
    Item, _Bad, _Checker, _nonempty_str, _object, _read_text, _type_name,
)
from vlmtune.errors import DataError

log = logging.getLogger(__name__)

PAIR_FORMATS = ("pairs", "grounding", "coco", "karpathy", "albef", "refcoco", "geotext", "hf")
COUNT_FORMATS = ("counting", "csv", "hf")
FORMATS = ("auto", "pairs", "coco", "karpathy", "albef", "refcoco", "geotext", "grounding", "counting", "csv", "hf")

# Splits of a one-file-all-splits format that make up each of vlmtune's three.
_SPLITS = {"train": ("train", "restval"), "val": ("val", "validation", "valid", "dev"),
           "test": ("test", "testA", "testB")}

# Fields that carry something a model could learn from: (what it carries, the formats
# that read it). A reader that meets one it does not use refuses the record.
CARRIERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "bbox": ("a box", ("grounding", "albef", "refcoco", "pairs")),
    "bboxes": ("boxes", ("geotext",)),
    "boxes": ("boxes", ()),
    "objects": ("boxes", ()),
    "segmentation": ("a mask", ()),
    "keypoints": ("keypoints", ()),
    "relation": ("a relation", ("grounding", "pairs")),
    "relations": ("relations", ()),
    "sentences": ("captions", ("geotext", "karpathy", "refcoco")),
    "captions": ("captions", ("hf",)),
    "caption": ("a caption", ("pairs", "albef", "coco", "geotext", "hf")),
    "text": ("a text", ("grounding", "albef", "refcoco", "hf")),
    "count": ("a count", ("counting", "csv", "hf")),
    "receipt_count": ("a count", ("csv",)),
    "question": ("a question", ("counting", "csv", "hf")),
    "answer": ("an answer", ("counting", "csv", "hf")),
}


def _bad(message: str) -> Exception:
    return _Bad(message)


def _item(label: str, get: Callable[[], dict[str, Any]], new: bool = True) -> Item:
    return Item(label, get, new)


def _failing(message: str) -> Callable[[], dict[str, Any]]:
    def get() -> dict[str, Any]:
        raise _bad(message)
    return get


def unread_fields(rec: dict[str, Any], used: set[str], fmt: str) -> None:
    """Refuse a field that carries boxes, relations, captions or counts ``fmt`` ignores."""
    for key in rec:
        if key in CARRIERS and key not in used:
            what, readers = CARRIERS[key]
            where = (f"format {' or '.join(repr(r) for r in readers)} reads it (data.format=...)" if readers
                     else "no vlmtune format reads it; remove it or convert the file")
            raise _bad(f"field '{key}' carries {what} that format '{fmt}' does not read; {where}")


# --------------------------------------------------------------------------- detection


def _load_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise _bad(f"not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None


def _is_hf_folder(path: Path) -> bool:
    return path.is_dir() and any((path / n).is_file() for n in (
        "dataset_info.json", "state.json", "dataset_dict.json", "metadata.jsonl", "metadata.csv")) or (
        path.is_dir() and any((path / s / "metadata.jsonl").is_file() for s in ("train", "validation", "val", "test")))


def detect(path: Path, data: Any = None) -> str:
    """The format of ``path`` from its name and shape (``data``: its parsed JSON, if any)."""
    name, suffix = path.name.lower(), path.suffix.lower()
    if path.is_dir():
        if _is_hf_folder(path):
            return "hf"
        raise _bad("is a folder but not a Hugging Face datasets folder (save_to_disk, or an imagefolder with metadata.jsonl)")
    if suffix in (".p", ".pkl", ".pickle"):
        return "refcoco"
    if suffix == ".csv":
        return "csv"
    if suffix == ".parquet" or name in ("metadata.jsonl", "metadata.csv"):
        return "hf"
    if suffix == ".jsonl":
        return "counting"
    if data is None:
        data = _load_json(path)
    if isinstance(data, dict):
        if "images" in data and "annotations" in data:
            return "coco"
        images = data.get("images")
        if isinstance(images, list) and (("dataset" in data) or any(
                isinstance(r, dict) and "sentences" in r and "filename" in r for r in images[:50])):
            return "karpathy"
        raise _bad("top level is an object but not COCO captions ('images' and 'annotations') nor a "
                   "Karpathy split file ('images' with 'filename' and 'sentences'); expected a list of records")
    if isinstance(data, list):
        recs = [r for r in data if isinstance(r, dict)]
        keys = set().union(*(r.keys() for r in recs)) if recs else set()
        if keys & {"bboxes", "sentences"}:
            return "geotext"
        if "ref_id" in keys:
            return "refcoco"
        if keys & {"bbox", "relation"}:
            return "grounding"
        if keys - {"image", "caption", "text"}:
            return "albef"
        return "pairs"
    raise _bad(f"top level must be a list of records, got {_type_name(data)}")


def _choose(ck: _Checker, path: Path, allowed: tuple[str, ...], task: str) -> tuple[str, Any]:
    """The format to read ``path`` with (and its parsed JSON when detection needed it)."""
    fmt, data = ck.opts.format, None
    if fmt == "auto":
        if not path.is_dir() and path.suffix.lower() == ".json":
            data = _load_json(path)
        fmt = detect(path, data)
        log.info("%s: detected format '%s'", path, fmt)
    elif fmt not in FORMATS:
        raise _bad(f"data.format '{fmt}' is not one of {', '.join(FORMATS)}")
    if fmt not in allowed:
        raise _bad(f"format '{fmt}' holds no {task} data; {task} reads {', '.join(allowed)}")
    ck.scan.format = fmt
    return fmt, data


def _wanted(ck: _Checker, split: Any) -> bool:
    """Whether a record of a one-file-all-splits format belongs to the split asked for."""
    split = "train" if split == "restval" else split
    ck.scan.splits[str(split)] = ck.scan.splits.get(str(split), 0) + 1
    want = ck.opts.split
    return want is None or split in _SPLITS.get(want, (want,))


# --------------------------------------------------------------------------- pair formats


def pair_items(ck: _Checker, path: Path) -> list[Item]:
    """Items of an image-text file in any pair format."""
    if not path.exists():
        raise _bad("annotation file not found")
    fmt, data = _choose(ck, path, PAIR_FORMATS, "image-text")
    if fmt == "hf":
        return [_item(label, (lambda r=rec: _hf_pair(r))) for label, rec in hf_rows(ck, path)]
    if fmt == "refcoco" and path.suffix.lower() in (".p", ".pkl", ".pickle"):
        return _refer_items(ck, path)
    data = _load_json(path) if data is None else data
    if fmt == "coco":
        if not (isinstance(data, dict) and "images" in data and "annotations" in data):
            raise _bad("format 'coco' expects an object with 'images' and 'annotations' (COCO captions)")
        return _coco_items(ck, data)
    if fmt == "karpathy":
        if not (isinstance(data, dict) and "images" in data):
            raise _bad("format 'karpathy' expects an object with 'images' (dataset_coco.json, dataset_flickr30k.json)")
        return _karpathy_items(ck, data)
    if not isinstance(data, list):
        raise _bad(f"format '{fmt}' expects a list of records at the top level")
    if fmt == "geotext":
        return [it for i, rec in enumerate(data) for it in _geotext_items(ck, i, rec)]
    used = {"image", "caption", "text", "bbox", "relation"}
    return [_item(f"record {i}", (lambda r=rec: _checked(r, used, fmt))) for i, rec in enumerate(data)]


def _checked(rec: Any, used: set[str], fmt: str) -> Any:
    if isinstance(rec, dict):
        unread_fields(rec, used, fmt)
    return rec


def _coco_image_entry(entry: Any, files: dict[int, Any]) -> tuple[int, str]:
    entry = _object(entry)
    key = entry.get("id")
    if not isinstance(key, int) or isinstance(key, bool):
        raise _bad("missing or non-integer 'id'")
    if key in files:
        raise _bad(f"duplicate image id {key}")
    return key, _nonempty_str(entry, "file_name")


def _coco_image_id(ann: dict[str, Any], files: dict[int, Any], bad_ids: set[int]) -> int:
    if "image_id" not in ann:
        raise _bad("missing 'image_id'")
    key = ann["image_id"]
    if not isinstance(key, bool) and isinstance(key, int) and key in bad_ids:
        raise _bad(f"image_id {key} refers to a bad entry of 'images' (reported above)")
    if isinstance(key, bool) or not isinstance(key, int) or key not in files:
        raise _bad(f"image_id {json.dumps(key)} is not in 'images'")
    return key


def _coco_items(ck: _Checker, data: dict[str, Any]) -> list[Item]:
    """COCO captions: ``record N`` is the N-th entry of ``annotations``."""
    images, annotations = data["images"], data["annotations"]
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise _bad("COCO 'images' and 'annotations' must be arrays")
    files: dict[int, dict[str, Any]] = {}
    bad_ids: set[int] = set()
    for j, entry in enumerate(images):
        try:
            key, _ = _coco_image_entry(entry, files)
            files[key] = entry
        except _Bad as e:
            ck.error(str(e), f"{ck.path}: image entry {j}")
            if isinstance(entry, dict) and isinstance(entry.get("id"), int) and entry["id"] not in files:
                bad_ids.add(entry["id"])

    def get(ann: Any) -> dict[str, Any]:
        if not isinstance(ann, dict):
            return ann
        unread_fields(ann, {"caption"}, "coco")
        key = _coco_image_id(ann, files, bad_ids)
        if "caption" not in ann:
            raise _bad("missing 'caption'" + (" (this looks like COCO instances, which carry no text; "
                                              "for RefCOCO use refer's refs(...).p with data.format=refcoco)"
                                              if "bbox" in ann else ""))
        return {"image": files[key].get("file_name"), "caption": ann["caption"]}

    return [_item(f"record {i}", (lambda a=ann: get(a))) for i, ann in enumerate(annotations)]


def _karpathy_items(ck: _Checker, data: dict[str, Any]) -> list[Item]:
    """Karpathy splits: ``record N`` is the N-th entry of ``images``, with its sentences."""
    images = data.get("images")
    if not isinstance(images, list):
        raise _bad("Karpathy 'images' must be an array")
    items = []
    for i, rec in enumerate(images):
        if isinstance(rec, dict) and not _wanted(ck, rec.get("split")):
            continue
        items.append(_item(f"record {i}", (lambda r=rec: _karpathy_record(r))))
    return items


def _karpathy_record(rec: Any) -> dict[str, Any]:
    rec = _object(rec)
    filename = _nonempty_str(rec, "filename")
    folder = rec.get("filepath")
    image = f"{folder}/{filename}" if isinstance(folder, str) and folder.strip() else filename
    sentences = rec.get("sentences")
    if not isinstance(sentences, list) or not sentences:
        raise _bad(f"'sentences' must be a non-empty list, got {_type_name(sentences)}")
    captions = []
    for j, s in enumerate(sentences):
        raw = s.get("raw") if isinstance(s, dict) else s
        if raw is None and isinstance(s, dict) and isinstance(s.get("tokens"), list):
            raw = " ".join(map(str, s["tokens"]))
        if not isinstance(raw, str):
            raise _bad(f"sentence {j} has no 'raw' text")
        captions.append(raw)
    return {"image": image, "caption": captions}


def _geotext_items(ck: _Checker, i: int, rec: Any) -> Iterator[Item]:
    """GeoText-1652: the caption as a retrieval record, and one grounding record per
    (sentence, box) pair with the normalised centre box converted to pixels; sentences
    whose box is null are skipped and counted."""
    label = f"record {i}"
    if not isinstance(rec, dict):
        yield _item(label, lambda: rec)
        return
    sentences, boxes = rec.get("sentences", []), rec.get("bboxes")
    if not isinstance(sentences, list) or (boxes is not None and not isinstance(boxes, list)):
        yield _item(label, _failing(f"'sentences' and 'bboxes' must be lists, got {_type_name(sentences)} "
                                    f"and {_type_name(boxes)}"))
        return
    if boxes is not None and len(boxes) != len(sentences):
        yield _item(label, _failing(f"{len(sentences)} sentences but {len(boxes)} bboxes; they pair up one to one"))
        return
    try:
        unread_fields(rec, {"caption", "sentences", "bboxes"}, "geotext")
    except _Bad as e:
        yield _item(label, _failing(str(e)))
        return
    image, caption = rec.get("image"), rec.get("caption")
    derived: list[tuple[str, dict[str, Any]]] = []
    for j, s in enumerate(sentences):
        if boxes is None:  # a test file without boxes: the sentences are more captions
            derived.append((f"{label} sentence {j}", {"image": image, "text": s}))
        elif boxes[j] is None:
            ck.count("GeoText sentences with a null box skipped")
        else:
            derived.append((f"{label} sentence {j}", {"image": image, "text": s, "bbox_norm": boxes[j]}))
    if caption is not None or not derived:
        what = {"image": image, "caption": caption} if caption is not None else None
        yield _item(label, (lambda: what) if what else _failing("no caption and no sentence with a box: nothing to read"))
        new = False
    else:
        new = True
    for lab, r in derived:
        yield _item(lab, (lambda r=r: r), new)
        new = False


# --------------------------------------------------------------------------- refer (RefCOCO)


class SafeUnpickler(pickle.Unpickler):
    """Builds only plain data: dict, list, tuple, str, int, float, bool, None (and bytes).

    Those need no class lookup; any pickle that names a class or function (the way code
    runs from a pickle: ``__reduce__`` returning ``os.system``, ...) is refused before
    anything is called.
    """

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refuses to build '{module}.{name}': only plain data "
                                     "(dict, list, tuple, str, int, float, bool, None) is read from a pickle")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refuses a persistent id: only plain data is read from a pickle")


def load_plain_pickle(path: Path) -> Any:
    """A pickle of plain data (refer's ``refs(unc).p``), read without running any code.
    Python 2 pickles (refer's own) decode their byte strings as latin-1."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise _bad(f"cannot read: {e.strerror or e}") from None
    try:
        return SafeUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise _bad(f"{e}") from None
    except (EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError, MemoryError) as e:
        raise _bad(f"not a readable pickle: {type(e).__name__}: {e}") from None


def _refer_items(ck: _Checker, path: Path) -> list[Item]:
    """refer's layout: ``refs(unc).p`` (one entry per referring object, every split) and
    ``instances.json`` beside it (COCO instances: the boxes and image files)."""
    refs = load_plain_pickle(path)
    if not isinstance(refs, list):
        raise _bad("a refs pickle must hold a list of refs")
    inst_path = path.parent / "instances.json"
    if not inst_path.is_file():
        raise _bad(f"refer's instances.json (the boxes and images of the refs) is not beside it: {inst_path}")
    try:
        inst = _load_json(inst_path)
    except _Bad as e:
        raise DataError(f"{inst_path}: {e}") from None
    if not isinstance(inst, dict) or not isinstance(inst.get("annotations"), list) or not isinstance(inst.get("images"), list):
        raise DataError(f"{inst_path}: not COCO instances (needs 'images' and 'annotations' arrays)")
    anns = {a.get("id"): a for a in inst["annotations"] if isinstance(a, dict)}
    images = {m.get("id"): m for m in inst["images"] if isinstance(m, dict)}
    items = []
    for i, ref in enumerate(refs):
        if isinstance(ref, dict) and not _wanted(ck, ref.get("split")):
            continue
        items.append(_item(f"record {i}", (lambda r=ref: _refer_record(r, anns, images))))
    return items


def _refer_record(ref: Any, anns: dict[Any, Any], images: dict[Any, Any]) -> dict[str, Any]:
    ref = _object(ref)
    ann = anns.get(ref.get("ann_id"))
    if ann is None:
        raise _bad(f"ann_id {json.dumps(ref.get('ann_id'))} is not in instances.json")
    image = images.get(ref.get("image_id", ann.get("image_id")))
    if image is None:
        raise _bad(f"image_id {json.dumps(ref.get('image_id'))} is not in instances.json")
    sentences = ref.get("sentences")
    if not isinstance(sentences, list) or not sentences:
        raise _bad("'sentences' must be a non-empty list")
    texts = []
    for j, s in enumerate(sentences):
        text = (s.get("sent") or s.get("raw")) if isinstance(s, dict) else s
        if not isinstance(text, str):
            raise _bad(f"sentence {j} has no 'sent' or 'raw' text")
        texts.append(text)
    return {"image": image.get("file_name"), "caption": texts, "bbox": ann.get("bbox")}


# --------------------------------------------------------------------------- counting formats


def count_items(ck: _Checker, path: Path) -> list[Item]:
    """Items of a counting file in any counting format."""
    if not path.exists():
        raise _bad("annotation file not found")
    fmt, _ = _choose(ck, path, COUNT_FORMATS, "counting")
    if fmt == "hf":
        return [_item(label, (lambda r=rec: _count_row(r, "hf"))) for label, rec in hf_rows(ck, path)]
    if fmt == "csv":
        return [_item(label, (lambda r=rec: _count_row(r, "csv"))) for label, rec in _csv_rows(path)]
    items = []
    for n, line in enumerate(_read_text(path).splitlines(), start=1):
        if line.strip():
            items.append(_item(f"line {n}", (lambda t=line: _jsonl_record(t))))
    return items


def _jsonl_record(line: str) -> Any:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise _bad(f"not valid JSON: {e.msg} (column {e.colno})") from None
    if isinstance(rec, dict):
        unread_fields(rec, {"image", "count", "question", "answer"}, "counting")
    return rec


def _count_row(rec: dict[str, Any], fmt: str) -> dict[str, Any]:
    """A CSV or ``datasets`` row in the counting shape: ``filename``/``file_name`` is the
    image, ``receipt_count`` the count; empty question or answer cells mean none given."""
    if "__bad__" in rec:
        raise _bad(rec["__bad__"])
    rec = dict(rec)
    for alias in ("filename", "file_name", "image_path"):
        if alias in rec and "image" not in rec:
            rec["image"] = rec.pop(alias)
    if "receipt_count" in rec:
        if "count" in rec:
            raise _bad("has both 'count' and 'receipt_count'; use one")
        rec["count"] = rec.pop("receipt_count")
    for key in ("question", "answer"):
        if key in rec and (rec[key] is None or (fmt == "csv" and isinstance(rec[key], str) and not rec[key].strip())):
            del rec[key]
    unread_fields(rec, {"image", "count", "question", "answer"}, fmt)
    if "image" not in rec:
        raise _bad("missing 'image' (or 'filename' / 'file_name')")
    return rec


def _csv_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    text = _read_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    if not header:
        raise _bad("empty CSV: expected a header line such as filename,receipt_count")
    header = [h.strip() for h in header]
    reader.fieldnames = header
    if not {"filename", "image", "file_name"} & set(header) or not {"count", "receipt_count"} & set(header):
        raise _bad(f"CSV header {','.join(header)} needs an image column (filename or image) and a count column "
                   "(count or receipt_count)")
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


# --------------------------------------------------------------------------- Hugging Face datasets


_NEEDS_HF = "reading a Hugging Face datasets layout needs the 'hf' extra: pip install 'vlmtune[hf]'"


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise _bad(_NEEDS_HF) from None
    return datasets


def hf_rows(ck: _Checker, path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a ``datasets`` layout as dicts, labelled ``record N`` (``SPLIT record N``
    where the layout has several splits); image paths relative to the image root."""
    if path.is_dir() and not (path / "dataset_info.json").is_file() and not (path / "dataset_dict.json").is_file() \
            and not (path / "state.json").is_file():
        return _imagefolder_rows(ck, path)
    if path.name.lower() in ("metadata.jsonl", "metadata.csv"):
        return _metadata_rows(ck, path, "")
    ds_mod = _datasets()
    if not path.is_dir():
        # A parquet file is read straight through pyarrow (datasets' own engine), so
        # nothing is written to a cache: read-only data and no side effects.
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise _bad(_NEEDS_HF) from None

        try:
            table = pq.read_table(str(path))
        except Exception as e:  # pyarrow raises several kinds for a bad file
            raise _bad(f"cannot read as parquet: {type(e).__name__}: {e}") from None
        return [(f"record {i}", _hf_image(rec)) for i, rec in enumerate(table.to_pylist())]
    try:
        loaded = ds_mod.load_from_disk(str(path))  # memory-maps the arrow files; writes nothing
    except Exception as e:  # datasets raises many kinds for a bad folder
        raise _bad(f"cannot load with datasets: {type(e).__name__}: {e}") from None
    parts = dict(loaded) if isinstance(loaded, ds_mod.DatasetDict) else {"": loaded}
    rows = []
    for split, ds in parts.items():
        if split and not _split_wanted(ck, split, len(ds)):
            continue
        for col, feat in ds.features.items():
            if type(feat).__name__ == "Image":  # the files themselves, not decoded pixels
                ds = ds.cast_column(col, ds_mod.Image(decode=False))
        prefix = f"{split} " if split else ""
        rows += [(f"{prefix}record {i}", _hf_image(rec)) for i, rec in enumerate(ds)]
    return rows


def _split_wanted(ck: _Checker, split: str, n: int) -> bool:
    ck.scan.splits[split] = n
    want = ck.opts.split
    return want is None or split in _SPLITS.get(want, (want,))


def _hf_image(rec: dict[str, Any]) -> dict[str, Any]:
    """An ``Image`` feature stored as {"bytes", "path"} becomes its path."""
    rec = dict(rec)
    for key in ("image", "file_name"):
        v = rec.get(key)
        if isinstance(v, dict) and "path" in v:
            if v.get("path"):
                rec[key] = v["path"]
            else:
                rec[key] = None
                rec["__bad__"] = (f"'{key}' is embedded as bytes without a file path; vlmtune reads image files: "
                                  "keep the images as files and store their paths")
    return rec


def _imagefolder_rows(ck: _Checker, folder: Path) -> list[tuple[str, dict[str, Any]]]:
    for name in ("metadata.jsonl", "metadata.csv"):
        if (folder / name).is_file():
            return _metadata_rows(ck, folder / name, "")
    rows = []
    for split in sorted(p.name for p in folder.iterdir() if (p / "metadata.jsonl").is_file() or (p / "metadata.csv").is_file()):
        meta = folder / split / ("metadata.jsonl" if (folder / split / "metadata.jsonl").is_file() else "metadata.csv")
        part = _metadata_rows(ck, meta, split)
        if _split_wanted(ck, split, len(part)):
            rows += part
    if not rows and not ck.scan.splits:
        raise _bad("no metadata.jsonl or metadata.csv in the folder or its split folders")
    return rows


def _metadata_rows(ck: _Checker, meta: Path, split: str) -> list[tuple[str, dict[str, Any]]]:
    """An imagefolder's metadata: ``file_name`` relative to the metadata file's folder."""
    rows: list[tuple[str, dict[str, Any]]] = []
    if meta.suffix == ".csv":
        raw = [(label.replace("line", f"{meta.name} line"), r) for label, r in _plain_csv(meta)]
    else:
        raw = []
        for n, line in enumerate(_read_text(meta).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                raw.append((f"{meta.name} line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raw.append((f"{meta.name} line {n}", {"__bad__": f"not valid JSON: {e.msg} (column {e.colno})"}))
    # file_name is relative to the metadata file's folder (or to a declared image root);
    # the image root check still applies to where it leads.
    base = ck.base if ck.declared_root else meta.parent.resolve()
    for label, rec in raw:
        if isinstance(rec, dict) and isinstance(rec.get("file_name"), str) and "image" not in rec:
            rec = dict(rec)
            name = rec.pop("file_name")
            rec["image"] = name if Path(name).is_absolute() else str(base / name)
        rows.append((f"{split} {label}" if split else label, rec))
    return rows


def _plain_csv(path: Path) -> list[tuple[str, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    return [(f"line {reader.line_num}", dict(r)) for r in reader]


def _hf_pair(rec: Any) -> dict[str, Any]:
    """A ``datasets`` row in the pairs shape: ``file_name`` is the image, ``captions`` or
    ``sentences`` (a list) the captions."""
    if not isinstance(rec, dict):
        return rec
    rec = dict(rec)
    if "__bad__" in rec:
        raise _bad(rec["__bad__"])
    for alias in ("file_name", "image_path"):
        if alias in rec and "image" not in rec:
            rec["image"] = rec.pop(alias)
    for alias in ("captions", "sentences"):
        if alias in rec:
            if "caption" in rec:
                raise _bad(f"has both 'caption' and '{alias}'; use one")
            rec["caption"] = rec.pop(alias)
    unread_fields(rec, {"image", "caption", "text", "bbox", "relation"}, "hf")
    return rec
