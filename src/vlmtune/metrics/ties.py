"""Recall@K under every order of tied scores: the span tie order allows, and its mean.

Two captions with the same text have the same embedding, so an image scores them
exactly alike; whichever comes first is a convention (vlmtune: the lower index;
ALBEF's ``itm_eval``: the higher one), and the convention moves recall. For each
query this module counts how many keys score above its first ground truth and how
many tie with it, read off the top-k lists (with their scores) that the chunked pass
keeps anyway, so no similarity is computed again (but for a query whose ties run past
the end of its list, counted in a pass of its own):

- ``above``: keys scoring more than the ground truth's score ``s``;
- ``tied``: negatives scoring ``s`` (ties it could lose);
- ``pos``: ground truths scoring ``s`` (i2t: an image's captions; t2i: 1).

The first ground truth's rank is then at best ``above + 1`` (ties broken for the
query) and at worst ``above + tied + 1`` (against it); under a uniformly random order
of the tied keys, the chance that one of the ``pos`` ground truths is among the first
``r = K - above`` of the ``tied + pos`` tied keys is ``1 - C(tied, r) / C(tied + pos, r)``.

"Scores ``s``" means within float32 rounding: the ground truth's score is computed
apart, in float64, and a key counts as tied when its similarity in the pass lies within
``TIE_TOL * sum_d |q_d k_d|`` of it. That bound is several times the largest rounding
error measured for float32 products (about 3e-7 of ``sum |q_d k_d|`` for D = 8 to 4096),
so the key's own block value, and every exact duplicate, always falls inside; keys
closer than that are ordered by rounding noise, and count as tied too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TIE_TOL", "Ties", "tie_counts", "tie_counts_reference", "tie_metrics"]

TIE_TOL = 2.0**-19  # relative to sum_d |q_d k_d|; about 6x the float32 rounding measured


@dataclass
class Ties:
    """Per query: keys above the first ground truth, negatives tied with it, ground truths tied with it."""

    above: Tensor
    tied: Tensor
    pos: Tensor


def _gt_scores(image_emb: Tensor, text_emb: Tensor, t2i: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Each caption's score with its own image in float64, and its tolerance (TIE_TOL * sum |q k|)."""
    scores, tols = [], []
    for c0 in range(0, text_emb.shape[0], chunk_size):
        t = text_emb[c0 : c0 + chunk_size].double()
        v = image_emb[t2i[c0 : c0 + chunk_size]].double()
        scores.append((t * v).sum(1))
        tols.append(TIE_TOL * (t.abs() * v.abs()).sum(1))
    return torch.cat(scores), torch.cat(tols)


def _thresholds(image_emb: Tensor, text_emb: Tensor, t2i: Tensor, chunk_size: int) -> tuple[Tensor, ...]:
    """The tie bands [lo, hi] (float32) of every caption (t2i: its image's score) and of
    every image (i2t: its best caption's; +inf for an image without captions), and the
    float64 ground-truth scores they come from."""
    n = image_emb.shape[0]
    s, tol = _gt_scores(image_emb, text_emb, t2i, chunk_size)
    best = torch.full((n,), float("-inf"), dtype=torch.float64, device=s.device).scatter_reduce(0, t2i, s, "amax")
    best_tol = torch.zeros(n, dtype=torch.float64, device=s.device).scatter_reduce(0, t2i, tol, "amax")
    inf = torch.full_like(best, float("inf"))
    captioned = torch.isfinite(best)
    # float32 bounds: tol is far above float32's spacing at s, so rounding them moves nothing.
    i_lo = torch.where(captioned, best - best_tol, inf).float()
    i_hi = torch.where(captioned, best + best_tol, inf).float()
    return (s - tol).float(), (s + tol).float(), i_lo, i_hi, s


def _from_lists(scores: Tensor, is_pos: Tensor, lo: Tensor, hi: Tensor, n_keys: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Counts read off each query's top-k list (its contrastive scores, any order):
    above, in-band, in-band ground truths, and whether the band may reach past the list
    (then the list cannot tell; such rows are counted again in full)."""
    above = (scores > hi[:, None]).sum(1)
    band = (scores >= lo[:, None]) & (scores <= hi[:, None])
    open_end = (
        (scores.min(1).values >= lo) & (above < scores.shape[1])
        if scores.shape[1] < n_keys
        else torch.zeros_like(above, dtype=torch.bool)
    )
    return above, band.sum(1), (band & is_pos).sum(1), open_end


def _count_full(queries: Tensor, keys: Tensor, lo: Tensor, hi: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Above and in-band counts of a few queries against every key, chunk by chunk."""
    above = torch.zeros(queries.shape[0], dtype=torch.long, device=queries.device)
    band = torch.zeros_like(above)
    for q0 in range(0, queries.shape[0], chunk_size):
        q = queries[q0 : q0 + chunk_size].float()
        lo_q, hi_q = lo[q0 : q0 + chunk_size, None], hi[q0 : q0 + chunk_size, None]
        for k0 in range(0, keys.shape[0], chunk_size):
            sim = q @ keys[k0 : k0 + chunk_size].float().T
            above[q0 : q0 + q.shape[0]] += (sim > hi_q).sum(1)
            band[q0 : q0 + q.shape[0]] += ((sim >= lo_q) & (sim <= hi_q)).sum(1)
    return above, band


def tie_counts(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    lists: tuple[Tensor, Tensor, Tensor, Tensor],
    chunk_size: int = 4096,
) -> tuple[Ties, Ties]:
    """(i2t, t2i) counts from the ranked lists the pass kept, ``lists`` = (i2t indices,
    t2i indices, i2t scores, t2i scores), with their contrastive scores (re-ranked lists
    included: only which keys they hold matters). No similarity is recomputed, except
    for the rare query whose tie band runs past the end of its list (as many tied keys
    as the list is long), which is counted against every key in a pass of its own.
    i2t counts are of captioned images only, as i2t recall counts them."""
    device = image_emb.device
    texts = text_emb.to(device)
    t2i = text_to_image.to(device).long()
    i2t_idx, t2i_idx, i2t_s, t2i_s = lists
    t_lo, t_hi, i_lo, i_hi, s = _thresholds(image_emb, texts, t2i, chunk_size)
    n, m = image_emb.shape[0], texts.shape[0]

    # t2i: one ground truth per caption, its image.
    above, band, _, again = _from_lists(t2i_s.to(device).float(), t2i_idx.to(device) == t2i[:, None], t_lo, t_hi, n)
    if again.any():
        rows = again.nonzero().flatten()
        above[rows], band[rows] = _count_full(texts[rows], image_emb, t_lo[rows], t_hi[rows], chunk_size)
    t2i_ties = Ties(above, (band - 1).clamp_min(0), torch.ones_like(band))

    # i2t: an image's captions are its ground truths.
    own = t2i[i2t_idx.to(device)] == torch.arange(n, device=device)[:, None]
    above, band, pos, again = _from_lists(i2t_s.to(device).float(), own, i_lo, i_hi, m)
    if again.any():
        rows = again.nonzero().flatten()
        above[rows], band[rows] = _count_full(image_emb[rows], texts, i_lo[rows], i_hi[rows], chunk_size)
        # Its ground truths in the band, from their own (float64) scores.
        in_band = (s >= i_lo[t2i].double()) & (s <= i_hi[t2i].double())
        pos_all = torch.zeros(n, dtype=torch.long, device=device).index_add_(0, t2i, in_band.long())
        pos[rows] = pos_all[rows]
    captioned = torch.isfinite(i_lo)
    pos = pos[captioned].clamp_min(1)
    i2t_ties = Ties(above[captioned], (band[captioned] - pos).clamp_min(0), pos)
    return i2t_ties, t2i_ties


def tie_counts_reference(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor) -> tuple[Ties, Ties]:
    """The same counts from the full similarity matrix, one query at a time (for tests)."""
    t2i = text_to_image.long().cpu()
    img, txt = image_emb.float().cpu(), text_emb.float().cpu()
    sim = img @ txt.T
    s, tol = _gt_scores(img, txt, t2i, max(1, txt.shape[0]))
    rows: dict[str, list[list[int]]] = {"i2t": [], "t2i": []}
    for j in range(txt.shape[0]):
        col = sim[:, j].double()
        above = int((col > float((s[j] + tol[j]).float())).sum())
        band = int((col >= float((s[j] - tol[j]).float())).sum()) - above
        rows["t2i"].append([above, max(band - 1, 0), 1])
    for i in range(img.shape[0]):
        own = t2i == i
        if not own.any():
            continue
        lo, hi = float((s[own].max() - tol[own].max()).float()), float((s[own].max() + tol[own].max()).float())
        row = sim[i].double()
        in_band = (row >= lo) & (row <= hi)
        pos = max(int((in_band & own).sum()), 1)
        rows["i2t"].append([int((row > hi).sum()), max(int(in_band.sum()) - pos, 0), pos])

    def ties(r: list[list[int]]) -> Ties:
        t = torch.tensor(r, dtype=torch.long).view(-1, 3)
        return Ties(t[:, 0], t[:, 1], t[:, 2])

    return ties(rows["i2t"]), ties(rows["t2i"])


def _expected_hit(t: Ties, k: int) -> Tensor:
    """P(the first ground truth is within the top k) under a uniformly random order of the tied keys."""
    r = (k - t.above).double()
    tied, pos = t.tied.double(), t.pos.double()
    # 1 - C(tied, r) / C(tied + pos, r) = 1 - prod_{i<r} (tied - i) / (tied + pos - i), via log-gamma.
    rr = r.clamp(0, None)
    log_ratio = (
        torch.lgamma(tied + 1)
        - torch.lgamma((tied - rr).clamp_min(0) + 1)
        - torch.lgamma(tied + pos + 1)
        + torch.lgamma(tied + pos - rr + 1)
    )
    p = 1.0 - torch.exp(log_ratio)
    p = torch.where(rr > tied, torch.ones_like(p), p)  # more places than tied negatives: a ground truth is in
    return torch.where(r <= 0, torch.zeros_like(p), p)


def tie_metrics(i2t: Ties, t2i: Ties, ks: Sequence[int], min_k: int = 1) -> dict[str, float | int]:
    """Keys ``retrieval/{i2t,t2i}_r{K}_tie_min|max|mean`` (percent; K >= ``min_k``) and
    ``retrieval/{i2t,t2i}_tie_queries``: queries whose hit at some reported K depends on
    the tie order (their first ground truth ties with a negative across K)."""
    out: dict[str, float | int] = {}
    for name, t in (("i2t", i2t), ("t2i", t2i)):
        n = max(int(t.above.numel()), 1)
        for k in ks:
            if k < min_k:
                continue
            out[f"retrieval/{name}_r{k}_tie_min"] = 100.0 * int((t.above + t.tied < k).sum()) / n
            out[f"retrieval/{name}_r{k}_tie_max"] = 100.0 * int((t.above < k).sum()) / n
            out[f"retrieval/{name}_r{k}_tie_mean"] = 100.0 * float(_expected_hit(t, k).sum()) / n
        moved = torch.zeros_like(t.above, dtype=torch.bool)
        for k in ks:
            if k >= min_k:
                moved |= (t.above < k) & (t.above + t.tied >= k)
        out[f"retrieval/{name}_tie_queries"] = int(moved.sum())
    return out
