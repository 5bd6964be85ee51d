"""What a run checks before any work: the stage plan fits the model, every active loss
has targets in the training data, the evaluation settings fit the val and test splits."""

from __future__ import annotations

import logging
from typing import Any

from vlmtune.config import Config
from vlmtune.data.integrity import warn_overlaps
from vlmtune.errors import ConfigError
from vlmtune.stages import Stage
from vlmtune.tasks import Task
from vlmtune.tasks.model import TaskModel

log = logging.getLogger("vlmtune")


def check_plan_fits(model: TaskModel, plan: list[Stage]) -> None:
    """Fail before any work when a stage asks for more blocks than exist (the model's
    ``component_modules`` refuses them)."""
    for st in plan:
        for comp in st.train:
            model.component_modules(comp, st.vision_blocks)


def check_loss_targets(cfg: Config, task: Task, plan: list[Stage], records: list[Any], path: str) -> None:
    """A stage whose active loss has no target anywhere in the training data (a box loss
    and no record with a box) is an error naming the stage and the loss, not a loss
    that silently never trains. Tasks say which targets records hold (``loss_targets``)."""
    targets = task.loss_targets(records)
    for stage in plan:
        missing = sorted(stage.losses - targets)
        if not missing:
            continue
        loss = missing[0]
        how = (
            f"remove it from stages[{stage.index}].losses"
            if cfg.stages[stage.index].losses is not None
            else f"set loss.{loss}=0 or list this stage's losses in stages[{stage.index}].losses"
        )
        raise ConfigError(
            f"stages[{stage.index}] '{stage.name}': the '{loss}' loss is active but no training record "
            f"({path}, {len(records)} records) has a target for it; use data that has one, or {how}"
        )


def check_splits(task: Task, paths: dict[str, str], records: dict[str, list[Any]], main: bool) -> None:
    """Before any work: the evaluation settings fit the val and test splits (a task's
    ``check_eval_records``, e.g. eval.ks within the gallery), and splits that share
    images or records are reported (a warning, not an error)."""
    task.check_eval_records(records["val"], paths["val"])
    task.check_eval_records(records["test"], paths["test"])
    if main:
        warn_overlaps(records, paths)


def metric_value(metric: str | None, val: dict[str, Any]) -> float:
    """The early-stopping metric's value, which must be one the validation pass gives."""
    if metric is None or metric not in val:
        shown = ", ".join(k for k in sorted(val) if not k.startswith("retrieval/chance"))
        raise ConfigError(f"train.early_stopping.metric: '{metric}' is not among the validation metrics ({shown})")
    return float(val[metric])
