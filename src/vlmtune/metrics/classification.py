"""Single-label multiclass metrics (torchmetrics functional) and a majority-class baseline.

Macro averages: torchmetrics (checked on 1.9, ``_adjust_weights_safe_divide``) gives weight
0 to classes with tp + fp + fn == 0, i.e. classes absent from both preds and targets, so
they do not drag the macro average down; passing the full ``num_classes`` is therefore
safe. A class that appears on only one side still counts, with a 0/0 precision or recall
scored as 0 (the sklearn ``zero_division=0`` convention).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

__all__ = ["classification_metrics", "majority_baseline"]


def class_scores(preds: Tensor, targets: Tensor, num_classes: int, prefix: str) -> dict[str, float]:
    if preds.shape != targets.shape or preds.ndim != 1:
        raise ValueError(f"need preds and targets of equal shape [N], got {tuple(preds.shape)}, {tuple(targets.shape)}")
    if preds.numel() == 0:
        nan = float("nan")
        return {f"{prefix}/{name}": nan for name in ("accuracy", "macro_precision", "macro_recall", "macro_f1")}
    preds, targets = preds.long(), targets.long()
    kw: dict[str, Any] = {"num_classes": num_classes}
    return {
        # average="micro" is plain accuracy (torchmetrics' "macro" accuracy is macro recall).
        f"{prefix}/accuracy": 100.0 * multiclass_accuracy(preds, targets, average="micro", **kw).item(),
        f"{prefix}/macro_precision": 100.0 * multiclass_precision(preds, targets, average="macro", **kw).item(),
        f"{prefix}/macro_recall": 100.0 * multiclass_recall(preds, targets, average="macro", **kw).item(),
        f"{prefix}/macro_f1": 100.0 * multiclass_f1_score(preds, targets, average="macro", **kw).item(),
    }


@torch.no_grad()
def classification_metrics(preds: Tensor, targets: Tensor, num_classes: int, prefix: str) -> dict:
    """Accuracy and macro precision/recall/F1 (percent), plus ``{prefix}/confusion``:
    a num_classes x num_classes nested list of counts, rows = true class, cols = predicted."""
    out: dict = class_scores(preds, targets, num_classes, prefix)
    if preds.numel():
        confusion = multiclass_confusion_matrix(preds.long(), targets.long(), num_classes=num_classes)
    else:
        confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    out[f"{prefix}/confusion"] = confusion.long().tolist()
    return out


@torch.no_grad()
def majority_baseline(train_targets: Tensor, test_targets: Tensor, num_classes: int, prefix: str) -> dict[str, float]:
    """Scores of always predicting the most common training class (ties: lowest class id).

    Keys: {prefix}/baseline_{accuracy,macro_precision,macro_recall,macro_f1}.
    """
    if train_targets.numel() == 0:
        raise ValueError("majority_baseline needs at least one training target")
    majority = torch.bincount(train_targets.long().flatten().cpu(), minlength=num_classes).argmax()  # first max
    preds = torch.full_like(test_targets.long(), int(majority))
    scores = class_scores(preds, test_targets, num_classes, prefix)
    return {key.replace(f"{prefix}/", f"{prefix}/baseline_", 1): value for key, value in scores.items()}
