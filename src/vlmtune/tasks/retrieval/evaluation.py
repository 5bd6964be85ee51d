"""The retrieval task's evaluation: retrieval, grounding and relation metrics with their
baselines, and per-query rankings.

embed (each process its share of the records) -> gather (all processes' outputs, put
back in record order) -> score (one process's arithmetic on the whole set).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch.utils.data import DataLoader

from vlmtune.boxes import cxcywh_to_xyxy, paired_box_iou
from vlmtune.config.schema import EvalConfig
from vlmtune.console import progress as progress_bar
from vlmtune.console import status
from vlmtune.data.formats import RELATIONS, PairRecord, image_size
from vlmtune.data.relations import mask_relation
from vlmtune.distributed import all_gather_objects
from vlmtune.errors import ConfigError
from vlmtune.metrics.boxes import box_metrics, constant_box_baseline
from vlmtune.metrics.classification import classification_metrics, majority_baseline
from vlmtune.metrics.retrieval import RetrievalRankings, ks_beyond_gallery, retrieval_metrics
from vlmtune.metrics.text_baseline import text_box_baseline, text_classifier_baseline
from vlmtune.tasks.common import shard_rows
from vlmtune.tasks.retrieval import matryoshka
from vlmtune.tasks.retrieval.model import RetrievalModel


def check_ks(ks: Sequence[int], *, n_images: int, n_captions: int, where: str) -> None:
    """Refuse (ConfigError naming eval.ks) a K larger than either gallery of ``where``."""
    if not n_images or not n_captions:
        return  # an empty split is reported by the reader
    gallery = min(n_images, n_captions)
    too_big = ks_beyond_gallery(ks, n_images, n_captions)
    if too_big:
        side = "images" if n_images <= n_captions else "captions"
        fits = [k for k in ks if k <= gallery] or [1]
        fix = "[" + ",".join(str(k) for k in fits) + "]"
        raise ConfigError(
            f"eval.ks: K={max(too_big)} is larger than the retrieval gallery of {where} ({n_images} images, "
            f"{n_captions} captions: at most {gallery} {side}); recall@K would be 100 whatever the model; "
            f"pass eval.ks={fix} (an override of train, or of evaluate) or use a larger split"
        )


@dataclass
class EvalOutputs:
    """Per-record outputs of the embedding pass. ``*_rows`` give the record index of each
    row of the tensors beside them, so outputs from several processes merge in order."""

    images: dict[int, torch.Tensor] = field(default_factory=dict)  # image id -> embedding
    text: list[torch.Tensor] = field(default_factory=list)  # caption embeddings
    text_image: list[torch.Tensor] = field(default_factory=list)  # image id of each caption
    text_rows: list[torch.Tensor] = field(default_factory=list)
    box_pred: list[torch.Tensor] = field(default_factory=list)  # xyxy in pixels
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
    def merge(cls, parts: list[EvalOutputs]) -> EvalOutputs:
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

    def cat(self, name: str) -> torch.Tensor:
        """One field's parts in one tensor: asked only of a field its group filled (every
        text field; a box or relation field once its group has rows)."""
        parts = getattr(self, name)
        if not parts:
            raise ValueError(f"no '{name}' outputs to concatenate")
        return torch.cat(parts)


def embed_outputs(
    model: RetrievalModel, loader: DataLoader, rows: torch.Tensor, device: torch.device, progress: bool
) -> EvalOutputs:
    """Each image embedded once, each caption once; boxes and relations predicted."""
    out = EvalOutputs()
    for batch in progress_bar(loader, desc="evaluate", enabled=progress):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        ids = batch["image_id"]
        row = rows[batch["index"].cpu()]  # record index in the whole set
        first = first_occurrences(ids, out.images)  # only rows that introduce a new image id
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


def score_outputs(
    model: RetrievalModel,
    out: EvalOutputs,
    device: torch.device,
    ev: EvalConfig,
    train_records: list[PairRecord] | None,
    rankings_k: int = 0,
    records: list[PairRecord] | None = None,
) -> tuple[dict[str, Any], RetrievalRankings | None]:
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
    rankings: RetrievalRankings | None = None
    result = retrieval_metrics(
        gallery,
        texts,
        t2i,
        ks=tuple(ev.ks),
        chunk_size=ev.chunk_size,
        rerank=rerank,
        rerank_k=max(ev.rerank_k, 1),
        search=ev.search,
        rankings_k=rankings_k,
        return_rankings=rankings_k > 0,
    )
    metrics: dict[str, Any]
    if isinstance(result, tuple):  # asked for with rankings_k > 0
        metrics, rankings = result
    else:
        metrics = result
    metrics.update(matryoshka.width_metrics(model.cfg, gallery, texts, t2i, ev))
    metrics["retrieval/n_images"] = n_img
    metrics["retrieval/n_captions"] = len(texts)
    metrics["retrieval/temperature"] = float(1.0 / model.logit_scale())
    if out.box_pred:
        true, wh = out.cat("box_true"), out.cat("box_wh")
        metrics.update(box_metrics(out.cat("box_pred"), true, wh))
        train_boxes = training_boxes(train_records)
        if train_boxes is not None:
            assert train_records is not None  # the training boxes are theirs
            metrics.update(constant_box_baseline(train_boxes, true, wh))
            if records is not None:
                # The caption names the object and, through its relation, hints where it is.
                box_texts = [records[i].text for i in out.cat("box_rows").tolist()]
                metrics.update(
                    text_box_baseline([r.text for r in train_records if r.bbox is not None], train_boxes, box_texts, true, wh)
                )
    if out.rel_pred:
        y = out.cat("rel_true")
        metrics.update(classification_metrics(out.cat("rel_pred"), y, len(RELATIONS), "spatial"))
        train_rel = [r.relation for r in train_records or [] if r.relation is not None]
        if train_rel:
            assert train_records is not None  # the training relations are theirs
            metrics.update(majority_baseline(torch.tensor(train_rel), y, len(RELATIONS), "spatial"))
            if records is not None:
                metrics.update(relation_text_baselines(train_records, [records[i] for i in out.cat("rel_rows").tolist()], y))
    return metrics, rankings


@torch.no_grad()
def evaluate_with_rankings(
    model: RetrievalModel,
    records: list[PairRecord],
    loader_for: Any,
    device: torch.device,
    ev: EvalConfig,
    train_records: list[PairRecord] | None = None,
    progress: bool = False,
    rankings_k: int = 0,
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
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
    rows = shard_rows([r.image_id for r in records])
    if progress:  # reading the images (and the cache) comes before the bar
        status("evaluating %d record%s: reading their images and features", len(records), "" if len(records) == 1 else "s")
    mine = embed_outputs(model, loader_for([records[i] for i in rows]), torch.tensor(rows), device, progress)
    merged = EvalOutputs.merge(all_gather_objects(mine))
    if progress:
        status("scoring: rankings%s", ", baselines fitted on the training split" if train_records else "")
    metrics, rankings = score_outputs(model, merged, device, ev, train_records, rankings_k, records)
    model.train(was_training)
    details = ranking_rows(records, merged, rankings, rankings_k) if rankings is not None else {}
    return metrics, details


def ranking_rows(records: list[PairRecord], out: EvalOutputs, rk: RetrievalRankings, k: int) -> dict[str, list[dict[str, Any]]]:
    """Per-query results as JSON-ready rows.

    t2i (one per caption, in record order): the caption, its image, the 1-based rank of
    that image, and the top ``k`` images with their similarity (``match``: the matching
    head's log-probability where re-ranked) and whether each is the ground truth; for
    grounding records the predicted and true boxes (x0, y0, x1, y1 in pixels) and their
    IoU, for relation records the predicted and true relation. i2t (one per image):
    its captions, the rank of the first one, and the top ``k`` captions likewise.
    """
    path_of: dict[int, str] = {}
    captions_of: dict[int, list[int]] = {}
    text_rows = out.cat("text_rows").tolist()
    for j, rec_index in enumerate(text_rows):
        r = records[rec_index]
        path_of.setdefault(r.image_id, str(r.image))
        captions_of.setdefault(r.image_id, []).append(j)
    t2i_rows = _t2i_rows(records, out, rk, k, text_rows, path_of)
    texts = [records[i].text for i in text_rows]
    i2t_rows = []
    for image_id in sorted(path_of):
        own = set(captions_of[image_id])
        i2t_rows.append(
            {
                "query": image_id,
                "image": path_of[image_id],
                "captions": [texts[j] for j in captions_of[image_id]],
                "gt_rank": int(rk.i2t_gt_rank[image_id]),
                "top": _top_entries(
                    k,
                    rk.i2t[image_id],
                    rk.i2t_scores[image_id],
                    None if rk.i2t_match is None else rk.i2t_match[image_id],
                    lambda j, own=own: j in own,
                    lambda j: {"text_index": j, "text": texts[j]},
                ),
            }
        )
    return {"t2i": t2i_rows, "i2t": i2t_rows}


def _top_entries(
    k: int,
    idx: torch.Tensor,
    scores: torch.Tensor,
    match: torch.Tensor | None,
    is_gt: Callable[..., bool],
    describe: Callable[[int], dict[str, Any]],
) -> list[dict[str, Any]]:
    """The first ``k`` entries of one query's ranked list, each described, scored and marked ground truth or not."""
    rows = []
    for pos, (key, score) in enumerate(zip(idx[:k].tolist(), scores[:k].tolist())):
        e = {"rank": pos + 1, **describe(key), "score": round(score, 6), "gt": bool(is_gt(key))}
        if match is not None and pos < match.shape[0]:
            e["match"] = round(float(match[pos]), 6)
        rows.append(e)
    return rows


def _t2i_rows(
    records: list[PairRecord],
    out: EvalOutputs,
    rk: RetrievalRankings,
    k: int,
    text_rows: list[int],
    path_of: dict[int, str],
) -> list[dict[str, Any]]:
    """The t2i rows of :func:`ranking_rows`: one per caption, with its box and relation where it has them."""
    boxes: dict[int, tuple[list[float], list[float]]] = {}
    if out.box_rows:
        for i, p, t in zip(out.cat("box_rows").tolist(), out.cat("box_pred").tolist(), out.cat("box_true").tolist()):
            boxes[i] = (p, t)
    relations: dict[int, tuple[int, int]] = {}
    if out.rel_rows:
        for i, p, t in zip(out.cat("rel_rows").tolist(), out.cat("rel_pred").tolist(), out.cat("rel_true").tolist()):
            relations[i] = (p, t)
    t2i_rows = []
    for j, rec_index in enumerate(text_rows):
        r = records[rec_index]
        row: dict[str, Any] = {
            "query": j,
            "record": rec_index,
            "text": r.text,
            "image": path_of[r.image_id],
            "image_id": r.image_id,
            "gt_rank": int(rk.t2i_gt_rank[j]),
            "top": _top_entries(
                k,
                rk.t2i[j],
                rk.t2i_scores[j],
                None if rk.t2i_match is None else rk.t2i_match[j],
                lambda i, gt=r.image_id: i == gt,
                lambda i: {"image_id": i, "image": path_of[i]},
            ),
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
    return t2i_rows


def relation_text_baselines(
    train_records: list[PairRecord], records: list[PairRecord], targets: torch.Tensor
) -> dict[str, float]:
    """What reading only the text scores on the relation, fitted on the training split.

    spatial/baseline_text_*: a bag-of-words classifier on the masked captions the
    relation head reads (what is left to read off the text: "small", a frame or ring as
    the reference); the head's accuracy means something only by its margin over this.
    spatial/baseline_caption_*: the same classifier on the whole captions, i.e. what a
    head reading the relation phrase would score without looking at the image.
    """
    train = [r for r in train_records if r.relation is not None]
    y = [r.relation for r in train if r.relation is not None]  # all of them; the test narrows the type
    out = text_classifier_baseline(
        [mask_relation(r.text) for r in train],
        y,
        [mask_relation(r.text) for r in records],
        targets,
        len(RELATIONS),
        "spatial",
        "text",
    )
    out.update(
        text_classifier_baseline(
            [r.text for r in train], y, [r.text for r in records], targets, len(RELATIONS), "spatial", "caption"
        )
    )
    return out


def first_occurrences(ids: torch.Tensor, seen: dict[int, Any]) -> torch.Tensor:
    first = torch.zeros(len(ids), dtype=torch.bool)
    local: set[int] = set()
    for i, x in enumerate(ids.tolist()):
        if x not in seen and x not in local:
            first[i] = True
            local.add(x)
    return first.to(ids.device)


def training_boxes(records: list[PairRecord] | None) -> torch.Tensor | None:
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
