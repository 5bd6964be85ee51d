"""Readers of the documented annotation formats, and a safe image loader.

Every problem with the user's data is raised as :class:`~vlmtune.errors.DataError` with a
one-line message that names the file and the record (JSON list index, 0-based) or the
line (JSONL, 1-based), so the CLI can print it without a traceback.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlmtune.errors import DataError

RELATIONS: tuple[str, ...] = ("left", "right", "above", "below", "inside", "outside")

# EXIF orientations 5..8 rotate by 90 degrees, so the loaded image has width and height
# swapped with respect to the stored header.
_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}

# What Pillow's decoders raise on truncated or corrupt data (besides OSError subclasses).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)

# Slack for float boxes that touch the image border.
_EPS = 1e-6


@dataclass(frozen=True)
class PairRecord:
    """One image-text pair; retrieval and grounding share it."""

    image: Path
    text: str
    image_id: int
    bbox: tuple[float, float, float, float] | None
    relation: int | None
    source: str


@dataclass(frozen=True)
class CountRecord:
    """One counting question about an image."""

    image: Path
    question: str
    answer: str
    count: int
    source: str


# --------------------------------------------------------------------------- images


def _where(path: Path, source: str) -> str:
    """Prefix for image errors: the image, plus the annotation record when known."""
    return f"{source}: image {path}" if source else f"{path}"


def _open(path: Path, source: str) -> Image.Image:
    """Open an image lazily (header only), mapping every failure to DataError."""
    where = _where(path, source)
    try:
        with warnings.catch_warnings():
            # A huge image is refused rather than half-trusted: the warning becomes an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except FileNotFoundError:
        raise DataError(f"{where}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{where}: is a directory, not an image") from None
    except UnidentifiedImageError:
        raise DataError(f"{where}: not an image or unsupported format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{where}: too many pixels (possible decompression bomb): {e}") from None
    except _DECODE_ERRORS as e:
        raise DataError(f"{where}: cannot read image: {e}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without clipping or black transparency."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16") or (mode == "I" and arr.min() >= 0 and arr.max() <= 65535):
            # 16-bit data: map the full 0..65535 range onto 0..255 (plain convert clips).
            arr = arr / 257.0
        else:
            # Signed or float data has no fixed range: stretch what is there.
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return img.convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in img.info
    )
    if has_alpha:
        # Transparent pixels are composited onto white, as a viewer would show them.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if mode == "RGB" else img.convert("RGB")


def load_image(path: Path, source: str = "") -> Image.Image:
    """Open an image fully, apply its EXIF orientation and return it as 8-bit RGB.

    Raises DataError naming the file (and ``source``, e.g. ``"train.json: record 3"``)
    when the file is missing, truncated, corrupt, not an image or too large.
    """
    path = Path(path)
    where = _where(path, source)
    img = _open(path, source)
    try:
        with img, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
            # exif_transpose returns a new image, so nothing refers to the closed file.
            out = _to_rgb(ImageOps.exif_transpose(img))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{where}: too many pixels (possible decompression bomb): {e}") from None
    except _DECODE_ERRORS as e:
        raise DataError(f"{where}: truncated or corrupt image: {e}") from None
    return out


def _image_size(path: Path, source: str, cache: dict[Path, tuple[int, int]]) -> tuple[int, int]:
    """Width and height as load_image will return them, read from the header only."""
    if path not in cache:
        with _open(path, source) as img:
            w, h = img.size
            # Only look at EXIF already parsed from the header: asking a PNG for EXIF
            # that sits after the pixel data would decode the whole image.
            if "exif" in img.info:
                try:
                    if img.getexif().get(_EXIF_ORIENTATION) in _SWAPPING_ORIENTATIONS:
                        w, h = h, w
                except _DECODE_ERRORS:
                    pass  # unreadable EXIF: load_image will report it if it matters
        cache[path] = (w, h)
    return cache[path]


# --------------------------------------------------------------------------- helpers


def _read_json(path: Path) -> Any:
    """Parse a whole JSON file, with DataErrors for missing or malformed files."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not an annotation file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text: {e}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})"
        ) from None


def _type_name(value: Any) -> str:
    """JSON name of a Python value's type, for error messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "number"
    return names.get(type(value), type(value).__name__)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _nonempty_str(rec: dict[str, Any], key: str, src: str) -> str:
    """A required, non-blank string field, stripped."""
    if key not in rec:
        raise DataError(f"{src}: missing '{key}'")
    value = rec[key]
    if not isinstance(value, str):
        raise DataError(f"{src}: '{key}' must be a string, got {_type_name(value)}")
    if not value.strip():
        raise DataError(f"{src}: '{key}' is empty")
    return value.strip()


def _image_path(rec: dict[str, Any], key: str, base: Path, src: str) -> Path:
    """The record's image, resolved against the annotation file's folder; must exist."""
    image = Path(_nonempty_str(rec, key, src))
    path = (image if image.is_absolute() else base / image).resolve()
    if not path.is_file():
        raise DataError(f"{src}: image not found: {path}")
    return path


def _texts(rec: dict[str, Any], src: str) -> list[str]:
    """The caption(s) of a retrieval record or the text of a grounding record."""
    if "caption" in rec and "text" in rec:
        raise DataError(f"{src}: has both 'caption' and 'text'; use one")
    if "text" in rec:
        return [_nonempty_str(rec, "text", src)]
    if "caption" not in rec:
        raise DataError(f"{src}: missing 'caption' (retrieval) or 'text' (grounding)")
    caption = rec["caption"]
    if isinstance(caption, str):
        return [_nonempty_str(rec, "caption", src)]
    if not isinstance(caption, list):
        raise DataError(
            f"{src}: 'caption' must be a string or a list of strings, got {_type_name(caption)}"
        )
    if not caption:
        raise DataError(f"{src}: 'caption' is an empty list")
    out = []
    for i, c in enumerate(caption):
        if not isinstance(c, str):
            raise DataError(f"{src}: caption {i} must be a string, got {_type_name(c)}")
        if not c.strip():
            raise DataError(f"{src}: caption {i} is empty")
        out.append(c.strip())
    return out


def _bbox(
    rec: dict[str, Any], image: Path, src: str, sizes: dict[Path, tuple[int, int]]
) -> tuple[float, float, float, float] | None:
    """Validate an optional [x, y, w, h] pixel box against the image's size."""
    box = rec.get("bbox")
    if box is None:
        return None
    if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
        raise DataError(f"{src}: 'bbox' must be 4 numbers [x, y, w, h], got {json.dumps(box)}")
    x, y, w, h = (float(v) for v in box)
    if x < 0 or y < 0:
        raise DataError(f"{src}: bbox has negative coordinates {json.dumps(box)}")
    if w <= 0 or h <= 0:
        raise DataError(
            f"{src}: bbox has zero area (width and height must be > 0): {json.dumps(box)}"
        )
    img_w, img_h = _image_size(image, src, sizes)
    if x + w > img_w + _EPS or y + h > img_h + _EPS:
        raise DataError(
            f"{src}: bbox {json.dumps(box)} extends outside the image ({img_w}x{img_h} pixels)"
        )
    return (x, y, w, h)


def _relation(rec: dict[str, Any], src: str) -> int | None:
    """Index of an optional relation label in RELATIONS."""
    rel = rec.get("relation")
    if rel is None:
        return None
    if not isinstance(rel, str) or rel not in RELATIONS:
        raise DataError(
            f"{src}: unknown relation {json.dumps(rel)}; expected one of {', '.join(RELATIONS)}"
        )
    return RELATIONS.index(rel)


# --------------------------------------------------------------------------- readers


def _pairs_from_list(data: list[Any], path: Path) -> list[PairRecord]:
    """Retrieval and grounding lists; each record's own keys decide its kind."""
    base = path.parent
    ids: dict[Path, int] = {}
    sizes: dict[Path, tuple[int, int]] = {}
    out: list[PairRecord] = []
    for i, rec in enumerate(data):
        src = f"{path}: record {i}"
        if not isinstance(rec, dict):
            raise DataError(f"{src}: must be an object, got {_type_name(rec)}")
        texts = _texts(rec, src)
        image = _image_path(rec, "image", base, src)
        bbox = _bbox(rec, image, src, sizes)
        relation = _relation(rec, src)
        image_id = ids.setdefault(image, len(ids))
        out.extend(PairRecord(image, t, image_id, bbox, relation, src) for t in texts)
    return out


def _pairs_from_coco(data: dict[str, Any], path: Path) -> list[PairRecord]:
    """COCO captions: ``record N`` is the N-th entry of ``annotations``."""
    base = path.parent
    images, annotations = data["images"], data["annotations"]
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise DataError(f"{path}: COCO 'images' and 'annotations' must be arrays")
    files: dict[int, Any] = {}
    for j, entry in enumerate(images):
        src = f"{path}: image entry {j}"
        if not isinstance(entry, dict):
            raise DataError(f"{src}: must be an object, got {_type_name(entry)}")
        if "id" not in entry or not isinstance(entry["id"], int) or isinstance(entry["id"], bool):
            raise DataError(f"{src}: missing or non-integer 'id'")
        if entry["id"] in files:
            raise DataError(f"{src}: duplicate image id {entry['id']}")
        _nonempty_str(entry, "file_name", src)
        files[entry["id"]] = entry
    ids: dict[Path, int] = {}
    resolved: dict[int, Path] = {}
    out: list[PairRecord] = []
    for i, ann in enumerate(annotations):
        src = f"{path}: record {i}"
        if not isinstance(ann, dict):
            raise DataError(f"{src}: must be an object, got {_type_name(ann)}")
        if "image_id" not in ann:
            raise DataError(f"{src}: missing 'image_id'")
        key = ann["image_id"]
        if isinstance(key, bool) or not isinstance(key, int) or key not in files:
            raise DataError(f"{src}: image_id {json.dumps(key)} is not in 'images'")
        text = _nonempty_str(ann, "caption", src)
        if key not in resolved:
            resolved[key] = _image_path(files[key], "file_name", base, src)
        image = resolved[key]
        out.append(PairRecord(image, text, ids.setdefault(image, len(ids)), None, None, src))
    return out


def read_pairs(path: str | Path) -> list[PairRecord]:
    """Read a retrieval, grounding or COCO-captions JSON file into image-text pairs.

    The format is detected from the top level (list of records or COCO dict) and each
    record's keys (``caption`` or ``text``). A caption list gives one pair per caption.
    ``image_id`` numbers distinct images 0..n-1 in order of first appearance.
    """
    path = Path(path)
    data = _read_json(path)
    if isinstance(data, list):
        records = _pairs_from_list(data, path)
    elif isinstance(data, dict) and "images" in data and "annotations" in data:
        records = _pairs_from_coco(data, path)
    elif isinstance(data, dict):
        raise DataError(
            f"{path}: top level is an object but not COCO captions (needs 'images' and "
            "'annotations'); expected a list of records"
        )
    else:
        raise DataError(f"{path}: top level must be a list of records, got {_type_name(data)}")
    if not records:
        raise DataError(f"{path}: no records")
    return records


def read_counting(path: str | Path, max_count: int | None = None) -> list[CountRecord]:
    """Read a counting JSONL file: one ``{"image", "question", "answer", "count"}`` per line.

    Blank lines are skipped; errors name the 1-based line number.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text: {e}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    base = path.parent
    out: list[CountRecord] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        src = f"{path}: line {n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{src}: not valid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{src}: must be an object, got {_type_name(rec)}")
        question = _nonempty_str(rec, "question", src)
        answer = _nonempty_str(rec, "answer", src)
        if "count" not in rec:
            raise DataError(f"{src}: missing 'count'")
        count = rec["count"]
        if isinstance(count, bool) or not isinstance(count, int):
            raise DataError(f"{src}: 'count' must be an integer, got {json.dumps(count)}")
        if count < 0:
            raise DataError(f"{src}: 'count' is negative ({count})")
        if max_count is not None and count > max_count:
            raise DataError(f"{src}: 'count' {count} is above max_count {max_count}")
        image = _image_path(rec, "image", base, src)
        out.append(CountRecord(image, question, answer, count, src))
    if not out:
        raise DataError(f"{path}: no records")
    return out
