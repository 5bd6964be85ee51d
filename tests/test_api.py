"""The public API (vlmtune.load) and the embed / index / search commands, on a tiny trained run.

Embeddings are checked against the evaluation path itself (the evaluation loader and
RetrievalModel.encode_image / encode_text, as ``vlmtune evaluate`` runs them), and
search's top-5 hit rate against the R@5 that ``vlmtune evaluate`` reports.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vlmtune
from conftest import CONFIGS
from vlmtune.cli import main
from vlmtune.errors import VlmtuneError

SINGLE = str(CONFIGS / "retrieval_single_stage.yaml")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, scenes: Path) -> Path:
    """A tiny retrieval run (one epoch) and its best checkpoint."""
    out = tmp_path_factory.mktemp("api") / "run"
    assert (
        main(
            [
                "train",
                SINGLE,
                "--output-dir",
                str(out),
                f"data.synthetic_dir={scenes}",
                "data.synthetic.n=40",
                "train.epochs=1",
                "train.batch_size=8",
                "train.progress=false",
                "eval.batch_size=16",
            ]
        )
        == 0
    )
    return out / "checkpoints" / "best"


@pytest.fixture(scope="module")
def model(ckpt: Path) -> vlmtune.Model:
    return vlmtune.load(ckpt)


@pytest.fixture(scope="module")
def counting_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A counting checkpoint written the way training writes one (untrained head: the
    API only has to serve it, not be good at it)."""
    from vlmtune.backbone import load_backbone
    from vlmtune.checkpoint import backbone_identity, save_checkpoint
    from vlmtune.config import load_config
    from vlmtune.state import TrainState
    from vlmtune.tasks import build_task

    cfg = load_config(
        str(CONFIGS / "receipts_three_stage.yaml"),
        ["counting.max_dynamic_patch=2", "generation.max_new_tokens=6", "generation.num_beams=2"],
    )
    backbone = load_backbone(cfg.backbone)
    m = build_task(cfg).build_model(backbone)
    weights = {k: v for k, v in m.state_dict().items() if not k.startswith("backbone.")}
    folder = tmp_path_factory.mktemp("counting") / "ckpt"
    save_checkpoint(
        folder,
        weights=weights,
        cfg=cfg,
        state=TrainState(backbone=backbone_identity(backbone)),
        trainer_state=None,
        backbone=backbone,
    )
    return folder


@pytest.fixture(scope="module")
def evaluated(model: vlmtune.Model, scenes: Path):
    """What evaluation computes for the test split: its loader and its embedding pass."""
    from vlmtune.tasks.retrieval import embed_outputs

    records = model.task.read_split(str(scenes / "test.json"))
    loader = model.task.make_loader(records, model.model.backbone, train=False)
    return records, embed_outputs(model.model, loader, torch.arange(len(records)), model.device, False)


# --------------------------------------------------------------------------- the API


def test_import_vlmtune_does_not_import_torch() -> None:
    code = (
        "import sys, vlmtune; assert 'torch' not in sys.modules, 'torch imported'; "
        "assert callable(vlmtune.load) and 'torch' in sys.modules; print(vlmtune.Model.__name__)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "Model"


def test_embeddings_equal_what_evaluation_computes(model: vlmtune.Model, evaluated, tmp_path: Path) -> None:
    records, out = evaluated
    paths = list(dict.fromkeys(r.image for r in records))  # image ids are in order of first appearance
    # Paths and PIL images (an RGBA copy of one, which loading converts as load_image does).
    rgba = Image.open(paths[1]).convert("RGBA")
    img = model.embed_images([paths[0], rgba, *[str(p) for p in paths[2:]]])
    want = torch.stack([out.images[i] for i in range(len(paths))])
    assert img.dtype == torch.float32 and img.shape == (len(paths), model.dim)
    torch.testing.assert_close(img, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(len(paths)))
    txt = model.embed_texts([r.text for r in records])
    torch.testing.assert_close(txt, out.cat("text"), atol=1e-5, rtol=1e-5)
    assert model.embed_images(paths[0]).shape == (1, model.dim)
    assert model.embed_texts([]).shape == (0, model.dim)

    # similarity: cosine x the learnt scale
    sim = model.similarity(img, txt)
    scale = float(
        model.model.log_scale.detach().exp().clamp(1 / model.cfg.model.temperature_max, 1 / model.cfg.model.temperature_min)
    )
    torch.testing.assert_close(sim, (img @ txt.T) * scale)

    # The frozen-feature cache gives the same embeddings, and a second call skips the towers.
    cached = vlmtune.load(model.folder, cache_dir=tmp_path / "cache")
    torch.testing.assert_close(cached.embed_images([str(p) for p in paths]), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached.embed_texts([r.text for r in records]), out.cat("text"), atol=1e-5, rtol=1e-5)
    assert len(list((tmp_path / "cache").glob("*/features.npy"))) == 2  # vision and text stores

    def no_tower(*a, **k):
        raise AssertionError("the tower ran although its features are cached")

    cached.model.backbone.vision_tokens = no_tower
    cached.model.backbone.text_tokens = no_tower
    torch.testing.assert_close(cached.embed_images([str(p) for p in paths]), want, atol=1e-5, rtol=1e-5)
    cached.embed_texts([records[0].text])


def test_ground_gives_evaluations_box_in_pixels(model: vlmtune.Model, evaluated) -> None:
    records, out = evaluated
    boxed = [r for r in records if r.bbox is not None]
    assert boxed
    pred = out.cat("box_pred")  # xyxy in pixels, in record order of the boxed records
    for r, want in list(zip(boxed, pred))[:4]:
        g = model.ground(r.image, r.text)
        assert g.box == pytest.approx(want.tolist(), abs=1e-3)
        assert 0.0 <= g.score <= 1.0
        x0, y0, x1, y1 = g.box
        assert g.box_xywh == pytest.approx((x0, y0, x1 - x0, y1 - y0))
    several = model.ground(boxed[0].image, [boxed[0].text, boxed[1].text])
    assert len(several) == 2 and several[0].box == pytest.approx(model.ground(boxed[0].image, boxed[0].text).box, abs=1e-4)


def test_methods_the_task_cannot_serve_are_clear_errors(
    model: vlmtune.Model, counting_ckpt: Path, scenes: Path, tmp_path: Path, capsys
) -> None:
    with pytest.raises(VlmtuneError, match=r"'retrieval' checkpoint cannot ask\(\)"):
        model.ask(next((scenes / "images").iterdir()), "How many?")
    counter = vlmtune.load(counting_ckpt)
    for call in (
        lambda: counter.embed_images(["x.png"]),
        lambda: counter.embed_texts(["a"]),
        lambda: counter.ground("x.png", "a"),
        lambda: counter.similarity(torch.zeros(1, 4), torch.zeros(1, 4)),
    ):
        with pytest.raises(VlmtuneError, match=r"'counting' checkpoint cannot (embed_images|embed_texts|ground|similarity)\(\)"):
            call()
    # The CLI turns it into one line and exit 2.
    assert main(["embed", str(counting_ckpt), "--images", str(scenes / "images"), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot embed_images()" in err[0] and not (tmp_path / "e").exists()


def test_ask_answers_like_predict(counting_ckpt: Path, tmp_path: Path) -> None:
    from vlmtune.predict import load_counting_checkpoint, predict_image

    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (96, 64, 3), dtype=np.uint8)).save(path)
    m = vlmtune.load(counting_ckpt)
    got = m.ask(path, "How many receipts are in this image?")
    ref_model, cfg = load_counting_checkpoint(counting_ckpt)
    want = predict_image(ref_model, cfg, Image.open(path).convert("RGB"), "How many receipts are in this image?")
    assert got.answer == want.answer and got.count == want.count
    assert got.probabilities == pytest.approx(want.probabilities, abs=1e-5)
    assert sum(got.probabilities) == pytest.approx(1.0, abs=1e-4)


# --------------------------------------------------------------------------- embed


def _folder_of_images(scenes: Path, root: Path) -> list[Path]:
    """Five scene images, some nested, plus files that are not (all) images."""
    src = sorted((scenes / "images").iterdir())
    (root / "sub" / "deeper").mkdir(parents=True)
    dests = [root / "a.png", root / "b.png", root / "sub" / "c.png", root / "sub" / "deeper" / "d.png", root / "sub" / "e.PNG"]
    for s, d in zip(src, dests):
        shutil.copy(s, d)
    (root / "notes.txt").write_text("not an image")
    (root / "broken.png").write_bytes(b"this is not a png")
    data = src[5].read_bytes()
    (root / "sub" / "truncated.png").write_bytes(data[: len(data) // 2])
    return dests


def _items(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]


def test_embed_a_folder_reports_unreadable_files_and_resumes(model: vlmtune.Model, scenes: Path, tmp_path: Path, capsys) -> None:
    root = tmp_path / "photos"
    dests = _folder_of_images(scenes, root)
    before = sorted(p for p in root.rglob("*"))
    out = tmp_path / "emb"
    texts = tmp_path / "texts.txt"
    texts.write_text("a red circle\n\na blue square left of a star\n")
    assert (
        main(["embed", str(model.folder), "--images", str(root), "--texts", str(texts), "--out", str(out), "--no-progress"]) == 0
    )
    cap = capsys.readouterr()
    assert "embedded 5 images" in cap.out and "2 unreadable" in cap.out and "2 new texts" in cap.out
    assert "broken.png" in cap.err and "truncated.png" in cap.err and "notes.txt" not in cap.err
    assert sorted(p for p in root.rglob("*")) == before  # nothing written beside the images
    assert sorted(p.name for p in out.iterdir()) == [".vlmtune.lock", "embed.json", "embeddings.safetensors", "items.jsonl"]
    items = _items(out)
    imgs = [r for r in items if r["kind"] == "image"]
    assert [Path(r["path"]) for r in imgs] == sorted(p.resolve() for p in dests)
    assert [r["text"] for r in items if r["kind"] == "text"] == ["a red circle", "a blue square left of a star"]
    t = load_file(str(out / "embeddings.safetensors"))
    torch.testing.assert_close(t["images"], model.embed_images([r["path"] for r in imgs]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        t["texts"], model.embed_texts(["a red circle", "a blue square left of a star"]), atol=1e-5, rtol=1e-5
    )
    meta = json.loads((out / "embed.json").read_text())
    assert {Path(u["path"]).name for u in meta["unreadable"]} == {"broken.png", "truncated.png"}

    # Grown folder, one file changed, one removed: only the new and the changed are embedded.
    shutil.copy(sorted((scenes / "images").iterdir())[7], root / "sub" / "new.png")
    changed = root / "b.png"
    shutil.copy(sorted((scenes / "images").iterdir())[9], changed)
    os.utime(changed, ns=(1, 1))  # a different mtime for sure
    (root / "sub" / "deeper" / "d.png").unlink()
    assert (
        main(["embed", str(model.folder), "--images", str(root), "--texts", str(texts), "--out", str(out), "--no-progress"]) == 0
    )
    cap = capsys.readouterr()
    assert "embedded 2 images (3 kept from before, 1 changed, 1 removed" in cap.out and "0 new texts" in cap.out
    items2 = _items(out)
    imgs2 = [r for r in items2 if r["kind"] == "image"]
    paths2 = [Path(r["path"]).name for r in imgs2]
    assert paths2 == ["a.png", "b.png", "c.png", "e.PNG", "new.png"]  # kept order, new appended
    t2 = load_file(str(out / "embeddings.safetensors"))
    torch.testing.assert_close(t2["images"], model.embed_images([r["path"] for r in imgs2]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(t2["images"][1], t["images"][1])  # b.png was re-embedded
    torch.testing.assert_close(t2["images"][0], t["images"][0])  # a.png kept as it was


def test_embed_interrupted_keeps_what_it_saved(
    model: vlmtune.Model, scenes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vlmtune.search as vs

    root = tmp_path / "photos"
    root.mkdir()
    for p in sorted((scenes / "images").iterdir())[:6]:
        shutil.copy(p, root / p.name)
    monkeypatch.setattr(model, "batch_size", 2)
    monkeypatch.setattr(vs, "FLUSH_EVERY", 2)
    real = model.embed_images
    calls = {"n": 0}

    def dies_on_third_batch(images, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(images, **kw)

    monkeypatch.setattr(model, "embed_images", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        vs.embed(model.folder, tmp_path / "emb", images=root, progress=False, model=model)
    assert len(load_file(str(tmp_path / "emb" / "embeddings.safetensors"))["images"]) == 4  # two batches saved
    monkeypatch.setattr(model, "embed_images", real)
    r = vs.embed(model.folder, tmp_path / "emb", images=root, progress=False, model=model)
    assert (r["embedded_images"], r["kept_images"], r["images"], r["complete"]) == (2, 4, 6, True)
    t = load_file(str(tmp_path / "emb" / "embeddings.safetensors"))["images"]
    paths = [x["path"] for x in _items(tmp_path / "emb") if x["kind"] == "image"]
    assert paths == sorted(str(p.resolve()) for p in root.iterdir())
    torch.testing.assert_close(t, model.embed_images(paths), atol=1e-5, rtol=1e-5)


def test_embed_refuses_what_it_cannot_do(model: vlmtune.Model, tmp_path: Path, scenes: Path, capsys) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"nope")
    (bad / "y.png").write_bytes(b"")
    assert main(["embed", str(model.folder), "--images", str(bad), "--out", str(tmp_path / "o1"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "none of the 2 image files could be read" in err and not (tmp_path / "o1" / "items.jsonl").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("x")
    assert main(["embed", str(model.folder), "--images", str(empty), "--out", str(tmp_path / "o2")]) == 2
    assert "holds no image files" in capsys.readouterr().err
    # An --out that holds something else is not written into.
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["embed", str(model.folder), "--images", str(scenes / "images"), "--out", str(other)]) == 2
    assert "not an embed folder" in capsys.readouterr().err and sorted(os.listdir(other)) == ["keep.txt"]


# --------------------------------------------------------------------------- index and search


def _other_checkpoint(ckpt: Path, dest: Path) -> Path:
    """The same run's checkpoint with one weight changed (another model)."""
    from vlmtune.checkpoint import open_checkpoint, save_checkpoint

    c = open_checkpoint(ckpt)
    w = c.weights()
    name = next(k for k in w if k.startswith("text_projector"))
    w[name] = w[name] + 0.01
    save_checkpoint(
        dest / "ckpt",
        weights=w,
        cfg=c.cfg,
        state=c.state,
        trainer_state=None,
        backbone=None,
        extra_files=lambda folder: shutil.copytree(ckpt / "backbone", folder / "backbone"),
    )
    return dest / "ckpt"


def test_search_top5_hit_rate_equals_evaluated_r5(model: vlmtune.Model, ckpt: Path, scenes: Path, tmp_path: Path, capsys) -> None:
    data = scenes / "train.json"  # the largest split: R@5 is not trivially 100 there
    emb, idx = tmp_path / "emb", tmp_path / "idx"
    assert main(["embed", str(ckpt), "--data", str(data), "--out", str(emb), "--no-progress"]) == 0
    assert main(["index", str(emb), "--out", str(idx)]) == 0
    items = _items(emb)
    images = {r["id"]: r["path"] for r in items if r["kind"] == "image"}
    captions = [r for r in items if r["kind"] == "text"]
    records = model.task.read_split(str(data))
    assert [c["text"] for c in captions] == [r.text for r in records]
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"text": c["text"], "id": c["id"]}) + "\n" for c in captions))
    res = tmp_path / "res.jsonl"
    assert main(["search", str(idx), "--queries", str(queries), "-k", "5", "--out", str(res)]) == 0
    lines = [json.loads(x) for x in res.read_text().splitlines()]
    assert len(lines) == len(captions)
    hits = sum(images[c["image"]] in [r["path"] for r in line["results"]] for c, line in zip(captions, lines))
    assert all(len(line["results"]) == 5 and line["query"]["id"] == c["id"] for c, line in zip(captions, lines))

    capsys.readouterr()
    assert main(["evaluate", str(ckpt), "--data", str(data), "--output-dir", str(tmp_path / "ev")]) == 0
    r5 = json.loads((tmp_path / "ev" / "metrics.json").read_text())["retrieval/t2i_r5"]
    assert 100.0 * hits / len(captions) == pytest.approx(r5, abs=1e-9)
    assert r5 < 100.0  # a real test: some captions miss

    # --rerank ranks as evaluation's re-rank does: the same hit rate as retrieval_metrics
    # with the matching head re-scoring the top 8.
    from vlmtune.metrics.retrieval import retrieval_metrics
    from vlmtune.search import Index, search

    t = load_file(str(emb / "embeddings.safetensors"))
    t2i = torch.tensor([c["image"] for c in captions])

    def rerank_fn(img_idx, txt_idx):
        return model.match_scores(t["images"][img_idx], t["texts"][txt_idx])

    want = retrieval_metrics(t["images"], t["texts"], t2i, ks=(5,), rerank=rerank_fn, rerank_k=8)["retrieval/t2i_r5"]
    reranked = search(Index(idx), model, [{"text": c["text"]} for c in captions], k=5, rerank=True, rerank_k=8)
    hits = sum(images[c["image"]] in [r["path"] for r in line["results"]] for c, line in zip(captions, reranked))
    assert 100.0 * hits / len(captions) == pytest.approx(want, abs=1e-9)

    # One query: a table, JSON, the same order as the batch run; an image query of a text gallery.
    capsys.readouterr()
    assert main(["search", str(idx), "--text", captions[0]["text"], "-k", "3"]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].split() == ["rank", "score", "item"] and len(table) == 4
    assert table[1].split()[2] == lines[0]["results"][0]["path"]
    assert main(["search", str(idx), "--text", captions[0]["text"], "-k", "3", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["results"] == lines[0]["results"][:3]

    # --rerank: the top k re-ordered by the matching head, scores carried along.
    assert main(["search", str(idx), "--text", captions[0]["text"], "-k", "5", "--rerank", "--json"]) == 0
    rr = json.loads(capsys.readouterr().out)["results"]
    assert sorted(r["path"] for r in rr) == sorted(r["path"] for r in lines[0]["results"])
    assert [r["match"] for r in rr] == sorted((r["match"] for r in rr), reverse=True)
    gallery = load_file(str(idx / "gallery.safetensors"))["gallery"]
    q = model.embed_texts([captions[0]["text"]])
    want = model.match_scores(gallery[[r["id"] for r in rr]], q.expand(len(rr), -1))
    assert [r["match"] for r in rr] == pytest.approx(want.tolist(), abs=1e-5)

    # A text gallery searched by image.
    tidx = tmp_path / "tidx"
    assert main(["index", str(emb), "--out", str(tidx), "--kind", "texts"]) == 0
    capsys.readouterr()
    assert main(["search", str(tidx), "--image", images[0], "-k", "4", "--rerank", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["results"]) == 4 and all("text" in r for r in out["results"])

    # A query model other than the one that built the index is refused.
    other = _other_checkpoint(ckpt, tmp_path / "other")
    assert main(["search", str(idx), "--text", "a red circle", "--checkpoint", str(other)]) == 2
    assert "is not the model that built" in capsys.readouterr().err
    assert main(["embed", str(other), "--data", str(data), "--out", str(emb), "--no-progress"]) == 2
    assert "another checkpoint" in capsys.readouterr().err


def test_faiss_indexes_report_recall_against_exact(tmp_path: Path, capsys) -> None:
    pytest.importorskip("faiss")
    from vlmtune.search import Index, exact_topk

    # An embed folder of clustered random vectors (what index reads), big enough for IVF.
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(50, 32, generator=g)
    images = torch.nn.functional.normalize(centres[torch.arange(4000) % 50] + 0.3 * torch.randn(4000, 32, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(centres[torch.arange(300) % 50] + 0.3 * torch.randn(300, 32, generator=g), dim=-1)
    emb = tmp_path / "emb"
    emb.mkdir()
    from safetensors.torch import save_file

    save_file({"images": images, "texts": texts}, str(emb / "embeddings.safetensors"))
    rows = [{"id": i, "kind": "image", "path": f"img{i}.jpg"} for i in range(4000)]
    rows += [{"id": i, "kind": "text", "text": f"t{i}"} for i in range(300)]
    (emb / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (emb / "embed.json").write_text(json.dumps({"checkpoint": "x", "fingerprint": "f", "dim": 32}))
    for kind, extra in (("ivf", ["--nprobe", "2"]), ("hnsw", ["--ef-search", "16", "--hnsw-m", "8"])):
        out = tmp_path / kind
        assert main(["index", str(emb), "--out", str(out), "--faiss", kind, *extra]) == 0
        printed = capsys.readouterr().out
        info = json.loads((out / "index.json").read_text())
        assert f"recall@10 against exact search: {info['recall_at_10']:.2f}%" in printed
        assert info["recall_queries"] == {"count": 300, "from": "texts"}
        # The reported figure is what the stored index gives on those queries.
        index = Index(out)
        _, approx = index.topk(texts, 10)
        _, exact = exact_topk(texts, images, 10)
        recall = 100.0 * sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact)) / 3000
        assert info["recall_at_10"] == pytest.approx(recall)
        assert 0.0 < recall <= 100.0
        _, exact_again = index.topk(texts, 10, exact=True)
        assert torch.equal(exact_again, exact)


def test_exact_topk_matches_a_full_sort() -> None:
    from vlmtune.search import exact_topk

    g = torch.Generator().manual_seed(1)
    gallery = torch.nn.functional.normalize(torch.randn(5000, 16, generator=g), dim=-1)
    gallery[100] = gallery[7]  # a tie: the lower row ranks first
    q = torch.cat([gallery[7:8], torch.randn(40, 16, generator=g)])
    s, i = exact_topk(q, gallery, 10, block=1 << 12)  # several key blocks
    full = (q @ gallery.T).argsort(dim=1, descending=True, stable=True)[:, :10]
    assert torch.equal(i, full)
    assert i[0, :2].tolist() == [7, 100]


@pytest.fixture(scope="module")
def image_index(model: vlmtune.Model, scenes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exact index of the scenes' images (test split's folder holds all of them)."""
    root = tmp_path_factory.mktemp("idx")
    photos = root / "photos"
    photos.mkdir()
    for p in sorted((scenes / "images").iterdir())[:6]:
        shutil.copy(p, photos / p.name)
    assert main(["embed", str(model.folder), "--images", str(photos), "--out", str(root / "emb"), "--no-progress"]) == 0
    assert main(["index", str(root / "emb"), "--out", str(root / "idx")]) == 0
    return root / "idx"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--text", ""], "the query is empty"),
        (["--text", "x", "-k", "0"], "argument -k: must be between 1 and"),
        (["--text", "x", "--image", "y.png"], "exactly one of --text, --image or --queries"),
        (["--image", "missing.png"], "missing.png: file not found"),
        (["--image", "IMG", "--rerank"], "--rerank: the matching head scores image-text pairs"),
        (["--queries", "LATIN1"], "not UTF-8"),
        (["--queries", "BOTH"], "query 1: needs exactly one of 'text' or 'image'"),
    ],
)
def test_search_bad_input_is_one_line(image_index: Path, scenes: Path, tmp_path: Path, capsys, args, message) -> None:
    idx = image_index
    capsys.readouterr()
    (tmp_path / "q.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "q.jsonl").write_text(json.dumps({"text": "a", "image": "b.png"}) + "\n")
    named = {
        "IMG": str(next((scenes / "images").iterdir())),
        "LATIN1": str(tmp_path / "q.txt"),
        "BOTH": str(tmp_path / "q.jsonl"),
    }
    args = [named.get(a, a) for a in args]
    assert main(["search", str(idx), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def _fake_embed_folder(folder: Path, n_img: int = 3, n_txt: int = 2) -> Path:
    from safetensors.torch import save_file

    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file(
        {"images": torch.randn(n_img, 8, generator=g), "texts": torch.randn(n_txt, 8, generator=g)},
        str(folder / "embeddings.safetensors"),
    )
    rows = [{"id": i, "kind": "image", "path": f"i{i}.png"} for i in range(n_img)]
    rows += [{"id": i, "kind": "text", "text": f"t{i}"} for i in range(n_txt)]
    (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "embed.json").write_text(json.dumps({"checkpoint": "c", "fingerprint": "f"}))
    return folder


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda f: (f / "embed.json").unlink(), "embed.json is missing"),
        (lambda f: (f / "embed.json").write_text("{"), "embed.json: not valid JSON"),
        (lambda f: (f / "embeddings.safetensors").write_bytes(b"garbage"), "embeddings.safetensors: cannot read"),
        (lambda f: (f / "items.jsonl").write_text('{"id": 5, "kind": "image", "path": "x"}\n'), "do not number the 3 rows"),
        (lambda f: (f / "items.jsonl").write_text("not json\n"), "items.jsonl: line 1: not valid JSON"),
    ],
)
def test_index_refuses_a_bad_embed_folder(tmp_path: Path, capsys, spoil, message) -> None:
    folder = _fake_embed_folder(tmp_path / "emb")
    spoil(folder)
    assert main(["index", str(folder), "--out", str(tmp_path / "idx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not (tmp_path / "idx").exists()


def test_index_writes_only_a_new_folder(tmp_path: Path, capsys) -> None:
    folder = _fake_embed_folder(tmp_path / "emb")
    (tmp_path / "file").write_text("x")
    assert main(["index", str(folder), "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["index", str(folder), "--out", str(folder)]) == 2  # never into the embed folder
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["index", str(folder), "--out", str(tmp_path / "idx"), "--kind", "texts"]) == 0
    info = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert info["count"] == 2 and info["kind"] == "texts" and info["search"] == "exact"
    g = load_file(str(tmp_path / "idx" / "gallery.safetensors"))["gallery"]
    torch.testing.assert_close(g.norm(dim=1), torch.ones(2))


def test_bench_search_section(tmp_path: Path) -> None:
    assert main(["bench", "--out", str(tmp_path / "b"), "--sections", "search", "--search-size", "3000"]) == 0
    r = json.loads((tmp_path / "b" / "bench.json").read_text())["search"]
    assert r["n"] == 3000 and r["dim"] == 256 and r["threads"] >= 1 and 0 < r["median_ms"] <= r["p95_ms"]
    assert "Exact search" in (tmp_path / "b" / "bench.md").read_text()
    assert sorted(os.listdir(tmp_path / "b")) == ["bench.json", "bench.md"]
