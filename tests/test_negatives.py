"""Negatives beyond the batch: the losses with explicit negatives against plain loops,
the mined lists and their false-negative filter against a brute-force search."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlmtune.losses.negatives import contrastive_loss_with_negatives, explicit_negative_pairs
from vlmtune.tasks.retrieval.negatives import mine_lists, text_group


def _unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _side_loop(queries, query_ids, cols, col_ids, scale: float) -> float:
    """One direction of InfoNCE, one query at a time in plain Python: the mean over the
    queries of minus the mean log-softmax of their positive columns."""
    total = 0.0
    for i in range(len(queries)):
        logits = [scale * float(queries[i] @ c) for c in cols]
        top = max(logits)
        log_z = top + math.log(sum(math.exp(x - top) for x in logits))
        pos = [j for j, cid in enumerate(col_ids) if int(cid) == int(query_ids[i])]
        total += -sum(logits[j] - log_z for j in pos) / len(pos)
    return total / len(queries)


def _infonce_loop(image, text, ids, scale, neg_text, neg_text_ids, neg_image, neg_image_ids) -> float:
    """The symmetric InfoNCE with extra columns, in plain Python."""
    cols_t, ids_t = list(text) + list(neg_text), [int(x) for x in ids] + [int(x) for x in neg_text_ids]
    cols_v, ids_v = list(image) + list(neg_image), [int(x) for x in ids] + [int(x) for x in neg_image_ids]
    return (_side_loop(image, ids, cols_t, ids_t, scale) + _side_loop(text, ids, cols_v, ids_v, scale)) / 2


@pytest.mark.parametrize("k,m", [(5, 3), (0, 4), (6, 0), (0, 0)])
def test_contrastive_with_negatives_equals_a_plain_loop(k: int, m: int) -> None:
    ids = torch.tensor([0, 0, 1, 2, 3, 3])  # two images with two captions each
    image, text = _unit(6, 8, seed=1), _unit(6, 8, seed=2)
    neg_text, neg_image = _unit(k, 8, seed=3), _unit(m, 8, seed=4)
    # Extra columns: one is a caption of image 1 (a positive of its rows), the rest no image's.
    neg_text_ids = torch.tensor([1] + [-1] * (k - 1)) if k else torch.zeros(0, dtype=torch.long)
    neg_image_ids = torch.tensor([-1] * (m - 1) + [2]) if m else torch.zeros(0, dtype=torch.long)
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    got = contrastive_loss_with_negatives(image, text, ids, scale, neg_text, neg_text_ids, neg_image, neg_image_ids)
    want = _infonce_loop(image, text, ids, float(scale), neg_text, neg_text_ids, neg_image, neg_image_ids)
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_without_extra_columns_it_is_the_batch_infonce() -> None:
    from vlmtune.losses import contrastive_loss

    ids = torch.tensor([0, 1, 1, 2])
    image, text = _unit(4, 8, seed=5), _unit(4, 8, seed=6)
    scale = torch.tensor(10.0, dtype=torch.float64)
    empty, none = torch.zeros(0, 8, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    got = contrastive_loss_with_negatives(image, text, ids, scale, empty, none, empty, none)
    assert float(got) == pytest.approx(float(contrastive_loss(image, text, ids, scale)), rel=1e-12)


def test_matching_pairs_take_each_rows_own_negatives() -> None:
    """Rows with extra columns of their own take their negative among them (never
    another row's, never a positive of theirs); rows without fall back to the batch."""
    torch.manual_seed(0)
    ids = torch.tensor([0, 1, 2, 3])
    image, text = _unit(4, 8, seed=7), _unit(4, 8, seed=8)
    neg_text = _unit(5, 8, seed=9)
    neg_text_ids = torch.tensor([-1, -1, 5, 0, -1])  # column 3 is a caption of row 0's image
    neg_text_owner = torch.tensor([0, 0, 1, 0, 2])
    neg_image = _unit(2, 8, seed=10)
    neg_image_ids, neg_image_owner = torch.tensor([-1, -1]), torch.tensor([3, 3])
    for _ in range(20):
        images, texts, labels = explicit_negative_pairs(
            image, text, ids, neg_text, neg_text_ids, neg_text_owner, neg_image, neg_image_ids, neg_image_owner
        )
        assert labels.tolist() == [1] * 4 + [0] * 8
        assert torch.equal(images[:4], image) and torch.equal(texts[:4], text)
        # Image rows 0, 1, 2 (own negatives) in order, then row 3 from the batch.
        own = {0: {0, 1}, 1: {2}, 2: {4}}
        for n, row in enumerate((0, 1, 2)):
            assert torch.equal(images[4 + n], image[row])
            assert any(torch.equal(texts[4 + n], neg_text[c]) for c in own[row])
        assert torch.equal(images[7], image[3]) and any(torch.equal(texts[7], text[j]) for j in (0, 1, 2))
        # Caption row 3 takes one of its two negative images; rows 0-2 take batch images.
        assert any(torch.equal(images[8], neg_image[c]) for c in (0, 1)) and torch.equal(texts[8], text[3])
        for n, row in enumerate((0, 1, 2)):
            assert torch.equal(texts[9 + n], text[row])
            assert not torch.equal(images[9 + n], image[row])


def _mine_reference(images, texts, text_image, captions, per_query, exclude_above):
    """Brute force: the full matrix, every candidate in rank order, the rules one by one."""
    sim = images.double() @ texts.double().T
    n_img, n_txt = sim.shape
    own = [float(sim[text_image[c], c]) for c in range(n_txt)]
    pos_img = [max(own[c] for c in range(n_txt) if text_image[c] == q) for q in range(n_img)]
    groups_of = [{text_group(captions[c]) for c in range(n_txt) if text_image[c] == q} for q in range(n_img)]
    i2t, t2i = [], []
    for q in range(n_img):
        order = sorted(range(n_txt), key=lambda c: (-float(sim[q, c]), c))
        kept = []
        for c in order:
            if len(kept) == per_query:
                break
            if text_image[c] == q or text_group(captions[c]) in groups_of[q]:
                continue
            if exclude_above is not None and float(sim[q, c]) > exclude_above * pos_img[q]:
                continue
            kept.append(c)
        i2t.append(kept + [-1] * (per_query - len(kept)))
    for c in range(n_txt):
        order = sorted(range(n_img), key=lambda q: (-float(sim[q, c]), q))
        kept = []
        for q in order:
            if len(kept) == per_query:
                break
            if q == text_image[c] or text_group(captions[c]) in groups_of[q]:
                continue
            if exclude_above is not None and float(sim[q, c]) > exclude_above * own[c]:
                continue
            kept.append(q)
        t2i.append(kept + [-1] * (per_query - len(kept)))
    return i2t, t2i


def _groups(captions: list[str]) -> torch.Tensor:
    seen: dict[str, int] = {}
    return torch.tensor([seen.setdefault(text_group(t), len(seen)) for t in captions])


@pytest.mark.parametrize("exclude_above", [None, 0.95, 0.5])
@pytest.mark.parametrize("chunk", [3, 1000])
def test_mined_lists_equal_a_brute_force_search(exclude_above: float | None, chunk: int) -> None:
    n_img = 12
    text_image = torch.tensor([q for q in range(n_img) for _ in range(2 + q % 2)])
    captions = [f"caption {i}" for i in range(len(text_image))]
    captions[0] = captions[5] = "A  red ball"  # shared by images 0 and 2 (case and spacing apart)
    captions[7] = "a red ball"
    images, texts = _unit(n_img, 6, seed=11).float(), _unit(len(text_image), 6, seed=12).float()
    got = mine_lists(images, texts, text_image, _groups(captions), 3, exclude_above, chunk_size=chunk)
    want_i2t, want_t2i = _mine_reference(images, texts, text_image.tolist(), captions, 3, exclude_above)
    assert got.i2t.tolist() == want_i2t
    assert got.t2i.tolist() == want_t2i


def test_the_filter_leaves_out_captions_shared_by_images() -> None:
    """Image 0 and image 1 both have the caption 'a dog on grass': image 0's most similar
    caption of another image is that shared caption of image 1, which is no negative of
    image 0 (nor image 1 of the shared caption of image 0); a caption scoring above 0.95 x
    the positive's score is left out too."""
    text_image = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    captions = ["a dog on grass", "a brown dog", "A dog on  grass", "a dog running", "a cat", "a cat sleeping", "a car"]
    d = 4
    images = torch.eye(d)[:4]
    texts = torch.zeros(7, d)
    texts[0], texts[1] = images[0], F.normalize(images[0] + 0.2 * images[2], dim=0)
    texts[2] = F.normalize(images[0] + 0.1 * images[1], dim=0)  # image 1's copy of image 0's caption, close to image 0
    texts[3] = images[1]
    texts[4] = F.normalize(images[0] * 0.99 + 0.05 * images[2], dim=0)  # image 2's, scoring near image 0's positive
    texts[5], texts[6] = images[2], images[3]
    got = mine_lists(images, texts, text_image, _groups(captions), 2, 0.95)
    assert 2 not in got.i2t[0].tolist()  # the shared caption: a false negative
    assert 4 not in got.i2t[0].tolist()  # above 0.95 x the positive
    assert got.i2t[0].tolist() == [3, 5]  # both score 0: ties go to the lower index, as evaluation ranks
    assert 0 not in got.t2i[2].tolist() and 1 not in got.t2i[2].tolist()  # caption 2 is image 0's too
    assert 0 not in got.i2t[1].tolist()
    assert got.filtered_same_text >= 2 and got.filtered_above >= 1
    want_i2t, want_t2i = _mine_reference(images, texts, text_image.tolist(), captions, 2, 0.95)
    assert got.i2t.tolist() == want_i2t and got.t2i.tolist() == want_t2i


def _png(path, shade: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (shade, 0, 0)).save(path)


def test_hugging_face_negative_columns_are_read(tmp_path) -> None:
    """An imagefolder's metadata rows: 'negative' (one caption) and 'negative_captions'
    (a list) are negative captions, 'negative_image' a negative image relative to the
    metadata file like file_name."""
    import json

    from vlmtune.data.formats import ReadOptions, read_pairs

    for i in range(3):
        _png(tmp_path / "train" / f"{i}.png", 40 * i)
    rows = [
        {"file_name": "0.png", "caption": "a red square", "negative": "a blue square", "negative_image": "1.png"},
        {"file_name": "1.png", "caption": "a dark square", "negative_captions": ["a green square", "a circle"]},
        {"file_name": "2.png", "caption": "a black square"},
    ]
    (tmp_path / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = read_pairs(tmp_path, opts=ReadOptions(format="hf"))
    assert [r.negatives for r in recs] == [("a blue square",), ("a green square", "a circle"), ()]
    assert [tuple(p.name for p in r.negative_images) for r in recs] == [("1.png",), (), ()]
    assert recs[0].negative_images[0] == recs[1].image


def test_hugging_face_negative_image_features_are_read(tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    from vlmtune.data.formats import ReadOptions, read_pairs

    for i in range(3):
        _png(tmp_path / "img" / f"{i}.png", 40 * i)
    paths = [str(tmp_path / "img" / f"{i}.png") for i in range(3)]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "negative_images": datasets.Sequence(datasets.Image()),
        }
    )
    ds = datasets.Dataset.from_dict(
        {"image": paths, "caption": ["zero", "one", "two"], "negative_images": [[paths[1], paths[2]], [paths[0]], []]},
        features=features,
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    recs = read_pairs(tmp_path / "ds", opts=ReadOptions(format="hf", image_root=tmp_path / "img"))
    assert [[p.name for p in r.negative_images] for r in recs] == [["1.png", "2.png"], ["0.png"], []]


def test_with_several_processes_the_batch_columns_are_global(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two 'processes' of 4 rows each, without extra columns: the mean of their losses is
    the one-process InfoNCE of all 8 rows, value and gradient (DDP's averaging); with
    extra columns each process's own join its rows' columns (the plain loop's value)."""
    import vlmtune.losses.negatives as neg
    from vlmtune.losses import contrastive_loss

    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(8, 6, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    text = F.normalize(torch.randn(8, 6, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])
    scale = torch.tensor(10.0, dtype=torch.float64)
    full = contrastive_loss(image, text, ids, scale)
    want = torch.autograd.grad(full, (image, text))
    halves = [slice(0, 4), slice(4, 8)]
    monkeypatch.setattr(neg, "rank_world", lambda: (0, 2))
    empty, none = torch.zeros(0, 6, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    parts = []
    for h in halves:
        li, lt, lids = image[h], text[h], ids[h]
        gathered = {id(li): image, id(lt): text}
        monkeypatch.setattr(neg, "all_gather_with_grad", lambda x, gathered=gathered: gathered[id(x)])
        monkeypatch.setattr(neg, "all_gather", lambda x: ids)
        parts.append(neg.contrastive_loss_with_negatives(li, lt, lids, scale, empty, none, empty, none))
        extra_t, extra_v = _unit(3, 6, seed=20), _unit(2, 6, seed=21)
        got = neg.contrastive_loss_with_negatives(
            li, lt, lids, scale, extra_t, torch.tensor([-1, 4, -1]), extra_v, -torch.ones(2)
        )
        # The plain loop: this process's rows against the global batch's columns plus its extras.
        cols_t, ids_t = torch.cat([text, extra_t]).detach(), ids.tolist() + [-1, 4, -1]
        cols_v, ids_v = torch.cat([image, extra_v]).detach(), ids.tolist() + [-1, -1]
        want_h = (_side_loop(li.detach(), lids, cols_t, ids_t, 10.0) + _side_loop(lt.detach(), lids, cols_v, ids_v, 10.0)) / 2
        assert got.item() == pytest.approx(want_h, rel=1e-10)
    shared = sum(parts) / 2
    got_grad = torch.autograd.grad(shared, (image, text))
    assert shared.item() == pytest.approx(full.item(), rel=1e-10)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(got_grad, want))


def test_a_short_query_is_searched_only_so_deep(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every candidate scores above 0.5 x the positive (as with an untrained model): a
    query's search stops at MAX_DEPTH candidates, not the whole gallery; the queries
    keep nothing and are counted short, and each met MAX_DEPTH - 1 filtered candidates
    (its positive is not a false negative)."""
    import vlmtune.tasks.retrieval.negatives as negatives

    monkeypatch.setattr(negatives, "MAX_DEPTH", 20)
    n = 40
    images = F.normalize(torch.ones(n, 4) + 1e-3 * _unit(n, 4, seed=30).float(), dim=1)
    got = negatives.mine_lists(images, images.clone(), torch.arange(n), torch.arange(n), 2, 0.5)
    assert (got.i2t == -1).all() and (got.t2i == -1).all()
    assert got.short_queries == 2 * n
    assert got.filtered_above == 2 * n * 19 and got.filtered_same_text == 0
