"""Losses: the functions (:mod:`vlmtune.losses.functions`) and the registry tasks
declare theirs in (:mod:`vlmtune.losses.registry`).

``from vlmtune.losses import contrastive_loss, ...`` keeps working: the functions are
re-exported here, imported (with torch) when first asked for, so the registry's
declarations stay readable without torch.
"""

from __future__ import annotations

from vlmtune.losses.registry import Loss, LossRegistry, has_field
from vlmtune.utils import lazy_exports

FUNCTIONS = (
    "box_loss_rows",
    "contrastive_loss",
    "contrastive_loss_local_rows",
    "hard_negative_pairs",
    "sample_hard_negatives",
    "soft_targets_ce",
)

__all__ = ["Loss", "LossRegistry", "has_field", *FUNCTIONS]


__getattr__ = lazy_exports(__name__, dict.fromkeys(FUNCTIONS, "functions"))
