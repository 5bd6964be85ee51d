"""Cross-modal retrieval with grounding: model, losses per batch, evaluation.

Pooled vision and text tokens of the frozen backbone go through adapters and
projectors into a joint space (contrastive InfoNCE with a learnable temperature);
heads on the pair predict image-text matching, the referred object's box and the
spatial relation.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from vlmtune.backbone import Backbone, pool_text, tokenize
from vlmtune.boxes import cxcywh_to_xyxy
from vlmtune.config import Config, LossConfig, ModelConfig
from vlmtune.data.cache import FeatureStore, text_key
from vlmtune.data.formats import RELATIONS, PairRecord, load_image, read_pairs
from vlmtune.data.pairs import PairCollator, PairDataset, image_keys
from vlmtune.distributed import all_gather, all_gather_objects, all_gather_with_grad, rank_world
from vlmtune.heads import Adapter, GroundingHead, Projector, mlp, pair_features, patch_centres
from vlmtune.losses import box_losses, contrastive_loss, hard_negative_pairs
from vlmtune.metrics.boxes import box_metrics, constant_box_baseline
from vlmtune.metrics.classification import classification_metrics, majority_baseline
from vlmtune.metrics.retrieval import retrieval_metrics


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

    def __init__(self, backbone: Backbone, cfg: ModelConfig, loss: LossConfig | None = None):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
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
        self.relation_head = mlp(4 * d, cfg.head_hidden, len(RELATIONS), cfg.adapter_dropout)
        self.grounding_head = GroundingHead(d, cfg.head_hidden, cfg.adapter_dropout)
        grid = info.image_size // _patch_size(backbone)
        self.register_buffer("centres", patch_centres(grid), persistent=False)

    # ---- components for the stage plan
    def component_modules(self, name: str, vision_blocks: int = 0) -> list[nn.Module | nn.Parameter]:
        if name in self.COMPONENTS:
            return [getattr(self, attr) for attr in self.COMPONENTS[name]]
        return self.backbone.component_modules(name, vision_blocks)

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights of the task's own parts (everything but the backbone)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def logit_scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(1.0 / self.cfg.temperature_max, 1.0 / self.cfg.temperature_min)

    # ---- encoders
    def encode_image(self, pixel_values: torch.Tensor | None = None,
                     vision_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (joint-space embedding [B, D], adapted patch tokens [B, N, D]).

        ``vision_tokens`` are the frozen tower's cached output for the same pixels.
        """
        if vision_tokens is None:
            vision_tokens = self.backbone.vision_tokens(pixel_values)
        tokens = self.vision_adapter(vision_tokens.float())
        emb = self.vision_projector(pool_tokens(tokens, self.backbone.cfg.vision_pooling))
        return emb, tokens[:, 1:]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    text_hidden: torch.Tensor | None = None) -> torch.Tensor:
        """``text_hidden``: the frozen language model's cached states for these tokens."""
        if text_hidden is None:
            text_hidden = self.backbone.text_tokens(input_ids, attention_mask)
        tokens = self.text_adapter(text_hidden.float())
        return self.text_projector(pool_text(tokens, attention_mask, self.backbone.cfg.text_pooling))

    def match_logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.matching_head(pair_features(image, text))

    def ground(self, text: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.grounding_head(text, patches, self.centres)

    # ---- training
    def forward(self, batch: dict[str, torch.Tensor], active: frozenset[str] | set[str]) -> dict[str, torch.Tensor]:
        """Named, unweighted loss terms of the active losses (plus diagnostics under 'diag/')."""
        v, patches = self.encode_image(batch.get("pixel_values"), batch.get("vision_tokens"))
        t = self.encode_text(batch["input_ids"], batch["attention_mask"], batch.get("text_hidden"))
        ids = batch["image_id"]
        terms: dict[str, torch.Tensor] = {}
        if "contrastive" in active:
            terms["contrastive"] = contrastive_loss(v, t, ids, self.logit_scale())
        if "matching" in active:
            terms["matching"] = self._matching_loss(v, t, ids)
        if "box" in active:
            has_box = torch.isfinite(batch["box"]).all(dim=1)
            if has_box.any():
                pred, _ = self.ground(t[has_box], patches[has_box])
                l1, giou = box_losses(pred, batch["box"][has_box])
                terms["box"] = self.box_weights[0] * l1 + self.box_weights[1] * giou
                terms["diag/box_l1"], terms["diag/box_giou_loss"] = l1.detach(), giou.detach()
        if "relation" in active:
            has_rel = batch["relation"] >= 0
            if has_rel.any():
                logits = self.relation_head(pair_features(v[has_rel], t[has_rel]))
                terms["relation"] = F.cross_entropy(logits, batch["relation"][has_rel])
        terms["diag/temperature"] = (1.0 / self.logit_scale()).detach()
        return terms

    def _matching_loss(self, v: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over {match, no match}: every positive pair, plus for each image a
        hard negative caption and for each caption a hard negative image, drawn from the
        global batch (all processes' rows, gathered with gradient as ALBEF does)."""
        images, texts, labels = hard_negative_pairs(v, t, ids, all_gather_with_grad(v), all_gather_with_grad(t),
                                                    all_gather(ids))
        return F.cross_entropy(self.match_logits(images, texts), labels)


def _patch_size(backbone: Backbone) -> int:
    p = backbone.model.config.vision_config.patch_size
    return int(p[0] if isinstance(p, (list, tuple)) else p)


# --------------------------------------------------------------------------- data


def resolve_data_paths(cfg: Config, output_dir: Path) -> dict[str, str]:
    """Annotation files from the config, or the synthetic scenes set, generated once."""
    from vlmtune.data.scenes import generate_scenes
    from vlmtune.tasks import data_paths

    s = cfg.data.synthetic
    return data_paths(cfg, output_dir, lambda folder: generate_scenes(folder, n=s.n, seed=s.seed, image_size=s.image_size), ".json")


def build_model(backbone: Backbone, cfg: Config) -> RetrievalModel:
    return RetrievalModel(backbone, cfg.model, cfg.loss)


def read_split(path: str, cfg: Config) -> list[PairRecord]:
    """Records of one split; bad records raise or are skipped (and logged) per data.on_error."""
    return read_pairs(path, on_error=cfg.data.on_error, max_text_chars=cfg.data.max_text_chars)


# The engine may hand make_loader and evaluate a feature cache (see train._cache_kwargs).
CACHEABLE = True


def make_loader(records: list[PairRecord], backbone: Backbone, cfg: Config, train: bool, seed: int = 0,
                cache_dir: str | Path | None = None, cache_vision: bool = True, cache_text: bool = True) -> DataLoader:
    """Training loaders shuffle (by a seeded generator) and drop the last partial batch.

    With ``cache_dir`` the frozen vision tower's outputs (``cache_vision``) and the
    frozen language model's (``cache_text``) come from the feature cache there, built
    now for any image or caption not yet in it, instead of being recomputed.
    """
    g = torch.Generator()
    g.manual_seed(seed)
    dataset = PairDataset(records)
    if cache_dir is not None:
        store, keys, sizes = build_vision_cache(records, backbone, cfg, cache_dir) if cache_vision else (None, None, None)
        text_store = build_text_cache(records, backbone, cfg, cache_dir) if cache_text else None
        dataset = PairDataset(records, store, keys, sizes, text_store)
    return DataLoader(
        dataset, batch_size=cfg.train.batch_size if train else cfg.eval.batch_size, shuffle=train,
        generator=g if train else None, num_workers=cfg.data.num_workers, drop_last=train and len(records) > cfg.train.batch_size,
        collate_fn=PairCollator(backbone.tokenizer, backbone.image_processor, cfg.backbone.max_text_tokens),
    )


@torch.no_grad()
def build_text_cache(records: list[PairRecord], backbone: Backbone, cfg: Config, cache_dir: str | Path) -> FeatureStore:
    """The store holding the language model's token states of every caption, padded to
    ``backbone.max_text_tokens`` (right padding, so real tokens never see the pads)."""
    dtype = cfg.cache.dtype
    max_tokens = cfg.backbone.max_text_tokens
    ns = {"kind": "text_tokens", "backbone": backbone.identity(), "weights": backbone.text_fingerprint(),
          "max_tokens": max_tokens, "dtype": dtype}
    store = FeatureStore(cache_dir, ns)
    by_key = {text_key(r.text): r.text for r in records}
    device = next(backbone.parameters()).device

    def compute(batch_keys: list[str]):
        enc = tokenize(backbone.tokenizer, [by_key[k] for k in batch_keys], max_tokens)
        hidden = backbone.text_tokens(enc["input_ids"].to(device), enc["attention_mask"].to(device)).float().cpu()
        return torch.nn.functional.pad(hidden, (0, 0, 0, max_tokens - hidden.shape[1])).numpy()

    store.ensure(list(by_key), compute, batch_size=cfg.eval.batch_size, dtype=dtype)
    return store


def vision_namespace(backbone: Backbone, dtype: str) -> dict[str, Any]:
    """Everything besides the image that determines the cached vision tokens."""
    return {"kind": "vision_tokens", "backbone": backbone.identity(), "weights": backbone.vision_fingerprint(),
            "preprocess": backbone.preprocess_signature(), "max_tiles": 1, "dtype": dtype}


@torch.no_grad()
def build_vision_cache(records: list[PairRecord], backbone: Backbone, cfg: Config,
                       cache_dir: str | Path) -> tuple[FeatureStore, dict[Any, str], dict[Any, tuple[int, int]]]:
    """The store holding the vision tokens of every image of ``records``."""
    from PIL import Image

    dtype = cfg.cache.dtype
    store = FeatureStore(cache_dir, vision_namespace(backbone, dtype))
    keys = image_keys(records)
    by_key = {k: p for p, k in keys.items()}
    sources = {r.image: r.source for r in records}
    sizes: dict[Any, tuple[int, int]] = {}
    for path in keys:
        with Image.open(path) as im:  # header only
            sizes[path] = im.size
    device = next(backbone.parameters()).device

    def compute(batch_keys: list[str]):
        images = [load_image(by_key[k], sources[by_key[k]]) for k in batch_keys]
        pv, _ = backbone.preprocess(images, max_tiles=1)
        return backbone.vision_tokens(pv.to(device)).float().cpu().numpy()

    store.ensure(list(keys.values()), compute, batch_size=cfg.eval.batch_size, dtype=dtype)
    return store, keys, sizes


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: RetrievalModel, records: list[PairRecord], cfg: Config, device: torch.device,
             train_records: list[PairRecord] | None = None, progress: bool = False, **cache: Any) -> dict[str, Any]:
    """All retrieval, grounding and relation metrics of ``model`` on ``records``.

    Each image is embedded once; captions are embedded once; similarity is computed in
    chunks with a running top-k. With ``train_records``, baselines (constant box,
    majority relation) are written beside the metrics.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    # With several processes each embeds the records of its own images (image id modulo
    # the number of processes, so every image is embedded once); all then gather the
    # per-record outputs and score the whole set in record order, as one process does.
    rank, world = rank_world()
    rows = [i for i, r in enumerate(records) if r.image_id % world == rank] if world > 1 else list(range(len(records)))
    shard = records if world == 1 else [records[i] for i in rows]
    loader = make_loader(shard, model.backbone, cfg, train=False, **cache)
    rows_t = torch.tensor(rows)
    image_emb: dict[int, torch.Tensor] = {}
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("text", "text_img", "text_rows", "box_pred", "box_true", "box_wh",
                                                          "box_rows", "rel_pred", "rel_true", "rel_rows")}
    for batch in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        ids = batch["image_id"]
        row = rows_t[batch["index"].cpu()]  # record index in ``records``
        # Embed each image once: only the rows that introduce a new image id.
        first = _first_occurrences(ids, image_emb)
        t = model.encode_text(batch["input_ids"], batch["attention_mask"], batch.get("text_hidden"))
        has_box = torch.isfinite(batch["box"]).all(dim=1)
        need_pixels = first.any() or has_box.any() or (batch["relation"] >= 0).any()
        if need_pixels:
            v, patches = model.encode_image(batch.get("pixel_values"), batch.get("vision_tokens"))
            for i in first.nonzero().flatten().tolist():
                image_emb[int(ids[i])] = v[i].float().cpu()
            if has_box.any():
                pred, _ = model.ground(t[has_box], patches[has_box])
                wh = batch["image_wh"][has_box]
                out["box_pred"].append((cxcywh_to_xyxy(pred.float()) * wh.repeat(1, 2)).cpu())
                out["box_true"].append((cxcywh_to_xyxy(batch["box"][has_box]) * wh.repeat(1, 2)).cpu())
                out["box_wh"].append(wh.cpu())
                out["box_rows"].append(row[has_box.cpu()])
            has_rel = batch["relation"] >= 0
            if has_rel.any():
                out["rel_pred"].append(model.relation_head(pair_features(v[has_rel], t[has_rel])).argmax(-1).cpu())
                out["rel_true"].append(batch["relation"][has_rel].cpu())
                out["rel_rows"].append(row[has_rel.cpu()])
        out["text"].append(t.float().cpu())
        out["text_img"].append(ids.cpu())
        out["text_rows"].append(row)
    shards = all_gather_objects((image_emb, {k: torch.cat(v) for k, v in out.items() if v}))
    image_emb = {k: e for part, _ in shards for k, e in part.items()}
    merged = _merge_by_row([part for _, part in shards])

    # Image ids are 0..n-1 in order of first appearance, so they index the gallery.
    n_img = max(image_emb) + 1
    gallery = torch.stack([image_emb[i] for i in range(n_img)])
    texts = merged["text"]
    t2i = merged["text_img"]
    def match_score(img_idx: torch.Tensor, txt_idx: torch.Tensor) -> torch.Tensor:
        logits = model.match_logits(gallery[img_idx].to(device), texts[txt_idx].to(device))
        return logits.float().log_softmax(-1)[:, 1].cpu()

    rerank = match_score if cfg.eval.rerank_k > 0 else None
    metrics: dict[str, Any] = retrieval_metrics(gallery, texts, t2i, ks=tuple(cfg.eval.ks), chunk_size=cfg.eval.chunk_size,
                                                rerank=rerank, rerank_k=max(cfg.eval.rerank_k, 1), search=cfg.eval.search)
    metrics["retrieval/n_images"] = n_img
    metrics["retrieval/n_captions"] = len(texts)
    metrics["retrieval/temperature"] = float(1.0 / model.logit_scale())
    if "box_pred" in merged:
        pred, true, wh = merged["box_pred"], merged["box_true"], merged["box_wh"]
        metrics.update(box_metrics(pred, true, wh))
        train_boxes = _train_boxes(train_records)
        if train_boxes is not None:
            metrics.update(constant_box_baseline(train_boxes, true, wh))
    if "rel_pred" in merged:
        p, y = merged["rel_pred"], merged["rel_true"]
        metrics.update(classification_metrics(p, y, len(RELATIONS), "spatial"))
        train_rel = [r.relation for r in train_records or [] if r.relation is not None]
        if train_rel:
            metrics.update(majority_baseline(torch.tensor(train_rel), y, len(RELATIONS), "spatial"))
    model.train(was_training)
    return metrics


def _merge_by_row(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate the processes' per-record outputs and put them in record order; each
    group ``X_rows`` orders the tensors sharing its prefix (``text_rows``: text, text_img)."""
    merged: dict[str, torch.Tensor] = {}
    for group in ("text", "box", "rel"):
        rows = [p[f"{group}_rows"] for p in parts if f"{group}_rows" in p]
        if not rows:
            continue
        order = torch.cat(rows).argsort(stable=True)
        for key in {k for p in parts for k in p if k.split("_")[0] == group and k != f"{group}_rows"}:
            merged[key] = torch.cat([p[key] for p in parts if key in p])[order]
    return merged


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
    from PIL import Image

    rows, sizes = [], {}
    for r in records or []:
        if r.bbox is None:
            continue
        if r.image not in sizes:
            with Image.open(r.image) as im:
                sizes[r.image] = im.size
        w, h = sizes[r.image]
        x, y, bw, bh = r.bbox
        rows.append([x / w, y / h, (x + bw) / w, (y + bh) / h])
    return torch.tensor(rows, dtype=torch.float64) if rows else None


def loss_weights(cfg: Config) -> dict[str, float]:
    w = cfg.loss
    return {"contrastive": w.contrastive, "matching": w.matching, "box": w.box, "relation": w.relation}
