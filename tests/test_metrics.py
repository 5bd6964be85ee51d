"""Tests for box utilities and the retrieval, grounding and classification metrics."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch

from vlmtune.boxes import cxcywh_to_xyxy, paired_box_iou, paired_generalized_box_iou, xywh_to_xyxy, xyxy_to_cxcywh, xyxy_to_xywh
from vlmtune.metrics.boxes import box_metrics, constant_box_baseline
from vlmtune.metrics.classification import classification_metrics, majority_baseline
from vlmtune.metrics.retrieval import chunked_topk, retrieval_metrics, retrieval_metrics_reference

# ---------------------------------------------------------------- helpers


def _grid_emb(gen: torch.Generator, n: int, d: int, step: float = 0.25) -> torch.Tensor:
    """Gaussian values rounded to multiples of ``step``: every dot product is exact in
    float32, so chunked and full-matrix scores agree bit for bit (and ties are real)."""
    return (torch.randn(n, d, generator=gen) / step).round() * step


def _full_topk(q: torch.Tensor, k_: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    s, i = (q @ k_.T).sort(dim=1, descending=True, stable=True)
    return s[:, :k], i[:, :k]


def _variable_captions(gen: torch.Generator, n_images: int, lo: int = 1, hi: int = 5) -> torch.Tensor:
    counts = torch.randint(lo, hi + 1, (n_images,), generator=gen)
    t2i = torch.repeat_interleave(torch.arange(n_images), counts)
    return t2i[torch.randperm(t2i.numel(), generator=gen)]  # captions not grouped by image


def _assert_same_metrics(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-9), key


# ---------------------------------------------------------------- chunked_topk


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 16, 64, 4096])
@pytest.mark.parametrize("k", [1, 5, 10])
def test_chunked_topk_matches_full_exact_with_ties(chunk_size: int, k: int) -> None:
    gen = torch.Generator().manual_seed(0)
    # Small integers: many exact ties, so the lower-index tie rule is exercised too.
    q = torch.randint(-2, 3, (37, 6), generator=gen).float()
    keys = torch.randint(-2, 3, (53, 6), generator=gen).float()
    scores, idx = chunked_topk(q, keys, k, chunk_size=chunk_size)
    ref_s, ref_i = _full_topk(q, keys, k)
    assert idx.dtype == torch.long and scores.shape == (37, k)
    assert torch.equal(scores, ref_s)
    assert torch.equal(idx, ref_i)


@pytest.mark.parametrize("chunk_size", [4, 13, 50])
def test_chunked_topk_gaussian_and_clipping(chunk_size: int) -> None:
    gen = torch.Generator().manual_seed(1)
    q, keys = torch.randn(29, 16, generator=gen), torch.randn(41, 16, generator=gen)
    scores, idx = chunked_topk(q, keys, 100, chunk_size=chunk_size)  # k > M is clipped
    assert scores.shape == idx.shape == (29, 41)
    full = q @ keys.T
    ref_s, _ = full.sort(dim=1, descending=True)
    assert torch.allclose(scores, ref_s, atol=1e-5)
    assert torch.allclose(full.gather(1, idx), scores, atol=1e-5)
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    assert all(torch.equal(row.sort().values, torch.arange(41)) for row in idx)  # a permutation


# ---------------------------------------------------------------- retrieval


def test_retrieval_hand_made_case() -> None:
    # text_emb = identity, so image_emb *is* the N x M similarity matrix.
    sim = torch.tensor(
        [
            [0.1, 0.9, 0.5, 0.2],  # img0: texts 1,2,3,0 -> own text1 at rank 0
            [0.8, 0.1, 0.3, 0.4],  # img1: texts 0,3,2,1 -> own text2 at rank 2
            [0.7, 0.6, 0.5, 0.0],  # img2: texts 0,1,2,3 -> own text3 at rank 3
        ]
    )
    text_to_image = torch.tensor([0, 0, 1, 2])
    # t2i: text0 -> imgs 1,2,0 (rank 2); text1 -> 0,2,1 (rank 0);
    # text2 -> 0,2,1 (tie 0.5 broken by lower index; rank 2); text3 -> 1,0,2 (rank 2).
    for fn in (retrieval_metrics, retrieval_metrics_reference):
        m = fn(sim, torch.eye(4), text_to_image, ks=(1, 2, 3))
        assert m["retrieval/i2t_r1"] == pytest.approx(100 / 3)
        assert m["retrieval/i2t_r2"] == pytest.approx(100 / 3)
        assert m["retrieval/i2t_r3"] == pytest.approx(200 / 3)
        assert m["retrieval/t2i_r1"] == pytest.approx(25.0)
        assert m["retrieval/t2i_r2"] == pytest.approx(25.0)
        assert m["retrieval/t2i_r3"] == pytest.approx(100.0)
        assert m["retrieval/mean_recall"] == pytest.approx((100 / 3 + 100 / 3 + 200 / 3 + 25 + 25 + 100) / 6)
        # Caption counts (2, 1, 1) of M=4: chance i2t R@1 = mean(2/4, 1/4, 1/4).
        assert m["retrieval/chance_i2t_r1"] == pytest.approx(100 / 3)
        assert m["retrieval/chance_t2i_r1"] == pytest.approx(100 / 3)
        assert m["retrieval/chance_t2i_r3"] == pytest.approx(100.0)

        # An oracle rerank over the top 3 lifts img1 (own caption at rank 2) to R@1,
        # but not img2 (rank 3, outside the re-ranked head).
        def oracle(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
            return (text_to_image[txt] == img).float()

        r = fn(sim, torch.eye(4), text_to_image, ks=(1, 2, 3), rerank=oracle, rerank_k=3)
        assert r["retrieval/i2t_r1"] == pytest.approx(200 / 3)
        assert r["retrieval/t2i_r1"] == pytest.approx(100.0)  # every own image is in the top 3


def _fancy_rerank(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """A deterministic score unrelated to the embeddings, with ties."""
    return ((img * 7 + txt * 3) % 11).float()


@pytest.mark.parametrize("rerank, rerank_k", [(None, 16), (_fancy_rerank, 4), (_fancy_rerank, 16), (_fancy_rerank, 1000)])
@pytest.mark.parametrize("chunk_size", [3, 8, 4096])
@pytest.mark.parametrize("step", [0.25, 1.0])  # step 1.0 rounds to small ints: heavy ties
def test_retrieval_matches_reference(rerank, rerank_k: int, chunk_size: int, step: float) -> None:
    gen = torch.Generator().manual_seed(2)
    n_images = 23
    text_to_image = _variable_captions(gen, n_images)
    image_emb = _grid_emb(gen, n_images, 8, step)
    text_emb = _grid_emb(gen, text_to_image.numel(), 8, step)
    ks = (1, 5, 10)
    fast = retrieval_metrics(
        image_emb, text_emb, text_to_image, ks=ks, chunk_size=chunk_size, rerank=rerank, rerank_k=rerank_k, rerank_batch_size=7
    )
    ref = retrieval_metrics_reference(image_emb, text_emb, text_to_image, ks=ks, rerank=rerank, rerank_k=rerank_k)
    _assert_same_metrics(fast, ref)
    expected = {f"retrieval/{d}_r{k}" for d in ("i2t", "t2i") for k in ks}
    expected |= {f"retrieval/chance_{d}_r{k}" for d in ("i2t", "t2i") for k in ks} | {"retrieval/mean_recall"}
    span_ks = [k for k in ks if rerank is None or k >= rerank_k]
    expected |= {f"retrieval/{d}_r{k}_tie_{b}" for d in ("i2t", "t2i") for k in span_ks for b in ("min", "max", "mean")}
    expected |= {"retrieval/i2t_tie_queries", "retrieval/t2i_tie_queries"}
    assert fast.keys() == expected
    assert all(0.0 <= v <= 100.0 for k, v in fast.items() if not k.endswith("tie_queries"))
    for d in ("i2t", "t2i"):  # the headline (ties to the lower index) lies in the span, as does the mean
        for k in span_ks:
            lo, hi, mean = (fast[f"retrieval/{d}_r{k}_tie_{b}"] for b in ("min", "max", "mean"))
            assert lo - 1e-9 <= fast[f"retrieval/{d}_r{k}"] <= hi + 1e-9
            assert lo - 1e-9 <= mean <= hi + 1e-9


def test_rerank_changes_result_and_uncaptioned_images() -> None:
    gen = torch.Generator().manual_seed(3)
    text_to_image = torch.tensor([0, 0, 2, 3, 3, 3, 5])  # images 1 and 4 have no caption
    image_emb, text_emb = _grid_emb(gen, 6, 4), _grid_emb(gen, 7, 4)
    plain = retrieval_metrics(image_emb, text_emb, text_to_image, chunk_size=2)
    _assert_same_metrics(plain, retrieval_metrics_reference(image_emb, text_emb, text_to_image))
    # Captioned images only: chance i2t R@1 = mean(2, 1, 3, 1) / 7.
    assert plain["retrieval/chance_i2t_r1"] == pytest.approx(100 * 7 / 4 / 7)

    def oracle(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return (text_to_image[txt] == img).float()

    reranked = retrieval_metrics(image_emb, text_emb, text_to_image, chunk_size=2, rerank=oracle, rerank_k=100)
    _assert_same_metrics(reranked, retrieval_metrics_reference(image_emb, text_emb, text_to_image, rerank=oracle, rerank_k=100))
    assert reranked["retrieval/i2t_r1"] == reranked["retrieval/t2i_r1"] == 100.0


def test_chance_levels_brute_force() -> None:
    # Enumerate every ranking; the expected recall must equal the reported chance level.
    text_to_image = torch.tensor([0, 1, 1, 1, 2, 0])
    n, m = 3, 6
    ks = (1, 2, 4)
    metrics = retrieval_metrics(torch.randn(n, 3), torch.randn(m, 3), text_to_image, ks=ks)
    owners = text_to_image.tolist()
    for k in ks:
        i2t = Fraction(0)
        perms = list(itertools.permutations(range(m)))
        for img in range(n):
            i2t += Fraction(sum(any(owners[t] == img for t in p[:k]) for p in perms), len(perms))
        t2i = Fraction(sum(0 in p[:k] for p in itertools.permutations(range(n))), math.factorial(n))
        assert metrics[f"retrieval/chance_i2t_r{k}"] == pytest.approx(float(100 * i2t / n))
        assert metrics[f"retrieval/chance_t2i_r{k}"] == pytest.approx(float(100 * t2i))


def test_retrieval_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        retrieval_metrics(torch.randn(3, 4), torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError):
        retrieval_metrics(torch.randn(3, 4), torch.randn(2, 5), torch.tensor([0, 1]))


# ---------------------------------------------------------------- boxes


def test_box_conversions_round_trip() -> None:
    xyxy = torch.tensor([[1.0, 2.0, 4.0, 8.0], [0.0, 0.0, 0.5, 0.25]])
    assert torch.allclose(xyxy_to_xywh(xyxy), torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.5, 0.25]]))
    assert torch.allclose(xyxy_to_cxcywh(xyxy), torch.tensor([[2.5, 5.0, 3.0, 6.0], [0.25, 0.125, 0.5, 0.25]]))
    assert torch.allclose(xywh_to_xyxy(xyxy_to_xywh(xyxy)), xyxy)
    assert torch.allclose(cxcywh_to_xyxy(xyxy_to_cxcywh(xyxy)), xyxy)
    batched = xyxy.expand(3, 2, 4)  # any leading shape
    assert cxcywh_to_xyxy(batched).shape == (3, 2, 4)


def test_paired_iou_giou_hand_values() -> None:
    a = torch.tensor([[0.0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 2, 2], [1, 1, 1, 1]])
    b = torch.tensor([[0.0, 0, 2, 2], [2, 0, 3, 1], [1, 1, 3, 3], [1, 1, 1, 1]])
    iou = paired_box_iou(a, b)
    giou = paired_generalized_box_iou(a, b)
    # identical; disjoint (union 2, hull 3); overlap (inter 1, union 7, hull 9); two points
    assert torch.allclose(iou, torch.tensor([1.0, 0.0, 1 / 7, 0.0]))
    assert torch.allclose(giou, torch.tensor([1.0, -1 / 3, 1 / 7 - 2 / 9, 0.0]))
    assert torch.isfinite(giou).all()


def test_giou_gradient_flows() -> None:
    pred = torch.tensor([[0.0, 0, 1, 1], [0.5, 0.5, 0.5, 0.5]], requires_grad=True)  # disjoint, degenerate
    target = torch.tensor([[2.0, 0, 3, 1], [0, 0, 1, 1]])
    (1 - paired_generalized_box_iou(pred, target)).sum().backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    assert pred.grad[0].abs().sum() > 0  # GIoU pulls non-overlapping boxes together


def test_box_metrics_hand_values() -> None:
    pred = torch.tensor([[1.0, 1, 5, 5], [2, 0, 3, 1]])
    target = torch.tensor([[1.0, 1, 5, 5], [0, 0, 1, 1]])
    wh = torch.tensor([[10.0, 10], [4, 2]])
    m = box_metrics(pred, target, wh)
    assert m["grounding/miou"] == pytest.approx(50.0)
    assert m["grounding/giou"] == pytest.approx((1 - 1 / 3) / 2)
    assert m["grounding/l1"] == pytest.approx((0 + (2 / 4 + 0 + 2 / 4 + 0) / 4) / 2)
    assert m["grounding/acc50"] == pytest.approx(50.0)


def test_constant_box_baseline() -> None:
    train = torch.tensor([[0.0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]])  # mean box (.25, .25, .75, .75)
    target = torch.tensor([[25.0, 25, 75, 75], [0, 0, 50, 25]])
    wh = torch.tensor([[100.0, 100], [200, 100]])
    m = constant_box_baseline(train, target, wh)
    # Predictions: [25,25,75,75] (exact) and [50,25,150,75] (touches target at a corner:
    # union 1250 + 5000, hull 150 x 75).
    assert set(m) == {"grounding/baseline_miou", "grounding/baseline_giou", "grounding/baseline_l1", "grounding/baseline_acc50"}
    assert m["grounding/baseline_miou"] == pytest.approx(50.0)
    assert m["grounding/baseline_acc50"] == pytest.approx(50.0)
    assert m["grounding/baseline_giou"] == pytest.approx((1 - (11250 - 6250) / 11250) / 2)
    assert m["grounding/baseline_l1"] == pytest.approx((0 + (50 / 200 + 25 / 100 + 100 / 200 + 50 / 100) / 4) / 2)


# ---------------------------------------------------------------- classification


def test_classification_hand_values() -> None:
    preds = torch.tensor([0, 1, 1, 0, 2])
    targets = torch.tensor([0, 1, 0, 0, 2])
    m = classification_metrics(preds, targets, num_classes=4, prefix="cls")  # class 3 never occurs
    # per class (P, R, F1): 0 -> (1, 2/3, .8), 1 -> (.5, 1, 2/3), 2 -> (1, 1, 1); 3 excluded
    assert m["cls/accuracy"] == pytest.approx(80.0)
    assert m["cls/macro_precision"] == pytest.approx(100 * 2.5 / 3)
    assert m["cls/macro_recall"] == pytest.approx(100 * (2 / 3 + 2) / 3)
    assert m["cls/macro_f1"] == pytest.approx(100 * (0.8 + 2 / 3 + 1) / 3)
    assert m["cls/confusion"] == [[2, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]


def _manual_macro(preds: list[int], targets: list[int], num_classes: int) -> tuple[float, float, float]:
    """Macro P/R/F1 over classes seen in preds or targets; 0/0 counts as 0."""
    ps, rs, fs = [], [], []
    for c in range(num_classes):
        tp = sum(p == c and t == c for p, t in zip(preds, targets))
        fp = sum(p == c and t != c for p, t in zip(preds, targets))
        fn = sum(p != c and t == c for p, t in zip(preds, targets))
        if tp + fp + fn == 0:
            continue
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        ps.append(p)
        rs.append(r)
        fs.append(2 * p * r / (p + r) if p + r else 0.0)
    return (100 * sum(ps) / len(ps), 100 * sum(rs) / len(rs), 100 * sum(fs) / len(fs))


def test_classification_matches_manual_computation() -> None:
    gen = torch.Generator().manual_seed(4)
    num_classes = 9
    targets = torch.randint(0, 6, (200,), generator=gen)  # classes 6-8 never appear...
    preds = torch.where(torch.rand(200, generator=gen) < 0.6, targets, torch.randint(0, 7, (200,), generator=gen))
    m = classification_metrics(preds, targets, num_classes=num_classes, prefix="x")  # ...except 6 in preds
    p, r, f = _manual_macro(preds.tolist(), targets.tolist(), num_classes)
    assert m["x/accuracy"] == pytest.approx(100 * (preds == targets).float().mean().item(), abs=1e-4)
    assert m["x/macro_precision"] == pytest.approx(p, abs=1e-4)
    assert m["x/macro_recall"] == pytest.approx(r, abs=1e-4)
    assert m["x/macro_f1"] == pytest.approx(f, abs=1e-4)
    confusion = torch.tensor(m["x/confusion"])
    assert confusion.sum() == 200 and torch.equal(confusion.diagonal(), torch.bincount(targets[preds == targets], minlength=9))
    assert torch.equal(confusion.sum(dim=1), torch.bincount(targets, minlength=9))  # rows = true class


def test_majority_baseline() -> None:
    train = torch.tensor([2, 2, 1, 0, 2])
    test = torch.tensor([0, 2, 2, 1])
    m = majority_baseline(train, test, num_classes=4, prefix="cls")
    # always 2: class 2 (P .5, R 1, F1 2/3), classes 0 and 1 all zero, class 3 excluded
    assert m == pytest.approx(
        {
            "cls/baseline_accuracy": 50.0,
            "cls/baseline_macro_precision": 100 * 0.5 / 3,
            "cls/baseline_macro_recall": 100 / 3,
            "cls/baseline_macro_f1": 100 * (2 / 3) / 3,
        }
    )
    # Ties go to the lowest class id.
    tie = majority_baseline(torch.tensor([1, 0, 1, 0]), torch.tensor([0, 0, 1]), num_classes=2, prefix="t")
    assert tie["t/baseline_accuracy"] == pytest.approx(200 / 3)


def test_faiss_search_matches_the_full_matrix_reference() -> None:
    pytest.importorskip("faiss", reason="faiss-cpu is an optional extra")
    from vlmtune.metrics.retrieval import retrieval_metrics, retrieval_metrics_reference

    g = torch.Generator().manual_seed(7)
    img = torch.nn.functional.normalize(torch.randn(60, 32, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(170, 32, generator=g), dim=-1)
    t2i = torch.randint(0, 60, (170,), generator=g)
    ref = retrieval_metrics_reference(img, txt, t2i)
    got = retrieval_metrics(img, txt, t2i, search="faiss")
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k] == pytest.approx(ref[k]), k


@pytest.mark.parametrize("chunk_size", [2, 5, 16, 64, 4096])
@pytest.mark.parametrize("step", [0.25, 1.0])  # 1.0: coarse values, many exact ties
def test_chunked_topk_both_matches_full_matrix_in_both_directions(chunk_size: int, step: float) -> None:
    """One pass feeds both lists; after the first rows the columns use the threshold path."""
    from vlmtune.metrics.retrieval import chunked_topk_both

    g = torch.Generator().manual_seed(chunk_size)
    img, txt = _grid_emb(g, 70, 6, step), _grid_emb(g, 130, 6, step)
    i2t, t2i = chunked_topk_both(img, txt, 10, chunk_size)
    assert torch.equal(i2t, _full_topk(img, txt, 10)[1])
    assert torch.equal(t2i, _full_topk(txt, img, 10)[1])
