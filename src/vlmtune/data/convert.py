"""``vlmtune data convert``: the same records in another tool's format.

The records are what the readers give (any format, read with the data.* settings), so
boxes leave in pixels and are written in the target's convention by the box contract
(:mod:`vlmtune.data.formats.boxes`); reading the output back gives the same records
(InternVL's boxes up to its 0-1000 rounding).

- ``internvl``: ``meta.json`` (one entry, ``root`` the images' folder) and ``NAME.jsonl``:
  per image, one record whose turns are its captions ("Describe the image.", a caption
  turn by the readers' rule) and its boxes (``<ref>text</ref><box>[[x1, y1, x2, y2]]</box>``
  in 0-1000); per counting record, one question with its answer and ``count``.
- ``swift``: ``NAME.jsonl`` of ms-swift records: ``messages`` + ``images`` (absolute
  paths, as ms-swift takes them); boxes as ``objects`` with ``bbox_type: real`` (pixel
  x1, y1, x2, y2, exact) and ``<ref-object>`` / ``<bbox>`` tags; records with negatives
  as embedding records (``positive_messages`` / ``negative_messages`` / ``*_images``).
- ``vlmtune``: ``NAME.json`` (pairs and grounding: ``image``, ``caption`` or ``text``,
  ``bbox`` in pixel x, y, w, h, ``relation``, ``negatives``, ``negative_images``) or
  ``NAME.jsonl`` (counting), image paths relative to the images' folder.

What a target cannot hold is refused, naming the record (a spatial relation has no
place in InternVL's or ms-swift's data; ``--to vlmtune`` keeps it). Nothing is written
outside ``--out``; an existing file is never replaced, and no link is followed.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmtune.data.formats import RELATIONS, CountRecord, PairRecord
from vlmtune.data.formats.boxes import from_pixels, to_norm1000
from vlmtune.data.formats.images import image_size
from vlmtune.errors import DataError, VlmtuneError

TARGETS = ("internvl", "swift", "vlmtune")
CAPTION_QUESTION = "Describe the image."
GROUNDING_QUESTION = "Please provide the bounding box coordinate of the region this sentence describes: "


def images_root(records: Sequence[Any]) -> Path:
    """The folder every image (and negative image) of the records lies in."""
    paths = [str(Path(r.image).parent) for r in records]
    paths += [str(Path(p).parent) for r in records for p in getattr(r, "negative_images", ())]
    root = Path(os.path.commonpath(paths))
    while not root.is_dir():  # a webdataset shard: its folder
        root = root.parent
    return root


def _rel(path: Path, root: Path) -> str:
    return Path(path).relative_to(root).as_posix()


def _by_image(records: Sequence[PairRecord]) -> list[list[PairRecord]]:
    groups: dict[int, list[PairRecord]] = {}
    for r in records:
        groups.setdefault(r.image_id, []).append(r)
    return list(groups.values())


def _refuse_relations(records: Sequence[PairRecord], target: str) -> None:
    for r in records:
        if r.relation is not None:
            raise DataError(
                f"{r.source}: relation '{RELATIONS[r.relation]}' has no place in {target}'s format; "
                "--to vlmtune keeps it (or drop the relations from the file)"
            )


# --------------------------------------------------------------------------- internvl


def _internvl_pairs(records: Sequence[PairRecord], root: Path) -> list[dict[str, Any]]:
    _refuse_relations(records, "InternVL")
    for r in records:
        if r.negatives or r.negative_images:
            raise DataError(f"{r.source}: negatives have no place in InternVL's format; --to swift or vlmtune keeps them")
    out: list[dict[str, Any]] = []
    for group in _by_image(records):
        image = group[0].image
        size = image_size(image)
        turns: list[dict[str, str]] = []
        for r in group:
            head = "<image>\n" if not turns else ""
            if r.bbox is None:
                turns += [{"from": "human", "value": head + CAPTION_QUESTION}, {"from": "gpt", "value": r.text}]
            else:
                box = to_norm1000(r.bbox, size)
                ref = f"<ref>{r.text}</ref>"
                turns += [
                    {"from": "human", "value": head + GROUNDING_QUESTION + ref},
                    {"from": "gpt", "value": f"{ref}<box>[{box}]</box>"},
                ]
        out.append({"id": len(out), "image": _rel(image, root), "width": size[0], "height": size[1], "conversations": turns})
    return out


def _internvl_counts(records: Sequence[CountRecord], root: Path) -> list[dict[str, Any]]:
    return [
        {
            "id": i,
            "image": _rel(r.image, root),
            "conversations": [{"from": "human", "value": "<image>\n" + r.question}, {"from": "gpt", "value": r.answer}],
            "count": r.count,
        }
        for i, r in enumerate(records)
    ]


# --------------------------------------------------------------------------- swift


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _swift_embedding(r: PairRecord) -> dict[str, Any]:
    if r.negatives and r.negative_images:
        raise DataError(f"{r.source}: an ms-swift embedding record holds negative captions or negative images, not both")
    if r.negative_images:  # a caption anchor, its image the positive
        return {
            "messages": _user(r.text),
            "positive_messages": [_user("<image>")],
            "positive_images": [[str(r.image)]],
            "negative_messages": [_user("<image>") for _ in r.negative_images],
            "negative_images": [[str(p)] for p in r.negative_images],
        }
    return {
        "messages": _user("<image>"),
        "images": [str(r.image)],
        "positive_messages": [_user(r.text)],
        "negative_messages": [_user(t) for t in r.negatives],
    }


def _swift_pairs(records: Sequence[PairRecord]) -> list[dict[str, Any]]:
    _refuse_relations(records, "ms-swift")
    out = []
    for group in _by_image(records):
        image = group[0].image
        messages: list[dict[str, str]] = []
        refs: list[str] = []
        boxes: list[list[float]] = []
        for r in group:
            if r.negatives or r.negative_images:
                out.append(_swift_embedding(r))
                continue
            head = "<image>" if not messages else ""
            if r.bbox is None:
                messages += [{"role": "user", "content": head + CAPTION_QUESTION}, {"role": "assistant", "content": r.text}]
            else:
                messages += [{"role": "user", "content": head + "Find <ref-object>"}, {"role": "assistant", "content": "<bbox>"}]
                refs.append(r.text)
                boxes.append(list(from_pixels(r.bbox, "xyxy", (1, 1))))
        if messages:
            rec: dict[str, Any] = {"messages": messages, "images": [str(image)]}
            if refs:
                rec["objects"] = {"ref": refs, "bbox": boxes, "bbox_type": "real"}
            out.append(rec)
    return out


def _swift_counts(records: Sequence[CountRecord]) -> list[dict[str, Any]]:
    return [
        {
            "messages": [{"role": "user", "content": "<image>" + r.question}, {"role": "assistant", "content": r.answer}],
            "images": [str(r.image)],
            "count": r.count,
        }
        for r in records
    ]


# --------------------------------------------------------------------------- vlmtune


def _vlmtune_pairs(records: Sequence[PairRecord], root: Path) -> list[dict[str, Any]]:
    out = []
    for r in records:
        rec: dict[str, Any] = {"image": _rel(r.image, root)}
        if r.bbox is None and r.relation is None:
            rec["caption"] = r.text
        else:
            rec["text"] = r.text
        if r.bbox is not None:
            rec["bbox"] = list(r.bbox)
        if r.relation is not None:
            rec["relation"] = RELATIONS[r.relation]
        if r.negatives:
            rec["negatives"] = list(r.negatives)
        if r.negative_images:
            rec["negative_images"] = [_rel(p, root) for p in r.negative_images]
        out.append(rec)
    return out


def _vlmtune_counts(records: Sequence[CountRecord], root: Path) -> list[dict[str, Any]]:
    return [{"image": _rel(r.image, root), "question": r.question, "answer": r.answer, "count": r.count} for r in records]


# --------------------------------------------------------------------------- writing


def write_new(path: Path, text: str) -> None:
    """Create ``path`` with ``text``; an existing file (or a link) there is refused."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    except FileExistsError:
        raise VlmtuneError(f"{path}: exists; data convert never replaces a file (choose another --out)") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise VlmtuneError(f"{path}: is a symbolic link; data convert does not write through links") from None
        raise VlmtuneError(f"{path}: cannot write ({e.strerror or e})") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def convert(records: Sequence[Any], kind: str, target: str, out: Path, name: str) -> dict[str, Any]:
    """Write ``records`` (pairs or counting) in ``target``'s format into ``out`` (an
    existing folder); returns what was written and the image root to read it back with."""
    if not records:
        raise DataError("no records to convert")
    root = images_root(records)
    files: dict[str, str] = {}
    if target == "internvl":
        rows = _internvl_pairs(records, root) if kind == "pairs" else _internvl_counts(records, root)
        files[f"{name}.jsonl"] = _jsonl(rows)
        meta = {
            name: {"root": str(root), "annotation": f"{name}.jsonl", "data_augment": False, "repeat_time": 1, "length": len(rows)}
        }
        files["meta.json"] = json.dumps(meta, indent=2) + "\n"
        main = "meta.json"
    elif target == "swift":
        rows = _swift_pairs(records) if kind == "pairs" else _swift_counts(records)
        files[f"{name}.jsonl"] = _jsonl(rows)
        main = f"{name}.jsonl"
    elif target == "vlmtune":
        if kind == "pairs":
            files[f"{name}.json"] = json.dumps(_vlmtune_pairs(records, root), indent=1, ensure_ascii=False) + "\n"
            main = f"{name}.json"
        else:
            files[f"{name}.jsonl"] = _jsonl(_vlmtune_counts(records, root))
            main = f"{name}.jsonl"
    else:
        raise VlmtuneError(f"--to {target}: one of {', '.join(TARGETS)}")
    for fname in files:  # refuse before writing anything
        if (out / fname).exists() or (out / fname).is_symlink():
            raise VlmtuneError(f"{out / fname}: exists; data convert never replaces a file (choose another --out)")
    for fname, text in files.items():
        write_new(out / fname, text)
    path = out / main
    return {
        "written": [str(out / f) for f in files],
        "records": len(records),
        "format": target,
        "image_root": str(root),
        "read_back": f"vlmtune data validate {path}" + ("" if target == "internvl" else f" data.image_root={root}"),
    }
