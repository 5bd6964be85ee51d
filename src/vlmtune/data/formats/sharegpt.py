"""``sharegpt``: ShareGPT-style conversations, a JSON list or a JSONL of records whose
``conversation`` (or ``conversations``) holds human/assistant turns (``from``/``value``
or ``role``/``content``), with ``image`` / ``images``; read as :mod:`.internvl` reads
its records (InternVL's ``<ref>``/``<box>`` tags in 0-1000)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.data.formats.conversations import internvl_turn_boxes, record_items
from vlmtune.data.formats.fields import Bad, failing
from vlmtune.data.formats.internvl import labelled_records, parse_conversation, records_kind
from vlmtune.data.formats.records import Item, Kind
from vlmtune.data.formats.registry import Format, Probe

if TYPE_CHECKING:
    from vlmtune.data.formats.checker import Checker


def _parse(rec: dict[str, Any]) -> tuple[list[Any], str | None]:
    key = "conversation" if "conversation" in rec else "conversations"
    return parse_conversation(rec, "sharegpt", key)


_EXPECTS = "format 'sharegpt' expects a list of conversation records (or a JSONL of them)"


def _reader(kind: Kind) -> Any:
    def read(ck: Checker, path: Path, data: Any) -> list[Item]:
        items: list[Item] = []
        for label, rec in labelled_records(path, data, _EXPECTS):
            if isinstance(rec, Bad):
                items.append(Item(label, failing(str(rec))))
            else:
                items += record_items(ck, kind, label, rec, _parse, internvl_turn_boxes)
        return items

    return read


def _is_sharegpt_jsonl(probe: Probe) -> bool:
    return not probe.is_dir and probe.suffix == ".jsonl" and "conversation" in probe.first_record


def _is_sharegpt(probe: Probe) -> bool:
    return isinstance(probe.data, list) and "conversation" in probe.keys


SHAREGPT = Format(
    "sharegpt",
    readers={"pairs": _reader("pairs"), "counting": _reader("counting")},
    carries={"conversation": "conversations", "conversations": "conversations", "count": "a count"},
    by_path=_is_sharegpt_jsonl,
    by_json=_is_sharegpt,
    detect_rank=36,
    kind_of=records_kind,
)
