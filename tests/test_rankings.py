"""Per-query rankings: the chunked pass's lists and scores against a full-matrix
reference, ground-truth ranks, `vlmtune evaluate --rankings` files and examples.html
opened in a real headless browser."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from vlmtune.cli import main
from vlmtune.metrics.retrieval import ground_truth_ranks, retrieval_metrics, retrieval_metrics_reference

from test_metrics import _assert_same_metrics, _fancy_rerank, _grid_emb, _variable_captions


def _reference_lists(image_emb, text_emb, t2i_map, k, rerank, rerank_k):
    """Full-matrix ranked lists (stable argsort, head re-ranked stably), scores, gt ranks."""
    sim = image_emb @ text_emb.T
    out = {}
    for name, s, is_img in (("i2t", sim, True), ("t2i", sim.T, False)):
        order = s.argsort(dim=1, descending=True, stable=True)
        rows, matches = [], []
        for q in range(order.shape[0]):
            o = order[q]
            if rerank is not None:
                r = min(rerank_k, o.numel())
                head = o[:r]
                qq = torch.full_like(head, q)
                sc = rerank(qq, head) if is_img else rerank(head, qq)
                perm = sc.argsort(descending=True, stable=True)
                o = torch.cat((head[perm], o[r:]))
                matches.append(sc[perm])
            rows.append(o)
        full = torch.stack(rows)
        truth = (t2i_map[full] == torch.arange(full.shape[0]).unsqueeze(1)) if is_img else (full == t2i_map.unsqueeze(1))
        gt = torch.tensor([int(t.nonzero()[0]) + 1 if t.any() else -1 for t in truth])
        out[name] = (full[:, :k], s.gather(1, full)[:, :k], torch.stack(matches) if matches else None, gt)
    return out


@pytest.mark.parametrize("rerank, rerank_k", [(None, 16), (_fancy_rerank, 4)])
@pytest.mark.parametrize("chunk_size", [3, 4096])
@pytest.mark.parametrize("step", [0.25, 1.0])  # 1.0: heavy ties
def test_rankings_match_full_matrix(rerank, rerank_k, chunk_size, step) -> None:
    gen = torch.Generator().manual_seed(4)
    n = 19
    t2i = _variable_captions(gen, n)
    t2i = t2i[t2i != 5]  # image 5 has no caption: rank -1, still a t2i distractor
    img, txt = _grid_emb(gen, n, 8, step), _grid_emb(gen, t2i.numel(), 8, step)
    metrics, rk = retrieval_metrics(img, txt, t2i, ks=(1, 5), chunk_size=chunk_size, rerank=rerank, rerank_k=rerank_k,
                                    rankings_k=7, return_rankings=True)
    _assert_same_metrics(metrics, retrieval_metrics_reference(img, txt, t2i, ks=(1, 5), rerank=rerank, rerank_k=rerank_k))
    k = max(7, rerank_k if rerank else 0)
    ref = _reference_lists(img, txt, t2i, k, rerank, rerank_k)
    for name, idx, scores, match, gt in (("i2t", rk.i2t, rk.i2t_scores, rk.i2t_match, rk.i2t_gt_rank),
                                         ("t2i", rk.t2i, rk.t2i_scores, rk.t2i_match, rk.t2i_gt_rank)):
        r_idx, r_scores, r_match, r_gt = ref[name]
        assert torch.equal(idx, r_idx), name
        assert torch.equal(scores, r_scores), name
        assert torch.equal(gt, r_gt), name
        assert (match is None) == (r_match is None)
        if match is not None:
            assert torch.equal(match, r_match)
    assert int(rk.i2t_gt_rank[5]) == -1
    assert int(rk.t2i_gt_rank.max()) > k  # some ground truths lie beyond the lists: counted, not listed


def test_ground_truth_ranks_alone() -> None:
    gen = torch.Generator().manual_seed(9)
    t2i = _variable_captions(gen, 30)
    img, txt = _grid_emb(gen, 30, 6, 1.0), _grid_emb(gen, t2i.numel(), 6, 1.0)
    ref = _reference_lists(img, txt, t2i, 1, None, 0)
    for chunk in (4, 1000):
        i2t, t2i_rank = ground_truth_ranks(img, txt, t2i, chunk)
        assert torch.equal(i2t, ref["i2t"][3]) and torch.equal(t2i_rank, ref["t2i"][3])
