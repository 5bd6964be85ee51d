"""``webdataset``: tar shards of samples (img2dataset's output, what open_clip trains on),
read from the tars in place (see :mod:`vlmtune.data.formats.shards`).

The data path is a folder of ``.tar`` shards, one shard, or a brace pattern in the file
name (``shards/{00000..00009}.tar``, ``shards/part-{a,b}.tar``). Members are grouped
into samples by key (the member name up to the first dot of its base name, as
webdataset groups them); a sample is one image (``jpg``, ``jpeg``, ``png`` or ``webp``)
with its caption in ``txt`` and/or ``json`` (``caption``, ``text`` or ``captions``;
equal captions count once). A sample is ``SHARD sample 'KEY'`` in messages; its image
is ``SHARD.tar/MEMBER`` (an image path inside the shard), so the feature cache keys it
by its bytes like any image, and ``vlmtune embed --data`` reads it the same way.
"""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from vlmtune.data.formats.fields import Bad, failing
from vlmtune.data.formats.records import Item
from vlmtune.data.formats.registry import Format, Probe, unread_fields
from vlmtune.data.formats.shards import COMPRESSED, SHARD_SUFFIX, clean_name, read_members, shard_members

if TYPE_CHECKING:
    from vlmtune.data.formats.checker import Checker

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt", "json")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")
MAX_SHARDS = 100_000


def expand(pattern: str) -> list[str]:
    """Brace expansion as webdataset and the shell do it: ``{000..012}`` (zero-padded
    to the first bound's width) and ``{a,b}``, several groups as a product."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end() :]
    rng = _RANGE.match(body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        if hi < lo or hi - lo >= MAX_SHARDS:
            raise Bad(f"brace range {{{body}}} must count up, at most {MAX_SHARDS} shards")
        width = len(rng.group(1))
        options = [f"{i:0{width}d}" for i in range(lo, hi + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        raise Bad(f"brace group {{{body}}} is neither a range {{000..009}} nor a list {{a,b}}")
    return [head + o + rest for o in options for rest in expand(tail)]


def is_pattern(path: Path) -> bool:
    return "{" in path.name and "}" in path.name


def shard_paths(path: Path) -> list[Path]:
    """The shards a data path names: a folder's ``.tar`` files, a brace pattern's, or one."""
    if is_pattern(path):
        if "{" in str(path.parent):
            raise Bad("a brace pattern may only be in the shards' file name, not in a folder name")
        shards = [path.parent / name for name in expand(path.name)]
        missing = [s for s in shards if not s.is_file()]
        if missing:
            raise Bad(f"{len(missing)} of the {len(shards)} shards of the pattern are not found, first {missing[0]}")
        return shards
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.suffix.lower() == SHARD_SUFFIX and p.is_file())
        if not shards:
            packed = [p.name for p in path.iterdir() if p.name.lower().endswith(COMPRESSED)]
            why = f" (compressed shards such as {packed[0]} cannot be read in place: decompress them)" if packed else ""
            raise Bad(f"a webdataset folder holds no .tar shards{why}")
        return shards
    return [path]


def _key(name: str) -> tuple[str, str]:
    """(sample key, extension) of a member name: the key ends at the base name's first dot."""
    p = PurePosixPath(name)
    base, _, ext = p.name.partition(".")
    return (str(p.parent / base) if str(p.parent) != "." else base), ext.lower()


def _captions(sample: dict[str, str], data: dict[str, bytes]) -> list[str]:
    """A sample's captions: its txt, then its json's caption / text / captions."""
    out: list[str] = []
    if "txt" in sample:
        try:
            out.append(data[sample["txt"]].decode("utf-8-sig"))
        except UnicodeDecodeError:
            raise Bad(f"{sample['txt']} is not UTF-8 text") from None
    if "json" in sample:
        try:
            meta = json.loads(data[sample["json"]].decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise Bad(f"{sample['json']} is not valid JSON: {e}") from None
        if isinstance(meta, dict):
            unread_fields(meta, {"caption", "text", "captions"}, "webdataset")
            for key in ("caption", "text", "captions"):
                value = meta.get(key)
                if isinstance(value, str):
                    out.append(value)
                elif isinstance(value, list):
                    out += [v for v in value if isinstance(v, str)]
    return list(dict.fromkeys(c.strip() for c in out if c.strip()))


def _sample(shard: Path, key: str, sample: dict[str, str], data: dict[str, bytes]) -> dict[str, Any]:
    images = [sample[e] for e in IMAGE_EXTS if e in sample]
    captions = _captions(sample, data)
    if not images:
        raise Bad(f"has a caption but no image ({', '.join(IMAGE_EXTS)})" if captions else "has no image and no caption")
    if len(images) > 1:
        raise Bad(f"has {len(images)} images ({', '.join(images)}); a sample holds one")
    if not captions:
        raise Bad(f"has an image ({images[0]}) but no caption (a .txt, or a .json with 'caption')")
    return {"image": str(shard.absolute() / images[0]), "caption": captions}


def shard_items(ck: Checker, shard: Path) -> list[Item]:
    """The samples of one shard, in the order their first member appears."""
    try:
        members = shard_members(shard)
    except OSError as e:
        return [Item(shard.name, failing(str(e).replace(f"{shard}: ", "")))]
    samples: dict[str, dict[str, str]] = {}
    items: list[Item] = []
    for m in members:
        name = clean_name(m.name)
        if not m.regular:
            if not m.folder:
                ck.count("shard members that are not plain files (links, devices) not followed")
            continue
        if name is None:
            items.append(Item(f"{shard.name} member {m.name!r}", failing("leads out of the shard (absolute or '..'); not read")))
            continue
        key, ext = _key(name)
        if ext in IMAGE_EXTS + CAPTION_EXTS:
            samples.setdefault(key, {})[ext] = name
        else:
            ck.count(f"shard members other than {'/'.join(IMAGE_EXTS + CAPTION_EXTS)} not read")
    wanted = [n for s in samples.values() for e, n in s.items() if e in CAPTION_EXTS]
    data = read_members(shard, wanted)
    for key, sample in samples.items():
        items.append(Item(f"{shard.name} sample '{key}'", partial(_sample, shard, key, sample, data)))
    return items


def read_webdataset(ck: Checker, path: Path, data: Any) -> list[Item]:
    return [it for shard in shard_paths(path) for it in shard_items(ck, shard)]


def _is_shards(probe: Probe) -> bool:
    p = probe.path
    if is_pattern(p):
        return SHARD_SUFFIX in p.name.lower()
    if probe.is_dir:
        try:
            return any(c.suffix.lower() == SHARD_SUFFIX for c in p.iterdir())
        except OSError:
            return False
    return probe.suffix == SHARD_SUFFIX


WEBDATASET = Format(
    "webdataset",
    readers={"pairs": read_webdataset},
    by_path=_is_shards,
    detect_rank=32,
    folder_shape="a folder of webdataset .tar shards",
)
