"""The formats VLM fine-tuners already have (issue 21), laid out as they ship
(tests/formats_fixtures.py), stored read-only: they validate, train one epoch and
evaluate through the real commands, and their readers get boxes, counts and captions right.

InternVL (meta JSON + annotation JSONL), LLaVA, ShareGPT, ms-swift (conversations,
objects, embedding records), webdataset shards (read in place), Flickr30k's own files.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

import formats_fixtures as ff
from conftest import CONFIGS, COUNT_QUICK
from vlmtune.cli import main
from vlmtune.data.formats import ReadOptions, image_size, load_image, read_counting, read_pairs
from vlmtune.errors import DataError

RETRIEVAL = str(CONFIGS / "retrieval_single_stage.yaml")
COUNTING = str(CONFIGS / "receipts_three_stage.yaml")
QUICK = [
    "train.epochs=1",
    "train.batch_size=4",
    "train.progress=false",
    "eval.batch_size=8",
    "eval.ks=[1,2]",
    "backbone.tiny_image_size=32",
    "data.duplicates=keep",
]


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err + cap.out
    return code, cap.out, cap.err


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def _set_writable(folder: Path, writable: bool) -> None:
    for p in [folder, *folder.rglob("*")]:
        mode = p.stat().st_mode
        p.chmod(mode | stat.S_IWUSR if writable else mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@pytest.fixture(autouse=True)
def _no_stale_log_handler() -> None:
    """A command's log handler writes to the stderr of the test that ran it: readers
    called directly here must not log through one a test before left behind."""
    for h in list(logging.getLogger().handlers):
        logging.getLogger().removeHandler(h)


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[list[Path]]:
    """Folders registered here are made read-only by the test and writable again after."""
    folders: list[Path] = []
    yield folders
    for f in folders:
        _set_writable(f, True)


def _train_and_evaluate(layout: ff.Layout, out: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    if layout.kind == "counting":
        argv = ["train", COUNTING, "--output-dir", str(out), *COUNT_QUICK]
    else:
        argv = ["train", RETRIEVAL, "--output-dir", str(out), *QUICK, "loss.relation=0"]
        argv += [] if layout.has_boxes else ["loss.box=0"]
    code, _, err = _run(capsys, [*argv, *layout.overrides()])
    assert code == 0, err
    code, _, err = _run(capsys, ["evaluate", str(out / "checkpoints" / "last")])
    assert code == 0, err
    return json.loads((out / "checkpoints" / "last" / "eval" / "metrics.json").read_text())


def _validate_train_evaluate(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], read_only: list[Path]) -> None:
    folder = tmp_path / name
    layout = ff.VLM_BUILDERS[name](folder)
    before = _tree(folder)
    _set_writable(folder, False)
    read_only.append(folder)
    root = [f"data.image_root={layout.image_root}"] if layout.image_root else []
    for path in dict.fromkeys([layout.train, layout.val, layout.test]):
        code, out, err = _run(capsys, ["data", "validate", str(path), *root, "data.duplicates=keep"])
        assert code == 0 and ", 0 errors" in out, out + err
    metrics = _train_and_evaluate(layout, tmp_path / "run", capsys)
    if layout.kind == "counting":
        assert "count/accuracy" in metrics
    else:
        assert "retrieval/mean_recall" in metrics and ("grounding/miou" in metrics) == layout.has_boxes
    assert _tree(folder) == before  # nothing written, nothing extracted


@pytest.mark.parametrize("name", list(ff.VLM_BUILDERS))  # 1-3 s each
def test_read_only_layout_validates_trains_and_evaluates(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], read_only: list[Path]
) -> None:
    _validate_train_evaluate(name, tmp_path, capsys, read_only)


# --------------------------------------------------------------------------- what the readers read


def _close(a: tuple[float, ...] | None, b: list[float], tol: float) -> bool:
    return a is not None and all(abs(x - y) <= tol for x, y in zip(a, b))


def test_internvl_boxes_are_pixels_of_the_loaded_image(tmp_path: Path) -> None:
    """0-1000 -> pixels by the image's size as loaded: an EXIF-rotated photo is portrait."""
    layout = ff.internvl_meta(tmp_path / "ivl")
    recs = read_pairs(layout.train, opts=ReadOptions(image_root=layout.image_root))
    boxed = [r for r in recs if r.bbox is not None]
    assert len(boxed) == 8 and len(recs) == 8 * 2 + 8  # 2 caption turns + 1 box per image; VQA turns left out
    for r in boxed:
        i = int(r.image.stem[-3:]) - 600
        size = image_size(r.image)
        assert size == ((40, 48) if i % 3 == 2 else (48, 40)) and load_image(r.image).size == size
        assert _close(r.bbox, ff._box(i, size), max(size) / 1000 + 1e-6), (i, r.bbox)
        assert r.text == f"the {ff.COLOURS[i % 9]} square"
    captions = {r.text for r in recs if r.bbox is None}
    assert ff._caption(0) in captions and "green" not in captions  # the VQA answer is not a caption


def test_internvl_meta_entries_resolve_against_their_root(tmp_path: Path) -> None:
    layout = ff.internvl_meta(tmp_path / "ivl")
    meta = json.loads(layout.train.read_text())
    meta["refcoco_train"]["root"] = "playground/data/missing/"
    layout.train.write_text(json.dumps(meta))
    with pytest.raises(DataError) as e:
        read_pairs(layout.train, opts=ReadOptions(image_root=layout.image_root))
    assert "finetune.json: entry 'refcoco_train': root playground/data/missing/ is not a folder" in str(e.value)


def test_counting_from_answers_and_count_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = ff.internvl_counting(tmp_path / "c")
    recs = read_counting(layout.train, opts=ReadOptions(image_root=layout.image_root))
    assert [r.count for r in recs] == [i % 4 for i in range(10)]
    assert recs[0].question == "How many receipts are in the image?" and recs[1].answer == "I can see 1 receipts"
    lines = layout.train.read_text().splitlines()
    no_count = json.loads(lines[1])
    no_count["conversations"][1]["value"] = "Some receipts."
    two = json.loads(lines[2])
    two["conversations"][1]["value"] = "I see 2 receipts, one of them torn."
    lines[1], lines[2] = json.dumps(no_count), json.dumps(two)
    layout.train.write_text("\n".join(lines) + "\n")
    code, out, _ = _run(capsys, ["data", "validate", str(layout.train), f"data.image_root={layout.image_root}"])
    assert code == 1
    assert f"{layout.train}: line 2: the answer states no count" in out
    assert f"{layout.train}: line 3: the answer states two different counts (2 and 1)" in out
    code, out, _ = _run(
        capsys, ["data", "validate", str(layout.train), f"data.image_root={layout.image_root}", "data.on_error=skip"]
    )
    assert code == 0 and "the 2 bad records are skipped (data.on_error=skip)" in out
    kept = read_counting(layout.train, on_error="skip", opts=ReadOptions(image_root=layout.image_root))
    assert len(kept) == 8


def test_swift_real_and_norm1000_boxes_agree(tmp_path: Path) -> None:
    layout = ff.swift_jsonl(tmp_path / "s")
    recs = [r for r in read_pairs(layout.train) if r.bbox is not None]
    assert len(recs) == 8
    for r in recs:
        i = int(r.image.stem)
        tol = 1e-6 if i % 2 == 0 else 48 / 1000 + 1e-6  # real: exact; norm1000: rounded to thousandths
        assert _close(r.bbox, ff._box(i), tol), (i, r.bbox)


def test_swift_embedding_negatives_are_carried_and_inspected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = ff.swift_embedding(tmp_path / "e")
    recs = read_pairs(layout.train)
    assert len(recs) == 16 and all(r.negatives == (ff._caption(int(r.image.stem) + 1),) for r in recs)
    code, out, _ = _run(capsys, ["data", "inspect", str(layout.train), "--json"])
    info = json.loads(out)
    assert code == 0 and info["negatives"] == {"records": 16, "captions": 16, "images": 0}


def test_text_anchor_embedding_records_carry_negative_images(tmp_path: Path) -> None:
    folder = tmp_path / "t"
    for i in range(3):
        ff._image(folder / f"{i}.png", i, fmt="PNG")
    rec = {
        "messages": [{"role": "user", "content": "a red square"}],
        "positive_messages": [[{"role": "user", "content": "<image>"}]],
        "positive_images": [["0.png"]],
        "negative_messages": [[{"role": "user", "content": "<image>"}], [{"role": "user", "content": "<image>"}]],
        "negative_images": [["1.png"], ["2.png"]],
    }
    (folder / "e.jsonl").write_text(json.dumps(rec) + "\n")
    (r,) = read_pairs(folder / "e.jsonl")
    assert r.image.name == "0.png" and r.text == "a red square" and [p.name for p in r.negative_images] == ["1.png", "2.png"]


def test_webdataset_is_read_in_place_and_keyed_by_content(tmp_path: Path) -> None:
    from vlmtune.data.cache import content_key

    layout = ff.webdataset_shards(tmp_path / "w")
    recs = read_pairs(layout.train)
    assert len(recs) == 8 and {r.image.suffix for r in recs} == {".jpg", ".png", ".webp"}
    first = recs[0]
    assert first.image.parent.name == "00000.tar" and first.text == ff._caption(0)  # txt and json say the same: once
    with tarfile.open(first.image.parent) as tf:
        data = tf.extractfile(first.image.name).read()  # type: ignore[union-attr]
    assert content_key(first.image) == hashlib.sha256(data).hexdigest()
    assert load_image(first.image).size == Image.open(io.BytesIO(data)).size == (48, 40)
    assert not any(p.suffix in (".jpg", ".png", ".webp") for p in (tmp_path / "w").rglob("*"))  # nothing extracted
    folder = read_pairs(layout.val.parent)  # the folder: every shard
    assert len(folder) == 12


def test_embed_reads_webdataset_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str], one_stage_run: Path) -> None:
    layout = ff.webdataset_shards(tmp_path / "w")
    out = tmp_path / "emb"
    code, _, err = _run(
        capsys, ["embed", str(one_stage_run / "checkpoints" / "last"), "--data", str(layout.train), "--out", str(out)]
    )
    assert code == 0, err
    items = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
    images = [x for x in items if x["kind"] == "image"]
    assert len(images) == 8 and all(".tar/" in x["path"] for x in images)


def test_flickr30k_token_and_csv_read_alike(tmp_path: Path) -> None:
    token = ff.flickr30k_token(tmp_path / "f")
    kaggle = ff.flickr30k_csv(tmp_path / "k")
    a = read_pairs(token.train, opts=ReadOptions(image_root=token.image_root))
    b = read_pairs(kaggle.train, opts=ReadOptions(image_root=kaggle.image_root))
    assert [(r.image.name, r.text) for r in a] == [(r.image.name, r.text) for r in b] and len(a) == 40


def test_counting_jsonl_takes_file_name(tmp_path: Path) -> None:
    layout = ff.counting_jsonl(tmp_path / "c")
    lines = [json.loads(x) for x in layout.train.read_text().splitlines()]
    layout.train.write_text("".join(json.dumps({"file_name": r["image"], "count": r["count"]}) + "\n" for r in lines))
    assert [r.count for r in read_counting(layout.train)] == [r["count"] for r in lines]


# --------------------------------------------------------------------------- validate and evaluate agree


def _overrun(px: float):
    def edit(recs: list[dict], folder: Path) -> None:
        r = next(r for r in recs if r.get("bbox"))
        w = Image.open(folder / r["image"]).size[0]
        r["bbox"] = [w - r["bbox"][2] + px, r["bbox"][1], r["bbox"][2], r["bbox"][3]]

    return edit


def _duplicate(recs: list[dict], folder: Path) -> None:
    recs.append(dict(recs[0]))


def _missing_image(recs: list[dict], folder: Path) -> None:
    recs[1]["image"] = "images/gone.png"


def _long_caption(recs: list[dict], folder: Path) -> None:
    recs[0]["text" if "text" in recs[0] else "caption"] = "a caption of forty characters, or more..."


AGREE_CASES = [
    ("overrun-1.5px", _overrun(1.5), [], False),
    ("overrun-1.5px-tolerance", _overrun(1.5), ["data.box_tolerance_px=2"], True),
    ("overrun-subpixel", _overrun(0.3), [], True),
    ("duplicate", _duplicate, [], False),
    ("duplicate-keep", _duplicate, ["data.duplicates=keep"], True),
    ("missing-image", _missing_image, [], False),
    ("missing-image-skip", _missing_image, ["data.on_error=skip"], True),
    ("long-caption", _long_caption, ["data.max_text_chars=20"], False),
]


@pytest.mark.parametrize(("case", "edit", "overrides", "accepted"), AGREE_CASES, ids=[c[0] for c in AGREE_CASES])
def test_validate_and_evaluate_agree(
    case: str,
    edit,
    overrides: list[str],
    accepted: bool,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    one_stage_run: Path,
    scenes: Path,
) -> None:
    """data validate --config CKPT/config.yaml KEY=VALUE accepts a file exactly when
    evaluate CKPT --data FILE KEY=VALUE does."""
    ckpt = one_stage_run / "checkpoints" / "last"
    recs = json.loads((scenes / "test.json").read_text())
    edit(recs, scenes)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(recs))
    overrides = [*overrides, f"data.image_root={scenes}"]
    v_code, v_out, v_err = _run(capsys, ["data", "validate", str(bad), "--config", str(ckpt / "config.yaml"), *overrides])
    e_code, _, e_err = _run(capsys, ["evaluate", str(ckpt), "--data", str(bad), "--output-dir", str(tmp_path / "ev"), *overrides])
    assert (v_code == 0) == (e_code == 0) == accepted, (v_out + v_err, e_err)
    if not accepted:
        assert f"{bad}: record" in v_out and f"{bad}: " in e_err
