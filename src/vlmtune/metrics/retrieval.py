"""Image-text retrieval recall with the multi-caption (COCO / Flickr30k) protocol.

Similarities are raw dot products ``queries @ keys.T``; L2-normalise the embeddings
first if cosine similarity is wanted.

Ranking rule, shared by every function here so that chunked and full-matrix results
agree exactly: higher score first, and among equal scores the lower key index first.
That is the headline R@K (and the order of the ranked lists and per-query ranks); as
any tie rule is a convention, the span every tie order allows and the mean over random
tie orders stand beside it (``..._tie_min|max|mean``, :mod:`vlmtune.metrics.ties`).

Protocol:
    image-to-text (i2t): an image hits at K when ANY of its captions is in its top K.
        Images without captions have no positive and are left out of i2t recall
        (they still act as distractors for t2i).
    text-to-image (t2i): a caption hits at K when its own image is in its top K.

Chance levels are the exact expected recall of a uniformly random ranking, so a
reported recall can be read against what guessing gives on the same split.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vlmtune.metrics.ties import tie_counts, tie_counts_reference, tie_metrics

__all__ = [
    "auto_chunk_size",
    "chunked_topk",
    "chunked_topk_both",
    "ground_truth_ranks",
    "retrieval_metrics",
    "retrieval_metrics_reference",
    "RerankFn",
    "RetrievalRankings",
]

# rerank(image_idx, text_idx) -> scores; 1-D tensors of equal length, higher is better.
RerankFn = Callable[[Tensor, Tensor], Tensor]


def chunked_topk(queries: Tensor, keys: Tensor, k: int, chunk_size: int = 4096) -> tuple[Tensor, Tensor]:
    """Top-k keys per query by dot product, without materialising the N x M matrix.

    The similarity is computed block by block (chunk_size queries x chunk_size keys) and a
    running top-k per query is merged with each block's top-k, so peak memory is
    O(chunk_size * (chunk_size + k)). Scores are computed in float32.

    Returns (scores [N, k] float32, indices [N, k] long), sorted by descending score with
    ties broken by the lower key index. k is clipped to M.
    """
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"need queries [N, D] and keys [M, D], got {tuple(queries.shape)} and {tuple(keys.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n, m = queries.shape[0], keys.shape[0]
    k = min(k, m)
    device = queries.device
    if k == 0 or n == 0:
        return (torch.empty(n, k, device=device), torch.empty(n, k, dtype=torch.long, device=device))

    out_scores, out_indices = [], []
    for q0 in range(0, n, chunk_size):
        q = queries[q0 : q0 + chunk_size].float()
        best_s = q.new_empty(q.shape[0], 0)
        best_i = torch.empty(q.shape[0], 0, dtype=torch.long, device=device)
        for k0 in range(0, m, chunk_size):
            sim = q @ keys[k0 : k0 + chunk_size].float().T
            s, i = block_topk(sim, min(k, sim.shape[1]))
            best_s, best_i = merge_topk(best_s, best_i, s, i + k0, k)
        out_scores.append(best_s)
        out_indices.append(best_i)
    return torch.cat(out_scores), torch.cat(out_indices)


def merge_topk(best_s: Tensor, best_i: Tensor, s: Tensor, i: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Merge a running top-k with a block's top-k. The running best comes from earlier,
    lower-index blocks, so it precedes the block on ties, which a stable sort keeps."""
    cat_s = torch.cat((best_s, s), dim=1)
    cat_i = torch.cat((best_i, i), dim=1)
    order = cat_s.argsort(dim=1, descending=True, stable=True)[:, :k]
    return cat_s.gather(1, order), cat_i.gather(1, order)


def chunked_topk_both(
    images: Tensor, texts: Tensor, k: int, chunk_size: int = 4096, *, with_scores: bool = False
) -> tuple[Tensor, ...]:
    """Top-k texts of every image and top-k images of every text, in ONE pass.

    Each similarity block is computed once and feeds both running top-k lists (its rows
    for image-to-text, its columns for text-to-image), so the cost is one matrix
    product of N x M, not two. Same ranking rule as :func:`chunked_topk`.
    Returns (i2t indices [N, k_t], t2i indices [M, k_i]); with ``with_scores`` also their
    similarities (i2t scores [N, k_t], t2i scores [M, k_i]), which the pass has anyway.
    """
    n, m = images.shape[0], texts.shape[0]
    kt, ki = min(k, m), min(k, n)
    device = images.device
    col_s = torch.empty(m, 0, device=device)
    col_i = torch.empty(m, 0, dtype=torch.long, device=device)
    rows_out, rows_s = [], []
    for r0 in range(0, n, chunk_size):
        q = images[r0 : r0 + chunk_size].float()
        row_s = q.new_empty(q.shape[0], 0)
        row_i = torch.empty(q.shape[0], 0, dtype=torch.long, device=device)
        # Once every text has a full top-k list, a later (higher-index) image can only
        # enter it with a score strictly above the list's k-th: a cheap comparison
        # finds those few candidates instead of a column-wise top-k of every block,
        # which costs about as much as the block's product itself.
        full = col_s.shape[1] >= ki
        col_parts_s, col_parts_i, cand = [], [], []
        for c0 in range(0, m, chunk_size):
            sim = q @ texts[c0 : c0 + chunk_size].float().T
            if row_s.shape[1] >= kt:  # the same shortcut for the rows' lists, once full
                rr, cc = (sim > row_s[:, -1:]).nonzero(as_tuple=True)
                row_s, row_i = _merge_candidates(row_s, row_i, rr, sim[rr, cc], cc + c0)
            else:
                s, i = block_topk(sim, min(kt, sim.shape[1]))
                row_s, row_i = merge_topk(row_s, row_i, s, i + c0, kt)
            if full:
                r, c = (sim > col_s[c0 : c0 + sim.shape[1], -1]).nonzero(as_tuple=True)
                cand.append((c + c0, sim[r, c], r + r0))
            else:
                s, i = block_topk(sim.T.contiguous(), min(ki, sim.shape[0]))
                col_parts_s.append(s)
                col_parts_i.append(i + r0)
        if full:
            cols, vals, rows = (torch.cat(x) for x in zip(*cand))
            col_s, col_i = _merge_candidates(col_s, col_i, cols, vals, rows)
        else:
            col_s, col_i = merge_topk(col_s, col_i, torch.cat(col_parts_s), torch.cat(col_parts_i), ki)
        rows_out.append(row_i)
        rows_s.append(row_s)
    if with_scores:
        return torch.cat(rows_out), col_i, torch.cat(rows_s), col_s
    return torch.cat(rows_out), col_i


def _merge_candidates(best_s: Tensor, best_i: Tensor, cols: Tensor, vals: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Merge scattered candidates (column, score, row) into full per-column top-k lists.

    Only the columns that received a candidate are touched. Their k entries and their
    candidates are ordered by (column, score desc, row asc). Two stable sorts do it,
    because within a column the entries already come in ascending row order: the
    running ones first (lower rows than any candidate, and equal scores among them
    already in row order), then the candidates, which ``nonzero`` lists in row-major
    order of their block (for a column, ascending rows) and the callers concatenate
    block by block in index order.
    """
    if cols.numel() == 0:
        return best_s, best_i
    k = best_s.shape[1]
    touched = torch.unique(cols)
    all_cols = torch.cat([touched.repeat_interleave(k), cols])
    all_vals = torch.cat([best_s[touched].reshape(-1), vals])
    all_rows = torch.cat([best_i[touched].reshape(-1), rows])
    order = all_vals.argsort(descending=True, stable=True)
    order = order[all_cols[order].argsort(stable=True)]
    # Every touched column has at least k entries; take the first k of each group.
    counts = torch.bincount(torch.searchsorted(touched, all_cols), minlength=len(touched))
    starts = torch.cumsum(counts, 0) - counts
    take = order[(starts[:, None] + torch.arange(k, device=cols.device)).reshape(-1)]
    best_s, best_i = best_s.clone(), best_i.clone()
    best_s[touched] = all_vals[take].view(-1, k)
    best_i[touched] = all_rows[take].view(-1, k)
    return best_s, best_i


def faiss_topk_both(images: Tensor, texts: Tensor, k: int, *, with_scores: bool = False) -> tuple[Tensor, ...]:
    """Top-k both ways with exact FAISS inner-product indexes (IndexFlatIP); with
    ``with_scores`` also the similarities, as :func:`chunked_topk_both`."""
    try:
        import faiss
    except ImportError:
        from vlmtune.errors import ConfigError

        raise ConfigError("eval.search: 'faiss' needs the faiss-cpu package (pip install faiss-cpu)") from None
    img = images.detach().float().cpu().contiguous().numpy()
    txt = texts.detach().float().cpu().contiguous().numpy()

    def search(base, queries, kk):
        index = faiss.IndexFlatIP(base.shape[1])
        index.add(base)
        sc, idx = index.search(queries, min(kk, base.shape[0]))
        return torch.from_numpy(idx).long(), torch.from_numpy(sc).float()

    (i2t, i2t_s), (t2i, t2i_s) = search(txt, img, k), search(img, txt, k)
    return (i2t, t2i, i2t_s, t2i_s) if with_scores else (i2t, t2i)


def auto_chunk_size(n: int, m: int) -> int:
    """The block size for ``n`` images x ``m`` captions: the whole gallery when it is
    small, else 2048 (a block of 16 MB in float32; measured fastest of 1024, 2048, 4096
    and 8192 at 5,000 x 25,000 on a CPU thread, see the bench's eval section)."""
    return max(1, min(max(n, m), 2048))


def block_topk(sim: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row, descending, equal scores in column order.

    ``torch.topk`` is fast but leaves the order of equal scores, and which of them make
    the cut, unspecified. Within the k it returns, a stable re-sort by (score desc,
    column asc) fixes the order; rows where the k-th score is tied with a value left
    out (rare outside synthetic data) are redone with a full stable sort.
    """
    # One extra candidate tells whether the cut falls inside a run of equal scores:
    # if the (k+1)-th score is below the k-th, nothing left out ties with what was kept.
    extra = min(k + 1, sim.shape[1])
    s, i = sim.topk(extra, dim=1)
    tied = s[:, k - 1] == s[:, k] if extra > k else torch.zeros(sim.shape[0], dtype=torch.bool, device=sim.device)
    s, i = s[:, :k], i[:, :k]
    i, by_col = i.sort(dim=1)
    s = s.gather(1, by_col)
    order = s.argsort(dim=1, descending=True, stable=True)
    s, i = s.gather(1, order), i.gather(1, order)
    if tied.any():
        rows = tied.nonzero().flatten()
        fs, fi = sim[rows].sort(dim=1, descending=True, stable=True)
        s[rows], i[rows] = fs[:, :k], fi[:, :k]
    return s, i


def _validate(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, ks: Sequence[int], rerank_k: int) -> None:
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"need image_emb [N, D] and text_emb [M, D], got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    if text_to_image.shape != (text_emb.shape[0],):
        raise ValueError(f"text_to_image must have shape [M]={text_emb.shape[0]}, got {tuple(text_to_image.shape)}")
    if text_to_image.dtype.is_floating_point:
        raise ValueError("text_to_image must be an integer tensor")
    n = image_emb.shape[0]
    if text_to_image.numel() and (int(text_to_image.min()) < 0 or int(text_to_image.max()) >= n):
        raise ValueError(f"text_to_image values must lie in [0, {n})")
    if n == 0 or text_emb.shape[0] == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks}")
    if rerank_k < 0:
        raise ValueError(f"rerank_k must be >= 0, got {rerank_k}")


def ks_beyond_gallery(ks: Sequence[int], n_images: int, n_captions: int) -> list[int]:
    """The Ks larger than a gallery: i2t ranks ``n_captions`` captions, t2i ranks
    ``n_images`` images, and recall@K over fewer than K items is 100 whatever the
    ranking. :func:`retrieval_metrics` computes such a K as it is; callers that report
    or select by it (the retrieval task) refuse it first."""
    gallery = min(n_images, n_captions)
    return sorted(int(k) for k in ks if int(k) > gallery)


def _chance_levels(text_to_image: Tensor, n_images: int, ks: Sequence[int]) -> dict[str, float]:
    """Exact expected recall@K (percent) of a uniformly random ranking."""
    m = text_to_image.numel()
    counts = torch.bincount(text_to_image.long().cpu(), minlength=n_images).tolist()
    # Same image set as i2t recall; grouped by caption count so each binomial is computed once.
    per_count = Counter(c for c in counts if c > 0)
    n_captioned = sum(per_count.values())
    out: dict[str, float] = {}
    for k in ks:
        kc = min(k, m)
        # P(no caption of image i among K random texts) = C(M - c_i, K) / C(M, K).
        # Python ints keep the binomials exact; true division of big ints rounds once.
        total = math.comb(m, kc)
        i2t = sum(n * (1.0 - math.comb(m - c, kc) / total) for c, n in per_count.items()) / n_captioned
        out[f"retrieval/chance_i2t_r{k}"] = 100.0 * i2t
        out[f"retrieval/chance_t2i_r{k}"] = 100.0 * min(k, n_images) / n_images
    return out


def _rerank_head(cand: Tensor, queries_are_images: bool, rerank: RerankFn, rerank_k: int, batch_size: int) -> Tensor:
    """Re-order the first rerank_k candidates of each row by rerank scores (stable, so
    rerank ties keep contrastive order); later candidates keep their contrastive order."""
    return _rerank_head_scored(cand, queries_are_images, rerank, rerank_k, batch_size)[0]


def _rerank_head_scored(
    cand: Tensor, queries_are_images: bool, rerank: RerankFn, rerank_k: int, batch_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_rerank_head`, also returning the head's new order (positions into the
    old head, [rows, r]) and its rerank scores in that order."""
    r = min(rerank_k, cand.shape[1])
    if r == 0:
        empty = cand[:, :0]
        return cand, empty, empty.float()
    head = cand[:, :r]
    query_idx = torch.arange(cand.shape[0], device=cand.device).unsqueeze(1).expand(-1, r)
    img, txt = (query_idx, head) if queries_are_images else (head, query_idx)
    img, txt = img.reshape(-1), txt.reshape(-1)
    parts = []
    for s in range(0, img.numel(), batch_size):
        scores = rerank(img[s : s + batch_size], txt[s : s + batch_size])
        if scores.shape != (min(batch_size, img.numel() - s),):
            raise ValueError(f"rerank must return 1-D scores, one per pair; got shape {tuple(scores.shape)}")
        parts.append(scores.detach().float().to(cand.device))
    scores = torch.cat(parts).view(-1, r)
    order = scores.argsort(dim=1, descending=True, stable=True)
    return torch.cat((head.gather(1, order), cand[:, r:]), dim=1), order, scores.gather(1, order)


def _finish(recalls: dict[str, float], chance: dict[str, float]) -> dict[str, float]:
    out = dict(recalls)
    out["retrieval/mean_recall"] = sum(recalls.values()) / len(recalls)
    out.update(chance)
    return out


@torch.no_grad()
def retrieval_metrics(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int | None = None,
    rerank: RerankFn | None = None,
    rerank_k: int = 16,
    *,
    rerank_batch_size: int = 1024,
    search: str = "chunked",
    rankings_k: int = 0,
    return_rankings: bool = False,
) -> dict[str, float] | tuple[dict[str, float], RetrievalRankings]:
    """Recall@K (percent) for i2t and t2i, their mean, and chance levels.

    With ``return_rankings`` it returns ``(metrics, RetrievalRankings)``: the top
    max(ks, rerank_k, ``rankings_k``) list of every query with its scores, as the pass
    computed them (nothing is recomputed), and each query's ground-truth rank (one more
    chunked pass of comparisons, see :func:`ground_truth_ranks`).

    ``search``: "chunked" (blocks with a running top-k, exact, ties to the lower index)
    or "faiss" (an exact inner-product FAISS index; needs the faiss-cpu package; the
    same lists up to the order of exactly equal scores).

    ``chunk_size`` None: :func:`auto_chunk_size` of the two sizes.
    Memory stays bounded by chunk_size: only the top-max(ks, rerank_k) list of each
    query is kept. With ``rerank``, each query's top ``rerank_k`` contrastive candidates
    are re-scored by ``rerank(image_idx, text_idx)`` (called with at most
    ``rerank_batch_size`` pairs) and re-ordered, the rest follow in contrastive order.

    Keys: retrieval/{i2t,t2i}_r{K} for K in ks, retrieval/mean_recall (mean of those),
    retrieval/chance_{i2t,t2i}_r{K}; beside each recall the span tie order allows,
    retrieval/{i2t,t2i}_r{K}_tie_min|max, and its mean under a random tie order,
    ..._tie_mean, with retrieval/{i2t,t2i}_tie_queries (:mod:`vlmtune.metrics.ties`;
    read off the ranked lists the pass keeps; with ``rerank`` only for K >= rerank_k).
    """
    _validate(image_emb, text_emb, text_to_image, ks, rerank_k)
    n = image_emb.shape[0]
    chunk_size = chunk_size or auto_chunk_size(n, text_emb.shape[0])
    kmax = max(max(ks), rerank_k if rerank is not None else 0, rankings_k)
    t2i_map = text_to_image.to(image_emb.device).long()

    i2t, t2i, i2t_s, t2i_s, i2t_match, t2i_match = _ranked_lists(
        image_emb, text_emb, kmax, chunk_size, search, rerank, rerank_k, rerank_batch_size
    )
    i2t_hits = t2i_map[i2t] == torch.arange(n, device=i2t.device).unsqueeze(1)  # [N, kmax]
    t2i_hits = t2i == t2i_map.unsqueeze(1)  # [M, kmax]
    captioned = torch.bincount(t2i_map, minlength=n) > 0
    i2t_hits = i2t_hits[captioned]

    def recall(hits: Tensor, k: int) -> float:
        # Integer count / count, so the value matches the reference exactly.
        return 100.0 * int(hits[:, :k].any(dim=1).sum()) / hits.shape[0]

    recalls: dict[str, float] = {}
    for k in ks:  # slicing past the list length just uses the whole (clipped) list
        recalls[f"retrieval/i2t_r{k}"] = recall(i2t_hits, k)
    for k in ks:
        recalls[f"retrieval/t2i_r{k}"] = recall(t2i_hits, k)
    metrics = _finish(recalls, _chance_levels(text_to_image, n, ks))
    # Re-ranking permutes only the first rerank_k: the top-K set, hence hit@K, is the
    # contrastive one for K >= rerank_k, and so are its ties.
    ties = tie_counts(image_emb, text_emb, text_to_image, (i2t, t2i, i2t_s, t2i_s), chunk_size)
    metrics.update(tie_metrics(*ties, ks, rerank_k if rerank is not None else 1))
    if not return_rankings:
        return metrics
    i2t_rank, t2i_rank = _list_ranks(image_emb, text_emb, text_to_image, chunk_size, i2t, t2i)
    return metrics, RetrievalRankings(
        i2t.cpu(),
        i2t_s.float().cpu(),
        t2i.cpu(),
        t2i_s.float().cpu(),
        None if i2t_match is None else i2t_match.cpu(),
        None if t2i_match is None else t2i_match.cpu(),
        i2t_rank,
        t2i_rank,
    )


def _ranked_lists(
    image_emb: Tensor,
    text_emb: Tensor,
    kmax: int,
    chunk_size: int,
    search: str,
    rerank: RerankFn | None,
    rerank_k: int,
    rerank_batch_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """The top-``kmax`` lists and scores of both directions, re-ranked where asked, with the re-rank scores."""
    if search == "faiss":
        i2t, t2i, i2t_s, t2i_s = (x.to(image_emb.device) for x in faiss_topk_both(image_emb, text_emb, kmax, with_scores=True))
    else:
        i2t, t2i, i2t_s, t2i_s = chunked_topk_both(image_emb, text_emb.to(image_emb.device), kmax, chunk_size, with_scores=True)
    i2t_match = t2i_match = None
    if rerank is not None:
        i2t, order, i2t_match = _rerank_head_scored(i2t, True, rerank, rerank_k, rerank_batch_size)
        i2t_s = torch.cat((i2t_s[:, : order.shape[1]].gather(1, order), i2t_s[:, order.shape[1] :]), dim=1)
        t2i, order, t2i_match = _rerank_head_scored(t2i, False, rerank, rerank_k, rerank_batch_size)
        t2i_s = torch.cat((t2i_s[:, : order.shape[1]].gather(1, order), t2i_s[:, order.shape[1] :]), dim=1)
    return i2t, t2i, i2t_s, t2i_s, i2t_match, t2i_match


def _list_ranks(
    image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, chunk_size: int, i2t: Tensor, t2i: Tensor
) -> tuple[Tensor, Tensor]:
    """Each query's 1-based ground-truth rank, read from its (possibly re-ranked) list where it is in it."""
    n = image_emb.shape[0]
    t2i_map = text_to_image.to(image_emb.device).long()
    i2t_rank, t2i_rank = ground_truth_ranks(image_emb, text_emb, text_to_image, chunk_size)
    # Where the ground truth is in the (possibly re-ranked) list, its place there is its
    # rank; further down the order is the contrastive one, which the count gives.
    i2t_all = t2i_map[i2t] == torch.arange(n, device=i2t.device).unsqueeze(1)
    for ranks, hits in ((i2t_rank, i2t_all), (t2i_rank, t2i == t2i_map.unsqueeze(1))):
        found = hits.any(dim=1)
        ranks[found.cpu()] = (hits.float().argmax(dim=1) + 1)[found].cpu()
    return i2t_rank, t2i_rank


@dataclass
class RetrievalRankings:
    """Every query's ranked list, as :func:`retrieval_metrics` computed it.

    ``*_match``: the re-rank scores of the first ``rerank_k`` entries of each list (None
    without re-ranking). ``*_gt_rank``: 1-based rank of each query's first ground truth
    in the final order (i2t: -1 for images without captions).
    """

    i2t: Tensor  # [N, k] caption indices per image
    i2t_scores: Tensor  # [N, k] similarities
    t2i: Tensor  # [M, k] image indices per caption
    t2i_scores: Tensor
    i2t_match: Tensor | None
    t2i_match: Tensor | None
    i2t_gt_rank: Tensor  # [N]
    t2i_gt_rank: Tensor  # [M]


@torch.no_grad()
def ground_truth_ranks(
    image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, chunk_size: int = 4096
) -> tuple[Tensor, Tensor]:
    """1-based rank of each query's first ground truth under the ranking rule (score
    descending, ties to the lower index), without the N x M matrix.

    t2i: the rank of a caption's image is 1 + the number of images scoring above it (or
    equal with a lower index). i2t: the image's best caption (highest score, lowest
    index on ties) is its first hit; its rank is counted the same way. Images without
    captions get -1. One chunked pass of products and comparisons. The ground truth's
    own score is a dot product computed apart from the blocks; another key within float
    rounding of it may fall on either side (the ranked lists themselves are exact).
    """
    n, m = image_emb.shape[0], text_emb.shape[0]
    device = image_emb.device
    texts = text_emb.to(device)
    t2i_map = text_to_image.to(device).long()
    # Score of each caption with its own image.
    gt_t = torch.cat(
        [
            (texts[c0 : c0 + chunk_size].float() * image_emb[t2i_map[c0 : c0 + chunk_size]].float()).sum(1)
            for c0 in range(0, m, chunk_size)
        ]
    )
    # Best caption of each image: highest score, lowest caption index on ties.
    best_s = torch.full((n,), float("-inf"), device=device)
    best_c = torch.full((n,), m, dtype=torch.long, device=device)
    seen = torch.zeros(n, dtype=torch.bool, device=device)
    order = torch.argsort(gt_t, descending=True, stable=True)
    order = order[torch.argsort(t2i_map[order], stable=True)]  # by image, then score desc, index asc
    imgs = t2i_map[order]
    first = torch.ones_like(imgs, dtype=torch.bool)
    first[1:] = imgs[1:] != imgs[:-1]
    seen[imgs[first]] = True
    best_c[imgs[first]] = order[first]
    best_s[imgs[first]] = gt_t[order[first]]
    t2i_above = torch.zeros(m, dtype=torch.long, device=device)
    i2t_above = torch.zeros(n, dtype=torch.long, device=device)
    cols_all = torch.arange(m, device=device)
    for r0 in range(0, n, chunk_size):
        q = image_emb[r0 : r0 + chunk_size].float()
        rows = torch.arange(r0, r0 + q.shape[0], device=device)
        for c0 in range(0, m, chunk_size):
            sim = q @ texts[c0 : c0 + chunk_size].float().T
            cols = cols_all[c0 : c0 + sim.shape[1]]
            g = gt_t[cols]
            # The ground truth itself is never counted (its product here may differ from
            # the one above in the last bit).
            gt_row = t2i_map[cols]
            t2i_above[cols] += (((sim > g) | ((sim == g) & (rows[:, None] < gt_row))) & (rows[:, None] != gt_row)).sum(0)
            b, bc = best_s[rows, None], best_c[rows, None]
            i2t_above[rows] += (((sim > b) | ((sim == b) & (cols[None, :] < bc))) & (cols[None, :] != bc)).sum(1)
    i2t_rank = torch.where(seen, i2t_above + 1, torch.full_like(i2t_above, -1))
    return i2t_rank.cpu(), (t2i_above + 1).cpu()


@torch.no_grad()
def retrieval_metrics_reference(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    rerank: RerankFn | None = None,
    rerank_k: int = 16,
    *,
    rerank_batch_size: int = 1024,
) -> dict[str, float]:
    """Slow full-matrix version of :func:`retrieval_metrics`, for tests.

    Ranks with a stable argsort of the whole similarity matrix and finds, per query,
    the rank of its first positive. ``rerank_batch_size`` is accepted for signature
    parity; rerank is called once per query here.
    """
    del rerank_batch_size
    _validate(image_emb, text_emb, text_to_image, ks, rerank_k)
    n, m = image_emb.shape[0], text_emb.shape[0]
    t2i_map = text_to_image.long().cpu()
    sim = image_emb.float().cpu() @ text_emb.float().cpu().T  # [N, M]
    i2t_rank = sim.argsort(dim=1, descending=True, stable=True)
    t2i_rank = sim.T.argsort(dim=1, descending=True, stable=True)

    def rerank_row(order: Tensor, query: int, queries_are_images: bool) -> Tensor:
        r = min(rerank_k, order.numel())
        head = order[:r]
        q = torch.full_like(head, query)
        assert rerank is not None  # called only under the check below
        scores = rerank(q, head) if queries_are_images else rerank(head, q)
        head = head[scores.float().cpu().argsort(descending=True, stable=True)]
        return torch.cat((head, order[r:]))

    if rerank is not None:
        i2t_rank = torch.stack([rerank_row(i2t_rank[i], i, True) for i in range(n)])
        t2i_rank = torch.stack([rerank_row(t2i_rank[j], j, False) for j in range(m)])

    # 0-based rank of the first positive of each query.
    i2t_first = []
    for i in range(n):
        positive = (t2i_map[i2t_rank[i]] == i).nonzero()
        if positive.numel():  # images without captions are left out
            i2t_first.append(int(positive[0]))
    t2i_first = [int((t2i_rank[j] == t2i_map[j]).nonzero()[0]) for j in range(m)]

    recalls: dict[str, float] = {}
    for k in ks:
        recalls[f"retrieval/i2t_r{k}"] = 100.0 * sum(r < k for r in i2t_first) / len(i2t_first)
    for k in ks:
        recalls[f"retrieval/t2i_r{k}"] = 100.0 * sum(r < k for r in t2i_first) / len(t2i_first)
    out = _finish(recalls, _chance_levels(text_to_image, n, ks))
    out.update(tie_metrics(*tie_counts_reference(image_emb, text_emb, text_to_image), ks, rerank_k if rerank is not None else 1))
    return out
