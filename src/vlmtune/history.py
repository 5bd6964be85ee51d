"""history.jsonl: the records a training run writes, one JSON object a line.

The schema is declared here once. Each record type is a dataclass: its fields are the
line's keys, in the order they are written, after ``"type"``. A field whose metadata
names a ``prefix`` is an open family (``terms`` holds the ``loss/<term>`` keys); a field
annotated ``X | None`` is optional, left out of the line when None. The training loop
writes records through :class:`History`; :func:`read_history` reads them back (the
report does), and a line that lacks a key, holds one of the wrong type, or holds one the
schema does not know is a :class:`DataError` naming the file, the line and the key.

- ``stage``: when a stage starts: its index and name, the epoch and optimizer step it
  starts at, the components it trains (with their LR scales), its loss terms, the
  trainable and total parameter counts, and where it reads cached features from.
- ``step``: every ``train.log_every`` optimizer steps: the means over that window of the
  total loss, each loss term and each diagnostic, and each parameter group's LR.
- ``epoch``: after each epoch's validation: cumulative samples, training and total wall
  time, peak memory, and the validation metrics.

Epochs are counted from 1 in every line, as the console and metrics.json count them:
``epoch`` is the epoch the line belongs to (a stage line: the stage's first epoch).
Files written before that counted from 0; :func:`epochs_from_one` reads both (a run's
first stage line says which: it starts at epoch 0 or 1). ``stage`` is the index into
the config's ``stages`` list, from 0.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from vlmtune.errors import DataError
from vlmtune.runfolder import write_text
from vlmtune.utils import jsonl_objects

__all__ = ["EpochRecord", "History", "Record", "StageRecord", "StepRecord", "epochs_from_one", "parse_record", "read_history"]


def _family(prefix: str) -> Any:
    """An open family of keys ``<prefix><name>``, held as {name: value}."""
    return field(default_factory=dict, metadata={"prefix": prefix})


class _Record:
    """What the three record types share: writing a line's object and reading one back."""

    TYPE: ClassVar[str]

    def to_json(self) -> dict[str, Any]:
        """The line's JSON object: ``"type"``, then the fields in order, each family's
        keys under its prefix, optional keys only when set."""
        out: dict[str, Any] = {"type": self.TYPE}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if "prefix" in f.metadata:
                out.update({f.metadata["prefix"] + k: v for k, v in value.items()})
            elif value is not None or not _optional(f):
                out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> Any:
        """The record a line's object holds; ``where`` (file and line) starts any error,
        which names the first key missing, unknown to the schema, or of the wrong type."""
        fixed = {f.name: f for f in fields(cls) if "prefix" not in f.metadata}  # type: ignore[arg-type]
        families = [f for f in fields(cls) if "prefix" in f.metadata]  # type: ignore[arg-type]
        for name, f in fixed.items():
            if name not in data and not _optional(f):
                raise DataError(f"{where}: {cls.TYPE} line: missing key '{name}'")
        values: dict[str, Any] = {f.name: {} for f in families}
        for key, value in data.items():
            if key == "type":
                continue
            if key in fixed:
                values[key] = value
                kind = _kind(fixed[key])  # an optional key is absent when unset, never null
            else:
                fam = next((f for f in families if key.startswith(f.metadata["prefix"])), None)
                if fam is None:
                    raise DataError(f"{where}: {cls.TYPE} line: key '{key}' is not in the schema (vlmtune.history)")
                values[fam.name][key.removeprefix(fam.metadata["prefix"])] = value
                kind = _MEMBER[_kind(fam)]
            check, what = _CHECKS[kind]
            if not check(value):
                raise DataError(f"{where}: {cls.TYPE} line: '{key}' must be {what}, got {json.dumps(value)[:60]}")
        return cls(**values)


@dataclass(frozen=True)
class StageRecord(_Record):
    """A stage starts (a run resumed inside a stage does not write it again)."""

    TYPE: ClassVar[str] = "stage"
    stage: int
    name: str
    epoch: int
    step: int
    train: dict[str, float]  # component -> LR scale
    losses: list[str]  # active loss terms, sorted
    trainable: int
    total: int
    cache: dict[str, Any]  # cache_dir, cache_vision, cache_text (+ cache_vision_start for a prefix); empty without a cache


@dataclass(frozen=True)
class StepRecord(_Record):
    """Means over the logging window that ends at ``step``."""

    TYPE: ClassVar[str] = "step"
    epoch: int
    step: int
    stage: int
    loss: float | None = None  # None when every step of the window was skipped (non-finite loss)
    terms: dict[str, float] = _family("loss/")
    diag: dict[str, float] = _family("diag/")
    lr: dict[str, float] = _family("lr/")  # by parameter group name
    bad_steps: int | None = None  # skipped steps so far in the run; None while there are none

    @classmethod
    def from_means(
        cls, epoch: int, step: int, stage: int, means: dict[str, float], lr: dict[str, float], bad_steps: int
    ) -> StepRecord:
        """From the window's means as the loop keeps them: ``"loss"``, each term by its
        name, diagnostics as ``"diag/<name>"``; ``bad_steps`` 0 is left out of the line."""
        return cls(
            epoch=epoch,
            step=step,
            stage=stage,
            loss=means.get("loss"),
            terms={k: v for k, v in means.items() if k != "loss" and not k.startswith("diag/")},
            diag={k.removeprefix("diag/"): v for k, v in means.items() if k.startswith("diag/")},
            lr=dict(lr),
            bad_steps=bad_steps or None,
        )


@dataclass(frozen=True)
class EpochRecord(_Record):
    """An epoch ends, after its validation."""

    TYPE: ClassVar[str] = "epoch"
    epoch: int
    step: int
    stage: int
    samples: int  # training samples seen so far, all processes together
    train_wall_s: float  # training time so far, validation left out
    wall_s: float  # time since the run started, validation included
    peak_mem_mb: float
    val: dict[str, Any] = _family("val/")  # scalar validation metrics (lists are not logged)


Record = StageRecord | StepRecord | EpochRecord
RECORD_TYPES: dict[str, type[_Record]] = {r.TYPE: r for r in (StageRecord, StepRecord, EpochRecord)}


# --------------------------------------------------------------------------- value types


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# Each annotation the records use: (its check, what it asks for, for error messages).
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (_is_int, "an integer"),
    "float": (_is_number, "a number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "list[str]": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "dict[str, float]": (lambda v: isinstance(v, dict) and all(map(_is_number, v.values())), "an object of numbers"),
    "dict[str, Any]": (lambda v: isinstance(v, dict), "an object"),
    "scalar": (lambda v: v is None or isinstance(v, (str, int, float, bool)), "a number, string, boolean or null"),
}
# What each member of a family holds, by the family's annotation.
_MEMBER = {"dict[str, float]": "float", "dict[str, Any]": "scalar"}


def _kind(f: Any) -> str:
    """A field's annotation (a string: this module defers annotations), without ``| None``."""
    return str(f.type).removesuffix(" | None")


def _optional(f: Any) -> bool:
    return str(f.type).endswith(" | None")


# --------------------------------------------------------------------------- reading


def parse_record(data: dict[str, Any], where: str) -> Record:
    """The record a history line's object holds, by its ``"type"``; ``where`` (file and
    line) starts any error."""
    kind = data.get("type")
    if kind not in RECORD_TYPES:
        got = "no 'type'" if "type" not in data else f"type {json.dumps(kind)}"
        raise DataError(f"{where}: {got}; a history line's type is one of: {', '.join(RECORD_TYPES)}")
    return RECORD_TYPES[kind].from_json(data, where)


def read_history(path: str | Path) -> list[Record]:
    """Every record of a history.jsonl, checked against the schema (blank lines skipped)."""
    path = Path(path)
    return [parse_record(data, f"{path}: line {i}") for i, data in jsonl_objects(path.read_text().splitlines(), path)]


# --------------------------------------------------------------------------- writing


class History:
    """history.jsonl: one JSON line per record; truncated on resume to the lines the
    checkpoint had seen, so no line is written twice. Only the main process writes it
    (``enabled``).

    ``keep_lines``: None (or 0) starts a new file; a number keeps that many lines of an
    existing one (the checkpoint's ``history_lines``). ``sink`` (e.g. a tracker) is
    called with each new record's JSON object.

    Records are given with their epochs counted from 1; a kept file that counted from 0
    (a run started by vlmtune 0.2.0 or earlier, resumed now) goes on counting from 0, so
    one file never holds both (:func:`epochs_from_one` reads either).
    """

    def __init__(
        self, path: Path, keep_lines: int | None, sink: Callable[[dict[str, Any]], Any] | None = None, enabled: bool = True
    ):
        self.path = path
        self.sink = sink
        self.enabled = enabled
        lines = path.read_text().splitlines() if keep_lines and path.exists() else []
        self.lines = lines[:keep_lines] if keep_lines else []
        self.from_zero = _counts_from_zero(self.lines)
        if enabled:
            write_text(path, "".join(ln + "\n" for ln in self.lines))  # never through a symbolic link

    def write(self, record: Record) -> None:
        if not self.enabled:
            return
        if self.from_zero:
            record = replace(record, epoch=record.epoch - 1)
        data = record.to_json()
        line = json.dumps(data)
        self.lines.append(line)
        write_text(self.path, line + "\n", append=True)
        if self.sink is not None:
            self.sink(data)


def _counts_from_zero(lines: list[str]) -> bool:
    """Whether history lines count epochs from 0: their first stage line says epoch 0."""
    for line in lines:
        try:
            data = json.loads(line)
        except ValueError:
            return False
        if isinstance(data, dict) and data.get("type") == StageRecord.TYPE:
            return data.get("epoch") == 0
    return False


def epochs_from_one(records: list[Any]) -> list[Any]:
    """``records`` (of one history.jsonl) with their epochs counted from 1: as they are
    when the file was written so, shifted by one when it counted from 0 (vlmtune 0.2.0
    and earlier: its first stage line says epoch 0)."""
    first = next((r for r in records if isinstance(r, StageRecord)), None)
    if first is None or first.epoch != 0:
        return records
    return [replace(r, epoch=r.epoch + 1) if hasattr(r, "epoch") else r for r in records]
