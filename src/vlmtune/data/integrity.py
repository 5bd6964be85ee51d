"""What a run checks about its data files before it trusts them.

- The sha256 of the train/val/test annotation files is recorded in the run's state
  (``TrainState.data_sha256``); ``--resume`` compares them and refuses a changed file
  by name unless the user passes ``--accept-changed-data``: a resumed run that trains
  on other data than it started with is not the run it claims to be.
- Splits that share images or records (a test file equal to the training file, a
  validation set cut from the training set) are reported with a warning naming the two
  splits and the overlap: the metrics of the later split are then optimistic.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from vlmtune.errors import DataError
from vlmtune.utils import sha256_file

log = logging.getLogger("vlmtune")

SPLITS = ("train", "val", "test")


def file_sha256(path: str | Path) -> str:
    return sha256_file(path, DataError)


def data_digests(paths: dict[str, str]) -> dict[str, str]:
    """sha256 of each split's annotation file (split name -> digest); a file that holds
    every split (Karpathy, refer) is read once."""
    digests: dict[str, str] = {}
    for path in {p for p in paths.values() if p and Path(p).is_file()}:
        digests[path] = file_sha256(path)
    return {split: digests[path] for split, path in paths.items() if path in digests}


def check_data_unchanged(saved: dict[str, str], now: dict[str, str], paths: dict[str, str], *, accept: bool, run: str) -> None:
    """Refuse a resume whose data files differ from those the run started with.

    ``saved``: the digests the checkpoint recorded; ``now``: the files' digests today;
    ``accept`` (``--accept-changed-data``): warn instead of refusing.
    """
    changed = [s for s in SPLITS if s in saved and saved[s] != now.get(s)]
    changed += sorted(s for s in saved if s not in SPLITS and saved[s] != now.get(s))
    if not changed:
        return
    names = ", ".join(f"{s} ({paths.get(s, '?')})" for s in changed)
    if not accept:
        also = f"; also changed: {', '.join(changed[1:])}" if len(changed) > 1 else ""
        raise DataError(
            f"{paths.get(changed[0], changed[0])}: the {changed[0]} data file changed since the run in "
            f"{run} started (its sha256 differs{also}); pass --accept-changed-data to continue on the "
            f"new data"
        )
    log.warning("--accept-changed-data: continuing %s on changed data: %s", run, names)


def _image_key(rec: Any) -> str:
    return str(Path(rec.image).resolve())


def _record_key(rec: Any) -> tuple[str, ...]:
    """What makes two records the same example: the image and its text (a caption, or
    a question and its answer)."""
    texts = tuple(str(getattr(rec, name)) for name in ("text", "question", "answer") if hasattr(rec, name))
    return (_image_key(rec), *texts)


def split_overlaps(records: Mapping[str, Iterable[Any]]) -> list[tuple[str, str, int, int]]:
    """(split a, split b, shared images, shared records) for every pair of splits that
    overlap, in train/val/test order."""
    names = [s for s in SPLITS if s in records] + sorted(s for s in records if s not in SPLITS)
    # Records without an image (a task of another kind) take no part.
    kept = {s: [r for r in records[s] if getattr(r, "image", None) is not None] for s in names}
    images = {s: {_image_key(r) for r in kept[s]} for s in names}
    recs = {s: {_record_key(r) for r in kept[s]} for s in names}
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            n_img, n_rec = len(images[a] & images[b]), len(recs[a] & recs[b])
            if n_img or n_rec:
                out.append((a, b, n_img, n_rec))
    return out


def warn_overlaps(records: Mapping[str, Iterable[Any]], paths: Mapping[str, str]) -> list[str]:
    """Log one warning per pair of overlapping splits; returns the messages."""
    messages = []
    for a, b, n_img, n_rec in split_overlaps(records):
        messages.append(
            f"the {a} and {b} splits overlap: {n_img} shared images, {n_rec} identical records "
            f"({paths.get(a, a)} and {paths.get(b, b)}); metrics on {b} will be optimistic"
        )
        log.warning(messages[-1])
    return messages
