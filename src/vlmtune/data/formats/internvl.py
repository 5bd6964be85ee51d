"""``internvl``: InternVL's fine-tuning layout, read as it ships.

A meta JSON ``{name: {"root": FOLDER, "annotation": FILE.jsonl, "repeat_time"?, ...}}``
(every entry read, as one set; each entry's images resolve against its own ``root``),
or one annotation JSONL with its image root (``data.image_root``, default its folder).
Each line is ``{"image" | "images", "conversations": [{"from": "human" | "gpt",
"value"}, ...], "count"?}``; see :mod:`vlmtune.data.formats.conversations` for how the
turns become captions, grounding records (``<ref>..</ref><box>[[..]]</box>`` in 0-1000)
and counts. A relative ``root`` or ``annotation`` resolves against the meta file's
folder, or against ``data.image_root`` when that is given (InternVL reads both from the
folder it runs in, ``internvl_chat/``: pass that folder).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.data.formats.conversations import (
    TurnKeys,
    internvl_turn_boxes,
    record_image,
    record_items,
    turns_of,
)
from vlmtune.data.formats.fields import Bad, failing, load_json, read_text, type_name
from vlmtune.data.formats.records import Item, Kind
from vlmtune.data.formats.registry import Format, Probe, unread_fields

if TYPE_CHECKING:
    from vlmtune.data.formats.checker import Checker

# The fields of a conversation record a conversation format reads.
CONVERSATION_FIELDS = frozenset({"image", "images", "conversations", "count"})


def parse_conversation(rec: dict[str, Any], fmt: str = "internvl", key: str = "conversations") -> tuple[list[Any], str | None]:
    """(turns, image) of an InternVL / LLaVA / ShareGPT record."""
    unread_fields(rec, CONVERSATION_FIELDS | {key}, fmt)
    if key not in rec:
        raise Bad(f"missing '{key}'")
    turns = turns_of(rec[key], key, TurnKeys())
    return turns, record_image(rec, turns)


def jsonl_records(text: str) -> Iterator[tuple[int, Any]]:
    """(1-based line, parsed record or the Bad it is) of every non-blank line."""
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            yield n, Bad(f"not valid JSON: {e.msg} (column {e.colno})")


def annotation_items(ck: Checker, kind: Kind, path: Path, prefix: str = "", root: Path | None = None) -> list[Item]:
    """The items of one annotation JSONL (``line N``, after ``prefix``)."""
    items: list[Item] = []
    for n, rec in jsonl_records(read_text(path)):
        label = f"{prefix}line {n}"
        if isinstance(rec, Bad):
            items.append(Item(label, failing(str(rec)), root=root))
            continue
        items += record_items(ck, kind, label, rec, parse_conversation, internvl_turn_boxes, root)
    return items


def _meta_entry(ck: Checker, path: Path, name: str, entry: Any) -> tuple[Path, Path]:
    """(annotation file, image root) of one meta entry, or Bad."""
    if not isinstance(entry, dict):
        raise Bad(f"must be an object with 'root' and 'annotation', got {type_name(entry)}")
    for key in ("root", "annotation"):
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            raise Bad(f"'{key}' must be a non-empty string, got {json.dumps(entry.get(key))}")
    base = meta_base(ck, path)
    root, annotation = (Path(entry[k]) if Path(entry[k]).is_absolute() else base / entry[k] for k in ("root", "annotation"))
    if not root.is_dir():
        raise Bad(f"root {entry['root']} is not a folder ({root})")
    if not annotation.is_file():
        raise Bad(f"annotation {entry['annotation']} not found ({annotation})")
    repeat = entry.get("repeat_time", 1)
    if repeat != 1:
        ck.count("meta entries whose repeat_time is not 1, read once (vlmtune does not resample)")
    return annotation, root


def meta_base(ck: Checker, path: Path) -> Path:
    """What a meta entry's relative ``root`` and ``annotation`` resolve against: InternVL
    reads them from the folder it runs in (``internvl_chat/``), given as data.image_root;
    without it, the meta file's folder."""
    return Path(ck.opts.image_root) if ck.opts.image_root is not None else path.parent


def meta_items(ck: Checker, kind: Kind, path: Path, meta: dict[str, Any]) -> list[Item]:
    """Every entry of a meta JSON, read as one set; ``entry 'NAME' FILE line N``."""
    items: list[Item] = []
    for name, entry in meta.items():
        label = f"entry '{name}'"
        try:
            annotation, root = _meta_entry(ck, path, name, entry)
            items += annotation_items(ck, kind, annotation, f"{label} {entry['annotation']} ", root)
        except Bad as e:
            items.append(Item(label, failing(str(e))))
    return items


def is_meta(data: Any) -> bool:
    return isinstance(data, dict) and bool(data) and all(isinstance(v, dict) and "annotation" in v for v in data.values())


def _reader(kind: Kind) -> Any:
    def read(ck: Checker, path: Path, data: Any) -> list[Item]:
        if path.suffix.lower() == ".jsonl":
            return annotation_items(ck, kind, path)
        data = load_json(path) if data is None else data
        if not is_meta(data):
            raise Bad("format 'internvl' expects a meta JSON {name: {'root', 'annotation'}} or an annotation JSONL")
        return meta_items(ck, kind, path, data)

    return read


def labelled_records(path: Path, data: Any, expects: str) -> list[tuple[str, Any]]:
    """A JSONL's records labelled ``line N``, or a JSON list's ``record N`` (``data``: the
    list already loaded, if it was); ``expects`` is the error for a JSON that is no list."""
    if path.suffix.lower() == ".jsonl":
        return [(f"line {n}", rec) for n, rec in jsonl_records(read_text(path))]
    data = load_json(path) if data is None else data
    if not isinstance(data, list):
        raise Bad(expects)
    return [(f"record {i}", rec) for i, rec in enumerate(data)]


def records_kind(ck: Checker, path: Path) -> Kind:
    """Counting when the first 20 records of a JSONL or JSON list ask 'how many' (or
    carry a count), else pairs; a file that does not read is pairs (its reader says why)."""
    try:
        recs = [r for _, r in labelled_records(path, None, "not a list")[:20]]
    except Bad:
        return "pairs"
    return "counting" if asks_counts(recs) else "pairs"


_HOW_MANY = re.compile(r"\bhow many\b|\bcount\b|\bnumber of\b", re.IGNORECASE)


def asks_counts(records: list[Any]) -> bool:
    """Whether conversation records are counting questions: every record that has turns
    carries a 'count' or asks 'how many' in its first question."""
    seen = False
    for rec in records:
        if not isinstance(rec, dict):
            continue
        turns = rec.get("conversations") or rec.get("conversation") or rec.get("messages")
        first = turns[0] if isinstance(turns, list) and turns and isinstance(turns[0], dict) else {}
        if first.get("role") == "system" and isinstance(turns, list) and len(turns) > 1 and isinstance(turns[1], dict):
            first = turns[1]
        text = first.get("value", first.get("content", ""))
        if "count" not in rec and not (isinstance(text, str) and _HOW_MANY.search(text)):
            return False
        seen = True
    return seen


def _first_records(path: Path, n: int = 20) -> list[Any]:
    out = []
    for _, rec in jsonl_records(read_text(path)):
        if not isinstance(rec, Bad):
            out.append(rec)
        if len(out) >= n:
            break
    return out


def internvl_kind(ck: Checker, path: Path) -> Kind:
    """Counting when the records ask 'how many' (or carry a count), else pairs."""
    try:
        if path.suffix.lower() == ".jsonl":
            return "counting" if asks_counts(_first_records(path)) else "pairs"
        meta = load_json(path)
        if is_meta(meta):
            for entry in meta.values():
                ann = Path(str(entry.get("annotation")))
                ann = ann if ann.is_absolute() else meta_base(ck, path) / ann
                if ann.is_file():
                    return "counting" if asks_counts(_first_records(ann)) else "pairs"
    except (Bad, OSError):
        pass
    return "pairs"


def _is_annotation(probe: Probe) -> bool:
    return not probe.is_dir and probe.suffix == ".jsonl" and "conversations" in probe.first_record


def _is_meta(probe: Probe) -> bool:
    return is_meta(probe.data)


INTERNVL = Format(
    "internvl",
    readers={"pairs": _reader("pairs"), "counting": _reader("counting")},
    carries={"conversations": "conversations", "count": "a count"},
    by_path=_is_annotation,
    by_json=_is_meta,
    detect_rank=35,
    object_shape="an InternVL meta JSON ({name: {'root', 'annotation'}})",
    kind_of=internvl_kind,
)
