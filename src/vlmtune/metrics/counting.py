"""How wrong the wrong counts are, whether the count head's confidence means anything,
and whether the head and the generated answer say the same count.

- ``count/mae``, ``count/rmse``: mean absolute and root mean square error of the head's
  class against the true class. With one class per count (no ``counting.buckets``),
  that is the error in counts; with buckets, in classes (a "2+" bucket has no single
  count to subtract).
- ``count/off_by_one``: share (0-100) of predictions within one class of the truth.
- ``count/per_count``: accuracy per true class (torchmetrics' per-class recall), with
  how many records each class has.
- ``count/ece``: expected calibration error of the head's top-class probability,
  torchmetrics' ``multiclass_calibration_error`` (L1 norm, ``CALIBRATION_BINS``
  equal-width bins), in percentage points (0-100); ``count/reliability`` holds its
  bins (confidence, accuracy, share of records) for the reliability diagram. The bins
  are computed here too, with torchmetrics' own rule (``bucketize(right=True)``, so a
  confidence of exactly 1 has a bin of its own), because torchmetrics returns only the
  sum; a test holds the two to the same ECE.
- ``answer/head_agreement``: share of the answers stating a count whose count falls in
  the head's class; ``answer/no_count``: share of answers stating none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_calibration_error

__all__ = ["CALIBRATION_BINS", "agreement_metrics", "calibration", "count_errors", "majority_count_errors", "per_count_accuracy"]

CALIBRATION_BINS = 10


def count_errors(preds: Tensor, targets: Tensor, prefix: str = "count") -> dict[str, float]:
    """``{prefix}/mae``, ``/rmse`` (in classes) and ``/off_by_one`` (percent within one class)."""
    if preds.numel() == 0:
        return dict.fromkeys((f"{prefix}/mae", f"{prefix}/rmse", f"{prefix}/off_by_one"), float("nan"))
    err = (preds.long() - targets.long()).abs().double()
    return {
        f"{prefix}/mae": float(err.mean()),
        f"{prefix}/rmse": float(err.pow(2).mean().sqrt()),
        f"{prefix}/off_by_one": 100.0 * float((err <= 1).double().mean()),
    }


def majority_count_errors(train_targets: Tensor, targets: Tensor, num_classes: int) -> dict[str, float]:
    """:func:`count_errors` of always answering the most common training class (ties:
    the lowest), as ``count/baseline_mae`` and so on."""
    majority = int(torch.bincount(train_targets.long().flatten().cpu(), minlength=num_classes).argmax())
    out = count_errors(torch.full_like(targets.long(), majority), targets)
    return {k.replace("count/", "count/baseline_", 1): v for k, v in out.items()}


def per_count_accuracy(preds: Tensor, targets: Tensor, names: list[str]) -> list[dict[str, Any]]:
    """One row per class: its name, its records in the split and the head's accuracy on
    them (percent; None for a class with none)."""
    k = len(names)
    support = torch.bincount(targets.long().cpu(), minlength=k)
    if preds.numel():
        acc = multiclass_accuracy(preds.long(), targets.long(), num_classes=k, average="none").tolist()
    else:
        acc = [0.0] * k
    return [
        {"count": names[c], "n": int(support[c]), "accuracy": 100.0 * float(acc[c]) if support[c] else None} for c in range(k)
    ]


def calibration(probs: Tensor, targets: Tensor, n_bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """``count/ece`` (percentage points) and ``count/reliability``: the non-empty bins,
    each ``{"low", "high", "n", "confidence", "accuracy"}`` (the last two in percent)."""
    if probs.numel() == 0:
        return {"count/ece": float("nan"), "count/reliability": []}
    probs = probs.float()
    ece = multiclass_calibration_error(probs, targets.long(), num_classes=probs.shape[1], n_bins=n_bins, norm="l1")
    conf, pred = probs.max(dim=1)
    right = (pred == targets.long()).float()
    bounds = torch.linspace(0, 1, n_bins + 1)
    idx = torch.bucketize(conf, bounds, right=True) - 1  # torchmetrics' rule: [low, high), 1.0 alone
    bins = []
    for b in range(n_bins + 1):
        sel = idx == b
        if sel.any():
            high = round(float(bounds[b + 1]), 6) if b < n_bins else 1.0
            bins.append(
                {
                    "low": round(float(bounds[b]), 6),
                    "high": high,
                    "n": int(sel.sum()),
                    "confidence": 100.0 * float(conf[sel].mean()),
                    "accuracy": 100.0 * float(right[sel].mean()),
                }
            )
    return {"count/ece": 100.0 * float(ece), "count/reliability": bins}


def agreement_metrics(
    head_classes: list[int], answer_counts: list[int | None], to_class: Callable[[int], int]
) -> dict[str, float]:
    """``answer/head_agreement`` (percent of answers stating a count whose class,
    ``to_class(count)``, is the head's; left out when no answer states one) and
    ``answer/no_count`` (percent stating none)."""
    if not answer_counts:
        return {}
    stated = [(h, c) for h, c in zip(head_classes, answer_counts) if c is not None]
    out = {"answer/no_count": 100.0 * (len(answer_counts) - len(stated)) / len(answer_counts)}
    if stated:  # none stated a count: answer/no_count (100) says so, and there is nothing to agree on
        out["answer/head_agreement"] = 100.0 * sum(to_class(c) == h for h, c in stated) / len(stated)
    return out


def reliability_figure(bins: list[dict[str, Any]], ece: float, title: str) -> Any:
    """The reliability diagram of :func:`calibration`'s bins: accuracy per confidence
    bin against the diagonal of perfect calibration, bar widths the bins', with each
    bin's record count; a matplotlib Figure (no pyplot state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 4.6), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 100], [0, 100], color="0.5", linestyle="--", linewidth=1, label="perfect calibration")
    for b in bins:
        lo, hi = 100 * b["low"], 100 * max(b["high"], b["low"] + 0.01)
        ax.bar(lo, b["accuracy"], width=hi - lo, align="edge", color="tab:blue", edgecolor="white", alpha=0.8)
        ax.plot([lo, hi], [b["confidence"]] * 2, color="tab:red", linewidth=2)
        ax.text((lo + hi) / 2, b["accuracy"] + 1.5, str(b["n"]), ha="center", fontsize=7)
    ax.plot([], [], color="tab:red", linewidth=2, label="mean confidence in the bin")
    ax.bar([], [], color="tab:blue", alpha=0.8, label="accuracy in the bin (n above)")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 105)
    ax.set_xlabel("count head's confidence (top-class probability, %)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{title}\nECE {ece:.2f} points, {sum(b['n'] for b in bins)} records")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    return fig
