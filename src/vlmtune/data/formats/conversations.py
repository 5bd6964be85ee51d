"""What the conversation formats share (``internvl``, ``llava``, ``sharegpt``, ``swift``):
turns, ``<image>`` placeholders, captions, counts and InternVL's ``<ref>``/``<box>`` tags.

A conversation record is one image (``image``, or ``images`` holding one) and turns
between a user (``human`` / ``user``) and the model (``gpt`` / ``assistant``); a
system turn may open it. Each user turn and the model's answer to it make a *turn*
(``turn N``, 0-based), read by :data:`CAPTION_RULE` for image-text pairs and
:data:`COUNT_RULE` for counting. InternVL writes boxes as
``<ref>phrase</ref><box>[[x1, y1, x2, y2], ...]</box>`` in 0-1000 of the image; the
box contract (:mod:`vlmtune.data.formats.boxes`) turns them into pixels by the image's
size, EXIF orientation applied.

Plain Python: the format modules load it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.data.formats.fields import Bad, failing, returning, type_name
from vlmtune.data.formats.records import Item, Kind

if TYPE_CHECKING:
    from vlmtune.data.formats.checker import Checker

IMAGE = "<image>"

USER_ROLES = ("human", "user")
MODEL_ROLES = ("gpt", "assistant", "bot", "model")
SYSTEM_ROLES = ("system",)

CAPTION_WORDS = re.compile(r"\b(describ\w*|description|caption\w*|summar[iy]\w*)\b", re.IGNORECASE)

CAPTION_RULE = (
    "a turn is a caption turn when its question, without the <image> placeholder, is empty or "
    "asks for a description (it holds 'describe', 'description', 'caption' or 'summarize', any "
    "case) and neither side carries a box; its answer is a caption of the image. Turns with "
    "boxes are grounding turns (each phrase and box one record); other turns (questions about "
    "the image) are not captions and are counted, not read"
)

COUNT_RULE = (
    "every turn of a counting file is a counting question: its count is the record's 'count' "
    "field when it has one, else the number its answer states (digits or number words zero to "
    "twenty); an answer stating no count, or two different counts, is an error"
)

_NUMBER_WORDS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_COUNT_TOKEN = re.compile(r"(?<![\w.])\d+(?![\w.]|\.\d)|[A-Za-z]+")

_REF_BOX = re.compile(r"<ref>(.*?)</ref>\s*<box>(.*?)</box>", re.DOTALL)
_REF = re.compile(r"<ref>(.*?)</ref>", re.DOTALL)
_BOX = re.compile(r"<box>(.*?)</box>", re.DOTALL)
_TAG = re.compile(r"</?(ref|box|quad)>|<image>|<ref-object>|<bbox>")


@dataclass(frozen=True)
class Turn:
    """One question and its answer; ``index`` counts turns from 0."""

    index: int
    question: str
    answer: str

    @property
    def label(self) -> str:
        return f"turn {self.index}"


def stated_counts(text: str) -> list[int]:
    """The distinct counts an answer states, in order: digits and number words."""
    out: list[int] = []
    for tok in _COUNT_TOKEN.findall(text):
        n = int(tok) if tok.isdigit() else _NUMBER_WORDS.get(tok.lower())
        if n is not None and n not in out:
            out.append(n)
    return out


def answer_count(answer: str, given: Any) -> int:
    """The count of a counting turn: ``given`` (the record's ``count`` field) when there
    is one (an answer stating another is an error), else the one the answer states."""
    counts = stated_counts(answer)
    if given is not None:
        if isinstance(given, str) and given.strip().isdigit():
            given = int(given)
        if isinstance(given, bool) or not isinstance(given, int) or given < 0:
            raise Bad(f"'count' must be a whole number >= 0, got {json.dumps(given)}")
        if counts and given not in counts:
            raise Bad(f"'count' is {given} but the answer states {counts[0]}: {shorten(answer)!r}")
        return given
    if not counts:
        raise Bad(f"the answer states no count (digits or number words) and the record has no 'count': {shorten(answer)!r}")
    if len(counts) > 1:
        raise Bad(
            f"the answer states two different counts ({counts[0]} and {counts[1]}): {shorten(answer)!r}; "
            "give the record a 'count' field"
        )
    return counts[0]


def shorten(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def plain(text: str) -> str:
    """A turn's text without placeholders and tags, whitespace collapsed."""
    return " ".join(_TAG.sub(" ", text).split())


def is_caption_turn(turn: Turn) -> bool:
    q = turn.question.replace(IMAGE, " ").strip()
    if "<box>" in turn.question + turn.answer or "<bbox>" in turn.question + turn.answer:
        return False
    return not q or bool(CAPTION_WORDS.search(q))


# --------------------------------------------------------------------------- turns


@dataclass(frozen=True)
class TurnKeys:
    """How a format writes a turn: the role key, the text key (each tried in order)."""

    role: tuple[str, ...] = ("from", "role")
    text: tuple[str, ...] = ("value", "content")


def _turn_field(turn: dict[str, Any], keys: tuple[str, ...], what: str, j: int) -> str:
    for key in keys:
        if key in turn:
            value = turn[key]
            if not isinstance(value, str):
                raise Bad(f"message {j}: '{key}' must be a string, got {type_name(value)}")
            return value
    raise Bad(f"message {j} has no {what} ({' or '.join(repr(k) for k in keys)})")


def turns_of(messages: Any, key: str, keys: TurnKeys = TurnKeys()) -> list[Turn]:
    """The turns of a conversation list: user/model messages in pairs (system ones
    skipped where they open it); anything else is Bad naming the message."""
    if not isinstance(messages, list) or not messages:
        raise Bad(f"'{key}' must be a non-empty list of messages, got {type_name(messages)}")
    turns: list[Turn] = []
    question: str | None = None
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise Bad(f"message {j} of '{key}' must be an object, got {type_name(m)}")
        role = _turn_field(m, keys.role, "role", j).strip().lower()
        text = _turn_field(m, keys.text, "text", j)
        if role in SYSTEM_ROLES and not turns and question is None:
            continue
        if role in USER_ROLES and question is None:
            question = text
        elif role in MODEL_ROLES and question is not None:
            turns.append(Turn(len(turns), question, text))
            question = None
        elif role in USER_ROLES + MODEL_ROLES:
            want = "a model answer" if question is not None else "a user question"
            raise Bad(f"message {j} of '{key}' is from '{role}' where {want} was due (turns alternate user, model)")
        else:
            raise Bad(f"message {j} of '{key}' has unknown role '{role}' (expected {', '.join(USER_ROLES + MODEL_ROLES)})")
    if not turns:
        raise Bad(f"'{key}' holds no question with an answer")
    return turns


def record_image(rec: dict[str, Any], turns: list[Turn], key: str = "images") -> str | None:
    """The record's one image (``image``, or ``images`` holding one), checked against its
    ``<image>`` placeholders; None for a text-only conversation."""
    placeholders = sum(t.question.count(IMAGE) + t.answer.count(IMAGE) for t in turns)
    images: Any = rec.get("image", rec.get(key))
    if isinstance(images, str):
        images = [images]
    if images is None or images == []:
        if placeholders:
            raise Bad(f"the conversation has {placeholders} {IMAGE} placeholder(s) but the record has no image")
        return None
    if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
        raise Bad(f"'image' / '{key}' must be a path or a list of paths, got {type_name(images)}")
    if len(images) > 1:
        raise Bad(f"has {len(images)} images; vlmtune's tasks read one image per record")
    if placeholders > 1:
        raise Bad(f"has {placeholders} {IMAGE} placeholders for one image")
    return images[0]


# --------------------------------------------------------------------------- boxes


def parse_boxes(text: str) -> list[list[float]]:
    """The boxes of one ``<box>...</box>`` body: ``[[x1, y1, x2, y2], ...]``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise Bad(f"<box>{shorten(text, 40)}</box> is not a list of boxes [[x1, y1, x2, y2], ...]") from None
    if isinstance(value, list) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value):
        value = [value]  # <box>[x1, y1, x2, y2]</box>, one box without the outer list
    if not isinstance(value, list) or not value or not all(isinstance(b, list) for b in value):
        raise Bad(f"<box>{shorten(text, 40)}</box> is not a list of boxes [[x1, y1, x2, y2], ...]")
    return value


def internvl_boxes(turn: Turn) -> list[tuple[str, list[float]]]:
    """(phrase, box in 0-1000) of every box of a turn: ``<ref>p</ref><box>[[...]]</box>``
    in the answer (or the question), a bare ``<box>`` in the answer taking the question's
    one ``<ref>``, or a ``<box>`` in the question whose region the answer describes."""
    out: list[tuple[str, list[float]]] = []
    for side in (turn.answer, turn.question):
        for phrase, body in _REF_BOX.findall(side):
            out += [(phrase.strip(), b) for b in parse_boxes(body)]
    bare_answer = _BOX.findall(_REF_BOX.sub("", turn.answer))
    if bare_answer:
        refs = _REF.findall(turn.question)
        if len(set(r.strip() for r in refs)) != 1:
            raise Bad(f"{turn.label}: a <box> in the answer with {'no' if not refs else 'several'} <ref> phrase in the question")
        out += [(refs[0].strip(), b) for body in bare_answer for b in parse_boxes(body)]
    bare_question = _BOX.findall(_REF_BOX.sub("", turn.question))
    if bare_question and not bare_answer:
        text = plain(turn.answer)
        if not text:
            raise Bad(f"{turn.label}: a <box> in the question and no description in the answer")
        out += [(text, b) for body in bare_question for b in parse_boxes(body)]
    for phrase, _ in out:
        if not phrase:
            raise Bad(f"{turn.label}: an empty <ref></ref> phrase")
    return out


# --------------------------------------------------------------------------- items


# A format's reading of one record: (its turns, its image) or Bad.
Parse = Callable[[dict[str, Any]], tuple[list[Turn], str | None]]
# A format's boxes of one turn: (phrase, box, convention).
Boxes = Callable[[dict[str, Any], list[Turn]], dict[int, list[tuple[str, list[float], str]]]]


def internvl_turn_boxes(rec: dict[str, Any], turns: list[Turn]) -> dict[int, list[tuple[str, list[float], str]]]:
    out: dict[int, list[tuple[str, list[float], str]]] = {}
    for t in turns:
        try:
            found = internvl_boxes(t)
        except Bad as e:
            msg = str(e)
            raise Bad(msg if msg.startswith("turn ") else f"{t.label}: {msg}") from None
        if found:
            out[t.index] = [(p, b, "norm1000") for p, b in found]
    return out


def record_items(
    ck: Checker, kind: Kind, label: str, rec: Any, parse: Parse, boxes: Boxes, root: Path | None = None
) -> Iterator[Item]:
    """The items of one conversation record: for pairs, its captions as one record and
    one grounding record per box; for counting, one record per turn. A record that is
    bad as a whole is one failing item."""
    if not isinstance(rec, dict):
        yield Item(label, lambda: rec, root=root)
        return
    try:
        turns, image = parse(rec)
        found = boxes(rec, turns) if kind == "pairs" else {}
    except Bad as e:
        yield Item(label, failing(str(e)), root=root)
        return
    if image is None:
        ck.count("text-only conversations (no image) not read")
        return
    ck.scan.rules["captions" if kind == "pairs" else "counts"] = CAPTION_RULE if kind == "pairs" else COUNT_RULE
    if kind == "counting":
        yield from _count_items(label, rec, turns, image, root)
        return
    yield from _pair_items(ck, label, turns, image, found, root)


def _count_items(label: str, rec: dict[str, Any], turns: list[Turn], image: str, root: Path | None) -> Iterator[Item]:
    for k, t in enumerate(turns):
        lab = label if len(turns) == 1 else f"{label} {t.label}"

        def get(t: Turn = t) -> dict[str, Any]:
            question = plain(t.question)
            answer = t.answer.strip()
            return {"image": image, "question": question, "answer": answer, "count": answer_count(answer, rec.get("count"))}

        yield Item(lab, get, new=k == 0, root=root)


def _pair_items(
    ck: Checker,
    label: str,
    turns: list[Turn],
    image: str,
    found: dict[int, list[tuple[str, list[float], str]]],
    root: Path | None,
) -> Iterator[Item]:
    captions = [plain(t.answer) for t in turns if t.index not in found and is_caption_turn(t)]
    others = sum(1 for t in turns if t.index not in found and not is_caption_turn(t))
    if others:
        ck.count("conversation turns that are not caption turns (questions about the image) not read", others)
    new = True
    if captions:
        yield Item(label, returning({"image": image, "caption": captions}), root=root)
        new = False
    for index, boxes in found.items():
        for k, (phrase, box, convention) in enumerate(boxes):
            rec = {"image": image, "text": phrase, "bbox": box, "box_convention": convention}
            yield Item(f"{label} turn {index} box {k}", returning(rec), new=new, root=root)
            new = False
    if new:
        yield Item(
            label, failing("no caption turn and no box: nothing to read (see 'data inspect' for the caption rule)"), root=root
        )
