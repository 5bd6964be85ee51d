"""What the rest of vlmtune knows about the retrieval task without building it (no torch):
its components, config section, losses (declared here, computed in :mod:`.losses`),
metrics, cache kinds and config rules. Config loading, ``config explain`` and the CLI
read this class; :class:`~vlmtune.tasks.retrieval.task.RetrievalTask` (which imports
torch) inherits it and is imported only when a command builds the task."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from vlmtune.errors import ConfigError
from vlmtune.losses.registry import Loss, LossRegistry
from vlmtune.tasks.base import ModelT, Task
from vlmtune.tasks.retrieval.config import ModelConfig, check_model
from vlmtune.tasks.retrieval.negconfig import NegativesConfig, check_negatives

if TYPE_CHECKING:
    from vlmtune.config.schema import Config

_FN = "vlmtune.tasks.retrieval.losses:"

# In the order their terms are computed (contrastive, matching, box, relation).
LOSSES = LossRegistry(
    [
        Loss("contrastive", 1.0, "Weight of the symmetric InfoNCE loss.", _FN + "contrastive"),
        Loss("matching", 1.0, "Weight of the image-text matching loss (hard negatives).", _FN + "matching"),
        Loss(
            "box",
            0.1,
            "Weight of the box loss (L1 + GIoU).",
            _FN + "box",
            fields=("bbox",),
            parts={"box_l1": 1.0, "box_giou": 1.0},
            part_help={"box_l1": "Weight of L1 inside the box loss.", "box_giou": "Weight of GIoU inside the box loss."},
        ),
        Loss(
            "relation",
            0.1,
            "Weight of the spatial relation loss: cross-entropy, plus the L1 distance of the relation head's "
            "subject position to the centre of the record's box where it has one.",
            _FN + "relation",
            fields=("relation",),
        ),
    ]
)


class RetrievalSpec(Task[ModelT]):
    """Cross-modal retrieval with grounding and spatial relations: its declarations."""

    name: ClassVar[str] = "retrieval"
    implementation: ClassVar[str] = "vlmtune.tasks.retrieval.task:RetrievalTask"
    # RetrievalModel.COMPONENTS' names (tests/test_startup.py checks they agree).
    components: ClassVar[tuple[str, ...]] = ("adapters", "heads")
    # The towers only: pooled vision tokens and the LM's text states; no mm_projector.
    backbone_components: ClassVar[tuple[str, ...]] = ("vision_blocks", "vision_tower", "language_model")
    # Config sections that evaluate / predict may override on top of a checkpoint's config.
    evaluation_sections: ClassVar[tuple[str, ...]] = ("data", "eval")
    config_sections: ClassVar[dict[str, type]] = {"model": ModelConfig, "negatives": NegativesConfig}
    serves: ClassVar[tuple[str, ...]] = ("embed_images", "embed_texts", "similarity", "ground")
    losses: ClassVar[LossRegistry] = LOSSES
    default_metric: ClassVar[str] = "retrieval/mean_recall"
    key_metrics: ClassVar[tuple[str, ...]] = (
        "retrieval/i2t_r1",
        "retrieval/i2t_r5",
        "retrieval/i2t_r10",
        "retrieval/t2i_r1",
        "retrieval/t2i_r5",
        "retrieval/t2i_r10",
        "retrieval/mean_recall",
        "retrieval/chance_i2t_r1",
        "retrieval/chance_t2i_r1",
        "grounding/acc50",
        "grounding/baseline_acc50",
        "grounding/baseline_text_acc50",
        "grounding/miou",
        "grounding/baseline_miou",
        "spatial/accuracy",
        "spatial/macro_f1",
        "spatial/baseline_accuracy",
        "spatial/baseline_text_accuracy",
        "spatial/baseline_caption_accuracy",
    )
    ranked_metrics: ClassVar[tuple[tuple[str, str], ...]] = (
        (r"retrieval/(i2t|t2i)_r\d+", "max"),  # the headline recalls, not their tie span
        (r"retrieval/mean_recall", "max"),
        (r"grounding/(acc\d+|miou|giou)", "max"),
        (r"grounding/l1", "min"),
        (r"spatial/(accuracy|macro_precision|macro_recall|macro_f1)", "max"),
    )
    report_sections: ClassVar[tuple[str, ...]] = ("retrieval", "grounding", "spatial")
    # Both towers' frozen outputs, and the frozen vision prefix's (a stage training only
    # the last N vision blocks runs those live on it).
    cache_kinds: ClassVar[tuple[str, ...]] = ("vision", "vision_prefix", "text")

    @classmethod
    def cached_texts(cls, records: list[Any]) -> int:
        """Each distinct caption, and the caption with its relation phrase masked where that
        differs (what the relation head reads): the keys the text cache stores."""
        from vlmtune.data.relations import mask_relation

        return len({t for r in records for t in (r.text, mask_relation(r.text))})

    @classmethod
    def check_sections(cls, cfg: Config) -> None:
        check_model(cfg.section("model"))
        check_negatives(cfg.section("negatives"))

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """The contrastive loss scores each image against the batch's other captions."""
        if cfg.train.batch_size < 2:
            raise ConfigError("train.batch_size: must be >= 2 (contrastive needs negatives)")
        m: ModelConfig = cfg.section("model")
        big = m.contrastive_batch
        if big > cfg.train.batch_size and m.grad_cache != "never" and cfg.train.fsdp.enabled:
            raise ConfigError(
                "model.grad_cache: GradCache re-runs chunks inside the backward pass, which FSDP's sharded "
                "parameters do not support; set model.grad_cache=never (every chunk's graph kept) or train.fsdp.enabled=false"
            )
        neg: NegativesConfig = cfg.section("negatives")
        if neg.enabled and (big > cfg.train.batch_size or m.mrl_dims):
            key = "model.contrastive_batch" if big > cfg.train.batch_size else "model.mrl_dims"
            raise ConfigError(
                f"negatives.{'data' if neg.data else 'mine'}: not combined with {key} yet (the whole-batch "
                f"contrastive loss would leave the extra negatives out); use one of the two"
            )
        if big and big % cfg.train.batch_size:
            raise ConfigError(
                f"model.contrastive_batch: {big} is not a multiple of train.batch_size ({cfg.train.batch_size}), "
                f"the chunk it is cut into; use {max(1, round(big / cfg.train.batch_size)) * cfg.train.batch_size} or 0"
            )
