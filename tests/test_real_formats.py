"""The data sets users already have, in their own layouts (tests/formats_fixtures.py):
validate, inspect, train one epoch and evaluate, through the real commands.

Validate and inspect run for every layout (cheap). Training runs a representative
subset by default (refer, GeoText read-only, Karpathy Flickr30k with evaluate --data;
counting's reading is covered by validate and the bad-input cases) and every layout
under ``-m slow``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
from pathlib import Path

import pytest

import formats_fixtures as ff
from conftest import CONFIGS, COUNT_QUICK
from vlmtune.cli import main
from vlmtune.data.formats import ReadOptions, read_counting, read_pairs
from vlmtune.errors import DataError

RETRIEVAL = str(CONFIGS / "retrieval_single_stage.yaml")
COUNTING = str(CONFIGS / "receipts_three_stage.yaml")
# One tiny shared run: one epoch, batch 4, 32-px tiles, cache on.
QUICK = [
    "train.epochs=1",
    "train.batch_size=4",
    "train.progress=false",
    "eval.batch_size=8",
    "eval.ks=[1,2]",
    "backbone.tiny_image_size=32",
    "data.duplicates=keep",
]
NO_BOXES = ["loss.box=0", "loss.relation=0"]
BOXES = ["loss.relation=0"]
NEEDS_HF = {"hf-save-to-disk", "hf-parquet"}
# Trained by default (a few seconds each); geotext trains read-only and Karpathy Flickr30k
# in the evaluate --data test below; every other layout trains under -m slow.
DEFAULT_TRAIN = ("refcoco-refer",)


def _build(name: str, tmp_path: Path) -> ff.Layout:
    if name in NEEDS_HF:
        pytest.importorskip("datasets")
    return ff.BUILDERS[name](tmp_path / name)


def _root_args(layout: ff.Layout) -> list[str]:
    return ["--image-root", str(layout.image_root)] if layout.image_root else []


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err + cap.out
    return code, cap.out, cap.err


# --------------------------------------------------------------------------- validate / inspect


@pytest.mark.parametrize("name", list(ff.BUILDERS))
def test_validate_and_inspect_every_layout(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = _build(name, tmp_path)
    for path in dict.fromkeys([layout.train, layout.val, layout.test]):
        code, out, err = _run(capsys, ["data", "validate", str(path), *_root_args(layout), "--duplicates", "keep"])
        assert code == 0, out + err
        # The fixtures repeat captions across images; that note (retrieval ties) is the only one allowed.
        notes = [ln for ln in out.strip().splitlines()[:-1] if "under several images" not in ln]
        assert ", 0 errors, " in out.strip().splitlines()[-1] and not notes and "detected format" in err
        # ALBEF's val/test files ({"image", "caption": [5]}) have the very shape of pairs, read alike.
        assert f"detected format '{ff.DETECTED[name]}'" in err or path != layout.train
    code, out, _ = _run(capsys, ["data", "inspect", str(layout.train), *_root_args(layout), "--json", "--duplicates", "keep"])
    info = json.loads(out)
    assert code == 0 and info["format"] == ff.DETECTED[name] and info["errors"] == 0 and info["usable"] > 0
    if layout.kind == "counting":
        assert info["losses"] == ["lm", "count"] and sum(info["count_histogram"].values()) == info["usable"]
    else:
        assert ("box" in info["losses"]) == layout.has_boxes and (info["boxes"] > 0) == layout.has_boxes
        assert ("grounding/miou" in info["metrics"]) == layout.has_boxes
    code, out, _ = _run(capsys, ["data", "inspect", str(layout.train), *_root_args(layout), "--duplicates", "keep"])
    assert code == 0 and "losses it can feed" in out and ff.DETECTED[name] in out


def test_without_the_image_root_the_message_says_how(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = ff.coco_captions(tmp_path / "coco")
    code, out, _ = _run(capsys, ["data", "validate", str(layout.train)])
    assert code == 1 and "image not found" in out and "--image-root" in out


def test_image_root_symlink_works_and_links_out_stay_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = ff.coco_captions(tmp_path / "coco")
    link = tmp_path / "shared"  # the declared root is itself a symlink to "shared storage"
    link.symlink_to(layout.image_root, target_is_directory=True)
    code, out, _ = _run(capsys, ["data", "validate", str(layout.train), "--image-root", str(link)])
    assert code == 0, out
    outside = tmp_path / "elsewhere.jpg"
    ff._image(outside, 0)
    first = layout.image_root / "COCO_val2014_000000000100.jpg"
    first.unlink()
    first.symlink_to(outside)
    code, out, _ = _run(capsys, ["data", "validate", str(layout.train), "--image-root", str(link)])
    assert code == 1 and "record 0: image path 'COCO_val2014_000000000100.jpg' leads outside the data set's folder" in out


def test_one_file_all_splits(tmp_path: Path) -> None:
    """Karpathy and refer: each split takes its own records; restval trains; test = testA + testB."""
    k = ff.karpathy_coco(tmp_path / "k")
    opts = lambda split: ReadOptions(image_root=k.image_root, split=split)  # noqa: E731
    sizes = {s: len({r.image for r in read_pairs(k.train, opts=opts(s))}) for s in ("train", "val", "test")}
    assert sizes == {"train": 6, "val": 3, "test": 3}
    assert len(read_pairs(k.train, opts=opts("train"))) == 6 * 5  # every sentence is a caption
    r = ff.refer_refcoco(tmp_path / "r")
    recs = read_pairs(r.train, opts=ReadOptions(image_root=r.image_root, split="test"))
    assert len(recs) == 2 * 2 and all(x.bbox is not None for x in recs)
    assert {x.image.name for x in recs} == {"COCO_train2014_000000000404.jpg", "COCO_train2014_000000000405.jpg"}


def test_geotext_boxes_are_converted_and_nulls_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    layout = ff.geotext(tmp_path / "g")
    caplog.set_level("INFO")
    recs = read_pairs(layout.train)
    boxed = [r for r in recs if r.bbox is not None]
    assert len(boxed) == 2 * 5 and len(recs) == 3 * 5  # caption + 2 boxed sentences per image; nulls skipped
    want = ff._box(0)
    got = next(r.bbox for r in boxed if r.image.name == "image-40.jpeg")
    assert all(abs(a - b) < 1e-6 for a, b in zip(got, want))
    assert "5 GeoText sentences with a null box skipped" in caplog.text


def test_counting_templates_and_numeric_strings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from vlmtune.data.receipts import ANSWER_TEMPLATES, QUESTIONS

    layout = ff.receipts_csv(tmp_path / "csv")
    caplog.set_level("INFO")
    recs = read_counting(layout.train, opts=ReadOptions(image_root=layout.image_root))
    assert [r.count for r in recs] == [i % 4 for i in range(10)]  # CSV cells are strings
    assert all(r.question in QUESTIONS for r in recs)
    assert recs[0].answer in ANSWER_TEMPLATES["zero"] and recs[2].answer in [a.format(n=2) for a in ANSWER_TEMPLATES["many"]]
    assert caplog.text.count("from counting templates") == 1
    custom = ReadOptions(
        image_root=layout.image_root,
        question_templates=("Receipts?",),
        answer_templates={"zero": ("none",), "one": ("one",), "many": ("{n} of them",)},
    )
    recs = read_counting(layout.train, opts=custom)
    assert recs[3].question == "Receipts?" and recs[3].answer == "3 of them"


# --------------------------------------------------------------------------- nothing silently dropped


@pytest.mark.parametrize(
    "field, fmt, reader",
    [
        ("bboxes", "pairs", "geotext"),
        ("sentences", "pairs", "geotext"),
        ("relations", "grounding", None),
        ("bbox", "coco", "refcoco"),
        ("segmentation", "albef", None),
    ],
)
def test_unread_fields_are_errors(field: str, fmt: str, reader: str | None, tmp_path: Path) -> None:
    layout = ff.pairs(tmp_path / "p") if fmt != "coco" else ff.coco_captions(tmp_path / "c")
    data = json.loads(layout.train.read_text())
    target = data["annotations"] if fmt == "coco" else data
    target[1][field] = [[0.5, 0.5, 0.2, 0.2]]
    layout.train.write_text(json.dumps(data))
    with pytest.raises(DataError) as e:
        read_pairs(layout.train, opts=ReadOptions(format=fmt, image_root=layout.image_root))
    msg = str(e.value)
    assert "record 1" in msg and f"field '{field}'" in msg and f"format '{fmt}' does not read" in msg
    assert (f"'{reader}'" in msg) if reader else "no vlmtune format reads it" in msg


def test_box_loss_without_boxes_is_an_error_at_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = ff.pairs(tmp_path / "p")
    out = tmp_path / "run"
    code, _, err = _run(capsys, ["train", RETRIEVAL, "--output-dir", str(out), *QUICK, *layout.overrides()])
    assert code == 2 and "stages[0] 'all': the 'box' loss is active but no training record" in err and "pairs.json" in err
    assert not (out / "checkpoints").exists()


def test_box_tolerance_and_duplicates(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    layout = ff.grounding(tmp_path / "g")
    recs = json.loads(layout.train.read_text())
    recs[0]["bbox"] = [-1.5, 0, 20, 41.5]  # overruns by 1.5 px left and bottom (image 48x40)
    recs.append(dict(recs[1]))
    layout.train.write_text(json.dumps(recs))
    with pytest.raises(DataError, match="record 0: bbox has negative"):
        read_pairs(layout.train, opts=ReadOptions(duplicates="keep"))
    with pytest.raises(DataError, match="duplicate of record 1"):
        read_pairs(layout.train, opts=ReadOptions(box_tolerance_px=2))
    caplog.set_level("INFO")
    got = read_pairs(layout.train, opts=ReadOptions(box_tolerance_px=2, duplicates="drop"))
    assert len(got) == 8 and got[0].bbox == (0.0, 0.0, 18.5, 40.0)
    assert "1 boxes clipped to the image" in caplog.text and "1 duplicates dropped" in caplog.text
    assert len(read_pairs(layout.train, opts=ReadOptions(box_tolerance_px=2, duplicates="keep"))) == 9
    with pytest.raises(DataError, match="record 0: bbox has negative"):  # 1.5 px is beyond a 1 px tolerance
        read_pairs(layout.train, opts=ReadOptions(box_tolerance_px=1, duplicates="keep"))
    recs[0]["bbox"] = [0, 0, 20, 41.5]
    layout.train.write_text(json.dumps(recs))
    with pytest.raises(DataError, match="record 0: bbox .* extends outside the image"):
        read_pairs(layout.train, opts=ReadOptions(box_tolerance_px=1, duplicates="keep"))


# --------------------------------------------------------------------------- the hostile pickle


class _Hostile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # what a planted refs(unc).p would do: run a shell command when loaded
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_runs_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = ff.refer_refcoco(tmp_path / "r")
    marker = tmp_path / "pwned"
    refs = pickle.loads(layout.train.read_bytes())
    refs[0]["sentences"][0]["sent"] = _Hostile(marker)
    layout.train.write_bytes(pickle.dumps(refs, protocol=2))
    assert not marker.exists()
    for argv in (
        ["data", "validate", str(layout.train), *_root_args(layout)],
        ["train", RETRIEVAL, "--output-dir", str(tmp_path / "run"), *QUICK, *BOXES, *layout.overrides()],
    ):
        code, out, err = _run(capsys, argv)
        text = out + err
        assert code in (1, 2) and "refs(unc).p" in text and "refuses to build 'posix.system'" in text
        assert not marker.exists()


# --------------------------------------------------------------------------- train and evaluate


def _train_and_evaluate(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: ff.Layout | None = None) -> dict:
    layout = layout or _build(name, tmp_path)
    out = tmp_path / f"run-{name}"
    if layout.kind == "counting":
        argv = ["train", COUNTING, "--output-dir", str(out), *COUNT_QUICK]
    else:
        argv = ["train", RETRIEVAL, "--output-dir", str(out), *QUICK, *(BOXES if layout.has_boxes else NO_BOXES)]
    code, _, err = _run(capsys, [*argv, *layout.overrides()])
    assert code == 0, err
    code, _, err = _run(capsys, ["evaluate", str(out / "checkpoints" / "last")])
    assert code == 0, err
    metrics = json.loads((out / "checkpoints" / "last" / "eval" / "metrics.json").read_text())
    if layout.kind == "counting":
        assert "count/accuracy" in metrics
    else:
        assert "retrieval/mean_recall" in metrics
        assert ("grounding/miou" in metrics) == layout.has_boxes
    return metrics


@pytest.mark.parametrize("name", DEFAULT_TRAIN)
def test_train_and_evaluate(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _train_and_evaluate(name, tmp_path, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ff.BUILDERS if n not in DEFAULT_TRAIN and n != "geotext"])
def test_train_and_evaluate_every_layout(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _train_and_evaluate(name, tmp_path, capsys)


def test_evaluate_data_takes_the_test_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """evaluate --data FILE --image-root DIR on a one-file-all-splits format reads its test split."""
    layout = ff.karpathy_flickr(tmp_path / "f")
    run = tmp_path / "run"
    assert main(["train", RETRIEVAL, "--output-dir", str(run), *QUICK, *NO_BOXES, *layout.overrides()]) == 0
    moved = tmp_path / "elsewhere"
    shutil.copytree(layout.image_root, moved)
    code, _, err = _run(
        capsys,
        [
            "evaluate",
            str(run / "checkpoints" / "last"),
            "--data",
            str(layout.test),
            "--image-root",
            str(moved),
            "--output-dir",
            str(tmp_path / "ev"),
        ],
    )
    assert code == 0, err
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["eval/data"] == str(layout.test) and "retrieval/mean_recall" in metrics


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_read_only_data_trains_and_evaluates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """chmod -R a-w on the data (and, since root ignores modes, nothing in it changes)."""
    layout = ff.geotext(tmp_path / "ro")
    folder = tmp_path / "ro"
    before = _tree(folder)
    for p in [folder, *folder.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        _train_and_evaluate("geotext", tmp_path, capsys, layout)
        assert _tree(folder) == before
    finally:
        for p in [folder, *folder.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_missing_hf_extra_is_one_line_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = _build("hf-parquet", tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # as if not installed
    with pytest.raises(DataError) as e:
        read_counting(layout.train)
    msg = str(e.value)
    assert msg.startswith(str(layout.train)) and "pip install 'vlmtune[hf]'" in msg and "\n" not in msg
