"""Count errors, accuracy per true count, calibration and head/answer agreement against hand-computed cases."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

from vlmtune.metrics.counting import (
    agreement_metrics,
    calibration,
    count_errors,
    majority_count_errors,
    per_count_accuracy,
    reliability_figure,
)


def test_count_errors_by_hand() -> None:
    # errors 0, 1, 2, 0, 3 -> MAE 6/5, RMSE sqrt(14/5), within one: 3 of 5.
    preds, true = torch.tensor([1, 2, 0, 3, 3]), torch.tensor([1, 1, 2, 3, 0])
    m = count_errors(preds, true)
    assert m["count/mae"] == pytest.approx(1.2)
    assert m["count/rmse"] == pytest.approx((14 / 5) ** 0.5)
    assert m["count/off_by_one"] == pytest.approx(60.0)
    # Majority of training classes [2, 2, 0] is 2: errors 1, 1, 0, 1, 2.
    b = majority_count_errors(torch.tensor([2, 2, 0]), true, 4)
    assert b == pytest.approx(
        {"count/baseline_mae": 1.0, "count/baseline_rmse": (7 / 5) ** 0.5, "count/baseline_off_by_one": 80.0}
    )


def test_per_count_accuracy_by_hand() -> None:
    preds, true = torch.tensor([1, 2, 0, 3, 3]), torch.tensor([1, 1, 2, 3, 0])
    rows = per_count_accuracy(preds, true, ["0", "1", "2", "3", "4"])
    assert rows == [
        {"count": "0", "n": 1, "accuracy": 0.0},
        {"count": "1", "n": 2, "accuracy": 50.0},
        {"count": "2", "n": 1, "accuracy": 0.0},
        {"count": "3", "n": 1, "accuracy": 100.0},
        {"count": "4", "n": 0, "accuracy": None},
    ]


def test_calibration_by_hand_and_as_torchmetrics() -> None:
    # Confidences 0.9 (right), 0.8 (wrong), 0.55 (right), 0.6 (right); 10 bins:
    # [0.5,0.6): 0.55 right -> |1 - .55| = .45; [0.6,0.7): 0.6 right -> .4;
    # [0.8,0.9): 0.8 wrong -> .8; [0.9,1.0): 0.9 right -> .1. ECE = (.45+.4+.8+.1)/4 = .4375.
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.55, 0.45], [0.4, 0.6]])
    y = torch.tensor([0, 0, 0, 1])
    c = calibration(probs, y)
    assert c["count/ece"] == pytest.approx(43.75, abs=1e-4)
    ref = 100 * float(multiclass_calibration_error(probs, y, num_classes=2, n_bins=10, norm="l1"))
    assert c["count/ece"] == pytest.approx(ref, abs=1e-4)
    flat = [x for b in c["count/reliability"] for x in (b["low"], b["n"], b["accuracy"])]
    assert flat == pytest.approx([0.5, 1, 100.0, 0.6, 1, 100.0, 0.8, 1, 0.0, 0.9, 1, 100.0])
    # ECE from the bins is torchmetrics' on random data too (its binning rule, 1.0 included).
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(3 * torch.randn(200, 4, generator=g), -1)
    p[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    t = torch.randint(0, 4, (200,), generator=g)
    c = calibration(p, t)
    from_bins = sum(b["n"] * abs(b["accuracy"] - b["confidence"]) for b in c["count/reliability"]) / 200
    assert from_bins == pytest.approx(c["count/ece"], abs=1e-3)
    fig = reliability_figure(c["count/reliability"], c["count/ece"], "test")
    assert "ECE" in fig.axes[0].get_title()


def test_head_answer_agreement_by_hand() -> None:
    # head classes 3, 2, 1, 0; answers say 3, 1, none, 5 (5 -> bucket "2+" = class 2 with buckets [0, 1, 2]).
    m = agreement_metrics([3, 2, 1, 0], [3, 1, None, 5], lambda c: c)
    assert m == pytest.approx({"answer/no_count": 25.0, "answer/head_agreement": 100 / 3})
    m = agreement_metrics([2, 2, 1, 2], [3, 1, None, 5], lambda c: min(c, 2))
    assert m["answer/head_agreement"] == pytest.approx(200 / 3)


def test_predict_says_when_head_and_answer_disagree() -> None:
    from vlmtune.predict import head_answer_check

    same = lambda c: c  # noqa: E731
    assert head_answer_check("There are 3 receipts.", "3", 3, 0.61, same) == (3, True, None)
    stated, agrees, note = head_answer_check("There are 2 receipts.", "3", 3, 0.61, same)
    assert (stated, agrees) == (2, False)
    assert note == "the answer says 2, the count head says 3 (61%): they disagree"
    assert head_answer_check("I cannot tell.", "1", 1, 0.5, same)[:2] == (None, None)
    # A bucket: 5 receipts fall in "2+" (class 2).
    assert head_answer_check("I see 5 receipts.", "2+", 2, 0.9, lambda c: min(c, 2))[1] is True


def test_no_answer_states_a_count() -> None:
    assert agreement_metrics([1, 2], [None, None], lambda c: c) == {"answer/no_count": 100.0}
