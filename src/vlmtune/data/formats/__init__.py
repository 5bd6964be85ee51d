"""Readers of the annotation formats, and a safe image loader.

Every problem with the user's data is a :class:`~vlmtune.errors.DataError` with a
one-line message that names the file and the record (JSON list index, 0-based) or the
line (JSONL, 1-based), so the CLI can print it without a traceback.

Each check exists once. A file is *scanned* record by record (:func:`scan_pairs`,
:func:`scan_counting`): every field check runs on its own and what it finds becomes a
:class:`Problem`, so one pass lists every problem of the file. The readers
(:func:`read_pairs`, :func:`read_counting`) are that scan plus a policy:

- ``on_error="raise"`` (the default): any problem stops with one DataError naming the
  file, the number of problems and the first. Images get a cheap header check up front
  (exists, is an image, size, not a decompression bomb); a truncated or corrupt body is
  found when :func:`load_image` decodes it, and is a DataError naming file and record.
- ``on_error="skip"``: every image is fully decoded up front, so the records left out
  are known before training starts; they are logged (count and the first few) and the
  rest is returned.

``vlmtune data validate`` (:mod:`vlmtune.data.validate`) runs the same scan with full
decoding and prints every problem, plus notes such as images converted to RGB.

The formats, read as they ship (one module each, registered in :mod:`.catalog`; see
:mod:`.registry` for what a format declares and how detection asks them):

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
| ``internvl`` | InternVL's meta JSON (entries ``root`` + ``annotation``, read as one set) or its conversation JSONL | captions, boxes (0-1000), counts from the turns |
| ``llava`` | LLaVA's JSON list of ``{"image", "conversations"}`` | as internvl |
| ``swift`` | ms-swift JSONL: ``messages`` + ``images``, ``objects`` (``bbox_type`` real / norm1000), embedding records | as internvl; negatives carried |
| ``sharegpt`` | ``conversation`` / ``conversations`` with user / assistant turns (JSON list or JSONL) | as internvl |
| ``webdataset`` | a folder of ``.tar`` shards, one shard, or ``shards/{00000..00009}.tar``, read in place | one per sample |
| ``flickr30k`` | ``results_20130124.token`` / Kaggle's ``results.csv`` | one per caption line |

Each format's reader turns a file into :class:`Item` s in the documented pairs shape
(``image``, ``caption`` or ``text``, ``bbox`` with its ``box_convention`` -- converted to
pixel x, y, w, h by the box contract, :mod:`.boxes` --, ``relation``, ``negatives``) or counting shape
(``image``, ``count``, ``question``, ``answer``); the same checks then run on every
format, so all get the same errors, notes and ``data.on_error`` policy. Nothing is
dropped without a word: a field that carries boxes, relations, captions or counts which
the chosen format does not read is an error naming the field and the formats that read it.

Importing this package loads no image library: the names that need Pillow (the image
loader, the checker, the readers) load on first use, so ``data.format`` validation
(:func:`~vlmtune.data.formats.registry.format_names`) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlmtune.data.formats import catalog as catalog
from vlmtune.data.formats.fields import Bad
from vlmtune.data.formats.hf import hf_rows
from vlmtune.data.formats.records import (
    MAX_TEXT_CHARS,
    RELATIONS,
    CountRecord,
    Duplicates,
    Item,
    Kind,
    OnError,
    PairRecord,
    Problem,
    ReadOptions,
    Scan,
    options_from_config,
)
from vlmtune.data.formats.refcoco import SafeUnpickler, load_plain_pickle
from vlmtune.data.formats.registry import FORMATS, Format, Probe, carriers, detect, format_names, unread_fields
from vlmtune.utils import lazy_exports

if TYPE_CHECKING:
    from vlmtune.data.formats.checker import Checker
    from vlmtune.data.formats.images import image_size, load_image, to_rgb
    from vlmtune.data.formats.reader import read_counting, read_pairs, scan_counting, scan_pairs

# The names that need Pillow, by the module that defines them (imported on first use).
_LAZY = {
    "load_image": "images",
    "image_size": "images",
    "to_rgb": "images",
    "Checker": "checker",
    "read_pairs": "reader",
    "read_counting": "reader",
    "scan_pairs": "reader",
    "scan_counting": "reader",
}

__all__ = [
    "FORMATS",
    "MAX_TEXT_CHARS",
    "RELATIONS",
    "Bad",
    "Checker",
    "CountRecord",
    "Duplicates",
    "Format",
    "Item",
    "Kind",
    "OnError",
    "PairRecord",
    "Probe",
    "Problem",
    "ReadOptions",
    "SafeUnpickler",
    "Scan",
    "carriers",
    "detect",
    "format_names",
    "hf_rows",
    "image_size",
    "load_image",
    "load_plain_pickle",
    "options_from_config",
    "read_counting",
    "read_pairs",
    "scan_counting",
    "scan_pairs",
    "to_rgb",
    "unread_fields",
]


__getattr__ = lazy_exports(__name__, _LAZY)
