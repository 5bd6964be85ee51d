"""Recall under tie order: the span and mean beside R@K, against hand-computed cases and
against a re-implementation of ALBEF's ``itm_eval`` (which breaks ties its own way)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmtune.metrics.retrieval import retrieval_metrics, retrieval_metrics_reference


def albef_itm_eval(scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img: list[int], img2txt: list[list[int]]) -> dict:
    """ALBEF's ``itm_eval`` (salesforce/ALBEF, Retrieval.py), written again here: each
    row sorted ascending by numpy and reversed, so among equal scores the higher index
    comes first; an image's rank is that of its best-placed caption."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score, kind="stable")[::-1]
        ranks[index] = min(np.where(inds == i)[0][0] for i in img2txt[index])
    tr = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score, kind="stable")[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    return {"txt_r1": tr[0], "txt_r5": tr[1], "txt_r10": tr[2], "img_r1": ir[0], "img_r5": ir[1], "img_r10": ir[2]}


def _albef(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor) -> dict:
    sim = (img.float() @ txt.float().T).numpy()
    img2txt = [[j for j in range(len(t2i)) if int(t2i[j]) == i] for i in range(img.shape[0])]
    return albef_itm_eval(sim, sim.T, t2i.tolist(), img2txt)


def test_hand_made_ties() -> None:
    # text_emb = identity: image_emb is the similarity matrix. Captions 0 and 1 have
    # the same text (equal columns); caption 2 is image 1's, caption 3 image 2's.
    sim = torch.tensor(
        [
            [0.5, 0.5, 0.1, 0.0],  # img0 owns caption 1, tied with caption 0 (image 1's)
            [0.5, 0.5, 0.2, 0.0],  # img1 owns 0 and 2: caption 0 ties with caption 1 (image 0's)
            [0.3, 0.3, 0.9, 0.4],  # img2 owns 3, below caption 2 only: no tie at its place
        ]
    )
    t2i = torch.tensor([1, 0, 1, 2])
    for fn in (retrieval_metrics, retrieval_metrics_reference):
        m = fn(sim, torch.eye(4), t2i, ks=(1, 2))
        # i2t R@1: img0 loses its tie under lower-index order (caption 0 first), img1 wins it.
        assert m["retrieval/i2t_r1"] == pytest.approx(100 / 3)
        assert m["retrieval/i2t_r1_tie_min"] == pytest.approx(0.0)
        assert m["retrieval/i2t_r1_tie_max"] == pytest.approx(200 / 3)
        # mean: img0 and img1 each first with probability 1/2 (one own caption among two tied).
        assert m["retrieval/i2t_r1_tie_mean"] == pytest.approx(100 / 3)
        assert m["retrieval/i2t_r2_tie_min"] == m["retrieval/i2t_r2_tie_max"] == pytest.approx(100.0)
        assert m["retrieval/i2t_tie_queries"] == 2
        # t2i: caption 0 (image 1) scores images 0 and 1 alike at 0.5; caption 1 (image 0)
        # too; caption 2 always misses (image 2 above), caption 3 always hits.
        assert m["retrieval/t2i_r1"] == pytest.approx(50.0)  # caption 1's image 0 comes first, caption 0's does not
        assert m["retrieval/t2i_r1_tie_min"] == pytest.approx(25.0)
        assert m["retrieval/t2i_r1_tie_max"] == pytest.approx(75.0)
        assert m["retrieval/t2i_r1_tie_mean"] == pytest.approx(50.0)
        assert m["retrieval/t2i_tie_queries"] == 2


def test_mean_with_several_tied_ground_truths() -> None:
    # img0 scores all 5 captions alike: 2 are its own, 3 are image 1's.
    # P(an own caption in the top 1) = 2/5; top 2: 1 - C(3,2)/C(5,2) = 1 - 3/10 = 7/10.
    sim = torch.tensor([[1.0] * 5, [0.0, 0.0, 0.0, 0.0, 1.0]])
    t2i = torch.tensor([1, 1, 1, 0, 0])
    for fn in (retrieval_metrics, retrieval_metrics_reference):
        m = fn(sim, torch.eye(5), t2i, ks=(1, 2, 4))
        # img1: caption 4 (another image's) above; its own 0-2 tie with caption 3 at 0.0:
        # top 1 never; top 2: 1 - C(1,1)/C(4,1) = 3/4.
        assert m["retrieval/i2t_r1_tie_mean"] == pytest.approx(100 * (2 / 5 + 0) / 2)
        assert m["retrieval/i2t_r2_tie_mean"] == pytest.approx(100 * (7 / 10 + 3 / 4) / 2)
        assert m["retrieval/i2t_r4_tie_mean"] == pytest.approx(100.0)
        assert m["retrieval/i2t_r2_tie_min"] == pytest.approx(0.0)  # img0: 3 tied negatives first; img1: 1 above + 1 tied
        assert m["retrieval/i2t_r2_tie_max"] == pytest.approx(100.0)


def _duplicated_captions(seed: int, n: int = 40, d: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised random embeddings, two captions per image; 6 caption texts shared by two images."""
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    t2i = torch.arange(n).repeat_interleave(2)
    txt = torch.nn.functional.normalize(img[t2i] + 0.3 * torch.randn(2 * n, d, generator=g), dim=-1)
    for a, b in ((0, 3), (10, 21), (30, 41), (50, 61), (70, 79), (2, 5)):
        txt[b] = txt[a]  # the same text under two images: the same embedding
    return img, txt, t2i


@pytest.mark.parametrize("chunk_size", [7, 4096])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_albef_itm_eval_up_to_tie_order(chunk_size: int, seed: int) -> None:
    img, txt, t2i = _duplicated_captions(seed)
    m = retrieval_metrics(img, txt, t2i, ks=(1, 5, 10), chunk_size=chunk_size)
    albef = _albef(img, txt, t2i)
    assert m["retrieval/i2t_tie_queries"] > 0  # the duplicates do tie
    # Each copy sits under a later image than its original: the original's image wins
    # the tie under the lower-index rule and loses it under ALBEF's (higher index first).
    assert m["retrieval/i2t_r1"] == pytest.approx(m["retrieval/i2t_r1_tie_max"])
    assert albef["txt_r1"] == pytest.approx(m["retrieval/i2t_r1_tie_min"])
    assert albef["txt_r1"] < m["retrieval/i2t_r1"]
    for ours, theirs in (("i2t", "txt"), ("t2i", "img")):
        for k in (1, 5, 10):
            lo, hi = m[f"retrieval/{ours}_r{k}_tie_min"], m[f"retrieval/{ours}_r{k}_tie_max"]
            assert lo - 1e-9 <= albef[f"{theirs}_r{k}"] <= hi + 1e-9, (ours, k)
            assert lo - 1e-9 <= m[f"retrieval/{ours}_r{k}"] <= hi + 1e-9
    # Without the duplicates nothing ties, and the two agree exactly.
    g = torch.Generator().manual_seed(seed)
    txt2 = torch.nn.functional.normalize(torch.randn(txt.shape, generator=g), dim=-1)
    m2 = retrieval_metrics(img, txt2, t2i, ks=(1, 5, 10), chunk_size=chunk_size)
    albef2 = _albef(img, txt2, t2i)
    assert m2["retrieval/i2t_tie_queries"] == m2["retrieval/t2i_tie_queries"] == 0
    for ours, theirs in (("i2t", "txt"), ("t2i", "img")):
        for k in (1, 5, 10):
            assert m2[f"retrieval/{ours}_r{k}"] == pytest.approx(albef2[f"{theirs}_r{k}"])
            assert m2[f"retrieval/{ours}_r{k}_tie_min"] == m2[f"retrieval/{ours}_r{k}_tie_max"] == m2[f"retrieval/{ours}_r{k}"]


@pytest.mark.parametrize("chunk_size", [3, 4096])
def test_ties_running_past_the_kept_lists(chunk_size: int) -> None:
    """Every score equal (a collapsed model): the top-1 lists hold one of many tied keys,
    so the counts come from the pass over those queries; R@1 is 1/N on average."""
    n, m = 5, 10
    img, txt = torch.ones(n, 4), torch.ones(m, 4)
    t2i = torch.arange(m) % n  # two captions per image
    for fn in (retrieval_metrics, retrieval_metrics_reference):
        kw = {"chunk_size": chunk_size} if fn is retrieval_metrics else {}
        r = fn(img, txt, t2i, ks=(1, 3), **kw)
        assert r["retrieval/t2i_r1_tie_min"] == 0.0 and r["retrieval/t2i_r1_tie_max"] == 100.0
        assert r["retrieval/t2i_r1_tie_mean"] == pytest.approx(100 / n)
        assert r["retrieval/t2i_r3_tie_mean"] == pytest.approx(300 / n)
        # i2t: 2 own captions among 10 tied; top 1: 2/10; top 3: 1 - C(8,3)/C(10,3) = 1 - 56/120.
        assert r["retrieval/i2t_r1_tie_mean"] == pytest.approx(20.0)
        assert r["retrieval/i2t_r3_tie_mean"] == pytest.approx(100 * (1 - 56 / 120))
        assert r["retrieval/i2t_tie_queries"] == n and r["retrieval/t2i_tie_queries"] == m


def test_validate_and_inspect_note_captions_shared_by_images(scenes, tmp_path, capsys) -> None:
    import json
    import shutil
    from pathlib import Path

    from vlmtune.cli import main

    records = json.loads((Path(scenes) / "train.json").read_text())
    images = list(dict.fromkeys(r["image"] for r in records))[:3]
    shared = [{"image": im, "caption": "a red circle"} for im in images]  # one text under three images
    own = [{"image": images[0], "caption": "a blue square"}]
    for im in images:  # the images beside the annotation file, as the readers want
        (tmp_path / im).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(scenes) / im, tmp_path / im)
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(shared + own))
    assert main(["data", "validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1 caption text stands under several images (3 images in all; e.g. 'a red circle' under 3 images)" in out
    assert main(["data", "inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shared_captions"] == {"texts": 1, "images": 3, "examples": [{"text": "a red circle", "images": 3}]}
