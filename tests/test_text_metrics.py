"""Text metrics match sacrebleu / rouge_score on fixed examples; parse_count reads answers."""

from __future__ import annotations

import math

import pytest
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

from vlmtune.metrics.text import parse_count, perplexity, text_metrics

PREDICTIONS = [
    "There are 3 receipts.",
    "I see two receipts on the table.",
    "There is 1 receipt.",
    "There are no receipts in the image.",
]
REFERENCES = ["There are 3 receipts.", "I can see 2 receipts.", "There are 2 receipts.", "There are no receipts."]


def test_bleu_matches_sacrebleu_corpus_scores() -> None:
    out = text_metrics(PREDICTIONS, REFERENCES)
    for n in range(1, 5):
        expected = BLEU(max_ngram_order=n).corpus_score(PREDICTIONS, [REFERENCES]).score
        assert out[f"text/bleu{n}"] == pytest.approx(expected)
    # Higher orders are stricter on this partly matching corpus.
    assert out["text/bleu1"] > out["text/bleu2"] > out["text/bleu3"] > out["text/bleu4"] > 0


def test_rouge_matches_rouge_score_mean_f() -> None:
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    out = text_metrics(PREDICTIONS, REFERENCES)
    for key in ("rouge1", "rouge2", "rougeL"):
        per_pair = [scorer.score(ref, pred)[key].fmeasure for pred, ref in zip(PREDICTIONS, REFERENCES)]
        assert out[f"text/{key}"] == pytest.approx(100 * sum(per_pair) / len(per_pair))


def test_hand_checkable_cases() -> None:
    same = text_metrics(["There are 3 receipts.", "I see no receipts."], ["There are 3 receipts.", "I see no receipts."])
    assert set(same) == {"text/bleu1", "text/bleu2", "text/bleu3", "text/bleu4", "text/rouge1", "text/rouge2", "text/rougeL"}
    assert all(v == pytest.approx(100.0) for v in same.values())

    disjoint = text_metrics(["apple banana cherry"], ["xylophone yak zebra"])
    assert disjoint["text/bleu1"] == 0.0 and disjoint["text/rouge1"] == 0.0

    # rouge1 by hand: 3 of 4 unigrams shared each way ("3" vs "three") -> F = 0.75.
    one = text_metrics(["There are three receipts."], ["There are 3 receipts."])
    assert one["text/rouge1"] == pytest.approx(75.0)


def test_length_mismatch_and_empty() -> None:
    with pytest.raises(ValueError):
        text_metrics(["a"], [])
    assert all(v == 0.0 for v in text_metrics([], []).values())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("There are 3 receipts.", 3),
        ("There is 1 receipt.", 1),
        ("I can see 12 receipts", 12),
        ("THERE ARE THREE RECEIPTS!", 3),
        ("Twenty receipts.", 20),
        ("zero", 0),
        ("There are no receipts.", 0),
        ("I see no visible receipts", 0),
        ("None.", 0),
        ("There is a receipt.", 1),
        ("There is a single receipt on the desk.", 1),
        ("One receipt", 1),
        ("I see 2 receipts, one of them torn.", 2),
        ("No, there are 4 receipts.", 4),
        ("A table with five receipts", 5),
        ("3", 3),
        ("receipts:2", 2),
        ("I cannot tell.", None),
        ("", None),
        ("There are receipts on a table.", None),
    ],
)
def test_parse_count(text: str, expected: int | None) -> None:
    assert parse_count(text) == expected


def test_perplexity() -> None:
    assert perplexity(0.0, 10) == 1.0
    assert perplexity(10 * math.log(5.0), 10) == pytest.approx(5.0)
    huge = perplexity(1e6, 1)  # would overflow math.exp unguarded
    assert math.isfinite(huge) and huge > 1e40
    with pytest.raises(ValueError):
        perplexity(1.0, 0)
