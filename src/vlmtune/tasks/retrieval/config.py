"""The retrieval task's config section, ``model:`` (no torch: config loading reads it).

Bounds live in each field (``setting(..., low=, high=)``), the one home that
validation, ``config explain`` and the CLI flags mirroring a key read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from vlmtune.config.fields import setting
from vlmtune.errors import ConfigError


@dataclass
class ModelConfig:
    """Adapters, projectors and heads."""

    # Keys that shape training only, not what a trained checkpoint computes: left out of
    # its fingerprint (vlmtune.api.checkpoint_fingerprint), which stays what it was before them.
    TRAINING_ONLY: ClassVar[tuple[str, ...]] = ("contrastive_batch", "grad_cache", "mrl_dims", "mrl_weights")

    embed_dim: int = setting(256, "Width of adapters and projectors.", low=1, high=65536)
    adapter_dropout: float = setting(0.1, "Dropout after the adapters' activation.", low=0, high=1, high_open=True)
    head_hidden: int = setting(256, "Hidden width of the pair heads (matching, box, relation).", low=1, high=65536)
    temperature_init: float = setting(0.07, "Initial contrastive temperature (learnable).")
    temperature_min: float = setting(0.01, "Lower clamp of the temperature.")
    temperature_max: float = setting(1.0, "Upper clamp of the temperature.")
    contrastive_batch: int = setting(
        0,
        "Pairs per contrastive batch (one optimizer step, per process), a multiple of train.batch_size; 0: "
        "train.batch_size. The contrastive loss scores the whole batch; the matching, box and relation heads see "
        "chunks of train.batch_size; with GradCache (grad_cache) one chunk's activations are in memory at a time.",
        low=0,
        high=10**7,
    )
    grad_cache: Literal["auto", "always", "never"] = setting(
        "auto",
        "With contrastive_batch: 'always' embeds the chunks without a graph, takes the loss over the whole batch, "
        "then re-runs each chunk with its cached gradient (GradCache); 'never' keeps every chunk's graph; 'auto': "
        "GradCache where a tower trains (the last vision blocks above the cached prefix, an end-to-end stage), "
        "not where the towers are frozen (from the feature cache only adapters run).",
    )
    mrl_dims: list[int] = setting(
        [],
        "Matryoshka: nested widths of the joint space trained besides embed_dim (e.g. [32, 64]); the contrastive "
        "loss is summed over every width's truncated, renormalised embeddings, metrics report R@K per width.",
        low=1,
        high=65536,
    )
    mrl_weights: list[float] = setting(
        [],
        "Matryoshka: one weight per trained width (mrl_dims plus embed_dim, ascending); empty: 1 each.",
    )


def check_model(m: ModelConfig) -> None:
    """The temperature starts inside the range it is clamped to; Matryoshka widths fit."""
    from vlmtune.tasks.retrieval.matryoshka import check_mrl

    check_mrl(m.embed_dim, m.mrl_dims, m.mrl_weights)
    if not 0 < m.temperature_min <= m.temperature_init <= m.temperature_max:
        raise ConfigError(
            f"model.temperature_init: must lie in [temperature_min, temperature_max] = [{m.temperature_min}, {m.temperature_max}]"
        )
