"""What the final metrics say about the run beyond the test split: which stage the
evaluated (best) checkpoint comes from, and whether the later stages helped."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from vlmtune.history import EpochRecord, History, parse_record
from vlmtune.stages import Stage
from vlmtune.state import TrainState

log = logging.getLogger("vlmtune")


def is_better(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    """Whether ``value`` improves on ``best`` (None or NaN: any number does) by more than ``min_delta``."""
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best + min_delta if mode == "max" else value < best - min_delta


def run_metrics(state: TrainState, total_params: int, peak_mem_mb: float, checkpoint: Path) -> dict[str, Any]:
    """The final metrics' train/* and params/* keys: how long, how far, how big; and the checkpoint evaluated."""
    return {
        "train/epochs": state.epoch,
        # Counted from 1, as the epoch lines and history.jsonl count (the state keeps its 0-based index).
        "train/best_epoch": None if state.best_epoch is None else state.best_epoch + 1,
        "train/best_val": state.best,
        "train/stopped_early": state.stopped_early,
        "train/steps": state.step,
        "train/bad_steps": state.bad_steps,
        "train/wall_s": round(state.wall_s, 3),
        "train/train_wall_s": round(state.train_wall_s, 3),
        "train/samples": state.samples,
        "train/samples_per_s": round(state.samples / max(state.train_wall_s, 1e-9), 2),
        "train/peak_mem_mb": round(peak_mem_mb, 1),
        "params/trainable": state.max_trainable,
        "params/total": total_params,
        "checkpoint": str(checkpoint),
    }


def best_stage_metrics(
    plan: list[Stage], state: TrainState, history: History, metric: str, mode: str, main: bool
) -> dict[str, Any]:
    """Which stage the best checkpoint (the one evaluated) comes from, each stage's best
    validation value, and whether the stages after the first ever beat it.

    train/best_stage, train/best_stage_name: the stage of train/best_epoch (its index
    in the config's ``stages``, from 0, as in history.jsonl's ``stage``); train/stage_best_val: per stage of the plan, its best validation
    value of the early-stopping ``metric`` (null for a stage that never ran);
    train/later_stages_improved: false when stages after the first ran and none beat the
    first stage's best, so the evaluated weights come from the first stage alone (also
    logged as a warning). Stage values come from history.jsonl, which the main process keeps.
    """
    out: dict[str, Any] = {}
    if state.best_epoch is not None:
        stage = next((s for s in plan if s.start_epoch <= state.best_epoch < s.end_epoch), None)
        if stage is not None:
            out["train/best_stage"], out["train/best_stage_name"] = stage.index, stage.name
    if not main:
        return out
    per_stage: list[float | None] = [None] * len(plan)
    for i, line in enumerate(history.lines, 1):
        rec = parse_record(json.loads(line), f"{history.path}: line {i}")
        value = rec.val.get(metric) if isinstance(rec, EpochRecord) else None
        if not isinstance(value, (int, float)) or not 0 <= rec.stage < len(per_stage) or math.isnan(value):
            continue
        best = per_stage[rec.stage]
        if best is None or is_better(float(value), best, mode, 0.0):
            per_stage[rec.stage] = float(value)
    out["train/stage_best_val"] = per_stage
    later_ran = [s for s, v in zip(plan[1:], per_stage[1:]) if v is not None]
    if later_ran and out.get("train/best_stage") is not None:
        improved = out["train/best_stage"] > 0
        out["train/later_stages_improved"] = improved
        if not improved:
            first = plan[0]
            log.warning(
                "stages after the first (%s) never beat stage 0 '%s' on validation %s (best %.3f at epoch %d): "
                "the evaluated checkpoint is stage 0's, so nothing those stages trained is in it",
                ", ".join(f"'{s.name}'" for s in later_ran),
                first.name,
                metric,
                state.best,
                (state.best_epoch or 0) + 1,
            )
    return out
