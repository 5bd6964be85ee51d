"""The safe image loader: every failure is a DataError naming the file (and the record).

:func:`load_image` is what training, evaluation and prediction all read images with;
:func:`image_size` gives the same size from the header, and :func:`inspect_image` is
what the data checks use (header only, or a full decode for ``data validate``).
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlmtune.data.formats.shards import read_member, split_member
from vlmtune.errors import DataError

# EXIF orientations 5..8 rotate by 90 degrees, so the loaded image has width and height
# swapped with respect to the stored header.
_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}

# What Pillow's decoders raise on truncated or corrupt data (besides OSError subclasses).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


def _where(path: Path, source: str) -> str:
    """Prefix for image errors: the image, plus the annotation record when known."""
    return f"{source}: image {path}" if source else f"{path}"


def _file(path: Path) -> Path | IO[bytes]:
    """What Pillow opens for ``path``: the file, or the bytes of a shard member
    (``SHARD.tar/KEY.jpg``, read in place: :mod:`vlmtune.data.formats.shards`)."""
    if not path.exists() and split_member(path) is not None:
        return io.BytesIO(read_member(path))
    return path


def _open(path: Path, source: str) -> Image.Image:
    """Open an image lazily (header only), mapping every failure to DataError."""
    where = _where(path, source)
    try:
        with warnings.catch_warnings():
            # A huge image is refused rather than half-trusted: the warning becomes an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(_file(path))
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


def to_rgb(img: Image.Image) -> Image.Image:
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
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode in ("P", "L", "RGB") and "transparency" in img.info)


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
    return to_rgb(_decode(Path(path), source))


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
        source = _file(path)
        with source if not isinstance(source, Path) else open(source, "rb") as f:
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
class ImageInfo:
    """What the data checks need of an image: its size as loaded, and what loading changes."""

    size: tuple[int, int]
    note: str | None


def inspect_image(path: Path, deep: bool) -> ImageInfo:
    """Size and mode note of an image: from the header, or (``deep``) by decoding it all.

    Raises DataError whose message starts with the path.
    """
    if deep:
        img = _decode(path, "")
        return ImageInfo(img.size, _mode_note(img))
    with _open(path, "") as img:
        return ImageInfo(_header_size(img, path), _mode_note(img))
