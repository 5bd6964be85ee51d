"""Losses: the functions (:mod:`vlmtune.losses.functions`) and the registry tasks
declare theirs in (:mod:`vlmtune.losses.registry`).

``from vlmtune.losses import contrastive_loss, ...`` keeps working: the functions are
re-exported here, imported (with torch) when first asked for, so the registry's
declarations stay readable without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from vlmtune.losses.registry import Loss, LossRegistry, has_field

FUNCTIONS = ("box_loss_rows", "contrastive_loss", "contrastive_loss_local_rows", "hard_negative_pairs",
             "sample_hard_negatives", "soft_targets_ce")

__all__ = ["Loss", "LossRegistry", "has_field", *FUNCTIONS]


def __getattr__(name: str) -> Any:
    # PEP 562: the loss functions (and torch) are imported when first asked for.
    if name not in FUNCTIONS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module("vlmtune.losses.functions"), name)
