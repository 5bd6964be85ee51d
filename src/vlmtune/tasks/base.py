"""The :class:`Task` base class: the engine's whole view of a recipe, with a default
for every member, so the engine reads ``task.X`` and never ``getattr(task, X, default)``.

A task declares on its class what the rest of vlmtune must know without building
anything: its trainable components, the backbone components it reads, its config
sections, its losses (a :class:`~vlmtune.losses.LossRegistry`), its default metric,
key metrics, report sections and cache kinds. This module needs no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from vlmtune.config.schema import BACKBONE_COMPONENTS
from vlmtune.errors import DataError, VlmtuneError
from vlmtune.losses.registry import LossRegistry
from vlmtune.runfolder import check_synthetic_dir

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader

    from vlmtune.backbone import Backbone
    from vlmtune.config.schema import Config
    from vlmtune.tasks.model import TaskModel

# The model class a task builds and evaluates (its own methods take that class, not any
# TaskModel); a bare ``Task`` in the engine is ``Task[Any]``.
ModelT = TypeVar("ModelT", bound="TaskModel")


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


class Task(Generic[ModelT]):
    """The engine's view of a recipe; subclass it and override what differs.

    The model a task builds is a :class:`~vlmtune.tasks.model.TaskModel`: an ``nn.Module``
    with ``forward(batch, active_losses)`` returning named, unweighted loss terms (and
    diagnostics under ``diag/``), ``component_modules(name, vision_blocks)``,
    ``head_state_dict()`` and ``backbone``. ``ModelT`` is its class.
    """

    name: ClassVar[str] = ""
    # "module:Class" of the subclass that builds and runs the task, where this class only
    # declares it (a task's spec.py: no torch, read by config loading and the CLI, while
    # task.py imports torch); "" where this class is the whole task.
    implementation: ClassVar[str] = ""
    # Trainable parts of the task's own model; the backbone's components come on top.
    components: ClassVar[tuple[str, ...]] = ()
    # The backbone components the task's model reads; a stage that trains another one is
    # a config error (it would never change).
    backbone_components: ClassVar[tuple[str, ...]] = BACKBONE_COMPONENTS
    # Config sections ``evaluate`` / ``predict`` may override (``eval.rerank_k=5``) on top
    # of a checkpoint's config; every other key is fixed by the training run.
    evaluation_sections: ClassVar[tuple[str, ...]] = ("data", "eval")
    # The task's own top-level config sections: name -> the dataclass that reads it.
    config_sections: ClassVar[dict[str, type]] = {}
    # The kind of records read_split gives ("pairs": image-text pairs, "counting"), as the
    # data formats' readers name them (vlmtune data inspect asks the tasks of a kind).
    data_kind: ClassVar[str] = "pairs"
    # The methods of the Python API's vlmtune.Model its checkpoints serve ("embed_images", "ask", ...).
    serves: ClassVar[tuple[str, ...]] = ()
    # The loss terms a stage can switch on, each with its default weight in ``loss:``.
    losses: ClassVar[LossRegistry] = LossRegistry()
    # The validation metric that picks the best checkpoint unless the config names one
    # (train.early_stopping.mode says whether larger is better; max by default).
    default_metric: ClassVar[str] = ""
    # Metrics the CLI prints after a run or an evaluation, in order.
    key_metrics: ClassVar[tuple[str, ...]] = ()
    # The metrics a comparison may rank, each with its better side: (regular expression
    # that the whole key matches, "max" or "min"). Any other number (counts, settings,
    # thread counts, chance levels, the train/* and params/* keys) is shown, never ranked.
    ranked_metrics: ClassVar[tuple[tuple[str, str], ...]] = ()
    # Metric-name prefixes ("retrieval/...") in the order reports show them.
    report_sections: ClassVar[tuple[str, ...]] = ()
    # Which frozen features the task's loaders can read from a FeatureCache: "vision"
    # (the frozen vision tower's output), "vision_prefix" (the state entering block L-N
    # while a stage trains only the last N vision blocks: FeatureCache.vision_start),
    # "text" (the language model's). None: make_loader / validate / evaluate take no cache.
    cache_kinds: ClassVar[tuple[str, ...]] = ()
    # Whether make_loader / validate / evaluate accept a FeatureCache: derived from cache_kinds.
    cacheable: ClassVar[bool] = False

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls.cacheable = bool(cls.cache_kinds)

    def __init__(self, *, loss: Mapping[str, float] | None = None):
        # Every registered loss and part with its weight (defaults where ``loss`` has none).
        self.loss = {**self.losses.defaults(), **dict(loss or {})}

    # ---- config
    @classmethod
    def from_config(cls, cfg: Config) -> Task[Any]:
        return cls(loss=cfg.loss)

    @classmethod
    def check_sections(cls, cfg: Config) -> None:
        """Rules between the fields of the task's own config sections (``counting.buckets``
        against ``counting.max_count``), checked in every config, whatever its task,
        since every config holds every registered task's sections. A broken rule raises
        ``ConfigError("key: message")``; bounds of single fields belong on the fields."""

    @classmethod
    def lora_adapter(cls, cfg: Config) -> str | None:
        """Why a checkpoint trained with ``cfg`` has no LoRA adapter to export for peft
        (``vlmtune export --format peft``), or None when it has one."""
        return f"a '{cls.name}' checkpoint has no LoRA to export as a peft adapter"

    @classmethod
    def cached_tiles(cls, cfg: Config) -> int:
        """The most tiles of one image the frozen-feature cache holds (its size estimate,
        ``train.caches.cache_estimate``): one; a task that tiles its images says more."""
        return 1

    @classmethod
    def cached_texts(cls, records: list[Any]) -> int:
        """The rows the text cache holds for ``records`` (its size estimate): one a record."""
        return len(records)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Rules of a run of this task on the rest of the config (retrieval: a batch of at
        least two pairs); a broken one raises ``ConfigError("key: message")``."""

    # ---- data
    def data_paths(self, output_dir: Path) -> dict[str, str]:
        """{"train", "val", "test"}: annotation files, or the task's synthetic set."""
        raise NotImplementedError

    def read_split(self, path: str, split: str | None = None) -> list[Any]:
        """Records of ``path``; ``split`` ("train", "val", "test") picks one from a file
        that holds every split (Karpathy, refer), and is ignored by other files."""
        raise NotImplementedError

    def check_eval_records(self, records: list[Any], where: str) -> None:
        """Refuse evaluation settings that do not fit a val or test split (before any work)."""

    def make_loader(
        self, records: list[Any], backbone: Backbone, *, train: bool, seed: int = 0, cache: FeatureCache | None = None
    ) -> DataLoader:
        raise NotImplementedError

    # ---- losses
    def loss_weights(self) -> dict[str, float]:
        """The registered losses' weights (their parts' sub-weights are the model's)."""
        return self.losses.weights(self.loss)

    def loss_targets(self, records: list[Any]) -> set[str]:
        """The losses for which ``records`` hold a target somewhere (a box for the box
        loss: the fields each loss declares). A stage whose active loss has none in the
        training data is an error at start-up rather than a loss that never trains."""
        return self.losses.targets(records)

    # ---- model and evaluation
    def build_model(self, backbone: Backbone) -> ModelT:
        raise NotImplementedError

    def validate(
        self, model: ModelT, records: list[Any], *, device: torch.device, cache: FeatureCache | None = None
    ) -> dict[str, Any]:
        """The per-epoch validation pass (tasks with a costly final evaluation give a cheaper one)."""
        return self.evaluate(model, records, device=device, cache=cache)

    def evaluate(
        self,
        model: ModelT,
        records: list[Any],
        *,
        device: torch.device,
        train_records: list[Any] | None = None,
        progress: bool = False,
        cache: FeatureCache | None = None,
    ) -> dict[str, Any]:
        """All metrics on ``records``; with ``train_records``, baselines beside them."""
        raise NotImplementedError

    # ---- epochs and checkpoints
    def start_epoch(
        self,
        model: ModelT,
        records: list[Any],
        *,
        epoch: int,
        backbone: Backbone,
        cache: FeatureCache | None,
        device: torch.device,
    ) -> None:
        """Called before each training epoch's first step (not before the rest of an epoch
        a resume continues): work the task does between epochs with the model as it is
        (retrieval mines its hard negatives). It must draw no random numbers of its own
        beyond what a loader's creation does, so a resumed run replays it exactly."""

    def train_state(self) -> dict[str, Any]:
        """What the task keeps across steps that a checkpoint must save (tensors and plain
        data, in trainer_state.pt); empty by default."""
        return {}

    def load_train_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`train_state` from a checkpoint (``--resume``)."""

    def train_metrics(self, train_records: list[Any]) -> dict[str, Any]:
        """Numbers about how the run trained, for metrics.json (none by default)."""
        return {}

    def write_figures(self, metrics: dict[str, Any], folder: Path) -> list[str]:
        """Draw the figures of an evaluation's ``metrics`` into ``folder``, beside its
        metrics.json; the names of the files written (none by default)."""
        return []

    def evaluate_with_rankings(
        self,
        model: ModelT,
        records: list[Any],
        *,
        device: torch.device,
        rankings_k: int,
        train_records: list[Any] | None = None,
        progress: bool = False,
        cache: FeatureCache | None = None,
    ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
        """:meth:`evaluate` plus per-query results of the same pass, JSON-ready rows by
        kind of query ({"t2i": [...], "i2t": [...]} or {"counting": [...]}), for
        ``vlmtune evaluate --rankings`` (rankings_KIND.jsonl and examples.html)."""
        raise VlmtuneError(f"the {self.name or type(self).__name__} task has no per-query results (evaluate without --rankings)")


def data_paths(data: Any, output_dir: Path, generate: Callable[[Path], Any], ext: str) -> dict[str, str]:
    """The train/val/test annotation files a ``data`` config section names, or the
    task's synthetic set: generated once by ``generate(folder)`` into
    data.synthetic_dir (default OUTPUT_DIR/data) and reused while it is complete.
    ``generate`` may write over the folder (the generators' ``overwrite=True``): it is
    called only on an empty folder or an incomplete generation of vlmtune's."""
    if data.train:
        missing = [k for k in ("val", "test") if not getattr(data, k)]
        if missing:
            raise DataError(f"data.{missing[0]}: needed when data.train is given")
        return {"train": data.train, "val": data.val, "test": data.test}
    folder = Path(data.synthetic_dir) if data.synthetic_dir else Path(output_dir) / "data"
    # Generated only into an empty folder or one vlmtune generated (its marker lists
    # the files); a folder holding the user's own files is refused, never overwritten.
    if check_synthetic_dir(folder, tuple(f"{split}{ext}" for split in ("train", "val", "test"))):
        from vlmtune.console import status

        status("generating the synthetic set (data.synthetic: %s) into %s", _synthetic_settings(data), folder)
        generate(folder)
    return {split: str((folder / f"{split}{ext}").resolve()) for split in ("train", "val", "test")}


def _synthetic_settings(data: Any) -> str:
    s = getattr(data, "synthetic", None)
    fields = getattr(s, "__dataclass_fields__", {})
    return ", ".join(f"{k}={getattr(s, k)}" for k in fields) or "defaults"
