"""Loss functions. Each returns a tensor; the tasks' registered losses (:mod:`vlmtune.losses.registry`)
collect them into named terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmtune.boxes import cxcywh_to_xyxy, paired_generalized_box_iou
from vlmtune.distributed import all_gather, all_gather_with_grad, rank_world


def contrastive_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    image_ids: torch.Tensor,
    logit_scale: torch.Tensor,
    text_image_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE where every caption of the same image is a positive.

    ``image`` [B, D] and ``text`` [M, D] are L2-normalised. Row i of the image side may
    repeat an image (one row per pair), so positives are found by image id, not by the
    diagonal; the target of a row is uniform over its positives (as ALBEF does).

    With several processes the features of all of them are gathered with gradient (as
    open_clip does): this process's rows are scored against the global batch's columns,
    so negatives come from the global batch, and the mean over processes of this loss
    (what DDP's gradient averaging optimises) is the loss of one process holding the
    whole global batch. Image ids must be data-set ids (unique across processes). With
    one process it is the plain form below, without any gather.
    """
    text_image_ids = image_ids if text_image_ids is None else text_image_ids
    if rank_world()[1] > 1:
        return contrastive_loss_local_rows(
            image,
            text,
            image_ids,
            text_image_ids,
            logit_scale,
            all_gather_with_grad(image),
            all_gather_with_grad(text),
            all_gather(image_ids),
            all_gather(text_image_ids),
        )
    logits = logit_scale * image @ text.T
    positives = (image_ids[:, None] == text_image_ids[None, :]).to(logits.dtype)
    i2t = -(positives / positives.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    pos_t = positives.T
    t2i = -(pos_t / pos_t.sum(1, keepdim=True) * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (i2t + t2i) / 2


def soft_targets_ce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    positives = positives.to(logits.dtype)
    return -(positives / positives.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()


def contrastive_loss_local_rows(
    image: torch.Tensor,
    text: torch.Tensor,
    image_ids: torch.Tensor,
    text_image_ids: torch.Tensor,
    logit_scale: torch.Tensor,
    all_image: torch.Tensor,
    all_text: torch.Tensor,
    all_image_ids: torch.Tensor,
    all_text_image_ids: torch.Tensor,
) -> torch.Tensor:
    """One process's share of the global InfoNCE: its images against every caption of
    the global batch (``all_*``, which include its own rows) and its captions against
    every image. Averaged over processes with equal local batches it equals
    :func:`contrastive_loss` on the global batch, value and gradient."""
    i2t = soft_targets_ce(logit_scale * image @ all_text.T, image_ids[:, None] == all_text_image_ids[None, :])
    t2i = soft_targets_ce(logit_scale * text @ all_image.T, text_image_ids[:, None] == all_image_ids[None, :])
    return (i2t + t2i) / 2


def hard_negative_pairs(
    image: torch.Tensor,
    text: torch.Tensor,
    ids: torch.Tensor,
    all_image: torch.Tensor,
    all_text: torch.Tensor,
    all_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs for the matching head: this process's positive pairs, plus for each of its
    images a hard negative caption and for each of its captions a hard negative image,
    drawn among the global batch's candidates (``all_*``: every process's rows, this
    one's included; with one process they are ``image``, ``text``, ``ids`` themselves).

    Returns (images, texts, labels) with label 1 for the positives, 0 for the negatives.
    """
    # Row i of image and text is one pair, so both sides share the ids (local rows,
    # global columns).
    positives = ids[:, None] == all_ids[None, :]
    sim = (image @ all_text.T).detach()
    if all_image is image:  # one process: the plain in-batch form
        sim_t, pos_t = sim.T, positives.T
    else:
        sim_t, pos_t = (text @ all_image.T).detach(), positives
    neg_t, ok_t = sample_hard_negatives(sim, positives)
    neg_v, ok_v = sample_hard_negatives(sim_t, pos_t)
    images = torch.cat([image, image[ok_t], all_image[neg_v[ok_v]]])
    texts = torch.cat([text, all_text[neg_t[ok_t]], text[ok_v]])
    labels = torch.cat([torch.ones(len(image)), torch.zeros(int(ok_t.sum()) + int(ok_v.sum()))]).long().to(image.device)
    return images, texts, labels


def sample_hard_negatives(similarity: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row, one column drawn with probability softmax(similarity) over its negatives.

    Similar-but-wrong pairs are the informative ones for a matching head (ALBEF, X-VLM).
    Returns (column index [B], valid [B]); a row with no negative at all is not valid.
    """
    with torch.no_grad():
        weights = similarity.float().softmax(dim=1).masked_fill(positives, 0.0)
        valid = weights.sum(1) > 0
        # Rows without any negative get uniform weights so multinomial does not fail;
        # they are dropped through ``valid``.
        weights = torch.where(valid[:, None], weights, torch.ones_like(weights))
        idx = torch.multinomial(weights, 1).squeeze(1)
    return idx, valid


def box_loss_rows(pred_cxcywh: torch.Tensor, target_cxcywh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (mean L1 on normalised cx, cy, w, h; 1 - GIoU); their means are the batch's box losses."""
    l1 = (pred_cxcywh - target_cxcywh).abs().mean(dim=-1)
    giou = paired_generalized_box_iou(cxcywh_to_xyxy(pred_cxcywh), cxcywh_to_xyxy(target_cxcywh))
    return l1, 1.0 - giou
