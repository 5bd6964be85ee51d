"""Tasks: what differs between recipes, behind one small interface the engine uses.

A task is a class implementing :class:`Task`. It is built once, at the edge, from the
config (``from_config``), keeps the plain config sections it needs, and offers the
engine keyword-only methods. What the rest of vlmtune must know about a task (its
trainable components, loss terms, key metrics, report sections) is declared on the
class and read from there by config validation, the CLI and the report.

Adding a task: write ``vlmtune/tasks/NAME.py`` with a class implementing ``Task`` and
add one line to :data:`TASKS`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol

if TYPE_CHECKING:  # the registry stays importable without torch for config checks
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from vlmtune.backbone import Backbone
    from vlmtune.config import Config

# name -> "module:Class" (imported on first use) or the class itself.
TASKS: dict[str, str | type] = {
    "retrieval": "vlmtune.tasks.retrieval:RetrievalTask",
    "counting": "vlmtune.tasks.counting:CountingTask",
}

# Metrics every task's run writes (train loop, parameter counts); shown after the task's own.
RUN_KEY_METRICS = ("train/epochs", "train/wall_s", "params/trainable", "params/total")


@dataclass(frozen=True)
class FeatureCache:
    """Where a loader may read a frozen tower's features from: ``vision`` while no
    vision component trains, ``text`` while the language model does not.

    ``vision_start`` (with ``vision``) caches a frozen prefix instead of the tower's
    output: the hidden state entering vision block ``vision_start``, for a stage that
    trains only the blocks from there on (which then run live on it). ``None``: the
    whole tower is frozen and its output is cached."""

    dir: Path
    vision: bool = True
    text: bool = True
    vision_start: int | None = None


class Task(Protocol):
    """The engine's view of a recipe.

    The model a task builds is an ``nn.Module`` with ``forward(batch, active_losses)``
    returning named, unweighted loss terms (and diagnostics under ``diag/``),
    ``component_modules(name, vision_blocks)``, ``head_state_dict()`` and ``backbone``.
    """

    name: ClassVar[str]
    # Trainable parts of the task's own model; the backbone's components come on top.
    components: ClassVar[tuple[str, ...]]
    # The backbone components (config.BACKBONE_COMPONENTS) the task's model reads; a
    # stage that trains another one is a config error (it would never change).
    backbone_components: ClassVar[tuple[str, ...]]
    # Config sections ``evaluate`` / ``predict`` may override (``eval.rerank_k=5``) on top
    # of a checkpoint's config; every other key is fixed by the training run.
    evaluation_sections: ClassVar[tuple[str, ...]]
    # Loss terms a stage can switch on (each with a weight in the ``loss`` section).
    losses: ClassVar[tuple[str, ...]]
    # Metrics the CLI prints after a run or an evaluation, in order.
    key_metrics: ClassVar[tuple[str, ...]]
    # Metric-name prefixes ("retrieval/...") in the order reports show them.
    report_sections: ClassVar[tuple[str, ...]]
    # Whether make_loader / validate / evaluate accept a FeatureCache.
    cacheable: ClassVar[bool]
    # Which frozen features those loaders can read from it: "vision" (the frozen vision
    # tower's output), "vision_prefix" (the state entering block L-N while a stage trains
    # only the last N vision blocks, which then run live: FeatureCache.vision_start),
    # "text" (the language model's). The engine asks only for these; a task that does
    # not declare it is taken to read "vision" and "text".
    cache_kinds: ClassVar[tuple[str, ...]]

    @classmethod
    def from_config(cls, cfg: Config) -> Task: ...

    def build_model(self, backbone: Backbone) -> nn.Module: ...

    def data_paths(self, output_dir: Path) -> dict[str, str]:
        """{"train", "val", "test"}: annotation files, or the task's synthetic set."""
        ...

    def read_split(self, path: str, split: str | None = None) -> list[Any]:
        """Records of ``path``; ``split`` ("train", "val", "test") picks one from a file
        that holds every split (Karpathy, refer), and is ignored by other files."""
        ...

    def loss_weights(self) -> dict[str, float]: ...

    def loss_targets(self, records: list[Any]) -> set[str]:
        """The loss terms for which ``records`` hold a target somewhere (a box for a box
        loss, ...). A stage whose active loss has none in the training data is an error
        at start-up rather than a loss that silently never trains."""
        ...

    def make_loader(self, records: list[Any], backbone: Backbone, *, train: bool, seed: int = 0,
                    cache: FeatureCache | None = None) -> DataLoader: ...

    def validate(self, model: nn.Module, records: list[Any], *, device: torch.device,
                 cache: FeatureCache | None = None) -> dict[str, Any]:
        """The per-epoch validation pass (tasks with a costly final evaluation give a cheaper one)."""
        ...

    def evaluate(self, model: nn.Module, records: list[Any], *, device: torch.device,
                 train_records: list[Any] | None = None, progress: bool = False,
                 cache: FeatureCache | None = None) -> dict[str, Any]:
        """All metrics on ``records``; with ``train_records``, baselines beside them."""
        ...

    def evaluate_with_rankings(self, model: nn.Module, records: list[Any], *, device: torch.device, rankings_k: int,
                               train_records: list[Any] | None = None, progress: bool = False,
                               cache: FeatureCache | None = None) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
        """:meth:`evaluate` plus per-query results of the same pass, JSON-ready rows by
        kind of query ({"t2i": [...], "i2t": [...]} or {"counting": [...]}), for
        ``vlmtune evaluate --rankings`` (rankings_KIND.jsonl and examples.html)."""
        ...


def task_class(name: str) -> type[Task]:
    """The registered class of task ``name``."""
    entry = TASKS[name]
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
    return entry  # type: ignore[return-value]


def build_task(cfg: Config) -> Task:
    return task_class(cfg.task).from_config(cfg)


def evaluation_config(cfg: Config, overrides: list[str] | None, what: str = "evaluate") -> Config:
    """A checkpoint's config with the ``evaluate`` / ``predict`` overrides applied: only
    the sections its task declares (``evaluation_sections``; data.* and eval.* by default)."""
    from vlmtune.config import with_overrides

    sections = tuple(getattr(task_class(cfg.task), "evaluation_sections", ("data", "eval")))
    return with_overrides(cfg, overrides, sections, what)


def report_sections() -> tuple[str, ...]:
    """Every registered task's report sections, in registry order."""
    out: list[str] = []
    for name in TASKS:
        out += [s for s in task_class(name).report_sections if s not in out]
    return tuple(out)


def data_paths(data: Any, output_dir: Path, generate: Callable[[Path], Any], ext: str) -> dict[str, str]:
    """The train/val/test annotation files a ``data`` config section names, or the
    task's synthetic set: generated once by ``generate(folder)`` into
    data.synthetic_dir (default OUTPUT_DIR/data) and reused while it is complete.
    ``generate`` may write over the folder (the generators' ``overwrite=True``): it is
    called only on an empty folder or an incomplete generation of vlmtune's."""
    from vlmtune.errors import DataError

    if data.train:
        missing = [k for k in ("val", "test") if not getattr(data, k)]
        if missing:
            raise DataError(f"data.{missing[0]}: needed when data.train is given")
        return {"train": data.train, "val": data.val, "test": data.test}
    from vlmtune.runfolder import check_synthetic_dir

    folder = Path(data.synthetic_dir) if data.synthetic_dir else Path(output_dir) / "data"
    # Generated only into an empty folder or one vlmtune generated (its marker lists
    # the files); a folder holding the user's own files is refused, never overwritten.
    if check_synthetic_dir(folder, tuple(f"{split}{ext}" for split in ("train", "val", "test"))):
        generate(folder)
    return {split: str((folder / f"{split}{ext}").resolve()) for split in ("train", "val", "test")}


__all__ = ["TASKS", "FeatureCache", "Task", "build_task", "data_paths", "evaluation_config", "report_sections",
           "task_class"]
