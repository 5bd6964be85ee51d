"""The retrieval task's registered losses, computed from the model's encodings of a batch
(declared, with their weights, fields and parts, in :mod:`.spec`'s ``LOSSES``).

Each function reads a :class:`~vlmtune.tasks.retrieval.model.RetrievalEncodings` (the
batch's images and captions encoded once, for every loss) and returns its unweighted
term, or its parts (box: ``box_l1``, ``box_giou``, summed with their sub-weights by
the registry), plus diagnostics under ``diag/``. They run in registration order
(contrastive, matching, box, relation); the training loop sums the weighted terms in
sorted order.

Box and relation cover the rows that have one, a number that differs between
processes: their means are over the global batch's rows (``mean_share``), and a batch
whose global rows have none gives no term at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmtune.distributed import all_gather, all_gather_with_grad, global_count, mean_share
from vlmtune.losses import box_loss_rows, contrastive_loss, hard_negative_pairs
from vlmtune.losses.negatives import contrastive_loss_with_negatives, explicit_negative_pairs
from vlmtune.tasks.retrieval import matryoshka
from vlmtune.tasks.retrieval.model import RetrievalEncodings


def contrastive(enc: RetrievalEncodings) -> dict[str, torch.Tensor]:
    """Symmetric InfoNCE; with negatives beyond the batch (the ``negatives`` section) they
    are extra columns of every row; with ``model.mrl_dims`` its sum over the trained
    widths (:mod:`.matryoshka`; the task refuses both together)."""
    m, neg = enc.model, enc.negatives
    if neg is not None:
        loss = contrastive_loss_with_negatives(
            enc.image, enc.text, enc.ids, m.logit_scale(), neg.text, neg.text_ids, neg.image, neg.image_ids
        )
        return {"contrastive": loss}
    if m.cfg.mrl_dims:
        return matryoshka.contrastive_terms(enc, contrastive_loss)
    return {"contrastive": contrastive_loss(enc.image, enc.text, enc.ids, m.logit_scale())}


def matching(enc: RetrievalEncodings) -> dict[str, torch.Tensor]:
    """Cross-entropy over {match, no match}: every positive pair, plus for each image a
    hard negative caption and for each caption a hard negative image, drawn from the
    global batch (all processes' rows, gathered with gradient as ALBEF does), or with
    negatives beyond the batch (the ``negatives`` section) among the row's own."""
    v, t, ids, neg = enc.image, enc.text, enc.ids, enc.negatives
    if neg is None:
        images, texts, labels = hard_negative_pairs(v, t, ids, all_gather_with_grad(v), all_gather_with_grad(t), all_gather(ids))
    else:  # each row's negative among its own data or mined negatives, in the batch where it has none
        images, texts, labels = explicit_negative_pairs(
            v, t, ids, neg.text, neg.text_ids, neg.text_owner, neg.image, neg.image_ids, neg.image_owner
        )
    # The number of pairs (negatives found) differs between processes: mean over all of them.
    ce = F.cross_entropy(enc.model.match_logits(images, texts), labels, reduction="none")
    return {"matching": mean_share(ce, global_count(len(labels), ids.device))}


def box(enc: RetrievalEncodings) -> dict[str, torch.Tensor]:
    """The grounding head's box against the record's: mean L1 on normalised (cx, cy, w, h)
    and 1 - GIoU, as parts (X-VLM's L1 + GIoU; L1 alone trains poorly)."""
    batch, t = enc.batch, enc.text
    has_box = torch.isfinite(batch["box"]).all(dim=1)
    n_box = global_count(has_box, enc.ids.device)
    if not n_box:
        return {}
    out: dict[str, torch.Tensor] = {}
    l1, giou = t.new_zeros(()), t.new_zeros(())
    if has_box.any():
        pred, _ = enc.model.ground(t[has_box], enc.patches[has_box])
        l1_rows, giou_rows = box_loss_rows(pred, batch["box"][has_box])
        l1, giou = mean_share(l1_rows, n_box), mean_share(giou_rows, n_box)
        out["diag/box_l1"], out["diag/box_giou_loss"] = l1_rows.mean().detach(), giou_rows.mean().detach()
    out["box_l1"], out["box_giou"] = l1, giou
    return out


def relation(enc: RetrievalEncodings) -> dict[str, torch.Tensor]:
    """Cross-entropy of the relation head (reading the caption with its relation phrase
    masked) plus, where the record has the subject's box, the L1 distance of the head's
    subject position to its centre, unweighted: part of this loss's definition, as
    without it the queries rarely learn to find the objects and the head falls back on
    what the masked text still says."""
    batch, ids = enc.batch, enc.ids
    has_rel = batch["relation"] >= 0
    n_rel = global_count(has_rel, ids.device)
    if not n_rel:
        return {}
    box = batch["box"][has_rel]
    placed = torch.isfinite(box).all(dim=1)
    n_placed = global_count(placed, ids.device)
    out: dict[str, torch.Tensor] = {"relation": enc.text.new_zeros(())}
    if has_rel.any():
        logits, where = enc.model.relation_outputs(batch, has_rel, enc.image, enc.patches)
        ce = F.cross_entropy(logits, batch["relation"][has_rel], reduction="none")
        out["relation"] = mean_share(ce, n_rel)
        out["diag/relation_ce"] = ce.mean().detach()
        if placed.any():
            subject_l1 = (where[placed, 0] - box[placed, :2]).abs().sum(dim=-1)
            out["relation"] = out["relation"] + mean_share(subject_l1, n_placed)
            out["diag/relation_subject_l1"] = subject_l1.mean().detach()
    return out
