"""Readers of the documented annotation formats, and a safe image loader.

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
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlmtune.errors import DataError

log = logging.getLogger(__name__)

RELATIONS: tuple[str, ...] = ("left", "right", "above", "below", "inside", "outside")

# Longest caption, question or answer accepted, in characters (config: data.max_text_chars).
MAX_TEXT_CHARS = 1000

OnError = Literal["raise", "skip"]
Duplicates = Literal["error", "keep", "drop"]


@dataclass(frozen=True)
class ReadOptions:
    """How a file is read, beyond its records: the ``data.*`` keys a reader needs.

    ``image_root``: the folder image paths resolve against (default: the annotation
    file's folder; a folder annotation, e.g. a ``datasets`` folder, is its own root).
    ``format``: ``auto`` detects it from the file's shape. ``split``: for files that hold
    every split (Karpathy, refer, ``datasets`` dicts), the one to take; None takes all.
    ``question_templates`` / ``answer_templates``: counting records without a question
    or answer get one from these (None: the synthetic set's own, ``vlmtune.data.receipts``).
    """

    image_root: str | Path | None = None
    format: str = "auto"
    split: str | None = None
    box_tolerance_px: float = 0.0
    duplicates: Duplicates = "error"
    max_text_chars: int = MAX_TEXT_CHARS
    question_templates: tuple[str, ...] | None = None
    answer_templates: dict[str, tuple[str, ...]] | None = None

# EXIF orientations 5..8 rotate by 90 degrees, so the loaded image has width and height
# swapped with respect to the stored header.
_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}

# What Pillow's decoders raise on truncated or corrupt data (besides OSError subclasses).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)

# Slack for float boxes that touch the image border.
_EPS = 1e-6

# How many skipped records a reader names in its log before "... and N more".
_LOG_FIRST = 5


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


@dataclass(frozen=True)
class Problem:
    """One thing wrong (``level="error"``) or worth knowing (``"note"``) in a data file.

    ``where`` is ``"FILE: record N"``, ``"FILE: line N"``, ``"FILE: image entry N"`` or
    just ``"FILE"`` for the file as a whole; ``str(problem)`` is the one-line message.
    """

    where: str
    message: str
    level: Literal["error", "note"] = "error"

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class Scan:
    """What a scan of one annotation file found: the good records and every problem.

    ``n_records`` counts the file's records (list entries, COCO annotations or non-blank
    JSONL lines), good or bad. A record with an error is not in ``records``.
    """

    path: Path
    n_records: int = 0
    records: list[Any] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    # The format the file was read as (``data.format``, or what ``auto`` detected).
    format: str = ""
    # What a reader changed or left out on purpose, by name: boxes clipped within
    # data.box_tolerance_px, duplicates dropped, null boxes skipped, questions templated.
    counts: dict[str, int] = field(default_factory=dict)
    # Records per split, for files that hold several (Karpathy, refer).
    splits: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "error"]

    @property
    def notes(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "note"]

    @property
    def bad_sources(self) -> list[str]:
        """The records (and file-level spots) with at least one error, in file order."""
        return list(dict.fromkeys(p.where for p in self.errors))


class _Bad(Exception):
    """A problem found by one check; the scan adds where it is."""


def options_from_config(data: Any, counting: Any = None, split: str | None = None,
                        image_root: str | Path | None = None) -> ReadOptions:
    """ReadOptions from the ``data`` (and ``counting``) config sections; ``image_root``
    overrides data.image_root (the ``--image-root`` option)."""
    return ReadOptions(
        image_root=image_root if image_root is not None else data.image_root, format=data.format, split=split,
        box_tolerance_px=data.box_tolerance_px, duplicates=data.duplicates, max_text_chars=data.max_text_chars,
        question_templates=tuple(counting.question_templates) if counting is not None else None,
        answer_templates={k: tuple(v) for k, v in counting.answer_templates.items()} if counting is not None else None)


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
    if _has_alpha(img):
        # Transparent pixels are composited onto white, as a viewer would show them.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if mode == "RGB" else img.convert("RGB")


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode in ("P", "L", "RGB") and "transparency" in img.info
    )


def _decode(path: Path, source: str) -> Image.Image:
    """Open and fully decode an image with its EXIF orientation applied (mode unchanged)."""
    where = _where(path, source)
    img = _open(path, source)
    try:
        with img, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
            # exif_transpose returns a new image, so nothing refers to the closed file.
            out = ImageOps.exif_transpose(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{where}: too many pixels (possible decompression bomb): {e}") from None
    except _DECODE_ERRORS as e:
        raise DataError(f"{where}: truncated or corrupt image: {e}") from None
    return out


def load_image(path: Path, source: str = "") -> Image.Image:
    """Open an image fully, apply its EXIF orientation and return it as 8-bit RGB.

    Raises DataError naming the file (and ``source``, e.g. ``"train.json: record 3"``)
    when the file is missing, truncated, corrupt, not an image or too large.
    """
    return _to_rgb(_decode(Path(path), source))


def image_size(path: str | Path, source: str = "") -> tuple[int, int]:
    """(width, height) of the image exactly as :func:`load_image` returns it -- its EXIF
    orientation applied, so a phone photo stored landscape with orientation 6 or 8 is
    portrait -- read from the header wherever the format allows.

    Every place that turns a box in pixels into a normalised one uses this (the
    feature cache, the baselines) or the loaded image's own size (live loading), so
    the two paths give the same targets. Raises DataError naming the file.
    """
    path = Path(path)
    with _open(path, source) as img:
        return _header_size(img, path)


def _header_size(img: Image.Image, path: Path | None = None) -> tuple[int, int]:
    """Width and height as load_image will return them, from the header where it can."""
    w, h = img.size
    if img.format == "PNG" and "exif" not in img.info:
        # EXIF may sit after the pixel data (an eXIf chunk after IDAT), where the header
        # parse does not reach and load_image's exif_transpose does: look for the chunk
        # (a walk over chunk headers, no decompression); if there is one, decode.
        if path is None or not _png_has_exif_chunk(path):
            return w, h
        return _decode(path, "").size
    if img.format not in _HEADER_EXIF_FORMATS and "exif" not in img.info:
        return w, h
    try:
        if img.getexif().get(_EXIF_ORIENTATION) in _SWAPPING_ORIENTATIONS:
            w, h = h, w
    except _DECODE_ERRORS:
        pass  # unreadable EXIF: exif_transpose ignores it too
    return w, h


# Formats whose EXIF (with the orientation) Pillow reads with the header. (Not TIFF:
# Pillow reports a TIFF's size with its orientation already applied.)
_HEADER_EXIF_FORMATS = {"JPEG", "MPO", "WEBP"}


def _png_has_exif_chunk(path: Path) -> bool:
    """Whether a PNG file has an eXIf chunk anywhere (chunk headers only)."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return False
            while True:
                head = f.read(8)
                if len(head) < 8:
                    return False
                length, kind = struct.unpack(">I4s", head)
                if kind == b"eXIf":
                    return True
                if kind == b"IEND":
                    return False
                f.seek(length + 4, os.SEEK_CUR)
    except OSError:
        return False


def _mode_note(img: Image.Image) -> str | None:
    """What load_image does to an image that is not plain 8-bit RGB (None when RGB)."""
    mode = img.mode
    if mode == "RGB" and not _has_alpha(img):
        return None
    if mode.startswith("I;16") or mode in ("I", "F"):
        how = "16-bit/integer/float values scaled to 8 bits"
    elif _has_alpha(img):
        how = "transparent pixels composited onto white"
    elif mode == "P":
        how = "palette expanded"
    elif mode in ("L", "1"):
        how = "grey copied to the three channels"
    else:
        how = "converted by Pillow"
    return f"mode {mode} is converted to RGB ({how})"


@dataclass(frozen=True)
class _ImageInfo:
    size: tuple[int, int]
    note: str | None


def _inspect_image(path: Path, deep: bool) -> _ImageInfo:
    """Size and mode note of an image: from the header, or (``deep``) by decoding it all.

    Raises DataError whose message starts with the path.
    """
    if deep:
        img = _decode(path, "")
        return _ImageInfo(img.size, _mode_note(img))
    with _open(path, "") as img:
        return _ImageInfo(_header_size(img, path), _mode_note(img))


# --------------------------------------------------------------------------- field checks
# Each raises _Bad with a message that does not say where; the scan adds the record.


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise _Bad("annotation file not found") from None
    except IsADirectoryError:
        raise _Bad("is a directory, not an annotation file") from None
    except UnicodeDecodeError as e:
        raise _Bad(f"not UTF-8 text: {e}") from None
    except OSError as e:
        raise _Bad(f"cannot read: {e.strerror or e}") from None


def _type_name(value: Any) -> str:
    """JSON name of a Python value's type, for error messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "number"
    return names.get(type(value), type(value).__name__)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _object(rec: Any) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise _Bad(f"must be an object, got {_type_name(rec)}")
    return rec


def _nonempty_str(rec: dict[str, Any], key: str) -> str:
    """A required, non-blank string field, stripped."""
    if key not in rec:
        raise _Bad(f"missing '{key}'")
    value = rec[key]
    if not isinstance(value, str):
        raise _Bad(f"'{key}' must be a string, got {_type_name(value)}")
    if not value.strip():
        raise _Bad(f"'{key}' is empty")
    return value.strip()


def _not_too_long(text: str, what: str, limit: int) -> str:
    if len(text) > limit:
        raise _Bad(f"{what} is {len(text)} characters long, more than data.max_text_chars ({limit})")
    return text


def _text_field(rec: dict[str, Any], key: str, limit: int) -> str:
    return _not_too_long(_nonempty_str(rec, key), f"'{key}'", limit)


def _texts(rec: dict[str, Any], limit: int) -> list[str]:
    """The caption(s) of a retrieval record or the text of a grounding record."""
    if "caption" in rec and "text" in rec:
        raise _Bad("has both 'caption' and 'text'; use one")
    if "text" in rec:
        return [_text_field(rec, "text", limit)]
    if "caption" not in rec:
        raise _Bad("missing 'caption' (retrieval) or 'text' (grounding)")
    caption = rec["caption"]
    if isinstance(caption, str):
        return [_text_field(rec, "caption", limit)]
    if not isinstance(caption, list):
        raise _Bad(f"'caption' must be a string or a list of strings, got {_type_name(caption)}")
    if not caption:
        raise _Bad("'caption' is an empty list")
    out = []
    for i, c in enumerate(caption):
        if not isinstance(c, str):
            raise _Bad(f"caption {i} must be a string, got {_type_name(c)}")
        if not c.strip():
            raise _Bad(f"caption {i} is empty")
        out.append(_not_too_long(c.strip(), f"caption {i}", limit))
    return out


def _bbox(rec: dict[str, Any], size: tuple[int, int] | None,
          tolerance: float = 0.0) -> tuple[tuple[float, float, float, float] | None, bool]:
    """An optional [x, y, w, h] pixel box, checked against the image's size when known.

    Returns (box, clipped): a box that overruns the image (or starts left of or above
    it) by at most ``tolerance`` pixels is clipped to the image; beyond that it is an error.
    """
    box = rec.get("bbox")
    if box is None:
        return None, False
    if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
        raise _Bad(f"'bbox' must be 4 numbers [x, y, w, h], got {json.dumps(box)}")
    return _pixel_box(tuple(float(v) for v in box), json.dumps(box), size, tolerance)  # type: ignore[arg-type]


def _pixel_box(box: tuple[float, float, float, float], shown: str, size: tuple[int, int] | None,
               tolerance: float) -> tuple[tuple[float, float, float, float], bool]:
    x, y, w, h = box
    slack = tolerance + _EPS
    if x < -slack or y < -slack:
        raise _Bad(f"bbox has negative coordinates {shown}")
    if w <= 0 or h <= 0:
        raise _Bad(f"bbox has zero area (width and height must be > 0): {shown}")
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), x + w, y + h
    if size is not None:
        img_w, img_h = size
        if x2 > img_w + slack or y2 > img_h + slack:
            raise _Bad(f"bbox {shown} extends outside the image ({img_w}x{img_h} pixels)")
        x2, y2 = min(x2, float(img_w)), min(y2, float(img_h))
        if x2 <= x1 or y2 <= y1:
            raise _Bad(f"bbox {shown} lies outside the image ({img_w}x{img_h} pixels)")
    clipped = (x1, y1, x2 - x1, y2 - y1)
    moved = max(abs(a - b) for a, b in zip(clipped, box)) > _EPS
    return (clipped if moved else box), moved


def _norm_box(rec: dict[str, Any], size: tuple[int, int] | None,
              tolerance: float) -> tuple[tuple[float, float, float, float] | None, bool]:
    """A GeoText box: [cx, cy, w, h] as fractions of the image, converted to pixel xywh."""
    box = rec.get("bbox_norm")
    if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
        raise _Bad(f"box must be 4 numbers [cx, cy, w, h] (fractions of the image) or null, got {json.dumps(box)}")
    if any(v < -1e-3 or v > 1 + 1e-3 for v in box):
        raise _Bad(f"box {json.dumps(box)} is not normalised to 0-1 [cx, cy, w, h]")
    if size is None:
        return None, False
    cx, cy, w, h = (float(v) for v in box)
    img_w, img_h = size
    pixels = ((cx - w / 2) * img_w, (cy - h / 2) * img_h, w * img_w, h * img_h)
    return _pixel_box(pixels, f"{json.dumps(box)} (normalised; {[round(v, 2) for v in pixels]} in pixels)", size, tolerance)


def _relation(rec: dict[str, Any]) -> int | None:
    """Index of an optional relation label in RELATIONS."""
    rel = rec.get("relation")
    if rel is None:
        return None
    if not isinstance(rel, str) or rel not in RELATIONS:
        raise _Bad(f"unknown relation {json.dumps(rel)}; expected one of {', '.join(RELATIONS)}")
    return RELATIONS.index(rel)


def _count(rec: dict[str, Any], max_count: int | None) -> int:
    if "count" not in rec:
        raise _Bad("missing 'count'")
    count = rec["count"]
    if isinstance(count, str) and re.fullmatch(r"\s*\+?\d+\s*", count):
        count = int(count)  # a count written as text (a CSV cell, a JSON string) is read as its integer
    if isinstance(count, bool) or not isinstance(count, int):
        raise _Bad(f"'count' must be an integer (a whole number), got {json.dumps(count)}")
    if count < 0:
        raise _Bad(f"'count' is negative ({count})")
    if max_count is not None and count > max_count:
        raise _Bad(f"'count' {count} is above max_count {max_count}")
    return count


T = TypeVar("T")


@dataclass(frozen=True)
class Item:
    """One record as a format reader hands it to the checks.

    ``label`` names it in messages (``record 3``, ``line 4``, ``record 2 sentence 1``);
    ``get()`` returns its fields in the documented pairs or counting shape, or raises
    ``_Bad`` for what is wrong with the record as its format has it. ``new`` is False for
    the further records one source record yields (a GeoText sentence), so counts stay
    per source record.
    """

    label: str
    get: Callable[[], dict[str, Any]]
    new: bool = True


class _Checker:
    """Runs the field checks of one file's records and collects what they find.

    Images are checked once per distinct file (header, or full decode when ``deep``);
    every record that uses a bad image gets the error, the first that uses an image
    not in RGB gets the note.
    """

    def __init__(self, path: Path, deep: bool, max_text_chars: int, opts: ReadOptions | None = None):
        self.path = path
        self.opts = opts or ReadOptions(max_text_chars=max_text_chars)
        self.declared_root = self.opts.image_root is not None
        # The declared root is resolved first, so a root that is itself a symlink (to
        # shared storage) works; every image must then stay inside what it points at.
        root = Path(self.opts.image_root) if self.declared_root else (path if path.is_dir() else path.parent)
        self.base = root.resolve()
        self.deep = deep
        self.max_text_chars = max_text_chars
        self.scan = Scan(path)
        self._images: dict[Path, _ImageInfo | str] = {}
        self._seen: dict[tuple[Any, ...], str] = {}
        self._where = ""
        self._bad = False

    def start(self, where: str, new: bool = True) -> None:
        """Begin a record: checks until the next start() are reported at ``where``."""
        self._where, self._bad = where, False
        self.scan.n_records += int(new)

    def count(self, what: str, n: int = 1) -> None:
        self.scan.counts[what] = self.scan.counts.get(what, 0) + n

    @property
    def ok(self) -> bool:
        return not self._bad

    def error(self, message: str, where: str | None = None) -> None:
        self.scan.problems.append(Problem(where or self._where, message))
        self._bad = True

    def check(self, fn: Callable[..., T], *args: Any) -> T | None:
        """``fn(*args)``, or None after recording its problem."""
        try:
            return fn(*args)
        except _Bad as e:
            self.error(str(e))
            return None

    def root_problem(self) -> str | None:
        """Why the declared image root cannot be used, or None."""
        if self.declared_root and not self.base.is_dir():
            return f"data.image_root {self.opts.image_root}: not a folder"
        return None

    def image_path(self, rec: dict[str, Any], key: str) -> Path:
        """The record's image, resolved (symlinks too) against the image root: the
        declared ``data.image_root``, else the annotation file's folder.

        It must stay inside that folder: an annotation file cannot point at files elsewhere.
        """
        text = _nonempty_str(rec, key)
        shown = text if len(text) <= 80 else text[:77] + "..."
        if "\x00" in text:
            raise _Bad(f"image path {shown!r} contains a NUL character")
        image = Path(text)
        try:
            path = (image if image.is_absolute() else self.base / image).resolve()
            if not path.is_relative_to(self.base):
                raise _Bad(f"image path '{shown}' leads outside the data set's folder {self.base} (to {str(path)[:120]})")
            if not path.is_file():
                hint = "" if self.declared_root else f" (image paths resolve against {self.base}; set data.image_root or --image-root)"
                raise _Bad(f"image not found: {str(path)[:200]}{hint}")
        except (OSError, RuntimeError) as e:  # a name too long for the file system, a link loop
            reason = "a symbolic link loop" if isinstance(e, RuntimeError) or e.errno == 40 else (e.strerror or str(e))
            raise _Bad(f"image path '{shown}': {reason.lower()}") from None
        return path

    def image_size(self, path: Path) -> tuple[int, int]:
        if path not in self._images:
            try:
                info: _ImageInfo | str = _inspect_image(path, self.deep)
            except DataError as e:
                info = str(e)
            self._images[path] = info
            if isinstance(info, _ImageInfo) and info.note:
                self.scan.problems.append(Problem(self._where, f"image {path.name}: {info.note}", "note"))
        info = self._images[path]
        if isinstance(info, str):
            raise _Bad(f"image {info}")
        return info.size

    def box(self, rec: dict[str, Any], size: tuple[int, int] | None) -> tuple[float, float, float, float] | None:
        """The record's pixel box (``bbox``, or GeoText's ``bbox_norm`` converted), clipped
        within data.box_tolerance_px (and counted)."""
        tol = self.opts.box_tolerance_px
        box, clipped = _norm_box(rec, size, tol) if "bbox_norm" in rec else _bbox(rec, size, tol)
        if clipped:
            self.count("boxes clipped to the image")
        return box

    def unique(self, key: tuple[Any, ...], what: str, label: str) -> bool:
        """Refuse a second record with the same ``key`` (``label`` names this one), or,
        per data.duplicates, keep it or drop it (counted); False when dropped."""
        policy = self.opts.duplicates
        if policy == "keep":
            return True
        first = self._seen.get(key)
        if first is not None:
            if policy == "drop":
                self.count("duplicates dropped")
                return False
            raise _Bad(f"duplicate of {first} (same {what}; data.duplicates=keep or drop allows it)")
        self._seen[key] = label
        return True


# --------------------------------------------------------------------------- scans


def _pair_rows(ck: _Checker, label: str, texts: list[str] | None, image: Path | None, bbox: Any,
               relation: int | None) -> list[tuple[Path, str, Any, int | None, str]]:
    """The pairs of one checked record (one per caption), or [] when it has an error."""
    if not ck.ok or texts is None or image is None:
        return []
    what = "image and text" if bbox is None else "image, text and bbox"
    labels = [label if len(texts) == 1 else f"{label} caption {j}" for j in range(len(texts))]
    keep = []
    for text, lab in zip(texts, labels):
        keep.append(ck.check(ck.unique, ("pair", image, text, bbox), what, lab))
    if not ck.ok:
        return []
    where = f"{ck.path}: {label}"
    return [(image, text, bbox, relation, where) for text, k in zip(texts, keep) if k]


def _objects(ck: _Checker, items: Iterable[Item]) -> Iterable[tuple[Item, dict[str, Any]]]:
    """Each item that reads as a JSON-like object, with the checker started on it."""
    for it in items:
        ck.start(f"{ck.path}: {it.label}", it.new)
        rec = ck.check(it.get)
        if rec is not None:
            rec = ck.check(_object, rec)
        if rec is not None:
            yield it, rec


def _scan_pair_items(ck: _Checker, items: Iterable[Item]) -> list[tuple[Path, str, Any, int | None, str]]:
    """Image-text records in the documented shape, whatever format they came from."""
    rows = []
    for it, rec in _objects(ck, items):
        texts = ck.check(_texts, rec, ck.max_text_chars)
        image = ck.check(ck.image_path, rec, "image")
        size = ck.check(ck.image_size, image) if image is not None else None
        bbox = ck.check(ck.box, rec, size) if ("bbox" in rec or "bbox_norm" in rec) else None
        relation = ck.check(_relation, rec)
        rows += _pair_rows(ck, it.label, texts, image, bbox, relation)
    return rows


def _open_scan(path: str | Path, deep: bool, opts: ReadOptions,
               items_of: Callable[[_Checker, Path], Iterable[Item]]) -> tuple[_Checker, Iterable[Item] | None]:
    """The checker of one file and its items (``items_of``: the format's reader), or
    None for the items when the file itself is the problem (recorded in the scan)."""
    path = Path(path)
    ck = _Checker(path, deep, opts.max_text_chars, opts)
    if (why := ck.root_problem()) is not None:
        ck.error(why, str(path))
        return ck, None
    try:
        return ck, items_of(ck, path)
    except _Bad as e:
        ck.error(str(e), str(path))
        return ck, None


def scan_pairs(path: str | Path, deep: bool = False, max_text_chars: int = MAX_TEXT_CHARS,
               opts: ReadOptions | None = None) -> Scan:
    """Check an image-text annotation file (retrieval or grounding, any pair format of
    :mod:`vlmtune.data.sources`); collect every problem.

    ``deep`` decodes every image in full (finds truncated and corrupt files); otherwise
    images are checked from their header. ``records`` holds the good records as
    :class:`PairRecord` (one per caption), ``image_id`` numbering their distinct images
    0..n-1 in order of first appearance.
    """
    from vlmtune.data.sources import pair_items

    ck, items = _open_scan(path, deep, opts or ReadOptions(max_text_chars=max_text_chars), pair_items)
    if items is None:
        return ck.scan
    rows = _scan_pair_items(ck, items)
    ids: dict[Path, int] = {}
    ck.scan.records = [PairRecord(image, text, ids.setdefault(image, len(ids)), bbox, rel, where)
                       for image, text, bbox, rel, where in rows]
    return ck.scan


def _fill_from_templates(ck: _Checker, rec: dict[str, Any], count: int, image: Path) -> tuple[str | None, str | None]:
    """Question and answer of a counting record; a missing one comes from the templates."""
    from vlmtune.data.receipts import ANSWER_TEMPLATES, QUESTIONS

    question = ck.check(_text_field, rec, "question", ck.max_text_chars) if "question" in rec else None
    answer = ck.check(_text_field, rec, "answer", ck.max_text_chars) if "answer" in rec else None
    if "question" in rec and "answer" in rec:
        return question, answer
    # A stable choice per image, so a file reads the same every time.
    pick = zlib.crc32(str(image).encode())
    if "question" not in rec:
        qs = ck.opts.question_templates or QUESTIONS
        question = qs[pick % len(qs)]
    if "answer" not in rec:
        templates = ck.opts.answer_templates or ANSWER_TEMPLATES
        key = "zero" if count == 0 else "one" if count == 1 else "many"
        options = templates[key]
        answer = options[pick % len(options)].format(n=count)
    ck.count("questions or answers from counting templates")
    return question, answer


def _scan_count_items(ck: _Checker, items: Iterable[Item], max_count: int | None) -> None:
    for it, rec in _objects(ck, items):
        count = ck.check(_count, rec, max_count)
        image = ck.check(ck.image_path, rec, "image")
        if image is not None:
            ck.check(ck.image_size, image)
        if count is None or image is None:
            # Still report a bad question or answer given in the record.
            for key in ("question", "answer"):
                if key in rec:
                    ck.check(_text_field, rec, key, ck.max_text_chars)
            continue
        question, answer = _fill_from_templates(ck, rec, count, image)
        if not ck.ok:
            continue
        keep = ck.check(ck.unique, ("count", image, question), "image and question", it.label)
        if ck.ok and keep:
            ck.scan.records.append(CountRecord(image, question, answer, count, f"{ck.path}: {it.label}"))  # type: ignore[arg-type]


def scan_counting(path: str | Path, max_count: int | None = None, deep: bool = False,
                  max_text_chars: int = MAX_TEXT_CHARS, opts: ReadOptions | None = None) -> Scan:
    """Check a counting file (JSONL ``{"image", "count", "question"?, "answer"?}`` per line,
    a CSV with a header, or a ``datasets`` layout); collect every problem. ``line N`` is
    1-based (a CSV's header is line 1); blank JSONL lines are skipped."""
    from vlmtune.data.sources import count_items

    ck, items = _open_scan(path, deep, opts or ReadOptions(max_text_chars=max_text_chars), count_items)
    if items is None:
        return ck.scan
    _scan_count_items(ck, items, max_count)
    return ck.scan


# --------------------------------------------------------------------------- readers


def _apply(scan: Scan, on_error: OnError) -> list[Any]:
    """The reader's policy: raise on any error, or leave bad records out and say which."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path, errors = scan.path, scan.errors
    whole_file = [p for p in errors if p.where == str(path)]
    if whole_file:
        raise DataError(str(whole_file[0]))  # nothing to skip: the file itself is bad
    if errors and on_error == "raise":
        if len(errors) == 1:
            raise DataError(str(errors[0]))
        raise DataError(f"{len(errors)} problems in {path}; first: {errors[0]}; "
                        f"run `vlmtune data validate {path}` for the list")
    if errors:
        bad = scan.bad_sources
        log.warning("%s: skipped %d of %d records with problems (data.on_error=skip):", path, len(bad), scan.n_records)
        for p in errors[:_LOG_FIRST]:
            log.warning("  skipped %s", p)
        if len(errors) > _LOG_FIRST:
            log.warning("  ... and %d more problems; run `vlmtune data validate %s` for the list",
                        len(errors) - _LOG_FIRST, path)
    if not scan.records:
        if errors:
            raise DataError(f"{path}: no usable records: all {scan.n_records} have problems; first: {errors[0]}")
        raise DataError(f"{path}: no records")
    return scan.records


def _report(scan: Scan) -> None:
    """Say in the log what was detected and what a reader changed or left out on purpose."""
    if scan.splits:  # the format itself was logged when detected
        splits = f" ({', '.join(f'{k} {v}' for k, v in scan.splits.items())} records by split)" if scan.splits else ""
        log.info("%s: read as format '%s'%s", scan.path, scan.format, splits)
    for what, n in scan.counts.items():
        log.info("%s: %d %s", scan.path, n, what)


def read_pairs(path: str | Path, on_error: OnError = "raise", max_text_chars: int = MAX_TEXT_CHARS,
               opts: ReadOptions | None = None) -> list[PairRecord]:
    """Read an image-text annotation file (any pair format) into image-text pairs.

    The format is ``opts.format`` or detected from the file's shape (see
    :mod:`vlmtune.data.sources`). A caption list gives one pair per caption.
    ``image_id`` numbers distinct images 0..n-1 in order of first appearance.
    ``on_error``: see the module docstring.
    """
    opts = opts or ReadOptions(max_text_chars=max_text_chars)
    scan = scan_pairs(path, deep=on_error == "skip", opts=opts)
    records = _apply(scan, on_error)
    _report(scan)
    return records


def read_counting(path: str | Path, max_count: int | None = None, on_error: OnError = "raise",
                  max_text_chars: int = MAX_TEXT_CHARS, opts: ReadOptions | None = None) -> list[CountRecord]:
    """Read a counting file: JSONL ``{"image", "count", "question"?, "answer"?}`` per line,
    a CSV with a header, or a ``datasets`` layout.

    Blank lines are skipped; errors name the 1-based line number. ``on_error``: see the
    module docstring.
    """
    opts = opts or ReadOptions(max_text_chars=max_text_chars)
    scan = scan_counting(path, max_count, deep=on_error == "skip", opts=opts)
    records = _apply(scan, on_error)
    _report(scan)
    return records
