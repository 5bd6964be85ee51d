"""The checker: runs the field checks of one file's records and collects what they find."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from vlmtune.data.formats.boxes import CONVENTIONS, INTERNAL, source_box
from vlmtune.data.formats.fields import SPLITS, Bad, nonempty_str, pixel_bbox
from vlmtune.data.formats.images import ImageInfo, inspect_image
from vlmtune.data.formats.records import Item, Problem, ReadOptions, Scan
from vlmtune.data.formats.shards import is_member
from vlmtune.errors import DataError

T = TypeVar("T")


class Checker:
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
        root = Path(self.opts.image_root) if self.opts.image_root is not None else (path if path.is_dir() else path.parent)
        self.base = root.resolve()
        self.deep = deep
        self.max_text_chars = max_text_chars
        self.scan = Scan(path)
        self._images: dict[Path, ImageInfo | str] = {}
        self._seen: dict[tuple[Any, ...], str] = {}
        self._where = ""
        self._bad = False
        self._root: Path | None = None

    def start(self, where: str, new: bool = True, root: Path | None = None) -> None:
        """Begin a record: checks until the next start() are reported at ``where``;
        ``root``: the folder its images resolve against, where not the file's."""
        self._where, self._bad = where, False
        self._root = root.resolve() if root is not None else None
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
        except Bad as e:
            self.error(str(e))
            return None

    def root_problem(self) -> str | None:
        """Why the declared image root cannot be used, or None."""
        if self.declared_root and not self.base.is_dir():
            if self.base.exists():
                return f"data.image_root {self.opts.image_root}: is a file, not a folder (name the folder the image paths resolve against)"
            return f"data.image_root {self.opts.image_root}: folder not found"
        return None

    def image_path(self, rec: dict[str, Any], key: str) -> Path:
        """The record's image, resolved (symlinks too) against the image root: the
        declared ``data.image_root``, else the annotation file's folder.

        It must stay inside that folder: an annotation file cannot point at files elsewhere.
        """
        text = nonempty_str(rec, key)
        return self.resolve_image(text)

    def resolve_image(self, text: str) -> Path:
        """An image path as a record writes it, resolved and checked (see :meth:`image_path`);
        a member of a webdataset shard (``SHARD.tar/KEY.jpg``) counts as a file."""
        base = self._root or self.base
        shown = text if len(text) <= 80 else text[:77] + "..."
        if "\x00" in text:
            raise Bad(f"image path {shown!r} contains a NUL character")
        image = Path(text)
        try:
            path = (image if image.is_absolute() else base / image).resolve()
            if not path.is_relative_to(base):
                raise Bad(f"image path '{shown}' leads outside the data set's folder {base} (to {str(path)[:120]})")
            if not path.is_file() and not is_member(path):
                hint = (
                    ""
                    if self.declared_root or self._root is not None
                    else f" (image paths resolve against {base}; set data.image_root or --image-root)"
                )
                raise Bad(f"image not found: {str(path)[:200]}{hint}")
        except (OSError, RuntimeError) as e:  # a name too long for the file system, a link loop
            reason = "a symbolic link loop" if isinstance(e, RuntimeError) or e.errno == 40 else (e.strerror or str(e))
            raise Bad(f"image path '{shown}': {reason.lower()}") from None
        return path

    def image_size(self, path: Path) -> tuple[int, int]:
        if path not in self._images:
            try:
                info: ImageInfo | str = inspect_image(path, self.deep)
            except DataError as e:
                info = str(e)
            self._images[path] = info
            if isinstance(info, ImageInfo) and info.note:
                self.scan.problems.append(Problem(self._where, f"image {path.name}: {info.note}", "note"))
        info = self._images[path]
        if isinstance(info, str):
            raise Bad(f"image {info}")
        return info.size

    def box(self, rec: dict[str, Any], size: tuple[int, int] | None) -> tuple[float, float, float, float] | None:
        """The record's box in pixels x, y, w, h: ``bbox`` as its format wrote it
        (``box_convention``, set by the reader; pixel x, y, w, h when absent), converted
        by the box contract (:mod:`vlmtune.data.formats.boxes`) and counted per source
        convention; clipped when it overruns the image by under a pixel or within
        data.box_tolerance_px (counted)."""
        tol = self.opts.box_tolerance_px
        convention = rec.get("box_convention", INTERNAL)
        if convention not in CONVENTIONS:
            raise Bad(f"unknown box convention {convention!r}")
        if convention == INTERNAL:
            box, clipped = pixel_bbox(rec, size, tol)
        else:
            box, clipped = source_box(rec.get("bbox"), convention, size, tol)
        if clipped == "subpixel":
            self.count("boxes clipped to the image (they overran it by under a pixel)")
        elif clipped:
            self.count("boxes clipped to the image (within data.box_tolerance_px)")
        if box is not None:
            self.scan.box_conventions[convention] = self.scan.box_conventions.get(convention, 0) + 1
            if self.scan.box_example is None:
                self.scan.box_example = {
                    "where": self._where,
                    "convention": convention,
                    "source": rec.get("bbox"),
                    "pixels_xywh": [round(v, 2) for v in box],
                }
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
            raise Bad(f"duplicate of {first} (same {what}; data.duplicates=keep or drop allows it)")
        self._seen[key] = label
        return True

    def split_problem(self, split: Any) -> str | None:
        """Why a record of a one-file-all-splits format belongs to no split (no ``split``,
        or a name such as ``TEST`` that is none of the known ones), when a split is asked
        for; None when it names a known split or every record is read. Such a record is
        an error of its own (reported, counted, under ``data.on_error``), never left out
        of every split without a word."""
        if self.opts.split is None:
            return None
        known = sorted({name for names in SPLITS.values() for name in names})
        if split is None:
            return f"has no 'split'; name one of {', '.join(known)} (or it belongs to no split)"
        if not isinstance(split, str) or split not in known:
            shown = str(split) if len(str(split)) <= 40 else str(split)[:37] + "..."
            return f"split {shown!r} is none of {', '.join(known)} (names are case-sensitive); it belongs to no split"
        return None

    def split_item(self, label: str, rec: Any, read: Callable[[], dict[str, Any]]) -> Item | None:
        """The item of a record of a one-file-all-splits format: ``read`` when it belongs
        to the split asked for, an item that is its error when it belongs to no split
        (:meth:`split_problem`), None when it belongs to another split."""
        if not isinstance(rec, dict):
            return Item(label, read)  # the record's own reader names what is wrong with it
        why = self.split_problem(rec.get("split"))
        if why is not None:
            return Item(label, partial(_no_split, why))
        return Item(label, read) if self.in_split(rec.get("split")) else None

    def in_split(self, split: Any) -> bool:
        """Whether a record of a one-file-all-splits format belongs to the split asked for
        (counted per split in the scan)."""
        split = "train" if split == "restval" else split
        self.scan.splits[str(split)] = self.scan.splits.get(str(split), 0) + 1
        want = self.opts.split
        return want is None or split in SPLITS.get(want, (want,))


def _no_split(why: str) -> dict[str, Any]:
    raise Bad(why)
