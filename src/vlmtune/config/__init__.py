"""Typed configuration: YAML files plus ``key.sub=value`` overrides.

Every field documents itself (help and bounds in its metadata, :mod:`.fields`) and is
checked when the config is built: an unknown key, a value of the wrong type or an
impossible combination is a :class:`~vlmtune.errors.ConfigError` that names the key.
The rest of the code receives these typed objects (or plain values taken from them),
never a raw dict.

- :mod:`.fields`: the field helper (``setting``) and bounds.
- :mod:`.schema`: the engine's sections; :mod:`.compose` adds each task's own.
- :mod:`.checks`: bounds, combinations, stages, losses, then the task's rules.
- :mod:`.loading`: YAML, overrides, coercion, saving. :mod:`.describe`: ``config explain``.

The names below are loaded on first use: the task packages declare their sections with
:mod:`.fields` and :mod:`.schema`, and importing those must not pull in the modules
that read the task registry (:mod:`.checks`, :mod:`.compose`, ...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlmtune.config.fields import key_bounds, setting
from vlmtune.config.schema import (
    BACKBONE_COMPONENTS,
    BackboneConfig,
    CacheConfig,
    Config,
    DataConfig,
    EarlyStoppingConfig,
    EvalConfig,
    FsdpConfig,
    OptimConfig,
    StageConfig,
    SyntheticConfig,
    TrainConfig,
)
from vlmtune.utils import lazy_exports

if TYPE_CHECKING:
    from vlmtune.config.checks import stage_starts
    from vlmtune.config.compose import config_class
    from vlmtune.config.describe import FieldDoc, explain, format_explain
    from vlmtune.config.loading import (
        apply_override,
        config_from_dict,
        config_to_dict,
        config_yaml,
        evaluation_config,
        load_config,
        load_saved_config,
        save_config,
        with_overrides,
    )

_LAZY = {
    "stage_starts": "checks",
    "config_class": "compose",
    "FieldDoc": "describe",
    "explain": "describe",
    "format_explain": "describe",
    **{
        name: "loading"
        for name in (
            "apply_override",
            "config_from_dict",
            "config_to_dict",
            "config_yaml",
            "evaluation_config",
            "load_config",
            "load_saved_config",
            "save_config",
            "with_overrides",
        )
    },
}


__getattr__ = lazy_exports(__name__, _LAZY)

__all__ = [
    "BACKBONE_COMPONENTS",
    "BackboneConfig",
    "CacheConfig",
    "Config",
    "DataConfig",
    "EarlyStoppingConfig",
    "EvalConfig",
    "FieldDoc",
    "FsdpConfig",
    "OptimConfig",
    "StageConfig",
    "SyntheticConfig",
    "TrainConfig",
    "apply_override",
    "config_class",
    "config_from_dict",
    "config_to_dict",
    "config_yaml",
    "evaluation_config",
    "explain",
    "format_explain",
    "key_bounds",
    "load_config",
    "load_saved_config",
    "save_config",
    "setting",
    "stage_starts",
    "with_overrides",
]
