"""Counting with answer generation: model, losses per batch, validation, evaluation.

InternVL's own language model reads the image tokens and the chat prompt and answers
in words ("There are 3 receipts."), trained with token cross-entropy on the answer
tokens only; a count-classification head sits on pooled multimodal features. The
training loop sums the two named terms ``lm`` and ``count`` with the weights
``loss.lm`` and ``loss.count`` (the seed's "MultimodalLoss") and logs both.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from vlmtune.backbone import CHAT_END, Backbone, preprocess_images
from vlmtune.checkpoint import backbone_identity
from vlmtune.config import Config, CountingConfig, DataConfig, GenerationConfig, ModelConfig
from vlmtune.data.cache import (FeatureStore, content_key, preprocess_signature, vision_fingerprint,
                                vision_prefix_fingerprint)
from vlmtune.data.counting import (IGNORE_INDEX, CachedTiles, CountingCollator, CountingDataset, PromptBuilder, count_class,
                                   num_tiles, tile_key)
from vlmtune.data.formats import CountRecord, image_size, load_image, options_from_config, read_counting
from vlmtune.distributed import all_gather_objects, global_count, mean_share, rank_world
from vlmtune.errors import ConfigError, VlmtuneError
from vlmtune.heads import mlp
from vlmtune.metrics.classification import classification_metrics, majority_baseline
from vlmtune.metrics.text import parse_count, perplexity, text_metrics
from vlmtune.tasks import FeatureCache, data_paths
from vlmtune.utils import derived_seed


def num_classes(c: CountingConfig) -> int:
    return len(c.buckets) if c.buckets is not None else c.max_count + 1


def class_names(c: CountingConfig) -> list[str]:
    """Readable class labels: "0", "1", ... or bucket ranges such as "2+" and "1-2"."""
    if c.buckets is None:
        return [str(i) for i in range(c.max_count + 1)]
    b = c.buckets
    names = []
    for i, lo in enumerate(b):
        hi = b[i + 1] - 1 if i + 1 < len(b) else None
        names.append(f"{lo}+" if hi is None else str(lo) if hi == lo else f"{lo}-{hi}")
    return names


def answer_token_ce(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of each answer token's next-token prediction -> (ce [answer tokens],
    mask [B, L-1] of where they are). Position t predicts token t+1; ``labels`` [B, L] are
    IGNORE_INDEX on the prompt and padding. The LM head runs on the answer positions
    only: the same numbers as on every position, without the [B, L, vocab] logits of
    each prompt and image token (with InternVL's 151k vocabulary the largest tensor of
    a step), and a row's values read nothing of the other rows or the padding."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return F.cross_entropy(lm_head(hidden[:, :-1][keep]).float(), targets[keep], reduction="none"), keep


def answer_token_loss(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy of the answer tokens (:func:`answer_token_ce`) -> (loss, tokens).

    With several processes the mean is over the answer tokens of all processes' rows
    (:func:`~vlmtune.distributed.mean_share`): their number differs between processes,
    so each process's own mean would weigh a token by how many others its process had.
    ``tokens`` is this process's count; a batch without one gives zero, in the graph.
    """
    ce, keep = answer_token_ce(hidden, lm_head, labels)
    total = global_count(keep, hidden.device)  # every process joins, also one without tokens
    if not len(ce):
        return ce.sum() * 0.0, 0
    return mean_share(ce, total), len(ce)


class CountingModel(nn.Module):
    """Backbone (optionally with LoRA adapters in its language model) + a count head."""

    def __init__(self, backbone: Backbone, counting: CountingConfig, model: ModelConfig):
        super().__init__()
        self.backbone = backbone
        self.pooling = counting.pooling
        self.lm_mode = counting.lm_mode
        self.count_head = mlp(backbone.info.text_hidden, model.head_hidden, num_classes(counting), model.adapter_dropout)
        if self.lm_mode == "lora":
            self._inject_lora(counting)

    def _inject_lora(self, c: CountingConfig) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        lora = LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout, target_modules=list(c.lora_target_modules))
        try:
            inject_adapter_in_model(lora, self.backbone.language_model)
        except ValueError as e:
            raise ConfigError(f"counting.lora_target_modules: {str(e).splitlines()[0]}") from None
        for p in self.backbone.model.parameters():
            p.requires_grad_(False)

    def lora_modules(self) -> list[nn.Module]:
        """The LoRA A/B matrices of the language model, found by module type."""
        from peft.tuners.lora import LoraLayer

        out: list[nn.Module] = []
        for m in self.backbone.language_model.modules():
            if isinstance(m, LoraLayer):
                out += [m.lora_A, m.lora_B]
        return out

    # ---- components for the stage plan
    def component_modules(self, name: str, vision_blocks: int = 0) -> list[nn.Module | nn.Parameter]:
        if name == "count_head":
            return [self.count_head]
        if name == "language_model" and self.lm_mode == "lora":
            return self.lora_modules()
        return self.backbone.component_modules(name, vision_blocks)

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    # ---- forward
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None,
                      **cached: torch.Tensor) -> torch.Tensor:
        """Last hidden states of the language model over image tokens + text, [B, L, Dt].

        The images come as the tiles' ``pixel_values`` or as cached vision states
        (``vision_tokens``, or ``vision_hidden`` with ``vision_start``: see :func:`image_inputs`).
        """
        embeds = self.embed(input_ids, pixel_values, **cached)
        return self.backbone.language_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, *,
              vision_tokens: torch.Tensor | None = None, vision_hidden: torch.Tensor | None = None,
              vision_start: int | None = None) -> torch.Tensor:
        """The LM's input embeddings with the image tokens in place. From cached states
        the tower's remaining blocks (``vision_hidden``: those from ``vision_start`` on)
        and the projector run live, so whatever of them a stage trains gets gradients."""
        bb = self.backbone
        if vision_hidden is not None:
            vision_tokens = bb.vision_from_hidden(vision_hidden, int(vision_start))  # type: ignore[arg-type]
        return bb.embed_multimodal(input_ids, pixel_values, vision_tokens=vision_tokens)

    def pool(self, hidden: torch.Tensor, input_ids: torch.Tensor, prompt_last: torch.Tensor) -> torch.Tensor:
        """Pooled multimodal features for the count head.

        "image": the mean of the LM's states at the image-token positions. They hold the
        LM's reading of every tile and come before the answer, so a teacher-forced answer
        ("There are 3 ...") can never leak the label into the head, and the same pooling
        works at prediction time, when there is no answer yet.
        "prompt_last": the state of the last prompt token (the one that starts the
        answer); it has seen the whole image and the question, and nothing of the answer.
        """
        if self.pooling == "prompt_last":
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), prompt_last]
        mask = (input_ids == self.backbone.image_token_id).to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def count_logits(self, hidden: torch.Tensor, input_ids: torch.Tensor, prompt_last: torch.Tensor) -> torch.Tensor:
        return self.count_head(self.pool(hidden, input_ids, prompt_last).float())

    def forward(self, batch: dict[str, torch.Tensor], active: frozenset[str] | set[str]) -> dict[str, torch.Tensor]:
        """Named, unweighted loss terms: ``lm`` (answer tokens) and ``count`` (head)."""
        hidden = self.hidden_states(batch["input_ids"], batch["attention_mask"], **image_inputs(batch))
        terms: dict[str, torch.Tensor] = {}
        if "lm" in active:
            terms["lm"], _ = answer_token_loss(hidden, self.backbone.model.lm_head, batch["labels"])
        if "count" in active:
            logits = self.count_logits(hidden, batch["input_ids"], _prompt_last(batch["labels"]))
            terms["count"] = F.cross_entropy(logits, batch["count"])
        return terms


# Batch keys that carry the images: live pixels or a feature cache's states.
IMAGE_KEYS = ("pixel_values", "vision_tokens", "vision_hidden")


def image_inputs(batch: dict[str, torch.Tensor], rows: list[int] | None = None) -> dict[str, torch.Tensor]:
    """The image input of a batch, as keyword arguments of :meth:`CountingModel.hidden_states`
    and :func:`generate_answers`: ``pixel_values`` (live), ``vision_tokens`` (the cached
    tower output) or ``vision_hidden`` + ``vision_start`` (the cached state entering
    that block). With ``rows``, only the tiles of those rows of the batch."""
    key = next(k for k in IMAGE_KEYS if k in batch)
    out = {key: batch[key] if rows is None else _tiles_of(batch[key], batch["num_tiles"], rows)}
    if "vision_start" in batch:
        out["vision_start"] = batch["vision_start"]
    return out


def _prompt_last(labels: torch.Tensor) -> torch.Tensor:
    """Index of the last prompt token of each row: the position before the first label."""
    labelled = labels != IGNORE_INDEX
    first = labelled.float().argmax(dim=1)  # first labelled position (answers are never empty)
    return (first - 1).clamp_min(0)


# --------------------------------------------------------------------------- generation


def stop_token_ids(tokenizer: Any) -> list[int]:
    """``<|im_end|>`` ends an answer; the tokenizer's own EOS stops generation as well."""
    ids = [tokenizer.convert_tokens_to_ids(CHAT_END), tokenizer.eos_token_id]
    unk = tokenizer.unk_token_id
    return list(dict.fromkeys(i for i in ids if i is not None and i != unk))


@torch.no_grad()
def generate_answers(model: CountingModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                     pixel_values: torch.Tensor | None, max_new_tokens: int, num_beams: int = 1, do_sample: bool = False,
                     top_p: float = 1.0, temperature: float = 1.0, *, vision_tokens: torch.Tensor | None = None,
                     vision_hidden: torch.Tensor | None = None, vision_start: int | None = None,
                     **kw: Any) -> Any:
    """Answers to left-padded prompts. Returns the generated ids [B, T] (or generate's
    output object when ``return_dict_in_generate`` is passed). The images come as
    ``pixel_values`` or as cached vision states (see :func:`image_inputs`)."""
    bb = model.backbone
    embeds = model.embed(prompt_ids, pixel_values, vision_tokens=vision_tokens, vision_hidden=vision_hidden,
                         vision_start=vision_start)
    tok = bb.tokenizer
    args: dict[str, Any] = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=do_sample,
                                eos_token_id=stop_token_ids(tok), pad_token_id=tok.pad_token_id)
    if do_sample:
        args.update(top_p=top_p, temperature=temperature)
    else:
        # Unset sampling knobs a hub generation_config may carry, so greedy/beam stays greedy.
        args.update(top_p=None, top_k=None, temperature=None)
    # Positions follow the mask, so left padding does not shift the real tokens.
    position_ids = (prompt_mask.long().cumsum(-1) - 1).clamp_min(0)
    return bb.model.generate(inputs_embeds=embeds, attention_mask=prompt_mask, position_ids=position_ids, **args, **kw)


def decode(tokenizer: Any, ids: torch.Tensor) -> list[str]:
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]


# --------------------------------------------------------------------------- data


def prompt_builder(backbone: Backbone, c: CountingConfig) -> PromptBuilder:
    return PromptBuilder(backbone.tokenizer, backbone.info.tokens_per_tile, c.question_max_tokens, c.answer_max_tokens)


def make_loader(records: list[CountRecord], backbone: Backbone, c: CountingConfig, *, batch_size: int,
                train: bool = False, seed: int = 0, num_workers: int = 0, cache: FeatureCache | None = None,
                cache_dtype: str = "float32", cache_batch_size: int = 32) -> DataLoader:
    """Training loaders shuffle (by a seeded generator) and drop the last partial batch.

    With a ``cache`` whose ``vision`` is set, the images' vision states come from the
    feature cache in ``cache.dir`` (built now for any image not yet in it) instead of
    being decoded, tiled and run through the tower: the tower's output, or -- where the
    cache names a ``vision_start`` block -- the state entering it (the frozen prefix of
    a stage that trains the blocks above). ``cache.text`` is ignored: the language
    model reads the image tokens, so its states are never frozen features.
    """
    g = torch.Generator()
    g.manual_seed(seed)
    collate = CountingCollator(prompt_builder(backbone, c), backbone.image_processor, c.max_dynamic_patch,
                               backbone.tokenizer.pad_token_id)
    cached = None
    if cache is not None and cache.vision:
        cached = build_vision_cache(records, backbone, cache.dir, max_tiles=c.max_dynamic_patch,
                                    start=cache.vision_start, dtype=cache_dtype,
                                    batch_size=cache_batch_size)
    return DataLoader(
        CountingDataset(records, c.buckets, cached), batch_size=batch_size, shuffle=train, generator=g if train else None,
        num_workers=num_workers, drop_last=train and len(records) > batch_size, collate_fn=collate,
    )


def vision_namespace(backbone: Backbone, *, max_tiles: int, start: int | None, dtype: str) -> dict[str, Any]:
    """Everything besides the image that decides the cached tiles' states: the backbone,
    the weights of the modules that compute them (the whole tower, or the prefix below
    block ``start``), the tiling and pixel preprocessing, the tower's and the storage's
    dtypes."""
    p = backbone.image_processor
    weights = vision_fingerprint(backbone) if start is None else vision_prefix_fingerprint(backbone, start)
    return {"kind": "vision_tiles" if start is None else "vision_hidden", "start": start,
            "backbone": backbone_identity(backbone), "weights": weights,
            "preprocess": {**preprocess_signature(p), "min_patches": getattr(p, "min_patches", 1),
                           "max_tiles": max_tiles, "crop_to_patches": max_tiles > 1},
            "tower_dtype": str(next(backbone.vision_tower.parameters()).dtype), "dtype": dtype}


@torch.no_grad()
def build_vision_cache(records: list[CountRecord], backbone: Backbone, cache_dir: str | Path, *, max_tiles: int,
                       start: int | None = None, dtype: str = "float32", batch_size: int = 32) -> CachedTiles:
    """The store holding the vision states of every tile of every image of ``records``,
    one row per tile, keyed by the image's content and the tile's index.

    Each image's tile count comes from its header size (EXIF orientation applied, as
    :func:`load_image` returns it) by the processor's own tiling rule, so a cached
    epoch decodes nothing; building a row checks that count against the processor's.
    ``start`` None stores the tower's last hidden state (what the projector reads); an
    int the hidden state entering block ``start`` (``Backbone.vision_hidden``).
    """
    store = FeatureStore(cache_dir, vision_namespace(backbone, max_tiles=max_tiles, start=start, dtype=dtype))
    keys = {path: content_key(path) for path in dict.fromkeys(r.image for r in records)}
    sources = {r.image: r.source for r in records}
    tiles = {path: num_tiles(backbone.image_processor, *image_size(path, sources[path]), max_tiles) for path in keys}
    path_of = {k: p for p, k in keys.items()}
    device = next(backbone.parameters()).device

    def compute(batch_keys: list[str]) -> Any:
        # Rows are tiles; an image's tiles may straddle two batches (each decodes it).
        wanted = [(k.rsplit("/tile", 1)[0], int(k.rsplit("/tile", 1)[1])) for k in batch_keys]
        images = list(dict.fromkeys(key for key, _ in wanted))
        pv, n = preprocess_images(backbone.image_processor, [load_image(path_of[k], sources[path_of[k]]) for k in images],
                                  max_tiles)
        first = dict(zip(images, torch.cat([n.new_zeros(1), n.cumsum(0)]).tolist()))
        for key, count in zip(images, n.tolist()):
            if count != tiles[path_of[key]]:
                raise VlmtuneError(f"{sources[path_of[key]]}: image {path_of[key]} was cut into {count} tiles, but its "
                                   f"header size gives {tiles[path_of[key]]}; set cache.enabled=false to train on it")
        pick = pv[[first[key] + t for key, t in wanted]].to(device)
        out = backbone.vision_tokens(pick) if start is None else backbone.vision_hidden(pick, start)
        return out.float().cpu().numpy()

    store.ensure([tile_key(keys[p], t) for p in keys for t in range(tiles[p])], compute, batch_size=batch_size,
                 dtype=dtype)
    return CachedTiles(store, keys, tiles, start)


# --------------------------------------------------------------------------- evaluation


class RecordSampler:
    """Top-k/top-p/temperature sampling with one random generator per record, seeded by
    (run seed, record index): a record's sampled answer does not depend on which other
    records share its batch or its process. A logits processor for greedy ``generate``:
    it draws each row's token from its own generator and leaves only that token
    possible, so greedy decoding takes it. The warpers are transformers' own, the ones
    ``do_sample=True`` applies."""

    def __init__(self, seeds: list[int], device: torch.device, *, top_p: float, temperature: float,
                 top_k: int | None = None):
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        warpers: list[Any] = []
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        self.warpers = LogitsProcessorList(warpers)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
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


def shard_rows(n: int) -> list[int]:
    """This process's records of ``n``: every world-th from its rank, so the first
    records (the ones validation answers) spread over all processes."""
    rank, world = rank_world()
    return list(range(rank, n, world))


@torch.no_grad()
def evaluate(model: CountingModel, records: list[CountRecord], loader_for: Callable[[list[CountRecord]], DataLoader],
             device: torch.device, *, counting: CountingConfig, max_new_tokens: int, n_generate: int,
             gen: dict[str, Any], sample_seed: int | None = None, train_records: list[CountRecord] | None = None,
             progress: bool = False, record_rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Head metrics beside the majority class, answer perplexity, and answers generated
    (with the ``gen`` settings of ``generate``) for the first ``n_generate`` records;
    BLEU and ROUGE when every record got one. With ``record_rows`` (a list), one JSON-ready
    row per record is appended to it (see :func:`per_record_rows`).

    ``loader_for(records)`` makes the evaluation loader of a list of records. With
    several processes each evaluates its shard (:func:`shard_rows`); all gather the
    per-record results, merge them in record order and compute the metrics from the
    whole set, as one process does, so every process returns the same metrics.
    ``sample_seed``: sample the answers (top-p, temperature from ``gen``), each record
    under its own generator seeded by (``sample_seed``, record index), so the answers
    do not depend on how the records are split into processes and batches."""
    from tqdm.auto import tqdm
    from transformers import LogitsProcessorList

    was_training = model.training
    model.eval()
    tok = model.backbone.tokenizer
    k = num_classes(counting)
    rows = shard_rows(len(records))
    mine: list[dict[str, Any]] = []
    for batch in tqdm(loader_for([records[i] for i in rows]), desc="evaluate", disable=not progress, leave=False):
        batch = {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in batch.items()}
        hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"], **image_inputs(batch))
        nll, n_tokens = answer_token_nll(hidden, model.backbone.model.lm_head, batch["labels"])
        count_logits = model.count_logits(hidden, batch["input_ids"], _prompt_last(batch["labels"]))
        idx = [rows[i] for i in batch["index"].tolist()]  # record index in the whole set
        answers: dict[int, str] = {}
        want = [j for j, i in enumerate(idx) if i < n_generate]
        if want:
            sel = torch.tensor(want, device=device)
            kw = dict(gen)
            if sample_seed is not None:
                sampler = RecordSampler([derived_seed(sample_seed, idx[j]) for j in want], device,
                                        top_p=kw.pop("top_p", 1.0), temperature=kw.pop("temperature", 1.0),
                                        top_k=getattr(model.backbone.model.generation_config, "top_k", None))
                kw.update(do_sample=False, logits_processor=LogitsProcessorList([sampler]))
            images = image_inputs(batch, want)
            ids = generate_answers(model, batch["prompt_ids"][sel], batch["prompt_mask"][sel],
                                   images.pop("pixel_values", None), max_new_tokens=max_new_tokens, **images, **kw)
            answers = dict(zip(want, decode(tok, ids)))
        probs = count_logits.float().softmax(-1).cpu()
        for j, i in enumerate(idx):
            mine.append({"row": i, "pred": int(probs[j].argmax()), "probs": probs[j], "label": int(batch["count"][j]),
                         "nll": float(nll[j]), "tokens": int(n_tokens[j]), "answer": answers.get(j)})
    # Every process joins the gather, also one whose shard is empty.
    merged = sorted((r for part in all_gather_objects(mine) for r in part), key=lambda r: r["row"])
    model.train(was_training)
    metrics = merged_metrics(records, merged, counting, train_records)
    if record_rows is not None:
        probs_all = torch.stack([r["probs"] for r in merged]) if merged else torch.empty(0, k)
        record_rows += per_record_rows(records, probs_all, {r["row"]: r["answer"] for r in merged
                                                            if r["answer"] is not None}, counting)
    return metrics


def merged_metrics(records: list[CountRecord], results: list[dict[str, Any]], counting: CountingConfig,
                   train_records: list[CountRecord] | None = None) -> dict[str, Any]:
    """The metrics of per-record results in record order (one dict per record: its
    predicted class ``pred``, true class ``label``, answer-token ``nll`` sum and
    ``tokens``, and generated ``answer`` or None)."""
    k = num_classes(counting)
    p = torch.tensor([r["pred"] for r in results], dtype=torch.long)
    y = torch.tensor([r["label"] for r in results], dtype=torch.long)
    metrics: dict[str, Any] = classification_metrics(p, y, k, "count")
    metrics["count/n"] = len(y)
    metrics["count/classes"] = class_names(counting)
    if train_records:
        train_y = torch.tensor([count_class(r.count, counting.buckets) for r in train_records])
        metrics.update(majority_baseline(train_y, y, k, "count"))
    nll, n_tokens = sum(r["nll"] for r in results), sum(r["tokens"] for r in results)
    metrics["text/perplexity"] = perplexity(nll, n_tokens) if n_tokens else float("nan")
    answered = [r for r in results if r["answer"] is not None]
    generated = [r["answer"] for r in answered]
    refs = [records[r["row"]].answer for r in answered]
    metrics.update(answer_metrics(generated, refs, [records[r["row"]].count for r in answered], train_records))
    if len(generated) == len(records):  # BLEU/ROUGE only over the whole split
        metrics.update(text_metrics(generated, refs))
    return metrics


def per_record_rows(records: list[CountRecord], probs: torch.Tensor, answers: dict[int, str],
                    counting: CountingConfig) -> list[dict[str, Any]]:
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
        out.append({
            "query": i, "image": str(r.image), "question": r.question, "count_true": r.count,
            "answer_true": r.answer, "count_pred": names[k], "count_pred_class": k, "count_true_class": true_class,
            "confidence": round(float(p[k]), 4), "prob_true": round(float(p[true_class]), 4),
            "probabilities": [round(float(x), 4) for x in p], "head_correct": k == true_class,
            "answer": answer, "answer_count": parsed, "answer_correct": None if answer is None else parsed == r.count,
        })
    return out


def _tiles_of(pixel_values: torch.Tensor, num_tiles: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The tiles of the chosen rows of a batch (tiles of all images are stacked in order)."""
    starts = torch.cat([num_tiles.new_zeros(1), num_tiles.cumsum(0)]).tolist()
    return torch.cat([pixel_values[starts[r]:starts[r + 1]] for r in rows])


def answer_metrics(generated: list[str], references: list[str], counts: list[int],
                   train_records: list[CountRecord] | None = None) -> dict[str, Any]:
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


# --------------------------------------------------------------------------- the task


class CountingTask:
    """Counting with answer generation (implements ``Task``)."""

    name: ClassVar[str] = "counting"
    # With counting.lm_mode=lora, the backbone's 'language_model' means the LoRA adapters of the LM.
    components: ClassVar[tuple[str, ...]] = ("count_head",)
    backbone_components: ClassVar[tuple[str, ...]] = ("vision_blocks", "vision_tower", "mm_projector", "language_model")
    # Config sections that evaluate / predict may override: decoding settings included.
    evaluation_sections: ClassVar[tuple[str, ...]] = ("data", "eval", "generation")
    losses: ClassVar[tuple[str, ...]] = ("lm", "count")
    key_metrics: ClassVar[tuple[str, ...]] = (
        "count/accuracy", "count/baseline_accuracy", "count/macro_f1", "count/baseline_macro_f1",
        "answer/count_accuracy", "answer/baseline_count_accuracy", "answer/parse_rate",
        "text/bleu4", "text/rougeL", "text/perplexity",
    )
    report_sections: ClassVar[tuple[str, ...]] = ("count", "answer", "text")
    # The vision tower's states (tiles of each image) come from the feature cache while it
    # is frozen, or its frozen prefix's while only its last blocks train; the language
    # model's never do: it reads the image tokens the projector makes.
    cacheable: ClassVar[bool] = True
    cache_kinds: ClassVar[tuple[str, ...]] = ("vision", "vision_prefix")

    def __init__(self, *, counting: CountingConfig, generation: GenerationConfig, model: ModelConfig, data: DataConfig,
                 loss_weights: dict[str, float], train_batch_size: int, eval_batch_size: int, seed: int = 0,
                 cache_dtype: str = "float32"):
        self.counting, self.generation, self.model_cfg, self.data = counting, generation, model, data
        self.weights = dict(loss_weights)
        self.train_batch_size, self.eval_batch_size = train_batch_size, eval_batch_size
        self.seed = seed
        self.cache_dtype = cache_dtype

    @classmethod
    def from_config(cls, cfg: Config) -> "CountingTask":
        return cls(counting=cfg.counting, generation=cfg.generation, model=cfg.model, data=cfg.data,
                   loss_weights={name: getattr(cfg.loss, name) for name in cls.losses},
                   train_batch_size=cfg.train.batch_size, eval_batch_size=cfg.eval.batch_size, seed=cfg.seed,
                   cache_dtype=cfg.cache.dtype)

    def build_model(self, backbone: Backbone) -> CountingModel:
        return CountingModel(backbone, self.counting, self.model_cfg)

    def data_paths(self, output_dir: Path) -> dict[str, str]:
        """Annotation files from the config, or the synthetic receipts set, generated once."""
        from vlmtune.data.receipts import generate_receipts

        s = self.data.synthetic
        return data_paths(self.data, output_dir, lambda folder: generate_receipts(
            folder, n=s.n, seed=s.seed, max_count=self.counting.max_count, image_size=s.image_size,
            overwrite=True), ".jsonl")  # data_paths has checked that the folder is empty or generated

    def read_split(self, path: str, split: str | None = None) -> list[CountRecord]:
        """Records of one split; bad records raise or are skipped (and logged) per data.on_error.
        Records without a question or answer get them from counting.*_templates."""
        return read_counting(path, max_count=self.counting.max_count, on_error=self.data.on_error,
                             opts=options_from_config(self.data, self.counting, split=split))

    def loss_weights(self) -> dict[str, float]:
        return dict(self.weights)

    def loss_targets(self, records: list[CountRecord]) -> set[str]:
        """Every counting record has a count (the head's target); the answer tokens are
        the LM loss's target wherever a record has a non-empty answer."""
        targets = {"count"} if records else set()
        if any(str(getattr(r, "answer", "") or "").strip() for r in records):
            targets.add("lm")
        return targets

    def check_eval_records(self, records: list[CountRecord], where: str) -> None:
        """Nothing in the counting evaluation depends on a split's size (the Task base class's default)."""

    def make_loader(self, records: list[CountRecord], backbone: Backbone, *, train: bool, seed: int = 0,
                    cache: FeatureCache | None = None) -> DataLoader:
        return make_loader(records, backbone, self.counting, batch_size=self.train_batch_size if train else self.eval_batch_size,
                           train=train, seed=seed, num_workers=self.data.num_workers, cache=cache,
                           cache_dtype=self.cache_dtype, cache_batch_size=self.eval_batch_size)

    def validate(self, model: CountingModel, records: list[CountRecord], *, device: torch.device,
                 cache: FeatureCache | None = None) -> dict[str, Any]:
        """The cheap pass after each epoch: head metrics, answer perplexity, and answers
        sampled for the first ``generation.val_num_images`` images (a quick look)."""
        g = self.generation
        # Sampled answers draw from generators of their own, seeded by (run seed, record),
        # so validation neither perturbs the training stream (resume stays exact) nor
        # varies between identical runs or with the number of processes.
        return evaluate(model, records, self._loader_for(model, cache), device, counting=self.counting,
                        max_new_tokens=g.max_new_tokens, n_generate=g.val_num_images,
                        gen=dict(num_beams=1, do_sample=False, top_p=g.val_top_p, temperature=g.val_temperature),
                        sample_seed=self.seed if g.val_do_sample else None)

    def evaluate(self, model: CountingModel, records: list[CountRecord], *, device: torch.device,
                 train_records: list[CountRecord] | None = None, progress: bool = False,
                 cache: FeatureCache | None = None) -> dict[str, Any]:
        """The final evaluation: head metrics beside the majority class, perplexity, and a
        beam-search answer for every image (BLEU, ROUGE, count parsed from the answer)."""
        return self._final(model, records, device, train_records, progress, cache=cache)

    def evaluate_with_rankings(self, model: CountingModel, records: list[CountRecord], *, device: torch.device,
                               rankings_k: int, train_records: list[CountRecord] | None = None, progress: bool = False,
                               cache: FeatureCache | None = None) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
        """:meth:`evaluate` plus one row per record: {"counting": [...]} (``rankings_k`` is
        unused: a counting query has one answer, not a ranked list)."""
        rows: list[dict[str, Any]] = []
        metrics = self._final(model, records, device, train_records, progress, record_rows=rows, cache=cache)
        return metrics, {"counting": rows}

    def _final(self, model: CountingModel, records: list[CountRecord], device: torch.device,
               train_records: list[CountRecord] | None, progress: bool,
               record_rows: list[dict[str, Any]] | None = None, cache: FeatureCache | None = None) -> dict[str, Any]:
        """The final evaluation's settings: an answer for every record, by beam search."""
        g = self.generation
        return evaluate(model, records, self._loader_for(model, cache), device,
                        counting=self.counting, max_new_tokens=g.max_new_tokens, n_generate=len(records),
                        gen=dict(num_beams=g.num_beams, do_sample=False), train_records=train_records,
                        progress=progress, record_rows=record_rows)

    def _loader_for(self, model: CountingModel, cache: FeatureCache | None) -> Callable[[list[CountRecord]], DataLoader]:
        """The evaluation loader of a shard of records (see :func:`evaluate`)."""
        return lambda shard: self.make_loader(shard, model.backbone, train=False, cache=cache)
