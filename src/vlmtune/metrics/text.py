"""Text-generation metrics: BLEU-1..4, ROUGE-1/2/L, perplexity, and the count in an answer.

Thin over the reference libraries so the numbers match what others report:

- BLEU is sacrebleu's corpus BLEU (``BLEU(max_ngram_order=n)``) with its defaults:
  ``13a`` tokenisation, case-sensitive, ``smooth_method="exp"`` and
  ``effective_order=False``. Corpus BLEU pools n-gram counts over all sentences, so
  effective order (meant for sentence BLEU) is not needed; "exp" smoothing keeps the
  score above zero when some higher-order n-gram has no match anywhere in the corpus,
  which happens with short answers such as "There are 3 receipts.".
- ROUGE is rouge_score's ``RougeScorer(use_stemmer=True)`` (Porter stemmer, lower-cased,
  punctuation dropped), the F-measure averaged over pairs. It needs no NLTK data
  download: the stemmer is rule-based and ``rougeLsum`` (which would split sentences)
  is not used.

All scores are percentages, 0-100.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

__all__ = ["MAX_MEAN_NLL", "parse_count", "perplexity", "text_metrics"]

_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU-1..4 and mean ROUGE-1/2/L F-measure of predictions against one
    reference each, as ``text/bleu1`` .. ``text/bleu4``, ``text/rouge1``,
    ``text/rouge2``, ``text/rougeL`` (0-100). Empty inputs give 0.0 for every key."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    keys = [f"text/bleu{n}" for n in range(1, 5)] + [f"text/{r}" for r in _ROUGE_TYPES]
    if not predictions:
        return dict.fromkeys(keys, 0.0)

    out: dict[str, float] = {}
    for n in range(1, 5):
        out[f"text/bleu{n}"] = float(BLEU(max_ngram_order=n).corpus_score(predictions, [references]).score)
    scorer = _rouge_scorer()
    sums = dict.fromkeys(_ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references):
        # rouge_score's argument order is (target, prediction).
        scores = scorer.score(ref, pred)
        for r in _ROUGE_TYPES:
            sums[r] += scores[r].fmeasure
    for r in _ROUGE_TYPES:
        out[f"text/{r}"] = 100.0 * sums[r] / len(predictions)
    return out


@lru_cache(maxsize=1)
def _rouge_scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(list(_ROUGE_TYPES), use_stemmer=True)


_NUMBER_WORDS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_TOKEN = re.compile(r"\d+|[a-z]+")


def parse_count(text: str) -> int | None:
    """The count stated in a generated answer, or None when it states none.

    Reads digits ("3"), number words zero..twenty ("three"), "none", "no receipts"
    (0) and "a receipt" / "a single receipt" (1). The first count mentioned wins, so
    "I see 2 receipts, one of them torn" gives 2. Case and punctuation are ignored.
    """
    tokens = _TOKEN.findall(text.lower())
    for i, tok in enumerate(tokens):
        if tok.isdigit():
            return int(tok)
        if tok in _NUMBER_WORDS:
            return _NUMBER_WORDS[tok]
        if tok == "none":
            return 0
        # "no"/"a" are counts only when they quantify a receipt ("no visible
        # receipts", "a single receipt"), not in "No, ..." or "a table with 3 ...".
        following = tokens[i + 1 : i + 3]
        if tok == "no" and any(t.startswith("receipt") for t in following):
            return 0
        if tok in ("a", "an") and "receipt" in following:
            return 1
    return None


MAX_MEAN_NLL = 100.0
"""Cap on the mean NLL before exponentiating: exp(100) ~ 2.7e43 is far beyond any model
worth scoring (a uniform guess over a 150k vocabulary is exp(12)) and keeps the result a
finite float that JSON can hold."""


def perplexity(total_nll: float, total_tokens: int) -> float:
    """exp(total_nll / total_tokens): the perplexity of summed token NLL (nats)."""
    if total_tokens <= 0:
        raise ValueError(f"perplexity needs at least one token, got total_tokens={total_tokens}")
    mean = total_nll / total_tokens
    if math.isnan(mean):
        return math.nan
    return math.exp(min(mean, MAX_MEAN_NLL))
