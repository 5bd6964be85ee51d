"""The training loop's state, which is also a checkpoint's ``state.json``.

One typed record serves the loop (counters, best metric, the history line in
progress) and every reader of a checkpoint (resume, evaluate, predict). Reading
validates every field's type and range, so a hand-edited or hostile ``state.json``
is refused with a message naming the field, before anything uses it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from vlmtune.errors import CheckpointError
from vlmtune.utils import shorten


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    best: float | None = None  # best value of the early-stopping metric so far
    best_epoch: int | None = None  # 0-based epoch that reached it
    bad_evals: int = 0  # evaluations without improvement in this stage
    wall_s: float = 0.0  # wall time of the run so far (training + validation)
    history_lines: int = 0  # lines of history.jsonl this state has seen
    stopped_early: bool = False
    max_trainable: int = 0  # most trainable parameters of any stage so far
    samples: int = 0  # training samples seen (all processes)
    train_wall_s: float = 0.0  # training time alone (no validation)
    backbone: dict[str, Any] = field(default_factory=dict)  # identity of the backbone trained on
    data_paths: dict[str, str] = field(default_factory=dict)  # train/val/test annotation files
    data_sha256: dict[str, str] = field(default_factory=dict)  # ... and their sha256 (--resume compares)
    metric: str = ""  # the early-stopping metric
    # Mid-epoch checkpoints (a signal, a run of bad steps): batches of epoch ``epoch``
    # already trained, and the running sums of the history line in progress.
    epoch_batches: int = 0
    running: dict[str, float] = field(default_factory=dict)
    n_running: int = 0
    bad_steps: int = 0  # non-finite steps skipped in all
    bad_in_row: int = 0  # ... and in a row, now
    # The early-stopping metric of the last validation (NaN when it was NaN), so a run
    # resumed after its last epoch reports train/last_val as the uninterrupted one did.
    last_val: float | None = None
    num_threads: int = 0  # CPU threads the run computes with (a resume keeps them); 0: not recorded

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str = "state.json") -> TrainState:
        """Validate and build; unknown keys other than the checkpoint's own bookkeeping
        (``format_version``) are refused, as are missing ones."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{where}: expected a JSON object, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names) - {"format_version"})
        if unknown:
            raise CheckpointError(f"{where}: unknown field '{unknown[0][:80]}'")
        missing = [n for n in names if n not in data and n not in _OPTIONAL]
        if missing:
            raise CheckpointError(f"{where}: field '{missing[0]}' is missing")
        values = {n: _check(n, data[n], where) for n in names if n in data}
        st = cls(**values)
        if st.best_epoch is not None and st.best_epoch >= st.epoch:
            raise CheckpointError(f"{where}: best_epoch {st.best_epoch} is not before epoch {st.epoch}")
        if st.n_running and not st.running:
            raise CheckpointError(f"{where}: n_running is {st.n_running} but running is empty")
        return st

    def check_against(self, epochs: int, where: str) -> None:
        """Ranges that depend on the run's config: a checkpoint cannot be past its last epoch."""
        if self.epoch > epochs:
            raise CheckpointError(f"{where}: epoch {self.epoch} is past the config's train.epochs ({epochs})")


_COUNTERS = (
    "epoch",
    "step",
    "bad_evals",
    "history_lines",
    "max_trainable",
    "samples",
    "epoch_batches",
    "n_running",
    "bad_steps",
    "bad_in_row",
    "num_threads",
)
_SECONDS = ("wall_s", "train_wall_s")
# Fields added after checkpoints were first written: absent in older ones, they take their default.
_OPTIONAL = ("last_val", "num_threads")


def _check(name: str, value: Any, where: str) -> Any:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{where}: field '{name}' {what}, got {shorten(repr(value), 80)}")

    if name in _COUNTERS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > 2**62:
            raise bad("must be a non-negative integer")
        return value
    if name in _SECONDS:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise bad("must be a non-negative number of seconds")
        return float(value)
    if name == "best":
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad("must be a finite number or null")
        return float(value)
    if name == "last_val":
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isinf(value):
            raise bad("must be a number, NaN or null")
        return float(value)
    if name == "best_epoch":
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise bad("must be a non-negative integer or null")
        return value
    if name == "stopped_early":
        if not isinstance(value, bool):
            raise bad("must be true or false")
        return value
    if name == "metric":
        if not isinstance(value, str):
            raise bad("must be a string")
        return value
    if name == "backbone":
        if not isinstance(value, dict):
            raise bad("must be an object")
        return value
    if name == "data_paths":
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise bad("must map split names to file paths")
        return value
    if name == "data_sha256":
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)
            for k, v in value.items()
        ):
            raise bad("must map split names to sha256 digests")
        return value
    if name == "running":
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in value.items()
        ):
            raise bad("must map loss names to numbers")
        return {k: float(v) for k, v in value.items()}
    raise AssertionError(name)  # pragma: no cover - every field is handled above
