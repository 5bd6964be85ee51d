"""The counting recipe's vision cache: while the vision tower is frozen, the tiles' tower
states come from the feature cache (one row per tile) instead of decoding, tiling and
the tower; losses, validation and whole runs equal the live path; an edited image gets
new rows, a corrupt row is rebuilt, a killed run resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CONFIGS, ROOT
from vlmtune.cli import main

RECIPE = str(CONFIGS / "receipts_three_stage.yaml")
BOTH = frozenset({"lm", "count"})


@pytest.fixture(scope="module")
def receipts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twelve receipts images of 64x96 (tiled 2x1 + thumbnail with 4 tiles at most)."""
    from vlmtune.data.receipts import generate_receipts

    folder = tmp_path_factory.mktemp("count_cache_data")
    generate_receipts(folder, n=12, seed=5, max_count=3, image_size=(64, 96))
    return folder


@pytest.fixture(scope="module")
def task_model():
    from vlmtune.backbone import load_backbone
    from vlmtune.config import load_config
    from vlmtune.tasks.counting import CountingTask

    cfg = load_config(
        RECIPE,
        [
            "model.adapter_dropout=0",
            "counting.max_dynamic_patch=4",
            "train.batch_size=4",
            "eval.batch_size=8",
            "generation.val_do_sample=false",
            "generation.val_num_images=3",
        ],
    )
    task = CountingTask.from_config(cfg)
    return task, task.build_model(load_backbone(cfg.backbone))


def _records(task, folder: Path) -> list:
    return task.read_split(str(folder / "train.jsonl")) + task.read_split(str(folder / "val.jsonl"))


def _cache(folder: Path, start: int | None = None):
    """A FeatureCache for the stage: vision states only; ``start`` the split point of a
    stage that trains the blocks above it (what the engine's cache carries as vision_start)."""
    from vlmtune.tasks import FeatureCache

    if start is None:
        return FeatureCache(folder, vision=True, text=True)  # text is the engine's default: counting ignores it
    return types.SimpleNamespace(dir=folder, vision=True, text=False, vision_start=start)


def _no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    import vlmtune.data.counting as data_counting

    def refuse(*a, **k):
        raise AssertionError("a cached batch decoded an image")

    monkeypatch.setattr(data_counting, "load_image", refuse)


@pytest.mark.parametrize("start", [None, 1], ids=["tower-output", "prefix-below-last-block"])
def test_cached_batches_give_the_same_losses_and_gradients(
    start, task_model, receipts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task, model = task_model
    recs = _records(task, receipts)
    live = list(task.make_loader(recs, model.backbone, train=True, seed=0))
    cached_loader = task.make_loader(recs, model.backbone, train=True, seed=0, cache=_cache(tmp_path / "c", start))
    _no_decoding(monkeypatch)
    cached = list(cached_loader)
    assert len(live) == len(cached) > 1
    trained = [model.backbone.mm_projector] + ([] if start is None else [model.backbone.vision_blocks[-1]])
    params = [p for m in trained for p in m.parameters()]
    for p in params:  # as the stage trains them
        p.requires_grad_(True)
    try:
        tiles = _compare(model, live, cached, params, start)
    finally:
        for p in params:
            p.requires_grad_(False)
    assert tiles > 2 * len(recs) - 4  # the images are tiled: more states than images


def _compare(model, live: list, cached: list, params: list, start: int | None) -> int:
    tiles = 0
    for a, b in zip(live, cached):
        assert "pixel_values" in a and "pixel_values" not in b
        assert ("vision_tokens" if start is None else "vision_hidden") in b
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["num_tiles"], b["num_tiles"])
        assert torch.equal(a["input_ids"], b["input_ids"])
        tiles += int(b["num_tiles"].sum())
        grads = []
        for batch in (a, b):
            terms = model(batch, BOTH)
            grads.append(torch.autograd.grad(terms["lm"] + terms["count"], params))
            grads[-1] = (terms, grads[-1])
        (ta, ga), (tb, gb) = grads
        for k in BOTH:
            assert tb[k].item() == pytest.approx(ta[k].item(), rel=1e-5, abs=1e-6), k
        for x, y in zip(ga, gb):  # the projector (and the block above the split) still train
            assert torch.allclose(x, y, rtol=1e-4, atol=1e-6)
    return tiles


def test_cached_validation_equals_live(task_model, receipts: Path, tmp_path: Path) -> None:
    """Head metrics, perplexity and the generated answers of validation read the cache too."""
    task, model = task_model
    recs = _records(task, receipts)
    cpu = torch.device("cpu")
    live = task.validate(model, recs, device=cpu)
    cached = task.validate(model, recs, device=cpu, cache=_cache(tmp_path / "c"))
    assert cached["answer/n_generated"] == live["answer/n_generated"] == 3
    assert cached["answer/examples"] == live["answer/examples"]
    for k, v in live.items():
        if isinstance(v, float):
            assert cached[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
        else:
            assert cached[k] == v, k


def test_tile_count_from_the_header_matches_the_processor(task_model, tmp_path: Path) -> None:
    """Every aspect ratio and an EXIF-rotated JPEG: the cache's tile count (no decoding) is
    the processor's, and the cached states of each tile are the live tower's."""
    from PIL import Image

    from vlmtune.backbone import preprocess_images
    from vlmtune.data.formats import CountRecord, load_image
    from vlmtune.tasks.counting import build_vision_cache

    task, model = task_model
    sizes = [(64, 64), (200, 40), (40, 200), (96, 64), (300, 90), (17, 23)]
    records = []
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (10 * i, 90, 200)).save(tmp_path / f"{i}.png")
        records.append(CountRecord(image=str(tmp_path / f"{i}.png"), count=1, question="How many?", answer="one", source="t"))
    img = Image.new("RGB", (180, 60), (200, 40, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    records.append(CountRecord(image=str(tmp_path / "rot.jpg"), count=1, question="How many?", answer="one", source="t"))
    for max_tiles in (1, 4, 6):
        cached = build_vision_cache(records, model.backbone, tmp_path / "cache", max_tiles=max_tiles)
        for r in records:
            pv, n = preprocess_images(model.backbone.image_processor, [load_image(r.image)], max_tiles)
            assert cached.tiles[r.image] == int(n[0]), (r.image, max_tiles)
            with torch.no_grad():
                live = model.backbone.vision_tokens(pv)
            assert torch.allclose(cached.states(r.image), live, atol=1e-5)
    assert {cached.tiles[r.image] for r in records} != {1}


def test_edited_image_gets_new_rows(task_model, tmp_path: Path) -> None:
    from PIL import Image

    from vlmtune.backbone import preprocess_images
    from vlmtune.data.formats import CountRecord, load_image
    from vlmtune.tasks.counting import build_vision_cache

    task, model = task_model
    path = tmp_path / "a.png"
    Image.new("RGB", (96, 64), (30, 30, 30)).save(path)
    recs = [CountRecord(image=str(path), count=1, question="How many?", answer="one", source="t")]
    first = build_vision_cache(recs, model.backbone, tmp_path / "cache", max_tiles=4)
    old_key, old_rows = first.keys[str(path)], len(first.store)
    Image.new("RGB", (64, 160), (220, 220, 220)).save(path)  # same name, other pixels and shape
    os.utime(path, ns=(1, 1))
    second = build_vision_cache(recs, model.backbone, tmp_path / "cache", max_tiles=4)
    assert second.keys[str(path)] != old_key
    assert len(second.store) == old_rows + second.tiles[str(path)]  # new rows; the old ones stay for their content
    pv, _ = preprocess_images(model.backbone.image_processor, [load_image(path)], 4)
    with torch.no_grad():
        assert torch.allclose(second.states(str(path)), model.backbone.vision_tokens(pv), atol=1e-5)


def test_corrupt_row_is_rebuilt(task_model, receipts: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import vlmtune.data.cache as cache_mod
    from vlmtune.tasks.counting import build_vision_cache

    task, model = task_model
    recs = task.read_split(str(receipts / "val.jsonl"))
    good = build_vision_cache(recs, model.backbone, tmp_path / "cache", max_tiles=4)
    want = {r.image: good.states(r.image).clone() for r in recs}
    data = np.load(good.store.dir / "features.npy", mmap_mode="r+")
    data[1] = 0.0  # one tile's row zeroed on disk
    data.flush()
    del data
    cache_mod._VERIFIED.clear()  # a new process: nothing checked yet
    with caplog.at_level("WARNING", logger="vlmtune"):
        again = build_vision_cache(recs, model.backbone, tmp_path / "cache", max_tiles=4)
    assert any("do not match their sha256" in r.getMessage() and "will be rebuilt" in r.getMessage() for r in caplog.records)
    for r in recs:
        assert torch.allclose(again.states(r.image), want[r.image], atol=1e-6)


def test_namespace_follows_tiling_weights_and_split(task_model) -> None:
    from vlmtune.tasks.counting import vision_namespace

    task, model = task_model
    bb = model.backbone
    base = vision_namespace(bb, max_tiles=4, start=None, dtype="float32")
    assert vision_namespace(bb, max_tiles=6, start=None, dtype="float32") != base
    assert vision_namespace(bb, max_tiles=4, start=None, dtype="float16") != base
    split = vision_namespace(bb, max_tiles=4, start=1, dtype="float32")
    assert split != base and split["start"] == 1
    with torch.no_grad():
        bb.vision_blocks[-1].mlp.fc1.weight.add_(1.0)  # a stage trained the last block
    try:
        assert vision_namespace(bb, max_tiles=4, start=None, dtype="float32")["weights"] != base["weights"]
        assert vision_namespace(bb, max_tiles=4, start=1, dtype="float32") == split  # the prefix below it is unchanged
    finally:
        with torch.no_grad():
            bb.vision_blocks[-1].mlp.fc1.weight.sub_(1.0)


# --------------------------------------------------------------------------- whole runs


def _fast(data: Path) -> list[str]:
    """Four epochs: stage 1 (frozen tower, cached) for two, then stages 2 and 3 one each."""
    return [
        f"data.synthetic_dir={data}",
        "data.synthetic.n=12",
        "train.epochs=4",
        "stages.1.start_epoch=2",
        "stages.2.start_epoch=3",
        "train.batch_size=4",
        "train.progress=false",
        "eval.batch_size=8",
        "counting.max_dynamic_patch=4",
        "generation.max_new_tokens=4",
        "generation.num_beams=2",
        "generation.val_num_images=2",
        "train.log_every=1",
        "train.early_stopping.patience=0",
    ]


def _lines(run: Path, kind: str) -> list[dict]:
    return [x for x in map(json.loads, (run / "history.jsonl").read_text().splitlines()) if x["type"] == kind]


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory: pytest.TempPathFactory, receipts: Path) -> Path:
    out = tmp_path_factory.mktemp("count_cache_on") / "run"
    assert main(["train", RECIPE, "--output-dir", str(out), *_fast(receipts)]) == 0
    return out


def test_whole_run_with_and_without_cache_agree(cached_run: Path, receipts: Path, tmp_path: Path) -> None:
    off = tmp_path / "off"
    assert main(["train", RECIPE, "--output-dir", str(off), *_fast(receipts), "cache.enabled=false"]) == 0
    stages = _lines(cached_run, "stage")
    assert stages[0]["cache"]["cache_vision"] is True and stages[0]["cache"]["cache_text"] is False
    assert stages[2]["cache"] == {}  # the whole tower trains: live pixels
    assert all(x["cache"] == {} for x in _lines(off, "stage")) and not (off / "cache").exists()
    ns = [json.loads(p.read_text()) for p in (cached_run / "cache").glob("*/namespace.json")]
    assert any(n["kind"] == "vision_tiles" and n["preprocess"]["max_tiles"] == 4 for n in ns)
    on_steps, off_steps = _lines(cached_run, "step"), _lines(off, "step")
    assert len(on_steps) == len(off_steps) > 4
    for a, b in zip(on_steps, off_steps):
        assert a["step"] == b["step"]
        for k in ("loss/lm", "loss/count", "loss"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k)
    on, off_m = (json.loads((d / "metrics.json").read_text()) for d in (cached_run, off))
    for key in (
        "count/accuracy",
        "count/macro_f1",
        "text/perplexity",
        "answer/count_accuracy",
        "text/bleu4",
        "train/steps",
        "train/best_epoch",
    ):
        assert on[key] == pytest.approx(off_m[key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow  # two `vlmtune train` processes (start-up, imports): about a minute on a shared 2-core CPU
def test_sigkill_in_the_cached_stage_then_resume(cached_run: Path, receipts: Path, tmp_path: Path) -> None:
    """`vlmtune train` killed in the second epoch of the cached stage resumes (reading the
    cache the killed run built) and ends as the uninterrupted run."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "vlmtune.cli", "train", RECIPE, "--output-dir", str(run), *_fast(receipts)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    steps_per_epoch = len([x for x in _lines(cached_run, "step") if x["epoch"] == 1])

    def step_lines() -> int:
        try:
            return sum('"type": "step"' in ln for ln in (run / "history.jsonl").read_text().splitlines())
        except OSError:
            return 0

    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    end = time.time() + 240
    while step_lines() < steps_per_epoch + 1:
        assert p.poll() is None, p.communicate()[1][-2000:]
        assert time.time() < end, "timed out waiting for the second epoch"
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    state = json.loads((run / "checkpoints/last/state.json").read_text())
    assert state["epoch"] == 1 and state["step"] == steps_per_epoch  # killed inside the second epoch
    p = subprocess.run(
        cmd + ["--resume"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=400
    )
    assert p.returncode == 0, p.stderr[-2000:]
    a, b = _lines(cached_run, "step"), _lines(run, "step")
    assert [x["step"] for x in a] == [x["step"] for x in b]
    for x, y in zip(a, b):
        for k in ("loss/lm", "loss/count", "loss"):
            assert x[k] == pytest.approx(y[k], abs=1e-6), (x["step"], k)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (cached_run, run))
    for key in ("count/accuracy", "text/perplexity", "answer/count_accuracy", "train/steps"):
        assert ma[key] == pytest.approx(mb[key], abs=1e-6), key
