"""``llava``: LLaVA's instruction data, one JSON list of ``{"id", "image", "conversations":
[{"from": "human" | "gpt", "value"}, ...]}`` (``<image>`` placeholders, InternVL's
``<ref>``/``<box>`` tags in 0-1000), read as :mod:`.internvl` reads its JSONL lines."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.data.formats.conversations import internvl_turn_boxes, record_items
from vlmtune.data.formats.fields import Bad, load_json
from vlmtune.data.formats.internvl import asks_counts, parse_conversation
from vlmtune.data.formats.records import Item, Kind
from vlmtune.data.formats.registry import Format, Probe

if TYPE_CHECKING:
    from vlmtune.data.formats.checker import Checker


def _reader(kind: Kind) -> Any:
    def read(ck: Checker, path: Path, data: Any) -> list[Item]:
        data = load_json(path) if data is None else data
        if not isinstance(data, list):
            raise Bad("format 'llava' expects a list of conversation records at the top level")
        items: list[Item] = []
        for i, rec in enumerate(data):
            items += record_items(ck, kind, f"record {i}", rec, parse_conversation, internvl_turn_boxes)
        return items

    return read


def llava_kind(ck: Checker, path: Path) -> Kind:
    try:
        data = load_json(path)
    except Bad:
        return "pairs"
    return "counting" if isinstance(data, list) and asks_counts(data[:20]) else "pairs"


def _is_llava(probe: Probe) -> bool:
    return isinstance(probe.data, list) and "conversations" in probe.keys


LLAVA = Format(
    "llava",
    readers={"pairs": _reader("pairs"), "counting": _reader("counting")},
    carries={"conversations": "conversations", "count": "a count"},
    by_json=_is_llava,
    detect_rank=60,
    kind_of=llava_kind,
)
