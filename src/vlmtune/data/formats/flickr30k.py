"""``flickr30k``: Flickr30k's own caption files, as they ship: ``results_20130124.token``
(``NAME.jpg#K<TAB>caption`` per line; Flickr8k's ``Flickr8k.token.txt`` too) or the
pipe-separated ``results.csv`` (``image_name| comment_number| comment``). One pair per
line (``line N``, 1-based, the CSV's header being line 1); the images are in
``flickr30k-images/`` (``data.image_root``). They hold no split: Karpathy's
``dataset_flickr30k.json`` (format ``karpathy``) has the usual one.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.data.formats.fields import Bad, read_text
from vlmtune.data.formats.records import Item
from vlmtune.data.formats.registry import Format, Probe

if TYPE_CHECKING:
    from vlmtune.data.formats.checker import Checker

_TOKEN = re.compile(r"^(?P<image>[^\t#]+)#(?P<k>[^\t]*)\t(?P<caption>.*)$")
_CSV_HEADER = re.compile(r"^\s*image_name\s*\|\s*comment_number\s*\|\s*comment\s*$")


def _token_line(line: str) -> dict[str, Any]:
    m = _TOKEN.match(line)
    if m is None:
        raise Bad("expected NAME.jpg#K<TAB>caption")
    return _record(m.group("image"), m.group("k"), m.group("caption"))


def _csv_line(line: str) -> dict[str, Any]:
    cells = line.split("|")
    if len(cells) != 3:
        raise Bad(f"expected 3 cells separated by '|' (image_name| comment_number| comment), got {len(cells)}")
    return _record(*cells)


def _record(image: str, k: str, caption: str) -> dict[str, Any]:
    if not k.strip().isdigit():
        raise Bad(f"caption number {k.strip()!r} is not a whole number")
    return {"image": image.strip(), "caption": caption.strip()}


def read_flickr30k(ck: Checker, path: Path, data: Any) -> list[Item]:
    lines = read_text(path).splitlines()
    csv = bool(lines) and _CSV_HEADER.match(lines[0]) is not None
    parse = _csv_line if csv else _token_line
    start = 2 if csv else 1
    body = lines[1:] if csv else lines
    return [Item(f"line {n}", partial(parse, line)) for n, line in enumerate(body, start=start) if line.strip()]


def _is_flickr30k(probe: Probe) -> bool:
    if probe.is_dir:
        return False
    if probe.name.endswith((".token", ".token.txt")):
        return True
    return probe.suffix == ".csv" and _CSV_HEADER.match(probe.first_line) is not None


FLICKR30K = Format(
    "flickr30k",
    readers={"pairs": read_flickr30k},
    by_path=_is_flickr30k,
    detect_rank=15,
)
