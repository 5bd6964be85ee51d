"""``swift``: ms-swift's JSONL (or JSON list), read as it ships.

- Conversations: ``{"messages": [{"role": "system" | "user" | "assistant", "content"}],
  "images": [PATH]}``, ``<image>`` placeholders; captions and counts as in
  :mod:`vlmtune.data.formats.conversations`.
- Grounding: ``"objects": {"ref": [PHRASE, ...], "bbox": [[x1, y1, x2, y2], ...],
  "bbox_type": "real" | "norm1000"}``; each ``<ref-object>`` tag in the messages takes
  the next ``ref``, each ``<bbox>`` tag the next ``bbox``. Within a turn, one phrase
  owns all its boxes, or phrases and boxes pair in order. ``real`` is pixel x1, y1, x2,
  y2, ``norm1000`` thousandths of the image (the box contract converts both).
- Embedding: ``messages`` (the anchor) with ``positive_messages`` / ``positive_images``
  and ``negative_messages`` / ``negative_images``: an image anchor with text positives
  gives one pair per positive caption, carrying the negative captions; a text anchor
  with image positives one pair per positive image, carrying the negative images
  (:class:`~vlmtune.data.formats.records.PairRecord` ``negatives`` /
  ``negative_images``; ``data inspect`` counts them).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.data.formats.conversations import IMAGE, Turn, TurnKeys, plain, record_image, record_items, turns_of
from vlmtune.data.formats.fields import Bad, failing, is_number, returning, type_name
from vlmtune.data.formats.internvl import labelled_records, records_kind
from vlmtune.data.formats.records import Item, Kind
from vlmtune.data.formats.registry import Format, Probe, unread_fields

if TYPE_CHECKING:
    from vlmtune.data.formats.checker import Checker

SWIFT_FIELDS = frozenset(
    {"messages", "images", "objects", "count", "positive_messages", "positive_images", "negative_messages", "negative_images"}
)
REF, BBOX = "<ref-object>", "<bbox>"
_TYPES = {"real": "xyxy", "norm1000": "norm1000"}
_KEYS = TurnKeys(role=("role", "from"), text=("content", "value"))


def _parse(rec: dict[str, Any]) -> tuple[list[Turn], str | None]:
    unread_fields(rec, SWIFT_FIELDS, "swift")
    if "messages" not in rec:
        raise Bad("missing 'messages'")
    turns = turns_of(rec["messages"], "messages", _KEYS)
    return turns, record_image(rec, turns, "images")


def _objects(rec: dict[str, Any]) -> tuple[list[str], list[list[float]], str]:
    objects = rec["objects"]
    if not isinstance(objects, dict):
        raise Bad(f"'objects' must be an object with 'ref' and 'bbox', got {type_name(objects)}")
    refs, boxes = objects.get("ref", []), objects.get("bbox", [])
    if not isinstance(refs, list) or not all(isinstance(r, str) and r.strip() for r in refs):
        raise Bad("'objects.ref' must be a list of non-empty strings")
    if not isinstance(boxes, list) or not all(
        isinstance(b, list) and len(b) == 4 and all(is_number(v) for v in b) for b in boxes
    ):
        raise Bad("'objects.bbox' must be a list of boxes [x1, y1, x2, y2]")
    kind = objects.get("bbox_type", "real")
    if kind not in _TYPES:
        raise Bad(f"'objects.bbox_type' must be 'real' or 'norm1000', got {kind!r}")
    return [r.strip() for r in refs], boxes, _TYPES[kind]


def swift_boxes(rec: dict[str, Any], turns: list[Turn]) -> dict[int, list[tuple[str, list[float], str]]]:
    """(phrase, box, convention) per turn, from the tags and ``objects``."""
    n_refs = sum((t.question + t.answer).count(REF) for t in turns)
    n_boxes = sum((t.question + t.answer).count(BBOX) for t in turns)
    if "objects" not in rec:
        if n_refs or n_boxes:
            raise Bad(f"the messages hold {REF} / {BBOX} tags but the record has no 'objects'")
        return {}
    refs, boxes, convention = _objects(rec)
    if len(refs) != n_refs or len(boxes) != n_boxes:
        raise Bad(
            f"'objects' holds {len(refs)} ref and {len(boxes)} bbox but the messages have {n_refs} {REF} and {n_boxes} {BBOX} tags"
        )
    out: dict[int, list[tuple[str, list[float], str]]] = {}
    r = b = 0
    for t in turns:
        text = t.question + t.answer
        t_refs, t_boxes = refs[r : r + text.count(REF)], boxes[b : b + text.count(BBOX)]
        r, b = r + len(t_refs), b + len(t_boxes)
        if not t_boxes:
            continue
        if len(t_refs) == 1:
            out[t.index] = [(t_refs[0], box, convention) for box in t_boxes]
        elif len(t_refs) == len(t_boxes):
            out[t.index] = [(p, box, convention) for p, box in zip(t_refs, t_boxes)]
        else:
            raise Bad(f"turn {t.index}: {len(t_refs)} {REF} and {len(t_boxes)} {BBOX} tags; cannot tell which box is whose")
    return out


# --------------------------------------------------------------------------- embedding records


def _side(messages: Any, images: Any, what: str) -> tuple[str, list[str]]:
    """(text, images) of one side of an embedding record."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise Bad(f"{what} must be a list of messages")
    texts = []
    for j, m in enumerate(messages):
        content = m.get("content", m.get("value"))
        if not isinstance(content, str):
            raise Bad(f"{what} message {j} has no 'content' string")
        if m.get("role", "user") in ("user", "human", "assistant", "gpt"):
            texts.append(content)
    if images is None:
        images = []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
        raise Bad(f"the images of {what} must be a list of paths")
    text = plain(" ".join(texts))
    if images and IMAGE not in " ".join(texts) and text:
        raise Bad(f"{what} has images and text but no {IMAGE} placeholder")
    return text, images


def _listed(rec: dict[str, Any], key: str, n: int) -> list[Any]:
    value = rec.get(key)
    if value is None:
        return [None] * n
    if not isinstance(value, list) or len(value) != n:
        raise Bad(f"'{key}' must be a list with one entry per {key.split('_')[0]} message list ({n})")
    return value


def embedding_pairs(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """The image-text pairs of an embedding record (see the module docstring)."""
    unread_fields(rec, SWIFT_FIELDS, "swift")
    anchor = _side(rec.get("messages"), rec.get("images"), "'messages'")
    sides = {}
    for kind in ("positive", "negative"):
        msgs = rec.get(f"{kind}_messages", [])
        if not isinstance(msgs, list):
            raise Bad(f"'{kind}_messages' must be a list of message lists, got {type_name(msgs)}")
        imgs = _listed(rec, f"{kind}_images", len(msgs))
        sides[kind] = [_side(m, im, f"'{kind}_messages' {j}") for j, (m, im) in enumerate(zip(msgs, imgs))]
    (text, images), pos, neg = anchor, sides["positive"], sides["negative"]
    if not pos:
        raise Bad("'positive_messages' is empty: an embedding record needs a positive")
    if len(images) == 1 and not text and all(t and not im for t, im in pos + neg):
        return [{"image": images[0], "caption": [t for t, _ in pos], "negatives": [t for t, _ in neg]}]
    if not images and text and all(len(im) == 1 and not t for t, im in pos + neg):
        negatives = [im[0] for _, im in neg]
        return [{"image": im[0], "text": text, "negative_images": negatives} for _, im in pos]
    raise Bad(
        "embedding record: vlmtune reads an image anchor with caption positives (and negatives), or a "
        "caption anchor with one image per positive (and negative)"
    )


def _embedding_items(label: str, rec: dict[str, Any]) -> list[Item]:
    try:
        pairs = embedding_pairs(rec)
    except Bad as e:
        return [Item(label, failing(str(e)))]
    out = []
    for k, p in enumerate(pairs):
        out.append(Item(label if len(pairs) == 1 else f"{label} positive {k}", returning(p), new=k == 0))
    return out


# --------------------------------------------------------------------------- reader


_EXPECTS = "format 'swift' expects a JSONL (or a JSON list) of records with 'messages'"


def _reader(kind: Kind) -> Any:
    def read(ck: Checker, path: Path, data: Any) -> list[Item]:
        items: list[Item] = []
        for label, rec in labelled_records(path, data, _EXPECTS):
            if isinstance(rec, Bad):
                items.append(Item(label, failing(str(rec))))
            elif isinstance(rec, dict) and "positive_messages" in rec:
                if kind == "counting":
                    items.append(Item(label, failing("an embedding record (positive_messages) holds no count")))
                else:
                    ck.count("embedding records (positives read as captions, negatives kept)")
                    items += _embedding_items(label, rec)
            else:
                items += record_items(ck, kind, label, rec, _parse, swift_boxes)
        return items

    return read


def _is_swift_jsonl(probe: Probe) -> bool:
    return not probe.is_dir and probe.suffix == ".jsonl" and "messages" in probe.first_record


def _is_swift(probe: Probe) -> bool:
    return isinstance(probe.data, list) and "messages" in probe.keys


SWIFT = Format(
    "swift",
    readers={"pairs": _reader("pairs"), "counting": _reader("counting")},
    carries={
        "messages": "conversations",
        "objects": "boxes",
        "positive_messages": "positive captions",
        "negative_messages": "negative captions",
        "positive_images": "positive images",
        "negative_images": "negative images",
        "count": "a count",
    },
    by_path=_is_swift_jsonl,
    by_json=_is_swift,
    detect_rank=37,
    kind_of=records_kind,
)
