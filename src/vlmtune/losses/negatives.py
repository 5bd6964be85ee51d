"""Losses with explicit negatives: extra columns beside the batch's own.

Explicit negatives are captions and images that are not rows of the batch: those the
records carry, and those mined from the training split
(:mod:`vlmtune.tasks.retrieval.negatives`). Each extra column has an image id (the
image it is a caption of, or is; ``-1`` when it belongs to no training image) and an
owner, the batch row it was drawn for.

- :func:`contrastive_loss_with_negatives`: the symmetric InfoNCE of
  :func:`~vlmtune.losses.functions.contrastive_loss` with the extra captions as more
  columns of every image row and the extra images as more columns of every caption row
  (shared by the whole batch, as sentence-transformers' and ms-swift's hard negatives
  are); a column whose id is a row's image is a positive of that row, as in the batch.
- :func:`explicit_negative_pairs`: the matching head's pairs, each row's negative drawn
  among its own extra columns (softmax of the similarity, as the in-batch draw), and in
  the batch where a row has none.
"""

from __future__ import annotations

import torch

from vlmtune.distributed import all_gather, all_gather_with_grad, rank_world
from vlmtune.losses.functions import sample_hard_negatives, soft_targets_ce


def contrastive_loss_with_negatives(
    image: torch.Tensor,
    text: torch.Tensor,
    image_ids: torch.Tensor,
    logit_scale: torch.Tensor,
    neg_text: torch.Tensor,
    neg_text_ids: torch.Tensor,
    neg_image: torch.Tensor,
    neg_image_ids: torch.Tensor,
) -> torch.Tensor:
    """Symmetric InfoNCE over the batch plus extra columns.

    ``image`` [B, D], ``text`` [B, D]: row i is one pair (ids ``image_ids``);
    ``neg_text`` [K, D] with ids [K], ``neg_image`` [L, D] with ids [L]: the extra
    columns (K or L may be 0). Image rows score every caption of the batch and every
    extra caption; caption rows every image of the batch and every extra image. The
    target of a row is uniform over its positives. With several processes the batch's
    columns are gathered from all of them (with gradient) and the extra columns are this
    process's own.
    """
    if rank_world()[1] > 1:
        all_text, all_image, all_ids = all_gather_with_grad(text), all_gather_with_grad(image), all_gather(image_ids)
    else:
        all_text, all_image, all_ids = text, image, image_ids
    cols_t = torch.cat([all_text, neg_text.to(all_text.dtype)])
    ids_t = torch.cat([all_ids, neg_text_ids.to(all_ids.dtype)])
    cols_v = torch.cat([all_image, neg_image.to(all_image.dtype)])
    ids_v = torch.cat([all_ids, neg_image_ids.to(all_ids.dtype)])
    i2t = soft_targets_ce(logit_scale * image @ cols_t.T, image_ids[:, None] == ids_t[None, :])
    t2i = soft_targets_ce(logit_scale * text @ cols_v.T, image_ids[:, None] == ids_v[None, :])
    return (i2t + t2i) / 2


def _own_draw(queries: torch.Tensor, cols: torch.Tensor, ids: torch.Tensor, col_ids: torch.Tensor, owner: torch.Tensor):
    """One of each row's own extra columns (not a positive of it), drawn with
    probability softmax(similarity); (index, valid) as :func:`sample_hard_negatives`."""
    n = len(queries)
    if len(cols) == 0:
        return torch.zeros(n, dtype=torch.long, device=queries.device), torch.zeros(n, dtype=torch.bool, device=queries.device)
    rows = torch.arange(n, device=queries.device)
    own = (owner[None, :] == rows[:, None]) & (col_ids[None, :] != ids[:, None])
    return sample_hard_negatives((queries @ cols.T).detach(), ~own)


def explicit_negative_pairs(
    image: torch.Tensor,
    text: torch.Tensor,
    ids: torch.Tensor,
    neg_text: torch.Tensor,
    neg_text_ids: torch.Tensor,
    neg_text_owner: torch.Tensor,
    neg_image: torch.Tensor,
    neg_image_ids: torch.Tensor,
    neg_image_owner: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs for the matching head: the batch's positive pairs, then for each image row a
    negative caption and for each caption row a negative image. A row with extra columns
    of its own (``*_owner`` == the row) takes its negative among them; a row without
    takes one from the batch (the global batch with several processes), as
    :func:`~vlmtune.losses.functions.hard_negative_pairs` does.
    Returns (images, texts, labels), label 1 for the positives and 0 for the negatives."""
    if rank_world()[1] > 1:
        all_image, all_text, all_ids = all_gather_with_grad(image), all_gather_with_grad(text), all_gather(ids)
    else:
        all_image, all_text, all_ids = image, text, ids
    positives = ids[:, None] == all_ids[None, :]
    in_t, ok_in_t = sample_hard_negatives((image @ all_text.T).detach(), positives)
    in_v, ok_in_v = sample_hard_negatives((text @ all_image.T).detach(), positives)
    ex_t, ok_ex_t = _own_draw(image, neg_text, ids, neg_text_ids, neg_text_owner)
    ex_v, ok_ex_v = _own_draw(text, neg_image, ids, neg_image_ids, neg_image_owner)
    use_in_t, use_in_v = ok_in_t & ~ok_ex_t, ok_in_v & ~ok_ex_v
    images = torch.cat([image, image[ok_ex_t], image[use_in_t], neg_image[ex_v[ok_ex_v]], all_image[in_v[use_in_v]]])
    texts = torch.cat([text, neg_text[ex_t[ok_ex_t]], all_text[in_t[use_in_t]], text[ok_ex_v], text[use_in_v]])
    n_neg = len(images) - len(image)
    labels = torch.cat([torch.ones(len(image)), torch.zeros(n_neg)]).long().to(image.device)
    return images, texts, labels
