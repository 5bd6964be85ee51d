"""The counting task's evaluation: head metrics beside the majority class (accuracy,
P/R/F1, count errors, accuracy per true count, calibration), answer perplexity,
generated answers (BLEU, ROUGE, the count parsed from them, its agreement with the
head) and one row per record for ``vlmtune evaluate --rankings``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from vlmtune.console import progress as progress_bar
from vlmtune.console import status
from vlmtune.data.counting import count_class
from vlmtune.data.formats import CountRecord
from vlmtune.distributed import all_gather_objects
from vlmtune.metrics.classification import classification_metrics, majority_baseline
from vlmtune.metrics.counting import agreement_metrics, calibration, count_errors, majority_count_errors, per_count_accuracy
from vlmtune.metrics.text import parse_count, perplexity, text_metrics
from vlmtune.tasks.common import shard_rows
from vlmtune.tasks.counting.config import CountingConfig
from vlmtune.tasks.counting.model import (
    CountingModel,
    answer_token_ce,
    class_names,
    decode,
    generate_answers,
    image_inputs,
    num_classes,
    prompt_last,
)
from vlmtune.utils import derived_seed


class RecordSampler:
    """Top-k/top-p/temperature sampling with one random generator per record, seeded by
    (run seed, record index): a record's sampled answer does not depend on which other
    records share its batch or its process. A logits processor for greedy ``generate``:
    it draws each row's token from its own generator and leaves only that token
    possible, so greedy decoding takes it. The warpers are transformers' own, the ones
    ``do_sample=True`` applies."""

    def __init__(self, seeds: list[int], device: torch.device, *, top_p: float, temperature: float, top_k: int | None = None):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        warpers: list[Any] = []
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        self.warpers = LogitsProcessorList(warpers)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        probs = self.warpers(input_ids, scores).float().softmax(-1)
        chosen = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.generators)])
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(chosen), device=scores.device), chosen] = 0.0
        return out


def answer_token_nll(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed cross-entropy of the answer tokens (float64) and their count
    (:func:`answer_token_ce`)."""
    ce, keep = answer_token_ce(hidden, lm_head, labels)
    nll = torch.zeros(len(labels), dtype=torch.float64, device=hidden.device).index_add_(0, keep.nonzero()[:, 0], ce.double())
    return nll, keep.sum(1)


@torch.no_grad()
def evaluate(
    model: CountingModel,
    records: list[CountRecord],
    loader_for: Callable[[list[CountRecord]], DataLoader],
    device: torch.device,
    *,
    counting: CountingConfig,
    max_new_tokens: int,
    n_generate: int,
    gen: dict[str, Any],
    sample_seed: int | None = None,
    train_records: list[CountRecord] | None = None,
    progress: bool = False,
    record_rows: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Head metrics beside the majority class, answer perplexity, and answers generated
    (with the ``gen`` settings of ``generate``) for the first ``n_generate`` records;
    BLEU and ROUGE when every record got one. With ``record_rows`` (a list), one JSON-ready
    row per record is appended to it (see :func:`per_record_rows`).

    ``loader_for(records)`` makes the evaluation loader of a list of records. With
    several processes each evaluates its shard (every world-th record from its rank:
    :func:`~vlmtune.tasks.common.shard_rows`); all gather the
    per-record results, merge them in record order and compute the metrics from the
    whole set, as one process does, so every process returns the same metrics.
    ``sample_seed``: sample the answers (top-p, temperature from ``gen``), each record
    under its own generator seeded by (``sample_seed``, record index), so the answers
    do not depend on how the records are split into processes and batches."""
    was_training = model.training
    model.eval()
    k = num_classes(counting)
    rows = shard_rows(range(len(records)))  # every world-th record
    mine: list[dict[str, Any]] = []
    if progress:  # reading the images (and the cache) comes before the bar
        status("evaluating %d record%s: reading their images and features", len(records), "" if len(records) == 1 else "s")
    for batch in progress_bar(loader_for([records[i] for i in rows]), desc="evaluate", enabled=progress):
        batch = {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in batch.items()}
        hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"], **image_inputs(batch))
        nll, n_tokens = answer_token_nll(hidden, model.backbone.model.lm_head, batch["labels"])
        count_logits = model.count_logits(hidden, batch["input_ids"], prompt_last(batch["labels"]))
        idx = [rows[i] for i in batch["index"].tolist()]  # record index in the whole set
        want = [j for j, i in enumerate(idx) if i < n_generate]
        answers = _batch_answers(model, batch, idx, want, device, max_new_tokens, gen, sample_seed) if want else {}
        probs = count_logits.float().softmax(-1).cpu()
        for j, i in enumerate(idx):
            mine.append(
                {
                    "row": i,
                    "pred": int(probs[j].argmax()),
                    "probs": probs[j],
                    "label": int(batch["count"][j]),
                    "nll": float(nll[j]),
                    "tokens": int(n_tokens[j]),
                    "answer": answers.get(j),
                }
            )
    # Every process joins the gather, also one whose shard is empty.
    merged = sorted((r for part in all_gather_objects(mine) for r in part), key=lambda r: r["row"])
    model.train(was_training)
    if progress:
        status("scoring the counts and answers")
    metrics = merged_metrics(records, merged, counting, train_records)
    if record_rows is not None:
        probs_all = torch.stack([r["probs"] for r in merged]) if merged else torch.empty(0, k)
        record_rows += per_record_rows(
            records, probs_all, {r["row"]: r["answer"] for r in merged if r["answer"] is not None}, counting
        )
    return metrics


def _batch_answers(
    model: CountingModel,
    batch: dict[str, Any],
    idx: list[int],
    want: list[int],
    device: torch.device,
    max_new_tokens: int,
    gen: dict[str, Any],
    sample_seed: int | None,
) -> dict[int, str]:
    """The generated answers of the batch rows ``want`` (by row; ``idx``: each row's record index)."""
    sel = torch.tensor(want, device=device)
    kw = dict(gen)
    if sample_seed is not None:
        sampler = RecordSampler(
            [derived_seed(sample_seed, idx[j]) for j in want],
            device,
            top_p=kw.pop("top_p", 1.0),
            temperature=kw.pop("temperature", 1.0),
            top_k=getattr(model.backbone.model.generation_config, "top_k", None),
        )
        kw.update(do_sample=False, logits_processor=LogitsProcessorList([sampler]))
    images = image_inputs(batch, want)
    ids = generate_answers(
        model,
        batch["prompt_ids"][sel],
        batch["prompt_mask"][sel],
        images.pop("pixel_values", None),
        max_new_tokens=max_new_tokens,
        **images,
        **kw,
    )
    return dict(zip(want, decode(model.backbone.tokenizer, ids)))


def merged_metrics(
    records: list[CountRecord],
    results: list[dict[str, Any]],
    counting: CountingConfig,
    train_records: list[CountRecord] | None = None,
) -> dict[str, Any]:
    """The metrics of per-record results in record order (one dict per record: its
    predicted class ``pred``, true class ``label``, class ``probs``, answer-token
    ``nll`` sum and ``tokens``, and generated ``answer`` or None)."""
    k = num_classes(counting)
    p = torch.tensor([r["pred"] for r in results], dtype=torch.long)
    y = torch.tensor([r["label"] for r in results], dtype=torch.long)
    metrics: dict[str, Any] = classification_metrics(p, y, k, "count")
    metrics["count/n"] = len(y)
    metrics["count/classes"] = class_names(counting)
    train_y = torch.tensor([count_class(r.count, counting.buckets) for r in train_records or []], dtype=torch.long)
    if train_records:
        metrics.update(majority_baseline(train_y, y, k, "count"))
    # How far off the wrong counts are, beside always answering the majority class.
    baseline = majority_count_errors(train_y, y, k) if train_records else {}
    for key, value in count_errors(p, y).items():
        metrics[key] = value
        if baseline:
            metrics[key.replace("count/", "count/baseline_", 1)] = baseline[key.replace("count/", "count/baseline_", 1)]
    metrics["count/per_count"] = per_count_accuracy(p, y, class_names(counting))
    if all("probs" in r for r in results):  # each record's class probabilities, when the caller kept them
        metrics.update(calibration(torch.stack([r["probs"] for r in results]).float() if results else torch.empty(0, k), y))
    nll, n_tokens = sum(r["nll"] for r in results), sum(r["tokens"] for r in results)
    metrics["text/perplexity"] = perplexity(nll, n_tokens) if n_tokens else float("nan")
    answered = [r for r in results if r["answer"] is not None]
    generated = [r["answer"] for r in answered]
    refs = [records[r["row"]].answer for r in answered]
    metrics.update(answer_metrics(generated, refs, [records[r["row"]].count for r in answered], train_records))
    metrics.update(
        agreement_metrics(
            [r["pred"] for r in answered], [parse_count(t) for t in generated], lambda c: count_class(c, counting.buckets)
        )
    )
    if len(generated) == len(records):  # BLEU/ROUGE only over the whole split
        metrics.update(text_metrics(generated, refs))
    return metrics


def per_record_rows(
    records: list[CountRecord], probs: torch.Tensor, answers: dict[int, str], counting: CountingConfig
) -> list[dict[str, Any]]:
    """One row per record: the image, question, true count and answer, the count head's
    class with its probability (and every class's), the generated answer and the count
    parsed from it (None where it states none)."""
    names = class_names(counting)
    out = []
    for i, r in enumerate(records):
        p = probs[i]
        k = int(p.argmax())
        true_class = count_class(r.count, counting.buckets)
        answer = answers.get(i)
        parsed = parse_count(answer) if answer is not None else None
        out.append(
            {
                "query": i,
                "image": str(r.image),
                "question": r.question,
                "count_true": r.count,
                "answer_true": r.answer,
                "count_pred": names[k],
                "count_pred_class": k,
                "count_true_class": true_class,
                "confidence": round(float(p[k]), 4),
                "prob_true": round(float(p[true_class]), 4),
                "probabilities": [round(float(x), 4) for x in p],
                "head_correct": k == true_class,
                "answer": answer,
                "answer_count": parsed,
                "answer_correct": None if answer is None else parsed == r.count,
                # Whether the answer's count falls in the head's class (None: no count stated).
                "head_agrees": None if parsed is None else count_class(parsed, counting.buckets) == k,
            }
        )
    return out


def answer_metrics(
    generated: list[str], references: list[str], counts: list[int], train_records: list[CountRecord] | None = None
) -> dict[str, Any]:
    """Share of answers that state a count, and of answers whose count is right (0-100),
    beside always answering the most common training count."""
    out: dict[str, Any] = {"answer/n_generated": len(generated)}
    if not generated:
        return out
    parsed = [parse_count(t) for t in generated]
    out["answer/parse_rate"] = 100.0 * sum(c is not None for c in parsed) / len(parsed)
    out["answer/count_accuracy"] = 100.0 * sum(c == y for c, y in zip(parsed, counts)) / len(parsed)
    if train_records:
        majority = Counter(r.count for r in train_records).most_common(1)[0][0]
        out["answer/baseline_count_accuracy"] = 100.0 * sum(y == majority for y in counts) / len(counts)
    out["answer/sample"] = generated[0]
    out["answer/examples"] = [{"reference": r, "generated": g} for r, g in list(zip(references, generated))[:5]]
    return out
