"""Tasks: what differs between recipes, behind one small interface the engine uses.

A task is a subclass of :class:`~vlmtune.tasks.base.Task`, one package per task
(``retrieval/``, ``counting/``: model, losses, data, evaluation, config sections and the
task class). It is built once, at the edge, from the config (``from_config``), keeps
the plain config sections it needs, and offers the engine keyword-only methods. What
the rest of vlmtune must know about a task (its trainable components, config
sections, losses, default metric, key metrics, report sections) is declared on a class
that needs no torch, ``spec.py``'s (:func:`task_spec`), and read from there by config
validation, the CLI and the report; the class that builds and runs the task
(``task.py``'s, :func:`task_class`) inherits it and is imported only when a command
builds the task. So ``config explain``, ``config show`` and a config error answer
before torch is imported.

Adding a task: write ``vlmtune/tasks/NAME/`` with a ``Task`` subclass and add one line
to :data:`TASKS` (its declaring class, whose ``implementation`` names the full one; or
the class itself, declarations and all).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vlmtune.tasks.base import FeatureCache, Task, data_paths

if TYPE_CHECKING:
    from vlmtune.config.schema import Config

# name -> "module:Class" of the task's declarations (imported on first use; no torch) or a class.
TASKS: dict[str, str | type[Task]] = {
    "retrieval": "vlmtune.tasks.retrieval.spec:RetrievalSpec",
    "counting": "vlmtune.tasks.counting.spec:CountingSpec",
}

# Metrics every task's run writes (train loop, parameter counts); shown after the task's own.
RUN_KEY_METRICS = ("train/epochs", "train/wall_s", "params/trainable", "params/total")


def _imported(ref: str) -> type[Task]:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def task_spec(name: str) -> type[Task]:
    """The declarations of task ``name`` (components, config sections, losses, metrics,
    config rules): the registered class, imported without torch."""
    entry = TASKS[name]
    return _imported(entry) if isinstance(entry, str) else entry


def task_class(name: str) -> type[Task]:
    """The class that builds and runs task ``name`` (imports torch): the declaring class's
    ``implementation``, or that class itself where it names none."""
    spec = task_spec(name)
    return _imported(spec.implementation) if spec.implementation else spec


def build_task(cfg: Config) -> Task:
    return task_class(cfg.task).from_config(cfg)


def losses_fed(kind: str, records: list[Any]) -> list[str]:
    """The losses that ``records`` (of data kind ``kind``: "pairs", "counting") hold
    targets for, over every registered task that reads that kind, in registry order:
    what ``vlmtune data inspect`` says a data set can train."""
    out: list[str] = []
    for name in TASKS:
        task = task_spec(name)
        if task.data_kind == kind:
            out += [loss for loss in sorted(task.losses.targets(records), key=list(task.losses).index) if loss not in out]
    return out


def metric_direction(key: str) -> str | None:
    """ "max" or "min" for a metric some registered task declares rankable
    (``Task.ranked_metrics``, the whole key matching); None for any other key."""
    import re

    for name in TASKS:
        for pattern, way in task_spec(name).ranked_metrics:
            if re.fullmatch(pattern, key):
                return way
    return None


def report_sections() -> tuple[str, ...]:
    """Every registered task's report sections, in registry order."""
    out: list[str] = []
    for name in TASKS:
        out += [s for s in task_spec(name).report_sections if s not in out]
    return tuple(out)


__all__ = [
    "RUN_KEY_METRICS",
    "TASKS",
    "FeatureCache",
    "Task",
    "build_task",
    "data_paths",
    "losses_fed",
    "metric_direction",
    "report_sections",
    "task_class",
    "task_spec",
]
