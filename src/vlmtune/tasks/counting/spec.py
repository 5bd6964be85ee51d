"""What the rest of vlmtune knows about the counting task without building it (no torch):
its components, config sections, losses (declared here, computed in :mod:`.losses`),
metrics, cache kinds and config rules. Config loading, ``config explain`` and the CLI
read this class; :class:`~vlmtune.tasks.counting.task.CountingTask` (which imports
torch) inherits it and is imported only when a command builds the task."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from vlmtune.losses.registry import Loss, LossRegistry
from vlmtune.tasks.base import ModelT, Task
from vlmtune.tasks.counting.config import CountingConfig, GenerationConfig, check_counting
from vlmtune.tasks.retrieval.config import ModelConfig

if TYPE_CHECKING:
    from vlmtune.config.schema import Config

_FN = "vlmtune.tasks.counting.losses:"

# In the order their terms are computed: lm, then count.
LOSSES = LossRegistry(
    [
        Loss(
            "lm",
            1.0,
            "Weight of the token cross-entropy on the answer tokens (prompt masked).",
            _FN + "lm",
            fields=("answer",),
        ),
        Loss("count", 1.0, "Weight of the count-classification cross-entropy.", _FN + "count", fields=("count",)),
    ]
)


class CountingSpec(Task[ModelT]):
    """Counting with answer generation: its declarations."""

    name: ClassVar[str] = "counting"
    implementation: ClassVar[str] = "vlmtune.tasks.counting.task:CountingTask"
    # With counting.lm_mode=lora, the backbone's 'language_model' means the LoRA adapters of the LM.
    components: ClassVar[tuple[str, ...]] = ("count_head",)
    backbone_components: ClassVar[tuple[str, ...]] = ("vision_blocks", "vision_tower", "mm_projector", "language_model")
    # Config sections that evaluate / predict may override: decoding settings included.
    evaluation_sections: ClassVar[tuple[str, ...]] = ("data", "eval", "generation")
    # Its own sections, and the model section's head sizes (head_hidden, adapter_dropout) for the count head.
    config_sections: ClassVar[dict[str, type]] = {
        "counting": CountingConfig,
        "generation": GenerationConfig,
        "model": ModelConfig,
    }
    data_kind: ClassVar[str] = "counting"
    serves: ClassVar[tuple[str, ...]] = ("ask",)
    losses: ClassVar[LossRegistry] = LOSSES
    default_metric: ClassVar[str] = "count/accuracy"
    key_metrics: ClassVar[tuple[str, ...]] = (
        "count/accuracy",
        "count/baseline_accuracy",
        "count/macro_f1",
        "count/baseline_macro_f1",
        "count/mae",
        "count/baseline_mae",
        "count/off_by_one",
        "count/baseline_off_by_one",
        "count/ece",
        "answer/count_accuracy",
        "answer/baseline_count_accuracy",
        "answer/parse_rate",
        "answer/head_agreement",
        "text/bleu4",
        "text/rougeL",
        "text/perplexity",
    )
    ranked_metrics: ClassVar[tuple[tuple[str, str], ...]] = (
        (r"count/(accuracy|macro_precision|macro_recall|macro_f1|off_by_one)", "max"),
        (r"count/(mae|rmse|ece)", "min"),
        (r"answer/(count_accuracy|parse_rate|head_agreement)", "max"),
        (r"answer/no_count", "min"),
        (r"text/(bleu\d|rouge1|rouge2|rougeL)", "max"),
        (r"text/perplexity", "min"),
    )
    report_sections: ClassVar[tuple[str, ...]] = ("count", "answer", "text")
    # The vision tower's states (tiles of each image) come from the feature cache while it
    # is frozen, or its frozen prefix's while only its last blocks train; the language
    # model's never do: it reads the image tokens the projector makes.
    cache_kinds: ClassVar[tuple[str, ...]] = ("vision", "vision_prefix")

    @classmethod
    def lora_adapter(cls, cfg: Config) -> str | None:
        """With counting.lm_mode=lora the language model's adapters are peft's."""
        mode = cfg.section("counting").lm_mode
        if mode != "lora":
            return f"trained its language model with counting.lm_mode={mode}, not LoRA, so there is no adapter to export"
        return None

    @classmethod
    def cached_tiles(cls, cfg: Config) -> int:
        """Up to counting.max_dynamic_patch tiles and the thumbnail."""
        return int(cfg.section("counting").max_dynamic_patch) + 1

    @classmethod
    def check_sections(cls, cfg: Config) -> None:
        """The counting section's rules between fields and on lists (generation's fields have only bounds)."""
        check_counting(cfg.section("counting"))
