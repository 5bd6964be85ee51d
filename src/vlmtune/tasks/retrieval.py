"""Cross-modal retrieval with grounding: model, losses per batch, evaluation.

Pooled vision and text tokens of the frozen backbone go through adapters and
projectors into a joint space (contrastive InfoNCE with a learnable temperature);
heads on the pair predict image-text matching, the referred object's box and the
spatial relation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from vlmtune.backbone import Backbone, pool_text, preprocess_images, tokenize
from vlmtune.boxes import cxcywh_to_xyxy
from vlmtune.checkpoint import backbone_identity
from vlmtune.config import Config, DataConfig, EvalConfig, LossConfig, ModelConfig
from vlmtune.data.cache import (FeatureStore, preprocess_signature, text_fingerprint, text_key, vision_fingerprint,
                                vision_prefix_fingerprint)
from vlmtune.data.formats import RELATIONS, PairRecord, image_size, load_image, options_from_config, read_pairs
from vlmtune.data.pairs import PairCollator, PairDataset, image_keys
from vlmtune.data.relations import mask_relation
from vlmtune.distributed import (all_gather, all_gather_objects, all_gather_with_grad, global_count, mean_share,
                                 rank_world)
from vlmtune.errors import ConfigError
from vlmtune.heads import Adapter, GroundingHead, Projector, RelationHead, mlp, pair_features, patch_centres
from vlmtune.losses import box_loss_rows, contrastive_loss, hard_negative_pairs
from vlmtune.metrics.boxes import box_metrics, constant_box_baseline
from vlmtune.metrics.classification import classification_metrics, majority_baseline
from vlmtune.metrics.retrieval import RetrievalRankings, ks_beyond_gallery, retrieval_metrics
from vlmtune.metrics.text_baseline import text_box_baseline, text_classifier_baseline
from vlmtune.tasks import FeatureCache, data_paths


def pool_tokens(tokens: torch.Tensor, mode: str) -> torch.Tensor:
    """Vision tokens [B, 1 + N, D] (CLS first) -> [B, D]."""
    return tokens[:, 0] if mode == "cls" else tokens[:, 1:].mean(dim=1)


class RetrievalModel(nn.Module):
    """Backbone + adapters, projectors, temperature and the three pair heads."""

    # Trainable components of this task, each a list of attribute names.
    COMPONENTS = {
        "adapters": ("vision_adapter", "text_adapter", "vision_projector", "text_projector", "log_scale"),
        "heads": ("matching_head", "relation_head", "grounding_head"),
    }

    def __init__(self, backbone: Backbone, cfg: ModelConfig, loss: LossConfig | None = None, *,
                 vision_pooling: str = "mean", text_pooling: str = "mean"):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.vision_pooling, self.text_pooling = vision_pooling, text_pooling
        loss = loss or LossConfig()
        self.box_weights = (loss.box_l1, loss.box_giou)
        d, info = cfg.embed_dim, backbone.info
        self.vision_adapter = Adapter(info.vision_hidden, d, cfg.adapter_dropout)
        self.text_adapter = Adapter(info.text_hidden, d, cfg.adapter_dropout)
        self.vision_projector = Projector(d)
        self.text_projector = Projector(d)
        # Temperature T is learnt as log(1/T), the CLIP parametrisation.
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature_init)))
        self.matching_head = mlp(4 * d, cfg.head_hidden, 2, cfg.adapter_dropout)
        self.relation_head = RelationHead(d, cfg.head_hidden, len(RELATIONS), cfg.adapter_dropout)
        self.grounding_head = GroundingHead(d, cfg.head_hidden, cfg.adapter_dropout)
        grid = info.image_size // info.patch_size
        self.register_buffer("centres", patch_centres(grid), persistent=False)

    # ---- components for the stage plan
    def component_modules(self, name: str, vision_blocks: int = 0) -> list[nn.Module | nn.Parameter]:
        if name in self.COMPONENTS:
            return [getattr(self, attr) for attr in self.COMPONENTS[name]]
        if name == "language_model":  # text states only: the LM head never runs here, so it does not train
            return [self.backbone.language_model]
        return self.backbone.component_modules(name, vision_blocks)

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights of the task's own parts (everything but the backbone)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def logit_scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(1.0 / self.cfg.temperature_max, 1.0 / self.cfg.temperature_min)

    # ---- encoders
    def encode_image(self, pixel_values: torch.Tensor | None = None, vision_tokens: torch.Tensor | None = None, *,
                     vision_hidden: torch.Tensor | None = None,
                     vision_start: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (joint-space embedding [B, D], adapted patch tokens [B, N, D]).

        ``vision_tokens`` are the frozen tower's cached output for the same pixels;
        ``vision_hidden`` the cached state entering block ``vision_start`` (a frozen
        prefix's output), from which the blocks above and the final norm run live, so
        the blocks a stage trains get their gradients.
        """
        if vision_hidden is not None:
            if vision_start is None:
                raise ValueError("vision_hidden needs vision_start, the block it enters")
            vision_tokens = self.backbone.vision_from_hidden(vision_hidden, int(vision_start))
        elif vision_tokens is None:
            vision_tokens = self.backbone.vision_tokens(pixel_values)
        tokens = self.vision_adapter(vision_tokens.float())
        emb = self.vision_projector(pool_tokens(tokens, self.vision_pooling))
        return emb, tokens[:, 1:]

    def encode_batch_images(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode_image` of a loader's batch, whichever image input it carries
        (pixels, cached tower output, or a cached prefix state and its block)."""
        return self.encode_image(batch.get("pixel_values"), batch.get("vision_tokens"),
                                 vision_hidden=batch.get("vision_hidden"), vision_start=batch.get("vision_start"))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    text_hidden: torch.Tensor | None = None) -> torch.Tensor:
        """``text_hidden``: the frozen language model's cached states for these tokens."""
        if text_hidden is None:
            text_hidden = self.backbone.text_tokens(input_ids, attention_mask)
        tokens = self.text_adapter(text_hidden.float())
        return self.text_projector(pool_text(tokens, attention_mask, self.text_pooling))

    def match_logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.matching_head(pair_features(image, text))

    def ground(self, text: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.grounding_head(text, patches, self.centres)

    def relation_outputs(self, batch: dict[str, torch.Tensor], keep: torch.Tensor, v: torch.Tensor,
                         patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(relation logits, subject and reference positions) of the rows ``keep`` of
        ``batch``, from the image and the caption with its relation phrase masked
        (``rel_*`` in the batch): never the phrase itself."""
        hidden = batch.get("rel_text_hidden")
        t = self.encode_text(batch["rel_input_ids"][keep], batch["rel_attention_mask"][keep],
                             None if hidden is None else hidden[keep])
        return self.relation_head(v[keep], t, patches[keep], self.centres)

    def relation_logits(self, batch: dict[str, torch.Tensor], keep: torch.Tensor, v: torch.Tensor,
                        patches: torch.Tensor) -> torch.Tensor:
        return self.relation_outputs(batch, keep, v, patches)[0]

    # ---- training
    def forward(self, batch: dict[str, torch.Tensor], active: frozenset[str] | set[str]) -> dict[str, torch.Tensor]:
        """Named, unweighted loss terms of the active losses (plus diagnostics under 'diag/')."""
        v, patches = self.encode_batch_images(batch)
        t = self.encode_text(batch["input_ids"], batch["attention_mask"], batch.get("text_hidden"))
        ids = batch["image_id"]
        terms: dict[str, torch.Tensor] = {}
        if "contrastive" in active:
            terms["contrastive"] = contrastive_loss(v, t, ids, self.logit_scale())
        if "matching" in active:
            terms["matching"] = self._matching_loss(v, t, ids)
        # Box and relation cover the rows that have one, a number that differs between
        # processes: their means are over the global batch's rows (mean_share).
        if "box" in active:
            has_box = torch.isfinite(batch["box"]).all(dim=1)
            n_box = global_count(has_box, ids.device)
            if n_box:
                l1, giou = t.new_zeros(()), t.new_zeros(())
                if has_box.any():
                    pred, _ = self.ground(t[has_box], patches[has_box])
                    l1_rows, giou_rows = box_loss_rows(pred, batch["box"][has_box])
                    l1, giou = mean_share(l1_rows, n_box), mean_share(giou_rows, n_box)
                    terms["diag/box_l1"], terms["diag/box_giou_loss"] = l1_rows.mean().detach(), giou_rows.mean().detach()
                terms["box"] = self.box_weights[0] * l1 + self.box_weights[1] * giou
        if "relation" in active:
            has_rel = batch["relation"] >= 0
            n_rel = global_count(has_rel, ids.device)
            if n_rel:
                box = batch["box"][has_rel]
                placed = torch.isfinite(box).all(dim=1)
                n_placed = global_count(placed, ids.device)
                terms["relation"] = t.new_zeros(())
                if has_rel.any():
                    logits, where = self.relation_outputs(batch, has_rel, v, patches)
                    ce = F.cross_entropy(logits, batch["relation"][has_rel], reduction="none")
                    terms["relation"] = mean_share(ce, n_rel)
                    terms["diag/relation_ce"] = ce.mean().detach()
                    # Where the record has the subject's box, the subject query's position is
                    # pulled to its centre (L1): without it the queries rarely learn to find
                    # the objects and the head falls back on what the masked text still says.
                    if placed.any():
                        subject_l1 = (where[placed, 0] - box[placed, :2]).abs().sum(dim=-1)
                        terms["relation"] = terms["relation"] + mean_share(subject_l1, n_placed)
                        terms["diag/relation_subject_l1"] = subject_l1.mean().detach()
        terms["diag/temperature"] = (1.0 / self.logit_scale()).detach()
        return terms

    def _matching_loss(self, v: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over {match, no match}: every positive pair, plus for each image a
        hard negative caption and for each caption a hard negative image, drawn from the
        global batch (all processes' rows, gathered with gradient as ALBEF does)."""
        images, texts, labels = hard_negative_pairs(v, t, ids, all_gather_with_grad(v), all_gather_with_grad(t),
                                                    all_gather(ids))
        # The number of pairs (negatives found) differs between processes: mean over all of them.
        ce = F.cross_entropy(self.match_logits(images, texts), labels, reduction="none")
        return mean_share(ce, global_count(len(labels), ids.device))


# --------------------------------------------------------------------------- data


def make_loader(records: list[PairRecord], backbone: Backbone, *, batch_size: int, max_text_tokens: int,
                train: bool = False, seed: int = 0, num_workers: int = 0, cache: FeatureCache | None = None,
                cache_dtype: str = "float32", cache_batch_size: int = 64) -> DataLoader:
    """Training loaders shuffle (by a seeded generator) and drop the last partial batch.

    With ``cache`` the frozen vision tower's outputs (``cache.vision``) and the frozen
    language model's (``cache.text``) come from the feature cache in ``cache.dir``,
    built now for any image or caption not yet in it, instead of being recomputed.
    With ``cache.vision_start`` the vision rows are the frozen prefix's output (the
    state entering that block) instead of the tower's: batches carry ``vision_hidden``
    and ``vision_start`` and the model runs the blocks above live.
    """
    g = torch.Generator()
    g.manual_seed(seed)
    dataset = PairDataset(records)
    if cache is not None:
        store, keys, sizes = (build_vision_cache(records, backbone, cache.dir, dtype=cache_dtype, batch_size=cache_batch_size,
                                                 start=cache.vision_start)
                              if cache.vision else (None, None, None))
        text_store = (build_text_cache(records, backbone, cache.dir, max_tokens=max_text_tokens, dtype=cache_dtype,
                                       batch_size=cache_batch_size) if cache.text else None)
        dataset = PairDataset(records, store, keys, sizes, text_store,
                              vision_start=cache.vision_start if cache.vision else None)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=train, generator=g if train else None, num_workers=num_workers,
        drop_last=train and len(records) > batch_size,
        collate_fn=PairCollator(backbone.tokenizer, backbone.image_processor, max_text_tokens),
    )


@torch.no_grad()
def build_text_cache(records: list[PairRecord], backbone: Backbone, cache_dir: str | Path, *, max_tokens: int,
                     dtype: str = "float32", batch_size: int = 64) -> FeatureStore:
    """The store holding the language model's token states of every caption, padded to
    ``max_tokens`` (right padding, so real tokens never see the pads)."""
    ns = {"kind": "text_tokens", "backbone": backbone_identity(backbone), "weights": text_fingerprint(backbone),
          "max_tokens": max_tokens, "dtype": dtype}
    store = FeatureStore(cache_dir, ns)
    # Captions, and the captions with their relation phrase masked (what the relation head reads).
    by_key = {text_key(t): t for r in records for t in (r.text, mask_relation(r.text))}
    device = next(backbone.parameters()).device

    def compute(batch_keys: list[str]):
        enc = tokenize(backbone.tokenizer, [by_key[k] for k in batch_keys], max_tokens)
        hidden = backbone.text_tokens(enc["input_ids"].to(device), enc["attention_mask"].to(device)).float().cpu()
        return torch.nn.functional.pad(hidden, (0, 0, 0, max_tokens - hidden.shape[1])).numpy()

    store.ensure(list(by_key), compute, batch_size=batch_size, dtype=dtype)
    return store


def vision_namespace(backbone: Backbone, dtype: str, start: int | None = None) -> dict[str, Any]:
    """Everything besides the image that determines the cached vision rows: the tower's
    output (``start`` None), or the hidden state entering block ``start``, keyed by the
    split point and the weights of exactly the prefix below it."""
    if start is None:
        return {"kind": "vision_tokens", "backbone": backbone_identity(backbone), "weights": vision_fingerprint(backbone),
                "preprocess": preprocess_signature(backbone.image_processor), "max_tiles": 1, "dtype": dtype}
    n = backbone.info.num_vision_blocks
    if not 0 <= start <= n:
        raise ValueError(f"vision prefix start {start}: the vision tower has {n} blocks")
    return {"kind": "vision_hidden", "start": start, "backbone": backbone_identity(backbone),
            "weights": vision_prefix_fingerprint(backbone, start),
            "preprocess": preprocess_signature(backbone.image_processor), "max_tiles": 1, "dtype": dtype}


@torch.no_grad()
def build_vision_cache(records: list[PairRecord], backbone: Backbone, cache_dir: str | Path, *, dtype: str = "float32",
                       batch_size: int = 64,
                       start: int | None = None) -> tuple[FeatureStore, dict[Any, str], dict[Any, tuple[int, int]]]:
    """The store holding the vision tokens of every image of ``records`` (with
    ``start``: the hidden state entering block ``start`` instead); the sizes are
    those :func:`load_image` returns (EXIF orientation applied), as live loading uses."""
    store = FeatureStore(cache_dir, vision_namespace(backbone, dtype, start))
    keys = image_keys(records)
    by_key = {k: p for p, k in keys.items()}
    sources = {r.image: r.source for r in records}
    sizes: dict[Any, tuple[int, int]] = {}
    for path in keys:
        sizes[path] = image_size(path, sources[path])  # header only
    device = next(backbone.parameters()).device

    def compute(batch_keys: list[str]):
        images = [load_image(by_key[k], sources[by_key[k]]) for k in batch_keys]
        pv, _ = preprocess_images(backbone.image_processor, images, max_tiles=1)
        if start is None:
            return backbone.vision_tokens(pv.to(device)).float().cpu().numpy()
        return backbone.vision_hidden(pv.to(device), start).float().cpu().numpy()

    store.ensure(list(keys.values()), compute, batch_size=batch_size, dtype=dtype)
    return store, keys, sizes


def check_ks(ks: Sequence[int], *, n_images: int, n_captions: int, where: str) -> None:
    """Refuse (ConfigError naming eval.ks) a K larger than either gallery of ``where``."""
    if not n_images or not n_captions:
        return  # an empty split is reported by the reader
    gallery = min(n_images, n_captions)
    too_big = ks_beyond_gallery(ks, n_images, n_captions)
    if too_big:
        side = "images" if n_images <= n_captions else "captions"
        raise ConfigError(f"eval.ks: K={max(too_big)} is larger than the retrieval gallery of {where} ({n_images} images, "
                          f"{n_captions} captions: at most {gallery} {side}); recall@K would be 100 whatever the model")


# --------------------------------------------------------------------------- evaluation
#
# embed (each process its share of the records) -> gather (all processes' outputs, put
# back in record order) -> score (one process's arithmetic on the whole set).


@dataclass
class EvalOutputs:
    """Per-record outputs of the embedding pass. ``*_rows`` give the record index of each
    row of the tensors beside them, so outputs from several processes merge in order."""

    images: dict[int, torch.Tensor] = field(default_factory=dict)  # image id -> embedding
    text: list[torch.Tensor] = field(default_factory=list)         # caption embeddings
    text_image: list[torch.Tensor] = field(default_factory=list)   # image id of each caption
    text_rows: list[torch.Tensor] = field(default_factory=list)
    box_pred: list[torch.Tensor] = field(default_factory=list)     # xyxy in pixels
    box_true: list[torch.Tensor] = field(default_factory=list)
    box_wh: list[torch.Tensor] = field(default_factory=list)
    box_rows: list[torch.Tensor] = field(default_factory=list)
    rel_pred: list[torch.Tensor] = field(default_factory=list)
    rel_true: list[torch.Tensor] = field(default_factory=list)
    rel_rows: list[torch.Tensor] = field(default_factory=list)

    # The per-record fields of each group, and the field that orders them.
    GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {
        "text_rows": ("text", "text_image"),
        "box_rows": ("box_pred", "box_true", "box_wh"),
        "rel_rows": ("rel_pred", "rel_true"),
    }

    @classmethod
    def merge(cls, parts: list["EvalOutputs"]) -> "EvalOutputs":
        """All processes' outputs in one, each group concatenated in record order."""
        out = EvalOutputs(images={k: e for p in parts for k, e in p.images.items()})
        for rows_name, names in cls.GROUPS.items():
            rows = [torch.cat(getattr(p, rows_name)) for p in parts if getattr(p, rows_name)]
            if not rows:
                continue
            order = torch.cat(rows).argsort(stable=True)
            setattr(out, rows_name, [torch.cat(rows)[order]])
            for name in names:
                setattr(out, name, [torch.cat([t for p in parts for t in getattr(p, name)])[order]])
        return out

    def cat(self, name: str) -> torch.Tensor | None:
        parts = getattr(self, name)
        return torch.cat(parts) if parts else None


def _embed(model: RetrievalModel, loader: DataLoader, rows: torch.Tensor, device: torch.device,
           progress: bool) -> EvalOutputs:
    """Each image embedded once, each caption once; boxes and relations predicted."""
    from tqdm.auto import tqdm

    out = EvalOutputs()
    for batch in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        ids = batch["image_id"]
        row = rows[batch["index"].cpu()]  # record index in the whole set
        first = _first_occurrences(ids, out.images)  # only rows that introduce a new image id
        t = model.encode_text(batch["input_ids"], batch["attention_mask"], batch.get("text_hidden"))
        has_box = torch.isfinite(batch["box"]).all(dim=1)
        has_rel = batch["relation"] >= 0
        if first.any() or has_box.any() or has_rel.any():
            v, patches = model.encode_batch_images(batch)
            for i in first.nonzero().flatten().tolist():
                out.images[int(ids[i])] = v[i].float().cpu()
            if has_box.any():
                pred, _ = model.ground(t[has_box], patches[has_box])
                wh = batch["image_wh"][has_box]
                out.box_pred.append((cxcywh_to_xyxy(pred.float()) * wh.repeat(1, 2)).cpu())
                out.box_true.append((cxcywh_to_xyxy(batch["box"][has_box]) * wh.repeat(1, 2)).cpu())
                out.box_wh.append(wh.cpu())
                out.box_rows.append(row[has_box.cpu()])
            if has_rel.any():
                out.rel_pred.append(model.relation_logits(batch, has_rel, v, patches).argmax(-1).cpu())
                out.rel_true.append(batch["relation"][has_rel].cpu())
                out.rel_rows.append(row[has_rel.cpu()])
        out.text.append(t.float().cpu())
        out.text_image.append(ids.cpu())
        out.text_rows.append(row)
    return out


def _score(model: RetrievalModel, out: EvalOutputs, device: torch.device, ev: EvalConfig,
           train_records: list[PairRecord] | None, rankings_k: int = 0,
           records: list[PairRecord] | None = None) -> tuple[dict[str, Any], RetrievalRankings | None]:
    """Retrieval, grounding and relation metrics of the merged outputs; with
    ``rankings_k`` also every query's ranked list (at least ``rankings_k`` long).
    ``records`` (the evaluated ones) give the text-only baselines their texts."""
    # Image ids are 0..n-1 in order of first appearance, so they index the gallery.
    n_img = max(out.images) + 1
    gallery = torch.stack([out.images[i] for i in range(n_img)])
    texts, t2i = out.cat("text"), out.cat("text_image")

    def match_score(img_idx: torch.Tensor, txt_idx: torch.Tensor) -> torch.Tensor:
        logits = model.match_logits(gallery[img_idx].to(device), texts[txt_idx].to(device))
        return logits.float().log_softmax(-1)[:, 1].cpu()

    rerank = match_score if ev.rerank_k > 0 else None
    rankings = None
    result = retrieval_metrics(gallery, texts, t2i, ks=tuple(ev.ks), chunk_size=ev.chunk_size, rerank=rerank,
                               rerank_k=max(ev.rerank_k, 1), search=ev.search, rankings_k=rankings_k,
                               return_rankings=rankings_k > 0)
    metrics: dict[str, Any]
    metrics, rankings = result if rankings_k > 0 else (result, None)
    metrics["retrieval/n_images"] = n_img
    metrics["retrieval/n_captions"] = len(texts)
    metrics["retrieval/temperature"] = float(1.0 / model.logit_scale())
    if out.box_pred:
        true, wh = out.cat("box_true"), out.cat("box_wh")
        metrics.update(box_metrics(out.cat("box_pred"), true, wh))
        train_boxes = _train_boxes(train_records)
        if train_boxes is not None:
            metrics.update(constant_box_baseline(train_boxes, true, wh))
            if records is not None:
                # The caption names the object and, through its relation, hints where it is.
                box_texts = [records[i].text for i in out.cat("box_rows").tolist()]
                metrics.update(text_box_baseline([r.text for r in train_records if r.bbox is not None],
                                                 train_boxes, box_texts, true, wh))
    if out.rel_pred:
        y = out.cat("rel_true")
        metrics.update(classification_metrics(out.cat("rel_pred"), y, len(RELATIONS), "spatial"))
        train_rel = [r.relation for r in train_records or [] if r.relation is not None]
        if train_rel:
            metrics.update(majority_baseline(torch.tensor(train_rel), y, len(RELATIONS), "spatial"))
            if records is not None:
                metrics.update(relation_text_baselines(train_records, [records[i] for i in out.cat("rel_rows").tolist()], y))
    return metrics, rankings


@torch.no_grad()
@torch.no_grad()
def evaluate_with_rankings(model: RetrievalModel, records: list[PairRecord], loader_for: Any, device: torch.device,
                           ev: EvalConfig, train_records: list[PairRecord] | None = None, progress: bool = False,
                           rankings_k: int = 0) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """All retrieval, grounding and relation metrics of ``model`` on ``records``, plus
    with ``rankings_k`` > 0 the per-query results of the same pass: {"t2i": one row per
    caption, "i2t": one row per image} (see :func:`ranking_rows`).

    ``loader_for(records)`` makes the evaluation loader of a list of records. With
    several processes each embeds the records of its own images (image id modulo the
    number of processes, so every image is embedded once); all then gather the
    per-record outputs and score the whole set in record order, as one process does.
    With ``train_records``, baselines are written beside the metrics: the constant
    box, the majority relation, and text-only models fitted on the training captions
    (box from the caption; relation from the masked caption the head reads, and from
    the whole caption).
    """
    was_training = model.training
    model.eval()
    rank, world = rank_world()
    rows = [i for i, r in enumerate(records) if r.image_id % world == rank] if world > 1 else list(range(len(records)))
    shard = records if world == 1 else [records[i] for i in rows]
    mine = _embed(model, loader_for(shard), torch.tensor(rows), device, progress)
    merged = EvalOutputs.merge(all_gather_objects(mine))
    metrics, rankings = _score(model, merged, device, ev, train_records, rankings_k, records)
    model.train(was_training)
    details = ranking_rows(records, merged, rankings, rankings_k) if rankings is not None else {}
    return metrics, details


def ranking_rows(records: list[PairRecord], out: EvalOutputs, rk: RetrievalRankings,
                 k: int) -> dict[str, list[dict[str, Any]]]:
    """Per-query results as JSON-ready rows.

    t2i (one per caption, in record order): the caption, its image, the 1-based rank of
    that image, and the top ``k`` images with their similarity (``match``: the matching
    head's log-probability where re-ranked) and whether each is the ground truth; for
    grounding records the predicted and true boxes (x0, y0, x1, y1 in pixels) and their
    IoU, for relation records the predicted and true relation. i2t (one per image):
    its captions, the rank of the first one, and the top ``k`` captions likewise.
    """
    from vlmtune.boxes import paired_box_iou

    path_of: dict[int, str] = {}
    captions_of: dict[int, list[int]] = {}
    text_rows = out.cat("text_rows").tolist()
    for j, rec_index in enumerate(text_rows):
        r = records[rec_index]
        path_of.setdefault(r.image_id, str(r.image))
        captions_of.setdefault(r.image_id, []).append(j)
    boxes: dict[int, tuple[list[float], list[float]]] = {}
    if out.box_rows:
        for i, p, t in zip(out.cat("box_rows").tolist(), out.cat("box_pred").tolist(), out.cat("box_true").tolist()):
            boxes[i] = (p, t)
    relations: dict[int, tuple[int, int]] = {}
    if out.rel_rows:
        for i, p, t in zip(out.cat("rel_rows").tolist(), out.cat("rel_pred").tolist(), out.cat("rel_true").tolist()):
            relations[i] = (p, t)

    def entries(idx: torch.Tensor, scores: torch.Tensor, match: torch.Tensor | None, is_gt, describe) -> list[dict]:
        rows = []
        for pos, (key, score) in enumerate(zip(idx[:k].tolist(), scores[:k].tolist())):
            e = {"rank": pos + 1, **describe(key), "score": round(score, 6), "gt": bool(is_gt(key))}
            if match is not None and pos < match.shape[0]:
                e["match"] = round(float(match[pos]), 6)
            rows.append(e)
        return rows

    t2i_rows = []
    for j, rec_index in enumerate(text_rows):
        r = records[rec_index]
        row: dict[str, Any] = {
            "query": j, "record": rec_index, "text": r.text, "image": path_of[r.image_id], "image_id": r.image_id,
            "gt_rank": int(rk.t2i_gt_rank[j]),
            "top": entries(rk.t2i[j], rk.t2i_scores[j], None if rk.t2i_match is None else rk.t2i_match[j],
                           lambda i, gt=r.image_id: i == gt, lambda i: {"image_id": i, "image": path_of[i]}),
        }
        if rec_index in boxes:
            pred, true = boxes[rec_index]
            row["box_pred"] = [round(v, 2) for v in pred]
            row["box_true"] = [round(v, 2) for v in true]
            row["iou"] = round(float(paired_box_iou(torch.tensor([pred]), torch.tensor([true]))[0]), 4)
        if rec_index in relations:
            pred_rel, true_rel = relations[rec_index]
            row["relation_pred"], row["relation_true"] = RELATIONS[pred_rel], RELATIONS[true_rel]
        t2i_rows.append(row)

    texts = [records[i].text for i in text_rows]
    i2t_rows = []
    for image_id in sorted(path_of):
        own = set(captions_of[image_id])
        i2t_rows.append({
            "query": image_id, "image": path_of[image_id], "captions": [texts[j] for j in captions_of[image_id]],
            "gt_rank": int(rk.i2t_gt_rank[image_id]),
            "top": entries(rk.i2t[image_id], rk.i2t_scores[image_id],
                           None if rk.i2t_match is None else rk.i2t_match[image_id],
                           lambda j, own=own: j in own, lambda j: {"text_index": j, "text": texts[j]}),
        })
    return {"t2i": t2i_rows, "i2t": i2t_rows}


def relation_text_baselines(train_records: list[PairRecord], records: list[PairRecord],
                            targets: torch.Tensor) -> dict[str, float]:
    """What reading only the text scores on the relation, fitted on the training split.

    spatial/baseline_text_*: a bag-of-words classifier on the masked captions the
    relation head reads (what is left to read off the text: "small", a frame or ring as
    the reference); the head's accuracy means something only by its margin over this.
    spatial/baseline_caption_*: the same classifier on the whole captions, i.e. what a
    head reading the relation phrase would score without looking at the image.
    """
    train = [r for r in train_records if r.relation is not None]
    y = [r.relation for r in train]
    out = text_classifier_baseline([mask_relation(r.text) for r in train], y, [mask_relation(r.text) for r in records],
                                   targets, len(RELATIONS), "spatial", "text")
    out.update(text_classifier_baseline([r.text for r in train], y, [r.text for r in records], targets, len(RELATIONS),
                                        "spatial", "caption"))
    return out


def _first_occurrences(ids: torch.Tensor, seen: dict[int, Any]) -> torch.Tensor:
    first = torch.zeros(len(ids), dtype=torch.bool)
    local: set[int] = set()
    for i, x in enumerate(ids.tolist()):
        if x not in seen and x not in local:
            first[i] = True
            local.add(x)
    return first.to(ids.device)


def _train_boxes(records: list[PairRecord] | None) -> torch.Tensor | None:
    """Training boxes as normalised xyxy, for the constant-box baseline."""
    rows, sizes = [], {}
    for r in records or []:
        if r.bbox is None:
            continue
        if r.image not in sizes:
            sizes[r.image] = image_size(r.image, r.source)
        w, h = sizes[r.image]
        x, y, bw, bh = r.bbox
        rows.append([x / w, y / h, (x + bw) / w, (y + bh) / h])
    return torch.tensor(rows, dtype=torch.float64) if rows else None


# --------------------------------------------------------------------------- the task


class RetrievalTask:
    """Cross-modal retrieval with grounding and spatial relations (implements ``Task``)."""

    name: ClassVar[str] = "retrieval"
    components: ClassVar[tuple[str, ...]] = tuple(RetrievalModel.COMPONENTS)
    # The towers only: pooled vision tokens and the LM's text states; no mm_projector.
    backbone_components: ClassVar[tuple[str, ...]] = ("vision_blocks", "vision_tower", "language_model")
    # Config sections that evaluate / predict may override on top of a checkpoint's config.
    evaluation_sections: ClassVar[tuple[str, ...]] = ("data", "eval")
    losses: ClassVar[tuple[str, ...]] = ("contrastive", "matching", "box", "relation")
    key_metrics: ClassVar[tuple[str, ...]] = (
        "retrieval/i2t_r1", "retrieval/i2t_r5", "retrieval/i2t_r10", "retrieval/t2i_r1", "retrieval/t2i_r5",
        "retrieval/t2i_r10", "retrieval/mean_recall", "retrieval/chance_i2t_r1", "retrieval/chance_t2i_r1",
        "grounding/acc50", "grounding/baseline_acc50", "grounding/baseline_text_acc50", "grounding/miou",
        "grounding/baseline_miou",
        "spatial/accuracy", "spatial/macro_f1", "spatial/baseline_accuracy", "spatial/baseline_text_accuracy",
        "spatial/baseline_caption_accuracy",
    )
    report_sections: ClassVar[tuple[str, ...]] = ("retrieval", "grounding", "spatial")
    cacheable: ClassVar[bool] = True
    # Both towers' frozen outputs, and the frozen vision prefix's (a stage training only
    # the last N vision blocks runs those live on it).
    cache_kinds: ClassVar[tuple[str, ...]] = ("vision", "vision_prefix", "text")

    def __init__(self, *, model: ModelConfig, loss: LossConfig, data: DataConfig, eval: EvalConfig,
                 train_batch_size: int, max_text_tokens: int, vision_pooling: str = "mean",
                 text_pooling: str = "mean", cache_dtype: str = "float32"):
        self.model_cfg, self.loss_cfg, self.data, self.eval_cfg = model, loss, data, eval
        self.train_batch_size = train_batch_size
        self.max_text_tokens = max_text_tokens
        self.vision_pooling, self.text_pooling = vision_pooling, text_pooling
        self.cache_dtype = cache_dtype

    @classmethod
    def from_config(cls, cfg: Config) -> "RetrievalTask":
        return cls(model=cfg.model, loss=cfg.loss, data=cfg.data, eval=cfg.eval, train_batch_size=cfg.train.batch_size,
                   max_text_tokens=cfg.backbone.max_text_tokens, vision_pooling=cfg.backbone.vision_pooling,
                   text_pooling=cfg.backbone.text_pooling, cache_dtype=cfg.cache.dtype)

    def build_model(self, backbone: Backbone) -> RetrievalModel:
        return RetrievalModel(backbone, self.model_cfg, self.loss_cfg, vision_pooling=self.vision_pooling,
                              text_pooling=self.text_pooling)

    def data_paths(self, output_dir: Path) -> dict[str, str]:
        """Annotation files from the config, or the synthetic scenes set, generated once."""
        from vlmtune.data.scenes import generate_scenes

        s = self.data.synthetic
        return data_paths(self.data, output_dir,
                          lambda folder: generate_scenes(folder, n=s.n, seed=s.seed, image_size=s.image_size,
                                                         overwrite=True), ".json")  # checked: empty or generated

    def read_split(self, path: str, split: str | None = None) -> list[PairRecord]:
        """Records of one split; bad records raise or are skipped (and logged) per data.on_error.
        ``split`` picks a split from a file that holds them all (Karpathy, refer)."""
        return read_pairs(path, on_error=self.data.on_error, opts=options_from_config(self.data, split=split))

    def loss_weights(self) -> dict[str, float]:
        return {name: getattr(self.loss_cfg, name) for name in self.losses}

    def loss_targets(self, records: list[PairRecord]) -> set[str]:
        """Pairs feed the contrastive and matching losses; a box or a relation on any
        record feeds the box or relation loss."""
        targets = {"contrastive", "matching"} if records else set()
        if any(getattr(r, "bbox", None) is not None for r in records):
            targets.add("box")
        if any(getattr(r, "relation", None) is not None for r in records):
            targets.add("relation")
        return targets

    def make_loader(self, records: list[PairRecord], backbone: Backbone, *, train: bool, seed: int = 0,
                    cache: FeatureCache | None = None) -> DataLoader:
        return make_loader(records, backbone, batch_size=self.train_batch_size if train else self.eval_cfg.batch_size,
                           max_text_tokens=self.max_text_tokens, train=train, seed=seed,
                           num_workers=self.data.num_workers, cache=cache, cache_dtype=self.cache_dtype,
                           cache_batch_size=self.eval_cfg.batch_size)

    def check_eval_records(self, records: list[PairRecord], where: str) -> None:
        """eval.ks must fit the gallery of each direction: the captions an image query
        ranks (i2t) and the images a caption query ranks (t2i). A K beyond it scores 100
        whatever the model, and the best checkpoint would be picked by that number."""
        check_ks(self.eval_cfg.ks, n_images=len({r.image_id for r in records}), n_captions=len(records), where=where)

    def validate(self, model: RetrievalModel, records: list[PairRecord], *, device: torch.device,
                 cache: FeatureCache | None = None) -> dict[str, Any]:
        return self.evaluate(model, records, device=device, cache=cache)

    def evaluate(self, model: RetrievalModel, records: list[PairRecord], *, device: torch.device,
                 train_records: list[PairRecord] | None = None, progress: bool = False,
                 cache: FeatureCache | None = None) -> dict[str, Any]:
        return self.evaluate_with_rankings(model, records, device=device, rankings_k=0, train_records=train_records,
                                           progress=progress, cache=cache)[0]

    def evaluate_with_rankings(self, model: RetrievalModel, records: list[PairRecord], *, device: torch.device,
                               rankings_k: int, train_records: list[PairRecord] | None = None, progress: bool = False,
                               cache: FeatureCache | None = None) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
        """:meth:`evaluate` plus per-query results: {"t2i": [...], "i2t": [...]} rows
        (with ``rankings_k`` > 0; none with 0)."""
        self.check_eval_records(records, records[0].source.split(": record")[0] if records else "the evaluation data")

        def loader_for(shard: list[PairRecord]) -> DataLoader:
            return self.make_loader(shard, model.backbone, train=False, cache=cache)

        return evaluate_with_rankings(model, records, loader_for, device, self.eval_cfg, train_records, progress,
                                      rankings_k=rankings_k)
