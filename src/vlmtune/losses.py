"""Loss functions. Each returns a tensor; tasks collect them into named terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmtune.boxes import cxcywh_to_xyxy, paired_generalized_box_iou


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, image_ids: torch.Tensor, logit_scale: torch.Tensor,
                     text_image_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE where every caption of the same image is a positive.

    ``image`` [B, D] and ``text`` [M, D] are L2-normalised. Row i of the image side may
    repeat an image (one row per pair), so positives are found by image id, not by the
    diagonal; the target of a row is uniform over its positives (as ALBEF does).
    """
    text_image_ids = image_ids if text_image_ids is None else text_image_ids
    logits = logit_scale * image @ text.T
    positives = (image_ids[:, None] == text_image_ids[None, :]).to(logits.dtype)
    i2t = -(positives / positives.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    pos_t = positives.T
    t2i = -(pos_t / pos_t.sum(1, keepdim=True) * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (i2t + t2i) / 2


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


def box_losses(pred_cxcywh: torch.Tensor, target_cxcywh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1 on normalised cx, cy, w, h; 1 - GIoU), both means over the batch."""
    l1 = F.l1_loss(pred_cxcywh, target_cxcywh)
    giou = paired_generalized_box_iou(cxcywh_to_xyxy(pred_cxcywh), cxcywh_to_xyxy(target_cxcywh))
    return l1, (1.0 - giou).mean()
