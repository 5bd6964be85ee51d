"""The retrieval task's config section, ``model:`` (no torch: config loading reads it).

Bounds live in each field (``setting(..., low=, high=)``), the one home that
validation, ``config explain`` and the CLI flags mirroring a key read.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmtune.config.fields import setting
from vlmtune.errors import ConfigError


@dataclass
class ModelConfig:
    """Adapters, projectors and heads."""

    embed_dim: int = setting(256, "Width of adapters and projectors.", low=1, high=65536)
    adapter_dropout: float = setting(0.1, "Dropout after the adapters' activation.", low=0, high=1, high_open=True)
    head_hidden: int = setting(256, "Hidden width of the pair heads (matching, box, relation).", low=1, high=65536)
    temperature_init: float = setting(0.07, "Initial contrastive temperature (learnable).")
    temperature_min: float = setting(0.01, "Lower clamp of the temperature.")
    temperature_max: float = setting(1.0, "Upper clamp of the temperature.")


def check_model(m: ModelConfig) -> None:
    """The temperature starts inside the range it is clamped to."""
    if not 0 < m.temperature_min <= m.temperature_init <= m.temperature_max:
        raise ConfigError(
            f"model.temperature_init: must lie in [temperature_min, temperature_max] = [{m.temperature_min}, {m.temperature_max}]"
        )
