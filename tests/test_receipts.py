"""The synthetic receipt-counting data set: format, determinism, counts, boxes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from vlmtune.data.receipts import MAX_HIDDEN_FRACTION, bucket_count, generate_receipts
from vlmtune.metrics.text import parse_count


def _records(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    out = tmp_path_factory.mktemp("receipts")
    return out, generate_receipts(out, n=40, seed=3, max_count=3, image_size=96)


def test_jsonl_records_are_well_formed(dataset: tuple[Path, dict[str, Path]]) -> None:
    out, paths = dataset
    assert set(paths) == {"train", "val", "test"}
    sizes = {split: len(_records(p)) for split, p in paths.items()}
    assert sizes == {"train": 32, "val": 4, "test": 4}
    images = set()
    for split, path in paths.items():
        assert path == out / f"{split}.jsonl"
        for rec in _records(path):
            assert set(rec) == {"image", "question", "answer", "count"}
            assert rec["image"].startswith("images/") and not Path(rec["image"]).is_absolute()
            with Image.open(path.parent / rec["image"]) as im:
                assert im.size == (96, 96) and im.mode == "RGB"
            assert isinstance(rec["count"], int) and 0 <= rec["count"] <= 3
            assert "receipt" in rec["question"].lower()
            images.add(rec["image"])
    assert len(images) == 40  # no image shared between splits


def test_answers_state_the_count(dataset: tuple[Path, dict[str, Path]]) -> None:
    _, paths = dataset
    answers = set()
    for path in paths.values():
        for rec in _records(path):
            assert parse_count(rec["answer"]) == rec["count"], rec
            answers.add(rec["answer"])
    assert len(answers) > 4  # several templates are in use


def test_counts_cover_range_and_meta_agrees(dataset: tuple[Path, dict[str, Path]]) -> None:
    out, paths = dataset
    meta = json.loads((out / "meta.json").read_text())
    assert meta["n"] == 40 and meta["seed"] == 3 and meta["max_count"] == 3
    assert meta["image_size"] == [96, 96]
    for split, path in paths.items():
        counts = [r["count"] for r in _records(path)]
        hist = {str(c): counts.count(c) for c in range(4)}
        assert meta["splits"][split]["count_histogram"] == hist
    train_counts = [r["count"] for r in _records(paths["train"])]
    assert sorted(set(train_counts)) == [0, 1, 2, 3]
    assert max(train_counts.count(c) for c in range(4)) - min(train_counts.count(c) for c in range(4)) <= 1


def _mask(quad: list[list[float]], size: tuple[int, int]) -> np.ndarray:
    img = Image.new("L", size, 0)
    ImageDraw.Draw(img).polygon([tuple(p) for p in quad], fill=1)
    return np.asarray(img, dtype=bool)


def test_boxes_match_receipts(dataset: tuple[Path, dict[str, Path]]) -> None:
    out, paths = dataset
    boxes = json.loads((out / "boxes.json").read_text())
    size = (96, 96)
    for path in paths.values():
        for rec in _records(path):
            quads = boxes[rec["image"]]
            assert len(quads) == rec["count"]
            pixels = np.asarray(Image.open(out / rec["image"]), dtype=np.float64)
            visible = []
            for quad in quads:
                assert len(quad) == 4
                assert all(0 <= x <= size[0] and 0 <= y <= size[1] for x, y in quad)
                side_w, side_h = math.dist(quad[0], quad[1]), math.dist(quad[1], quad[2])
                assert side_h > side_w  # portrait paper
                mask = _mask(quad, size)
                visible = [v & ~mask for v in visible] + [mask]
            for quad, vis in zip(quads, visible):
                # Each receipt stays mostly uncovered (1-px slack for rasterisation).
                full = _mask(quad, size).sum()
                assert vis.sum() >= (1 - MAX_HIDDEN_FRACTION) * full - 2 * math.dist(quad[0], quad[2])
                # What shows of it is light paper (the text lines are thin and dark).
                assert np.median(pixels[vis].mean(axis=1)) > 200


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    a = tmp_path / "a"
    b = tmp_path / "b"
    c = tmp_path / "c"
    generate_receipts(a, n=8, seed=11, image_size=64)
    generate_receipts(b, n=8, seed=11, image_size=64)
    generate_receipts(c, n=8, seed=12, image_size=64)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert len(files) == 8 + 6  # images, 3 splits, boxes.json, meta.json, .vlmtune-generated.json
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "boxes.json").read_bytes() != (c / "boxes.json").read_bytes()


def test_global_rng_untouched(tmp_path: Path) -> None:
    np.random.seed(0)
    before = np.random.get_state()[1].copy()
    generate_receipts(tmp_path, n=4, seed=0, image_size=48)
    assert np.array_equal(np.random.get_state()[1], before)


def test_non_square_images(tmp_path: Path) -> None:
    paths = generate_receipts(tmp_path, n=8, seed=5, max_count=3, image_size=(64, 128), split_fractions=(0.5, 0.25, 0.25))
    boxes = json.loads((tmp_path / "boxes.json").read_text())
    for path in paths.values():
        for rec in _records(path):
            with Image.open(tmp_path / rec["image"]) as im:
                assert im.size == (64, 128)
            assert all(0 <= x <= 64 and 0 <= y <= 128 for q in boxes[rec["image"]] for x, y in q)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate_receipts(tmp_path, n=4, split_fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError):
        generate_receipts(tmp_path, n=-1)


def test_bucket_count() -> None:
    assert [bucket_count(c, [0, 1, 2]) for c in range(6)] == [0, 1, 2, 2, 2, 2]
    assert [bucket_count(c, [0, 1, 3]) for c in range(5)] == [0, 1, 1, 2, 2]
    with pytest.raises(ValueError):
        bucket_count(-1, [0, 1, 2])
    with pytest.raises(ValueError):
        bucket_count(1, [0, 2, 2])
