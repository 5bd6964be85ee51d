"""The bad-input catalogue: every kind of bad input, through the real commands.

Each case runs ``vlmtune.cli.main`` as a user would (``data validate``, ``train``,
``evaluate``) and checks the exit status and that the message names the file, the
record or key, and the problem. Exit status: ``data validate`` 1 when it finds an error
(0 when clean, notes included); every other command 2 on bad input, without a traceback.

Cases: DATA_CASES x {validate, train} (counting cases train the counting recipe), a few
through ``evaluate --data``, CONFIG_CASES, CHECKPOINT_CASES, and the cases that must
*succeed* (images in other modes; ``data.on_error=skip``). ``test_catalogue_size``
states how many there are.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import CONFIGS, COUNT_QUICK
from vlmtune.cli import main

RETRIEVAL = str(CONFIGS / "retrieval_two_stage.yaml")
COUNTING = str(CONFIGS / "receipts_three_stage.yaml")
ONE_STAGE = "stages=[{name: a, start_epoch: 0, train: {adapters: 1.0, heads: 1.0}}]"
QUICK = ["train.epochs=1", "train.batch_size=8", "train.progress=false", "eval.batch_size=16", ONE_STAGE, "eval.ks=[1,2]"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pairs_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlmtune.data.scenes import generate_scenes

    folder = tmp_path_factory.mktemp("pairs")
    generate_scenes(folder, n=20, seed=5, image_size=64)
    return folder


@pytest.fixture(scope="module")
def count_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlmtune.data.receipts import generate_receipts

    folder = tmp_path_factory.mktemp("counting")
    generate_receipts(folder, n=20, seed=5, max_count=3, image_size=48)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, pairs_set: Path) -> tuple[Path, list[str]]:
    """One tiny retrieval run; checkpoint cases tamper with copies of it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    overrides = [f"data.synthetic_dir={pairs_set}", "data.synthetic.n=20", *QUICK]
    assert main(["train", RETRIEVAL, "--output-dir", str(out), *overrides]) == 0
    return out, overrides


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err + cap.out
    return code, cap.out, cap.err


def _error_line(code: int, err: str) -> str:
    """The one ``error:`` line of a failed command (exit status 2)."""
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------- bad files


def _png_body_truncated(path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, format="PNG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _jpeg_truncated(path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, format="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bomb_png(path: Path, side: int = 30000) -> None:
    """A valid PNG header claiming side x side pixels (900 M), with a tiny body: over
    twice Pillow's default limit, so it is refused from the header, never allocated."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    )


def _new_image(folder: Path, name: str, make: Callable[[Path], None]) -> str:
    make(folder / "images" / name)
    return f"images/{name}"


# Each data case breaks a clean generated set: ``fn(folder, records)`` edits the records
# (a list of dicts, changed in place) or returns the raw text of the annotation file.
# ``expect`` must all appear in the message; ``bad.json``/``bad.jsonl`` always does.


@dataclass(frozen=True)
class DataCase:
    id: str
    kind: str  # "pairs" or "counting"
    fn: Callable[[Path, list[dict[str, Any]]], str | None]
    expect: tuple[str, ...]


def _set(i: int, **fields: Any) -> Callable[[Path, list[dict[str, Any]]], None]:
    def fn(folder: Path, recs: list[dict[str, Any]]) -> None:
        recs[i].update(fields)

    return fn


def _image(i: int, name: str, make: Callable[[Path], None]) -> Callable[[Path, list[dict[str, Any]]], None]:
    def fn(folder: Path, recs: list[dict[str, Any]]) -> None:
        recs[i]["image"] = _new_image(folder, name, make)
        recs[i].pop("bbox", None)

    return fn


def _outside(folder: Path, recs: list[dict[str, Any]]) -> None:
    outside = folder.parent / f"{folder.name}_outside.png"
    Image.new("RGB", (64, 64)).save(outside)  # a real image: refused for where it is, not what
    recs[1]["image"] = f"../{outside.name}"


def _absolute_outside(folder: Path, recs: list[dict[str, Any]]) -> None:
    outside = folder.parent / f"{folder.name}_abs.png"
    Image.new("RGB", (64, 64)).save(outside)
    recs[1]["image"] = str(outside)


def _symlink_outside(folder: Path, recs: list[dict[str, Any]]) -> None:
    outside = folder.parent / f"{folder.name}_target.png"
    Image.new("RGB", (64, 64)).save(outside)
    os.symlink(outside, folder / "images" / "link.png")
    recs[1]["image"] = "images/link.png"
    recs[1].pop("bbox", None)


def _duplicate(folder: Path, recs: list[dict[str, Any]]) -> None:
    recs.append(dict(recs[0]))


def _two_problems(folder: Path, recs: list[dict[str, Any]]) -> None:
    recs[1]["text"] = ""
    recs[3]["relation"] = "beside"


def _raw(text: str) -> Callable[[Path, list[dict[str, Any]]], str]:
    return lambda folder, recs: text


def _jsonl_line(i: int, line: str) -> Callable[[Path, list[dict[str, Any]]], str]:
    def fn(folder: Path, recs: list[dict[str, Any]]) -> str:
        lines = [json.dumps(r) for r in recs]
        lines[i] = line
        return "\n".join(lines) + "\n"

    return fn


DATA_CASES = [
    # images
    DataCase("image-missing", "pairs", _set(1, image="images/nope.png"), ("record 1", "image not found", "nope.png")),
    DataCase(
        "image-not-an-image",
        "pairs",
        _image(1, "notes.png", lambda p: p.write_text("hello")),
        ("record 1", "notes.png", "not an image"),
    ),
    DataCase(
        "image-truncated-png",
        "pairs",
        _image(1, "half.png", _png_body_truncated),
        ("record 1", "half.png", "truncated or corrupt"),
    ),
    DataCase(
        "image-truncated-jpeg", "pairs", _image(1, "half.jpg", _jpeg_truncated), ("record 1", "half.jpg", "truncated or corrupt")
    ),
    DataCase(
        "image-decompression-bomb", "pairs", _image(1, "bomb.png", _bomb_png), ("record 1", "bomb.png", "decompression bomb")
    ),
    DataCase("image-path-escapes", "pairs", _outside, ("record 1", "leads outside the data set's folder")),
    DataCase("image-path-absolute-outside", "pairs", _absolute_outside, ("record 1", "leads outside the data set's folder")),
    DataCase("image-symlink-outside", "pairs", _symlink_outside, ("record 1", "link.png", "leads outside")),
    DataCase("image-path-etc-passwd", "pairs", _set(1, image="../../../../../../etc/passwd"), ("record 1", "leads outside")),
    # boxes
    DataCase("bbox-zero-area", "pairs", _set(1, bbox=[3, 3, 0, 5]), ("record 1", "zero area")),
    DataCase("bbox-outside-image", "pairs", _set(1, bbox=[40, 40, 30, 10]), ("record 1", "outside the image (64x64")),
    DataCase("bbox-negative", "pairs", _set(1, bbox=[-2, 3, 5, 5]), ("record 1", "negative coordinates")),
    # text and labels
    DataCase("caption-empty", "pairs", _set(1, text="   "), ("record 1", "'text' is empty")),
    DataCase("caption-too-long", "pairs", _set(1, text="x" * 1001), ("record 1", "1001 characters", "max_text_chars")),
    DataCase("relation-unknown", "pairs", _set(1, relation="beside"), ("record 1", 'unknown relation "beside"')),
    # structure
    DataCase("json-malformed", "pairs", _raw('[{"image": "images/scene_00000.png", "text": "x"'), ("not valid JSON", "line 1")),
    DataCase("field-wrong-type", "pairs", _set(1, bbox="1,2,3,4"), ("record 1", "'bbox' must be 4 numbers")),
    DataCase("field-wrong-type-text", "pairs", _set(1, text=["a"]), ("record 1", "'text' must be a string, got array")),
    DataCase("record-duplicate", "pairs", _duplicate, ("duplicate of record 0",)),
    DataCase("many-problems", "pairs", _two_problems, ("2 problems in", "first:", "record 1", "vlmtune data validate")),
    # counting
    DataCase("count-above-max", "counting", _set(1, count=9), ("line 2", "'count' 9 is above max_count 3")),
    DataCase("count-negative", "counting", _set(1, count=-1), ("line 2", "'count' is negative")),
    DataCase("count-wrong-type", "counting", _set(1, count="2.5"), ("line 2", "'count' must be an integer")),
    DataCase("jsonl-malformed-line", "counting", _jsonl_line(2, '{"image": "x.png", "count": '), ("line 3", "not valid JSON")),
    DataCase("question-empty", "counting", _set(1, question=""), ("line 2", "'question' is empty")),
    DataCase("counting-duplicate", "counting", _duplicate, ("duplicate of line 1", "same image and question")),
]


def _link_loop(folder: Path, recs: list[dict[str, Any]]) -> None:
    os.symlink(folder / "images" / "loop_b.png", folder / "images" / "loop_a.png")
    os.symlink(folder / "images" / "loop_a.png", folder / "images" / "loop_b.png")
    recs[1]["image"] = "images/loop_a.png"


# Image paths the file system refuses (issue 10): one line each, never a traceback.
DATA_CASES += [
    DataCase("image-path-nul", "pairs", _set(1, image="images/scene\x00.png"), ("record 1", "contains a NUL character")),
    DataCase(
        "image-path-too-long", "pairs", _set(1, image="images/" + "n" * 5000 + ".png"), ("record 1", "nnnn", "file name too long")
    ),
    DataCase("image-symlink-loop", "pairs", _link_loop, ("record 1", "loop_a.png", "link loop")),
]


def _write_bad_set(case: DataCase, src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    if case.kind == "pairs":
        recs = json.loads((dst / "train.json").read_text())
        path = dst / "bad.json"
    else:
        recs = [json.loads(x) for x in (dst / "train.jsonl").read_text().splitlines() if x.strip()]
        path = dst / "bad.jsonl"
    raw = case.fn(dst, recs)
    if raw is None:
        raw = json.dumps(recs) if case.kind == "pairs" else "".join(json.dumps(r) + "\n" for r in recs)
    path.write_text(raw)
    return path


@pytest.mark.parametrize("command", ["validate", "train"])
@pytest.mark.parametrize("case", DATA_CASES, ids=[c.id for c in DATA_CASES])
def test_bad_data(
    case: DataCase, command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], pairs_set: Path, count_set: Path
) -> None:
    path = _write_bad_set(case, pairs_set if case.kind == "pairs" else count_set, tmp_path / "data")
    if command == "validate":
        argv = ["data", "validate", str(path)] + (["--max-count", "3"] if case.kind == "counting" else [])
        code, out, err = _run(capsys, argv)
        assert code == 1, out + err
        lines = out.strip().splitlines()
        assert lines[-1].endswith(("error", "errors", "note", "notes")) and " 0 errors" not in lines[-1]
        problems = [ln for ln in lines[:-1] if ": note: " not in ln]
        assert problems and all(ln.startswith(f"{path}") for ln in problems)
        msg = "\n".join(problems)
        expect = [e for e in case.expect if e not in ("2 problems in", "first:", "vlmtune data validate")]
    else:
        config, quick = (RETRIEVAL, QUICK) if case.kind == "pairs" else (COUNTING, COUNT_QUICK)
        out_dir = tmp_path / "run"
        code, out, err = _run(
            capsys,
            [
                "train",
                config,
                "--output-dir",
                str(out_dir),
                *quick,
                f"data.train={path}",
                f"data.val={path}",
                f"data.test={path}",
            ],
        )
        msg = _error_line(code, err)
        expect = list(case.expect)
        assert not (out_dir / "checkpoints").exists()
    assert path.name in msg
    for e in expect:
        assert e in msg, (e, msg)


@pytest.mark.parametrize("case", [c for c in DATA_CASES if c.id in ("bbox-negative", "image-truncated-png")], ids=lambda c: c.id)
def test_bad_data_in_evaluate(
    case: DataCase, tmp_path: Path, capsys: pytest.CaptureFixture[str], pairs_set: Path, trained: tuple[Path, list[str]]
) -> None:
    """Evaluation reads data through the same checks as training."""
    path = _write_bad_set(case, pairs_set, tmp_path / "data")
    run, _ = trained
    code, _, err = _run(
        capsys, ["evaluate", str(run / "checkpoints/last"), "--data", str(path), "--output-dir", str(tmp_path / "ev")]
    )
    msg = _error_line(code, err)
    assert path.name in msg and all(e in msg for e in case.expect)


def test_validate_clean_set_and_json(capsys: pytest.CaptureFixture[str], pairs_set: Path, count_set: Path) -> None:
    code, out, _ = _run(capsys, ["data", "validate", str(pairs_set / "train.json")])
    assert code == 0 and out.strip().endswith(", 0 errors, 0 notes")
    code, out, _ = _run(capsys, ["data", "validate", str(count_set / "val.jsonl"), "--max-count", "3", "--json"])
    report = json.loads(out)
    assert code == 0 and report["kind"] == "counting" and report["errors"] == [] and report["records"] == 2


def test_validate_lists_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str], pairs_set: Path) -> None:
    """One run lists all problems, several in one record too, each with file and record."""
    case = DataCase("all", "pairs", lambda folder, recs: None, ())
    path = _write_bad_set(case, pairs_set, tmp_path / "data")
    recs = json.loads(path.read_text())
    recs[0].update(text="", relation="sideways")  # two problems in one record
    recs[2]["bbox"] = [0, 0, 0, 0]
    recs[4]["image"] = "images/gone.png"
    recs.append(dict(recs[5]))
    path.write_text(json.dumps(recs))
    code, out, _ = _run(capsys, ["data", "validate", str(path), "--json"])
    report = json.loads(out)
    assert code == 1 and report["bad_records"] == 4
    wheres = [e["where"].split(": ")[-1] for e in report["errors"]]
    assert wheres == ["record 0", "record 0", "record 2", "record 4", f"record {len(recs) - 1}"]


# --------------------------------------------------------------------------- succeeds


def _modes_set(src: Path, dst: Path) -> Path:
    """The clean set with four images replaced by L, RGBA, P and 16-bit versions of themselves."""
    shutil.copytree(src, dst)
    recs = json.loads((dst / "train.json").read_text())
    images = list(dict.fromkeys(r["image"] for r in recs))[:4]
    for rel, mode in zip(images, ("L", "RGBA", "P", "I;16")):
        rgb = Image.open(dst / rel).convert("RGB")
        if mode == "I;16":
            arr = np.asarray(rgb.convert("L")).astype(np.uint16) * 257
            Image.fromarray(arr).save(dst / rel)
        else:
            rgb.convert(mode).save(dst / rel)
    return dst


def test_other_image_modes_are_notes_and_train(tmp_path: Path, capsys: pytest.CaptureFixture[str], pairs_set: Path) -> None:
    data = _modes_set(pairs_set, tmp_path / "data")
    code, out, _ = _run(capsys, ["data", "validate", str(data / "train.json")])
    assert code == 0, out
    notes = [ln for ln in out.splitlines() if ": note: " in ln]
    for mode in ("mode L ", "mode RGBA ", "mode P ", "mode I;16"):
        assert any(mode in ln and "converted to RGB" in ln for ln in notes), (mode, notes)
    assert out.strip().endswith("0 errors, 4 notes")
    code, _, err = _run(
        capsys,
        ["train", RETRIEVAL, "--output-dir", str(tmp_path / "run"), *QUICK, f"data.synthetic_dir={data}", "data.synthetic.n=20"],
    )
    assert code == 0, err


def test_on_error_skip_trains_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str], pairs_set: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(pairs_set, data)
    recs = json.loads((data / "train.json").read_text())
    recs[1]["bbox"] = [-1, 0, 4, 4]
    recs[2]["image"] = _new_image(data, "half.png", _png_body_truncated)  # found only by decoding
    recs[2].pop("bbox")
    recs.append(dict(recs[0]))
    (data / "train.json").write_text(json.dumps(recs))
    out = tmp_path / "run"
    argv = ["train", RETRIEVAL, "--output-dir", str(out), *QUICK, f"data.synthetic_dir={data}", "data.synthetic.n=20"]
    code, _, err = _run(capsys, argv)
    msg = _error_line(code, err)  # raise, the default: stops with the count and the first
    # Raise checks image headers only: the truncated body is not among the 2 found up front.
    assert "2 problems in" in msg and "train.json: record 1" in msg
    code, _, err = _run(capsys, [*argv, "data.on_error=skip"])
    assert code == 0, err
    assert f"skipped 3 of {len(recs)} records" in err
    for where in ("record 1: bbox has negative", "record 2: image", f"record {len(recs) - 1}: duplicate"):
        assert where in err, where
    assert json.loads((out / "metrics.json").read_text())["train/epochs"] == 1


# --------------------------------------------------------------------------- the real formats' bad cases
# Each breaks one record (or the file) of a faithful copy of a downloaded layout
# (tests/formats_fixtures.py) and runs validate (exit 1) and train (exit 2) on it with
# the image root the format uses; the message names the file and the record.


def _edit_json(path: Path, fn: Callable[[Any], None]) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _edit_refs(path: Path, fn: Callable[[Any], None]) -> None:
    import pickle

    refs = pickle.loads(path.read_bytes())
    fn(refs)
    path.write_bytes(pickle.dumps(refs, protocol=2))


def _edit_lines(path: Path, i: int, line: str) -> None:
    lines = path.read_text().splitlines()
    lines[i] = line
    path.write_text("\n".join(lines) + "\n")


def _edit_jsonl_record(path: Path, i: int, fn: Callable[[Any], Any]) -> None:
    lines = path.read_text().splitlines()
    rec = json.loads(lines[i])
    fn(rec)
    lines[i] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")


def _tar_append(shard: Path, name: str) -> None:
    """Add one member to a webdataset shard (a sample missing its caption or its image)."""
    import io
    import tarfile

    data = b"a caption" if name.endswith(".txt") else _jpeg_bytes()
    with tarfile.open(shard, "a") as tf:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))


def _jpeg_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


@dataclass(frozen=True)
class FormatCase:
    id: str
    layout: str  # a formats_fixtures.BUILDERS name
    fn: Callable[[Any], Any]  # breaks the layout's training file (or an image it uses)
    expect: tuple[str, ...]


FORMAT_CASES = [
    FormatCase(
        "coco-image-id-unknown",
        "coco",
        lambda L: _edit_json(L.train, lambda d: d["annotations"][3].update(image_id=999)),
        ("captions_val2014.json: record 3", "image_id 999 is not in 'images'"),
    ),
    FormatCase(
        "coco-instances-bbox",
        "coco",
        lambda L: _edit_json(L.train, lambda d: d["annotations"][1].update(bbox=[1, 2, 3, 4])),
        ("record 1", "field 'bbox' carries a box that format 'coco' does not read"),
    ),
    FormatCase(
        "karpathy-sentence-without-raw",
        "karpathy-flickr30k",
        lambda L: _edit_json(L.train, lambda d: d["images"][2]["sentences"].__setitem__(1, {"sentid": 11})),
        ("dataset_flickr30k.json: record 2", "sentence 1 has no 'raw' text"),
    ),
    FormatCase(
        "karpathy-image-missing",
        "karpathy-flickr30k",
        lambda L: (L.image_root / "1000092795.jpg").unlink(),
        ("dataset_flickr30k.json: record 0", "image not found", "1000092795.jpg"),
    ),
    FormatCase(
        "albef-path-escapes-image-root",
        "albef",
        lambda L: _edit_json(L.train, lambda d: d[1].update(image="../data/coco_train.json")),
        ("coco_train.json: record 1", "leads outside the data set's folder"),
    ),
    FormatCase(
        "refer-ann-id-unknown",
        "refcoco-refer",
        lambda L: _edit_refs(L.train, lambda r: r[1].update(ann_id=123)),
        ("refs(unc).p: record 1", "ann_id 123 is not in instances.json"),
    ),
    FormatCase(
        "refer-pickle-names-a-class",
        "refcoco-refer",
        lambda L: _edit_refs(L.train, lambda r: r[0].update(split=Path("train"))),
        ("refs(unc).p", "refuses to build 'pathlib", "only plain data"),
    ),
    FormatCase(
        "geotext-sentences-bboxes-mismatch",
        "geotext",
        lambda L: _edit_json(L.train, lambda d: d[2]["bboxes"].pop()),
        ("train.json: record 2", "3 sentences but 2 bboxes"),
    ),
    FormatCase(
        "geotext-box-in-pixels",
        "geotext",
        lambda L: _edit_json(L.train, lambda d: d[1]["bboxes"].__setitem__(0, [20, 20, 10, 10])),
        ("train.json: record 1 sentence 0", "is not normalised to 0-1"),
    ),
    FormatCase(
        "csv-count-not-whole",
        "csv",
        lambda L: _edit_lines(L.train, 3, "receipt_0002.jpg,2.5"),
        ("train.csv: line 4", "'count' must be an integer", "2.5"),
    ),
    FormatCase(
        "csv-row-too-long",
        "csv",
        lambda L: _edit_lines(L.train, 2, "receipt_0001.jpg,1,extra"),
        ("train.csv: line 3", "cells but the header has 2"),
    ),
    FormatCase(
        "csv-no-count-column",
        "csv",
        lambda L: _edit_lines(L.train, 0, "filename,receipts"),
        ("train.csv", "needs an image column", "count column"),
    ),
    FormatCase(
        "counting-unread-bbox",
        "counting",
        lambda L: _edit_lines(L.train, 1, json.dumps({"image": "images/1.png", "count": 1, "bbox": [1, 1, 2, 2]})),
        ("counts.jsonl: line 2", "field 'bbox' carries a box that format 'counting' does not read"),
    ),
    # issue 21: the formats VLM fine-tuners already have
    FormatCase(
        "internvl-placeholder-without-image",
        "internvl-meta",
        lambda L: _edit_jsonl_record(L.image_root / "playground/opensource/coco_caption.jsonl", 1, lambda r: r.pop("image")),
        ("finetune.json: entry 'coco_caption' playground/opensource/coco_caption.jsonl line 2", "1 <image> placeholder"),
    ),
    FormatCase(
        "internvl-meta-root-missing",
        "internvl-meta",
        lambda L: _edit_json(L.train, lambda d: d["refcoco_train"].update(root="playground/data/gone/")),
        ("finetune.json: entry 'refcoco_train'", "root playground/data/gone/ is not a folder"),
    ),
    FormatCase(
        "internvl-box-outside-0-1000",
        "internvl-meta",
        lambda L: _edit_jsonl_record(
            L.image_root / "playground/opensource/refcoco_train.jsonl",
            2,
            lambda r: r["conversations"][1].update(value="<ref>x</ref><box>[[10, 10, 1200, 990]]</box>"),
        ),
        ("refcoco_train.jsonl line 3 turn 0 box 0", "is not normalised to 0-1000"),
    ),
    FormatCase(
        "internvl-answer-without-count",
        "internvl-counting",
        lambda L: _edit_jsonl_record(L.train, 1, lambda r: r["conversations"][1].update(value="Some receipts.")),
        ("receipts_count.jsonl: line 2", "the answer states no count"),
    ),
    FormatCase(
        "internvl-answer-two-counts",
        "internvl-counting",
        lambda L: _edit_jsonl_record(L.train, 2, lambda r: r["conversations"][1].update(value="2 receipts, one torn")),
        ("receipts_count.jsonl: line 3", "two different counts (2 and 1)"),
    ),
    FormatCase(
        "llava-two-questions-in-a-row",
        "llava",
        lambda L: _edit_json(L.train, lambda d: d[3]["conversations"][1].update({"from": "human"})),
        ("llava_v1_5_mix665k.json: record 3", "message 1 of 'conversations' is from 'human' where a model answer was due"),
    ),
    FormatCase(
        "sharegpt-unknown-role",
        "sharegpt",
        lambda L: _edit_jsonl_record(L.train, 0, lambda r: r["conversation"][2].update(role="narrator")),
        ("sharegpt.jsonl: line 1", "unknown role 'narrator'"),
    ),
    FormatCase(
        "swift-tags-and-objects-disagree",
        "swift",
        lambda L: _edit_jsonl_record(L.train, 1, lambda r: r["messages"][1].update(content="<bbox><bbox>")),
        ("swift_train.jsonl: line 2", "'objects' holds 1 ref and 1 bbox but the messages have 1 <ref-object> and 2 <bbox>"),
    ),
    FormatCase(
        "swift-bbox-type-unknown",
        "swift",
        lambda L: _edit_jsonl_record(L.train, 3, lambda r: r["objects"].update(bbox_type="norm1")),
        ("swift_train.jsonl: line 4", "'objects.bbox_type' must be 'real' or 'norm1000'"),
    ),
    FormatCase(
        "webdataset-image-without-caption",
        "webdataset",
        lambda L: _tar_append(L.train.parent / "00000.tar", "extra.jpg"),
        ("00000.tar sample 'extra'", "has an image (extra.jpg) but no caption"),
    ),
    FormatCase(
        "webdataset-caption-without-image",
        "webdataset",
        lambda L: _tar_append(L.train.parent / "00001.tar", "orphan.txt"),
        ("00001.tar sample 'orphan'", "has a caption but no image"),
    ),
    FormatCase(
        "flickr30k-token-line-without-tab",
        "flickr30k-token",
        lambda L: _edit_lines(L.train, 2, "1000092795.jpg#2 two words"),
        ("results_20130124.token: line 3", "expected NAME.jpg#K<TAB>caption"),
    ),
    FormatCase(
        "flickr30k-csv-row-missing-a-separator",
        "flickr30k-csv",
        lambda L: _edit_lines(L.train, 3, "1000092795.jpg| 2 A dog runs across the grass ."),
        ("results.csv: line 4", "expected 3 cells separated by '|'"),
    ),
    FormatCase(
        "hf-imagefolder-file-missing",
        "hf-imagefolder",
        lambda L: (L.train / "train" / "1.png").unlink(),
        ("train metadata.jsonl line 2", "image not found"),
    ),
]


@pytest.mark.parametrize("command", ["validate", "train"])
@pytest.mark.parametrize("case", FORMAT_CASES, ids=[c.id for c in FORMAT_CASES])
def test_bad_real_format(case: FormatCase, command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import formats_fixtures as ff

    layout = ff.BUILDERS[case.layout](tmp_path / "data")
    case.fn(layout)
    path = layout.train
    root = ["--image-root", str(layout.image_root)] if layout.image_root else []
    if command == "validate":
        code, out, err = _run(capsys, ["data", "validate", str(path), *root])
        assert code == 1, out + err
        lines = [ln for ln in out.strip().splitlines()[:-1] if ": note: " not in ln]
        assert lines and all(ln.startswith(str(path)) for ln in lines), out
        msg = "\n".join(lines)
    else:
        config, quick = (COUNTING, COUNT_QUICK) if layout.kind == "counting" else (RETRIEVAL, [*QUICK, "loss.relation=0"])
        if layout.kind != "counting" and not layout.has_boxes:
            quick = [*quick, "loss.box=0"]
        out_dir = tmp_path / "run"
        code, out, err = _run(capsys, ["train", config, "--output-dir", str(out_dir), *quick, *layout.overrides()])
        msg = _error_line(code, err)
        assert not (out_dir / "checkpoints").exists()
    for e in case.expect:
        assert e in msg, (e, msg)


# --------------------------------------------------------------------------- config


CONFIG_CASES = [
    ("unknown-key", ["optim.learning_rate=1"], "optim.learning_rate: unknown key"),
    ("unknown-nested-key", ["data.on_eror=skip"], "data.on_eror: unknown key"),
    ("wrong-type", ["train.epochs=two"], "train.epochs: expected an integer"),
    ("wrong-type-bool", ["backbone.trust_remote_code=maybe"], "backbone.trust_remote_code: expected true or false"),
    ("bad-choice", ["data.on_error=ignore"], "data.on_error: 'ignore' is not one of"),
    ("negative-lr", ["optim.lr=-1e-3"], "optim.lr: must be > 0"),
    ("stages-out-of-order", ["train.epochs=4", "stages.1.start_epoch=0"], "stages[1].start_epoch: must be after"),
    ("stage-never-runs", ["train.epochs=2", "stages.1.start_epoch=5"], "is not before train.epochs"),
    ("too-many-vision-blocks", ["train.epochs=2", "stages.1.start_epoch=1", "stages.1.vision_blocks=9"], "only 2 blocks"),
    ("max-text-chars-zero", ["data.max_text_chars=0"], "data.max_text_chars: must be between 1 and"),
    ("box-tolerance-negative", ["data.box_tolerance_px=-1"], "data.box_tolerance_px: must be >= 0"),
    ("duplicates-bad-choice", ["data.duplicates=ignore"], "data.duplicates: 'ignore' is not one of"),
    ("answer-templates-keys", ["counting.answer_templates={zero: [none]}"], "counting.answer_templates: needs exactly the keys"),
    (
        "answer-template-field",
        ["counting.answer_templates={zero: [a], one: [b], many: ['{count}']}"],
        "counting.answer_templates.many: '{count}' is not a template with only {n}",
    ),
    ("image-root-not-a-folder", ["data.image_root=/nonexistent/images"], "data.image_root /nonexistent/images: folder not found"),
]


@pytest.mark.parametrize(("overrides", "expected"), [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_fails_before_work(
    overrides: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], pairs_set: Path
) -> None:
    out = tmp_path / "run"
    code, _, err = _run(
        capsys,
        [
            "train",
            RETRIEVAL,
            "--output-dir",
            str(out),
            f"data.synthetic_dir={pairs_set}",
            "data.synthetic.n=20",
            "train.progress=false",
            *overrides,
        ],
    )
    assert expected in _error_line(code, err)
    assert not (out / "checkpoints").exists()


# --------------------------------------------------------------------------- checkpoints


def _copy_ckpt(trained: tuple[Path, list[str]], tmp_path: Path) -> Path:
    run, _ = trained
    dst = tmp_path / "ckpt"
    shutil.copytree(run / "checkpoints" / "last", dst)
    return dst


def _state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "state.json").read_text())


def _put_state(ckpt: Path, state: dict[str, Any]) -> None:
    """Rewrite state.json as a forger would: the manifest resealed, so what refuses the
    file is state.json's own validation."""
    from vlmtune.checkpoint import write_manifest

    (ckpt / "state.json").write_text(json.dumps(state))
    write_manifest(ckpt)


def _resealed(change: Callable[[Path], None]) -> Callable[[Path], None]:
    """``change``, then the manifest rewritten to match (a forger's edit)."""

    def fn(ckpt: Path) -> None:
        from vlmtune.checkpoint import write_manifest

        change(ckpt)
        write_manifest(ckpt)

    return fn


def _manifest(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "manifest.json").read_text())


def _put_manifest(ckpt: Path, manifest: dict[str, Any]) -> None:
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def _flip_byte(ckpt: Path) -> None:
    path = ckpt / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor: still a valid file, other numbers
    path.write_bytes(bytes(data))


def _truncate(ckpt: Path) -> None:
    path = ckpt / "weights.safetensors"
    path.write_bytes(path.read_bytes()[:200])


def _truncate_unrecorded(ckpt: Path) -> None:
    """The manifest removed (digests in state.json once could be, which turned the
    check off): refused."""
    _truncate(ckpt)
    (ckpt / "manifest.json").unlink()


def _digest_emptied(ckpt: Path) -> None:
    """One file's digest emptied: the manifest is refused, the file not read unchecked."""
    manifest = _manifest(ckpt)
    manifest["files"]["weights.safetensors"] = ""
    _put_manifest(ckpt, manifest)


def _digest_removed(ckpt: Path) -> None:
    """One file's entry removed from the manifest: the file is unlisted, refused."""
    manifest = _manifest(ckpt)
    manifest["files"].pop("weights.safetensors")
    _put_manifest(ckpt, manifest)


def _state_field(key: str, value: object):
    def change(ckpt: Path) -> None:
        state = _state(ckpt)
        state[key] = value
        _put_state(ckpt, state)

    return change


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


def _merge_json(path: Path, changes: dict[str, Any]) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _symlinked_config(ckpt: Path) -> None:
    """config.yaml replaced by a link to an identical file outside: same bytes, refused."""
    outside = ckpt.parent / "elsewhere.yaml"
    shutil.copy(ckpt / "config.yaml", outside)
    (ckpt / "config.yaml").unlink()
    (ckpt / "config.yaml").symlink_to(outside)


def _foreign_backbone(ckpt: Path) -> None:
    state = _state(ckpt)
    state["backbone"]["config_sha256"] = "0" * 64
    state["backbone"]["name_or_path"] = "OpenGVLab/InternVL3-1B-hf"
    _put_state(ckpt, state)


def _foreign_config(ckpt: Path) -> None:
    """Weights of a model with embed_dim 256 next to a config that says 128."""
    text = (ckpt / "config.yaml").read_text()
    assert "embed_dim: 256" in text
    (ckpt / "config.yaml").write_text(text.replace("embed_dim: 256", "embed_dim: 128"))
    from vlmtune.checkpoint import write_manifest

    write_manifest(ckpt)  # resealed: what refuses it is the shape check


CHECKPOINT_CASES = [
    ("missing-folder", lambda c: shutil.rmtree(c), "checkpoint folder not found"),
    ("missing-weights", lambda c: (c / "weights.safetensors").unlink(), "weights.safetensors is missing"),
    ("missing-state", lambda c: (c / "state.json").unlink(), "state.json is missing"),
    ("state-not-json", _resealed(lambda c: (c / "state.json").write_text("{")), "state.json: not valid JSON"),
    ("state-edited", lambda c: (c / "state.json").write_text("{}"), "state.json: does not match its sha256 in manifest.json"),
    ("truncated-weights", _truncate, "weights.safetensors: does not match its sha256 in manifest.json (modified or truncated)"),
    ("truncated-weights-no-digest", _truncate_unrecorded, "manifest.json is missing"),
    ("digest-emptied", _digest_emptied, "'weights.safetensors' has no valid sha256"),
    ("digest-removed", _digest_removed, "weights.safetensors: not listed in manifest.json; refused"),
    ("state-epoch-past-config", _state_field("epoch", 999), "epoch 999 is past the config's train.epochs"),
    ("state-backbone-null", _state_field("backbone", None), "field 'backbone' must be an object"),
    ("state-step-negative", _state_field("step", -1), "field 'step' must be a non-negative integer"),
    ("state-best-string", _state_field("best", "high"), "field 'best' must be a finite number or null"),
    ("state-unknown-field", _state_field("exec", "rm -rf /"), "unknown field 'exec'"),
    ("tampered-weights", _flip_byte, "weights.safetensors: does not match its sha256 in manifest.json"),
    ("foreign-backbone", _foreign_backbone, "trained on backbone 'OpenGVLab/InternVL3-1B-hf'"),
    ("foreign-config", _foreign_config, "has shape"),
    # Every file is in the manifest, the backbone folder's included (issue 10).
    (
        "backbone-weights-altered",
        lambda c: _flip(c / "backbone" / "model.safetensors"),
        "backbone/model.safetensors: does not match its sha256 in manifest.json",
    ),
    (
        "backbone-tokenizer-altered",
        lambda c: _merge_json(c / "backbone" / "tokenizer.json", {"added_tokens": []}),
        "backbone/tokenizer.json: does not match its sha256 in manifest.json",
    ),
    (
        "backbone-file-removed",
        lambda c: (c / "backbone" / "tokenizer.json").unlink(),
        "backbone/tokenizer.json is missing (listed in manifest.json)",
    ),
    (
        "extra-backbone-file",
        lambda c: (c / "backbone" / "notes.txt").write_text("hi"),
        "backbone/notes.txt: not listed in manifest.json; refused",
    ),
    (
        "extra-planted-code",
        lambda c: (c / "backbone" / "modeling_evil.py").write_text("import os\n"),
        "backbone/modeling_evil.py: not listed in manifest.json; refused",
    ),
    ("manifest-not-json", lambda c: (c / "manifest.json").write_text("[1,"), "manifest.json: not valid JSON"),
    ("manifest-emptied", lambda c: (c / "manifest.json").write_text("{}"), "manifest.json: expected an object"),
    ("manifest-files-emptied", lambda c: _put_manifest(c, {**_manifest(c), "files": {}}), ": not listed in manifest.json"),
    ("manifest-old-format", lambda c: _put_manifest(c, {**_manifest(c), "format_version": 1}), "checkpoint format 1 is not 2"),
    ("symlinked-config", _symlinked_config, "config.yaml: is a symbolic link"),
]


@pytest.mark.parametrize(("break_it", "expected"), [c[1:] for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES])
def test_bad_checkpoint(
    break_it: Callable[[Path], None],
    expected: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    trained: tuple[Path, list[str]],
) -> None:
    ckpt = _copy_ckpt(trained, tmp_path)
    break_it(ckpt)
    code, _, err = _run(capsys, ["evaluate", str(ckpt), "--output-dir", str(tmp_path / "ev")])
    msg = _error_line(code, err)
    assert "ckpt" in msg and expected in msg, msg


class _Payload:
    """Unpickling this calls os.system: the code a hostile trainer_state.pt would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("digest", ["stale", "forged"])
def test_hostile_trainer_state_is_refused(
    digest: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], trained: tuple[Path, list[str]]
) -> None:
    """``train --resume`` on a run whose trainer_state.pt would run code when unpickled.

    stale: the digest in manifest.json no longer matches (refused before unpickling);
    forged: the attacker also rewrote the digest, so torch.load(weights_only=True) sees
    the payload and refuses it. Either way the payload never runs.
    """
    import hashlib

    import torch

    src, overrides = trained
    run = tmp_path / "run"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("cache"))
    ckpt = run / "checkpoints" / "last"
    marker = tmp_path / "pwned"
    torch.save({"optimizer": _Payload(marker)}, ckpt / "trainer_state.pt")
    if digest == "forged":
        manifest = _manifest(ckpt)
        manifest["files"]["trainer_state.pt"] = hashlib.sha256((ckpt / "trainer_state.pt").read_bytes()).hexdigest()
        _put_manifest(ckpt, manifest)
    code, _, err = _run(capsys, ["train", RETRIEVAL, "--output-dir", str(run), "--resume", *overrides])
    msg = _error_line(code, err)
    assert "trainer_state.pt" in msg
    expected = "does not match its sha256 in manifest.json" if digest == "stale" else "refused: a pickle that is not only tensors"
    assert expected in msg and ("posix.system" in msg or digest == "stale"), msg
    assert "weights_only" not in msg  # torch's advice to re-run with weights_only=False is not ours to give
    assert not marker.exists()
    # The payload is live: a plain unpickle would have run it.
    torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert marker.exists()


def test_untouched_checkpoint_evaluates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], trained: tuple[Path, list[str]]
) -> None:
    """The control: a copy nobody touched passes every check above."""
    ckpt = _copy_ckpt(trained, tmp_path)
    code, _, err = _run(capsys, ["evaluate", str(ckpt), "--output-dir", str(tmp_path / "ev")])
    assert code == 0, err


# --------------------------------------------------------------------------- size


N_CASES = (
    2 * len(DATA_CASES)
    + 2
    + len(CONFIG_CASES)
    + len(CHECKPOINT_CASES)
    + 2  # bad input, refused
    + 2 * len(FORMAT_CASES)  # the real formats' bad cases, validate and train
    + 2
)  # modes accepted with notes; on_error=skip (raise, then skip)


def test_catalogue_size() -> None:
    """The note on the issue quotes this number; change both together."""
    assert (
        N_CASES == 160
    )  # 83 before issue 10 + 33 real-format and config cases (issue 11) + 6 write-path data cases + 12 manifest and backbone-folder cases + 26 VLM-format cases (issue 21)


# --------------------------------------------------------------------------- writes (issue 10)
# Each case builds a small tree under tmp_path (the working directory is tmp_path/cwd),
# runs one command and checks: exit status 2, one ``error:`` line naming the culprit, and
# that no file outside the run folder changed (contents, mtimes, links).


def _snapshot(root: Path, skip: Path | None = None) -> dict[str, Any]:
    """Every file, folder and link under ``root`` (not following links), ``skip`` aside."""
    import hashlib

    seen: dict[str, Any] = {}
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        if skip is not None and (here == skip or skip in here.parents):
            dirs[:] = []
            continue
        for name in dirs + files:
            p = here / name
            if skip is not None and p == skip:
                continue
            if p.is_symlink():
                seen[str(p)] = ("link", os.readlink(p))
            elif p.is_file():
                st = p.stat()
                seen[str(p)] = ("file", st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                seen[str(p)] = ("dir",)
    return seen


@dataclass(frozen=True)
class WriteCase:
    id: str
    # (tmp, pairs_set) -> (argv, run folder or None); the run folder is where writes may happen
    setup: Callable[[Path, Path], tuple[list[str], Path | None]]
    expect: tuple[str, ...]


def _train(tmp: Path, data: Path, out: str | Path, *extra: str) -> list[str]:
    return ["train", RETRIEVAL, "--output-dir", str(out), f"data.synthetic_dir={data}", "data.synthetic.n=20", *QUICK, *extra]


def _out_arg(text: str) -> Callable[[Path, Path], tuple[list[str], Path | None]]:
    return lambda tmp, data: (_train(tmp, data, text), None)


def _out_is_file(tmp: Path, data: Path) -> tuple[list[str], Path | None]:
    (tmp / "cwd" / "notes.txt").write_text("mine")
    return _train(tmp, data, tmp / "cwd" / "notes.txt"), None


def _out_under_file(tmp: Path, data: Path) -> tuple[list[str], Path | None]:
    (tmp / "cwd" / "notes.txt").write_text("mine")
    return _train(tmp, data, tmp / "cwd" / "notes.txt" / "run"), None


def _out_cwd_link(tmp: Path, data: Path) -> tuple[list[str], Path | None]:
    os.symlink(tmp / "cwd", tmp / "here")
    return _train(tmp, data, tmp / "here"), None


def _out_cwd_spelling(tmp: Path, data: Path) -> tuple[list[str], Path | None]:
    (tmp / "cwd" / "sub").mkdir()
    return _train(tmp, data, "./sub/../"), None


def _out_long_name(tmp: Path, data: Path) -> tuple[list[str], Path | None]:
    return _train(tmp, data, tmp / ("x" * 5000)), None


def _out_link_loop(tmp: Path, data: Path) -> tuple[list[str], Path | None]:
    os.symlink(tmp / "loop_b", tmp / "loop_a")
    os.symlink(tmp / "loop_a", tmp / "loop_b")
    return _train(tmp, data, tmp / "loop_a" / "run"), None


def _holds(*names: str) -> Callable[[Path, Path], tuple[list[str], Path | None]]:
    """A folder with some of a run's artifacts (e.g. checkpoints/best and history.jsonl, last gone)."""

    def setup(tmp: Path, data: Path) -> tuple[list[str], Path | None]:
        run = tmp / "run"
        for name in names:
            (run / name).parent.mkdir(parents=True, exist_ok=True)
            if name.startswith("checkpoints/"):
                (run / name).mkdir()
                (run / name / "state.json").write_text("{}")
            else:
                (run / name).write_text("earlier run\n")
        # The run folder itself must stay untouched too: snapshot it as "outside" (no skip).
        return _train(tmp, data, run), None

    return setup


def _linked(name: str, *extra: str, folder: bool = False) -> Callable[[Path, Path], tuple[list[str], Path | None]]:
    """A run folder in which ``name`` is a symbolic link to a file (or folder) outside it."""

    def setup(tmp: Path, data: Path) -> tuple[list[str], Path | None]:
        run = tmp / "run"
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        target = tmp / "outside" / "target"
        target.parent.mkdir()
        if folder:
            target.mkdir()
            (target / "keep.txt").write_text("keep")
        else:
            target.write_text("not yours\n")
        os.symlink(target, run / name)
        return _train(tmp, data, run, *extra), None

    return setup


def _lock_held(tmp: Path, data: Path) -> tuple[list[str], Path | None]:
    from vlmtune.runfolder import RunLock

    run = tmp / "run"
    run.mkdir()
    lock = RunLock(run).acquire()  # released when the test's tmp tree goes; held during main()
    _HELD.append(lock)
    return _train(tmp, data, run), None


_HELD: list[Any] = []


def _user_synthetic(*files: str) -> Callable[[Path, Path], tuple[list[str], Path | None]]:
    """data.synthetic_dir naming a folder of the user's own files (no generator marker)."""

    def setup(tmp: Path, data: Path) -> tuple[list[str], Path | None]:
        mine = tmp / "mine"
        mine.mkdir()
        for f in files:
            (mine / f).write_text("[]" if f.endswith(".json") else "mine")
        return ["train", RETRIEVAL, "--output-dir", str(tmp / "run"), f"data.synthetic_dir={mine}", *QUICK], tmp / "run"

    return setup


def _generator_into(kind: str, *extra: str) -> Callable[[Path, Path], tuple[list[str], Path | None]]:
    def setup(tmp: Path, data: Path) -> tuple[list[str], Path | None]:
        out = tmp / "set"
        out.mkdir()
        (out / "train.json").write_text("[]")  # an existing data set
        return ["data", kind, "--out", str(out), "--n", "10", *extra], None

    return setup


def _evaluate_into_run(tmp: Path, data: Path) -> tuple[list[str], Path | None]:
    run = tmp / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "metrics.json").write_text("{}")
    return ["evaluate", str(tmp / "ckpt"), "--output-dir", str(run)], None


def _labels_collide(tmp: Path, data: Path) -> tuple[list[str], Path | None]:
    return ["evaluate", str(tmp / "a"), str(tmp / "b"), "--labels", "x/y", "x_y", "--output-dir", str(tmp / "ev")], tmp / "ev"


def _config_file(text: str | bytes) -> Callable[[Path, Path], tuple[list[str], Path | None]]:
    def setup(tmp: Path, data: Path) -> tuple[list[str], Path | None]:
        path = tmp / "cfg.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["train", str(path), "--output-dir", str(tmp / "run")], tmp / "run"

    return setup


def _config_path(name: str) -> Callable[[Path, Path], tuple[list[str], Path | None]]:
    def setup(tmp: Path, data: Path) -> tuple[list[str], Path | None]:
        if name == "loop":
            os.symlink(tmp / "c_b.yaml", tmp / "c_a.yaml")
            os.symlink(tmp / "c_a.yaml", tmp / "c_b.yaml")
            path = str(tmp / "c_a.yaml")
        else:
            path = name
        return ["train", path, "--output-dir", str(tmp / "run")], tmp / "run"

    return setup


def _argv(*argv: str) -> Callable[[Path, Path], tuple[list[str], Path | None]]:
    return lambda tmp, data: ([a.replace("TMP", str(tmp)) for a in argv], tmp / "out")


def _override(*overrides: str) -> Callable[[Path, Path], tuple[list[str], Path | None]]:
    return lambda tmp, data: (_train(tmp, data, tmp / "run", *overrides), tmp / "run")


WRITE_CASES = [
    # the output folder: named, not the current one, not a file, reachable
    WriteCase("out-empty", _out_arg(""), ("--output-dir: empty",)),
    WriteCase("out-dot", _out_arg("."), ("--output-dir .", "is the current folder")),
    WriteCase("out-dot-slash", _out_arg("./"), ("is the current folder",)),
    WriteCase("out-cwd-other-spelling", _out_cwd_spelling, ("./sub/../", "is the current folder")),
    WriteCase("out-cwd-through-link", _out_cwd_link, ("here", "is the current folder")),
    WriteCase("out-is-a-file", _out_is_file, ("notes.txt", "is a file")),
    WriteCase("out-under-a-file", _out_under_file, ("notes.txt", "cannot create the folder", "not a directory")),
    WriteCase("out-name-too-long", _out_long_name, ("xxxx", "file name too long")),
    WriteCase("out-link-loop", _out_link_loop, ("loop_a", "link loop")),
    WriteCase(
        "seeds-out-dot",
        lambda tmp, data: (_train(tmp, data, ".", "--seeds", "0,1"), None),
        ("--output-dir .", "is the current folder"),
    ),
    # a folder holding a run: --resume or --overwrite
    WriteCase(
        "holds-best-and-history",
        _holds("history.jsonl", "checkpoints/best"),
        ("run: already holds a run (history.jsonl, checkpoints)", "--resume", "--overwrite"),
    ),
    WriteCase("holds-config-only", _holds("config.yaml"), ("already holds a run (config.yaml)",)),
    WriteCase("holds-metrics-only", _holds("metrics.json"), ("already holds a run (metrics.json)",)),
    WriteCase(
        "resume-and-overwrite",
        lambda tmp, data: (_train(tmp, data, tmp / "run", "--resume", "--overwrite"), tmp / "run"),
        ("--resume and --overwrite: choose one",),
    ),
    # links inside a run folder are refused, never written through
    WriteCase("link-config-yaml", _linked("config.yaml"), ("run/config.yaml: is a symbolic link",)),
    WriteCase("link-config-yaml-overwrite", _linked("config.yaml", "--overwrite"), ("run/config.yaml: is a symbolic link",)),
    WriteCase("link-history-resume", _linked("history.jsonl", "--resume"), ("run/history.jsonl: is a symbolic link",)),
    WriteCase("link-metrics", _linked("metrics.json", "--resume"), ("run/metrics.json: is a symbolic link",)),
    WriteCase("link-checkpoints", _linked("checkpoints", folder=True), ("run/checkpoints: is a symbolic link",)),
    WriteCase(
        "link-checkpoint-last", _linked("checkpoints/last", "--resume", folder=True), ("checkpoints/last: is a symbolic link",)
    ),
    WriteCase("link-cache", _linked("cache", folder=True), ("run/cache: is a symbolic link",)),
    WriteCase("link-lock-file", _linked(".vlmtune.lock"), (".vlmtune.lock: is a symbolic link",)),
    # one writer per run folder
    WriteCase("lock-held", _lock_held, ("run: another vlmtune process (PID {pid})", "is writing to this run folder")),
    # generated data never over the user's files
    WriteCase(
        "synthetic-dir-user-annotations",
        _user_synthetic("train.json", "val.json"),
        ("data.synthetic_dir", "mine: holds train.json, val.json", "no .vlmtune-generated.json", "data.train"),
    ),
    WriteCase("synthetic-dir-user-files", _user_synthetic("notes.txt"), ("data.synthetic_dir", "mine: is not empty (notes.txt")),
    WriteCase("scenes-out-not-empty", _generator_into("scenes"), ("set: not empty (train.json)", "--overwrite")),
    WriteCase("receipts-out-not-empty", _generator_into("receipts"), ("set: not empty (train.json)", "--overwrite")),
    WriteCase("scenes-out-dot", _argv("data", "scenes", "--out", ".", "--n", "10"), ("--out .", "is the current folder")),
    WriteCase("receipts-out-empty", _argv("data", "receipts", "--out", ""), ("--out: empty",)),
    # evaluate writes inside its --output-dir only
    WriteCase("evaluate-into-a-run", _evaluate_into_run, ("run: holds a training run", "metrics.json would be replaced")),
    WriteCase("evaluate-out-dot", _argv("evaluate", "TMP/ckpt", "--output-dir", "."), ("is the current folder",)),
    WriteCase("evaluate-labels-collide", _labels_collide, ("--labels", "'x/y' and 'x_y'", "folder name 'x_y'")),
    # config files and paths the file system refuses
    WriteCase("config-not-utf8", _config_file(b"seed: 1\ntask: \xff\xfe\n"), ("cfg.yaml", "not UTF-8")),
    WriteCase("config-nested-deeply", _config_file("a: " + "[" * 5000 + "]" * 5000 + "\n"), ("cfg.yaml",)),
    WriteCase("config-5000-digits", _config_file("seed: " + "9" * 5000 + "\n"), ("cfg.yaml",)),
    WriteCase("config-path-nul", _config_path("conf\x00ig.yaml"), ("conf\\x00ig.yaml", "NUL character")),
    WriteCase("config-path-too-long", _config_path("c" * 5000 + ".yaml"), ("cccc", "name too long")),
    WriteCase("config-link-loop", _config_path("loop"), ("c_a.yaml", "link loop")),
    WriteCase("override-5000-digits", _override("seed=" + "9" * 5000), ("seed",)),
    WriteCase("override-key-5000-chars", _override("k" * 5000 + "=1"), ("kkkk", "unknown key")),
    # sizes and counts: config keys ...
    WriteCase("size-tiny-hidden-0", _override("backbone.tiny_hidden_size=0"), ("backbone.tiny_hidden_size", "got 0")),
    WriteCase("size-tiny-hidden-odd", _override("backbone.tiny_hidden_size=80"), ("backbone.tiny_hidden_size", "multiple of 32")),
    WriteCase("size-tiny-layers-0", _override("backbone.tiny_layers=0"), ("backbone.tiny_layers", "got 0")),
    WriteCase("size-tiny-image-20", _override("backbone.tiny_image_size=20"), ("backbone.tiny_image_size", "multiple of 16")),
    WriteCase("size-tiny-image-huge", _override("backbone.tiny_image_size=65536"), ("backbone.tiny_image_size", "between")),
    WriteCase("size-head-hidden-neg", _override("model.head_hidden=-1"), ("model.head_hidden", "got -1")),
    WriteCase("size-embed-dim-0", _override("model.embed_dim=0"), ("model.embed_dim",)),
    WriteCase("size-eval-ks-0", _override("eval.ks=[1, 0]"), ("eval.ks",)),
    WriteCase("size-eval-ks-huge", _override("eval.ks=[1, 1000000000000]"), ("eval.ks",)),
    WriteCase("size-seed-negative", _override("seed=-1"), ("seed: must be between 0",)),
    WriteCase("size-synthetic-image-0", _override("data.synthetic.image_size=0"), ("data.synthetic.image_size",)),
    WriteCase("size-counting-patch-0", _override("counting.max_dynamic_patch=0"), ("counting.max_dynamic_patch",)),
    WriteCase("size-counting-max-count-huge", _override("counting.max_count=100000000"), ("counting.max_count",)),
    WriteCase("size-generation-beams-0", _override("generation.num_beams=0"), ("generation.num_beams",)),
    WriteCase("size-generation-tokens-neg", _override("generation.max_new_tokens=-5"), ("generation.max_new_tokens",)),
    WriteCase("size-vision-blocks-neg", _override("stages.0.vision_blocks=-1"), ("stages[0].vision_blocks",)),
    # ... and command flags
    WriteCase("flag-scenes-n-0", _argv("data", "scenes", "--out", "TMP/out", "--n", "0"), ("--n", "got 0")),
    WriteCase("flag-scenes-n-1", _argv("data", "scenes", "--out", "TMP/out", "--n", "1"), ("--n 1", "too small")),
    WriteCase(
        "flag-scenes-image-size-0", _argv("data", "scenes", "--out", "TMP/out", "--image-size", "0"), ("--image-size", "got 0")
    ),
    WriteCase(
        "flag-scenes-image-size-20",
        _argv("data", "scenes", "--out", "TMP/out", "--image-size", "20"),
        ("--image-size", "between 48"),
    ),
    WriteCase("flag-scenes-seed-neg", _argv("data", "scenes", "--out", "TMP/out", "--seed", "-3"), ("--seed",)),
    WriteCase("flag-receipts-width-0", _argv("data", "receipts", "--out", "TMP/out", "--width", "0"), ("--width", "got 0")),
    WriteCase(
        "flag-receipts-max-count-neg",
        _argv("data", "receipts", "--out", "TMP/out", "--max-count", "-1"),
        ("--max-count", "got -1"),
    ),
    WriteCase("flag-receipts-n-word", _argv("data", "receipts", "--out", "TMP/out", "--n", "ten"), ("--n", "'ten'")),
    WriteCase("flag-bench-images-0", _argv("bench", "--out", "TMP/out", "--images", "0"), ("--images", "got 0")),
    WriteCase("flag-bench-batch-0", _argv("bench", "--out", "TMP/out", "--batch-size", "0"), ("--batch-size", "got 0")),
    WriteCase(
        "flag-bench-eval-size-0",
        _argv("bench", "--out", "TMP/out", "--sections", "eval", "--eval-sizes", "0x5"),
        ("--eval-sizes", "'0x5'"),
    ),
    WriteCase("flag-attention-limit-0", _argv("attention", "TMP/ckpt", "--limit", "0"), ("--limit", "got 0")),
    WriteCase(
        "flag-validate-max-chars-0",
        _argv("data", "validate", "TMP/x.json", "--max-text-chars", "0"),
        ("--max-text-chars", "got 0"),
    ),
    WriteCase(
        "flag-compare-tolerance-neg",
        _argv("compare", "TMP/a", "--output-dir", "TMP/out", "--tolerance", "-1"),
        ("--tolerance", "got -1"),
    ),
    WriteCase(
        "flag-compare-tolerance-nan", _argv("compare", "TMP/a", "--output-dir", "TMP/out", "--tolerance", "nan"), ("--tolerance",)
    ),
    WriteCase("flag-unknown", _argv("data", "scenes", "--out", "TMP/out", "--colour", "red"), ("unrecognized arguments",)),
]


@pytest.mark.parametrize("case", WRITE_CASES, ids=[c.id for c in WRITE_CASES])
def test_bad_write(
    case: WriteCase, tmp_path: Path, capsys: pytest.CaptureFixture[str], pairs_set: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "config.yaml").write_text("# the user's own file\n")  # what `--output-dir .` once overwrote
    monkeypatch.chdir(cwd)
    argv, run = case.setup(tmp_path, pairs_set)
    before = _snapshot(tmp_path, run)
    try:
        code, _, err = _run(capsys, argv)
    finally:
        while _HELD:
            _HELD.pop().release()
    msg = _error_line(code, err)
    assert len(msg) <= 500, len(msg)
    for e in case.expect:
        assert e.format(pid=os.getpid()) in msg, (e, msg)
    assert _snapshot(tmp_path, run) == before  # nothing outside the run folder changed
    if run is not None:
        assert not (run / "checkpoints").exists() and not (run / "metrics.json").exists()


INJECTED = [
    ("enospc", OSError(28, "No space left on device", "/runs/a/metrics.json"), ("/runs/a/metrics.json", "no space left")),
    ("erofs", OSError(30, "Read-only file system", "/mnt/ro/run"), ("/mnt/ro/run", "read-only")),
    ("enametoolong", OSError(36, "File name too long", "/x/" + "n" * 3000), ("/x/nnn", "too long")),
    ("eloop", OSError(40, "Too many levels of symbolic links", "/x/loop"), ("/x/loop", "link loop")),
    ("eisdir", IsADirectoryError(21, "Is a directory", "/x/metrics.json"), ("/x/metrics.json", "is a directory")),
    ("enotdir", NotADirectoryError(20, "Not a directory", "/x/file/run"), ("/x/file/run", "not a directory")),
    ("eacces", PermissionError(13, "Permission denied", "/x/run"), ("/x/run", "permission denied")),
    ("rename", OSError(18, "Invalid cross-device link", "/x/a.tmp", None, "/y/a"), ("/x/a.tmp -> /y/a", "cross-device")),
    ("unicode", UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), ("not UTF-8",)),
    ("recursion", RecursionError("maximum recursion depth exceeded"), ("nested too deeply",)),
    ("value", ValueError("embedded null byte\n" + "x" * 5000), ("embedded null byte", "--debug")),
    (
        "torch-disk-full",
        RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0: file write failed"),
        ("file write failed", "disk full"),
    ),
    ("unexpected", KeyError("boom"), ("unexpected KeyError", "--debug")),
]


@pytest.mark.parametrize(("exc", "expect"), [c[1:] for c in INJECTED], ids=[c[0] for c in INJECTED])
def test_any_error_is_one_line(
    exc: BaseException,
    expect: tuple[str, ...],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An error that no check turned into a VlmtuneError (disk full, read-only disk, ...):
    one line naming the file and the cause, exit status 2; --debug raises it."""
    import vlmtune.train

    def fail(*args: Any, **kwargs: Any) -> None:
        raise exc

    monkeypatch.setattr(vlmtune.train, "train", fail)
    argv = ["train", RETRIEVAL, "--output-dir", str(tmp_path / "run")]
    code, _, err = _run(capsys, argv)
    msg = _error_line(code, err)
    assert len(msg) <= 500 and "\n" not in msg.strip()
    for e in expect:
        assert e in msg, (e, msg)
    with pytest.raises(type(exc)):
        main(["--debug", *argv])


def test_evaluate_labels_stay_inside(tmp_path: Path, capsys: pytest.CaptureFixture[str], trained: tuple[Path, list[str]]) -> None:
    """`evaluate --labels ../x /abs/path`: the labels head the table; their folders are
    made safe, so everything is written inside --output-dir and nothing outside."""
    run, _ = trained
    ckpt = run / "checkpoints" / "last"
    ev = tmp_path / "work" / "ev"
    (tmp_path / "work").mkdir()
    before = _snapshot(tmp_path, ev)
    code, out, err = _run(
        capsys, ["evaluate", str(ckpt), str(ckpt), "--labels", "../x", str(tmp_path / "abs"), "--output-dir", str(ev)]
    )
    assert code == 0, err
    assert _snapshot(tmp_path, ev) == before
    assert not (tmp_path / "work" / "x").exists() and not (tmp_path / "abs").exists()
    assert (ev / "_x" / "metrics.json").is_file()
    assert (ev / safe_name(str(tmp_path / "abs")) / "metrics.json").is_file()
    table = (ev / "evaluation.md").read_text()
    assert f"| metric | ../x | {tmp_path / 'abs'} |" in table
    assert set(json.loads((ev / "evaluation.json").read_text())) == {"../x", str(tmp_path / "abs")}


def safe_name(label: str) -> str:
    from vlmtune.runfolder import safe_name as f

    return f(label)


def test_overwrite_replaces_only_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str], pairs_set: Path) -> None:
    """--overwrite on a folder whose checkpoints/last is gone but best and history.jsonl
    remain: the earlier run's artifacts are replaced, other files are kept."""
    run = tmp_path / "run"
    (run / "checkpoints" / "best").mkdir(parents=True)
    (run / "checkpoints" / "best" / "state.json").write_text("{}")
    (run / "history.jsonl").write_text('{"type": "old"}\n')
    (run / "notes.txt").write_text("mine")
    code, _, err = _run(capsys, _train(tmp_path, pairs_set, run, "--overwrite"))
    assert code == 0, err
    assert "old" not in (run / "history.jsonl").read_text()
    assert (run / "notes.txt").read_text() == "mine"
    assert json.loads((run / "checkpoints" / "best" / "state.json").read_text())["epoch"] == 1


def test_generators_refuse_then_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`data scenes --out` an existing set: refused; with --overwrite regenerated, the
    earlier generation's files gone, the user's other files kept; the marker lists all."""
    out = tmp_path / "set"
    assert main(["data", "scenes", "--out", str(out), "--n", "12", "--image-size", "48"]) == 0
    marker = json.loads((out / ".vlmtune-generated.json").read_text())
    assert marker["complete"] and "images/scene_00011.png" in marker["files"] and "test.json" in marker["files"]
    (out / "notes.txt").write_text("mine")
    code, _, err = _run(capsys, ["data", "scenes", "--out", str(out), "--n", "10", "--image-size", "48"])
    assert "not empty" in _error_line(code, err)
    assert main(["data", "scenes", "--out", str(out), "--n", "10", "--image-size", "48", "--overwrite"]) == 0
    assert not (out / "images" / "scene_00011.png").exists() and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / ".vlmtune-generated.json").read_text())["n"] == 10


def test_synthetic_dir_regenerates_only_its_own(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An interrupted generation (marker says incomplete) is generated again; a complete
    one is reused as it is."""
    from vlmtune.config import load_config
    from vlmtune.tasks import build_task

    data = tmp_path / "data"
    cfg = load_config(RETRIEVAL, [f"data.synthetic_dir={data}", "data.synthetic.n=10", "data.synthetic.image_size=48"])
    task = build_task(cfg)
    paths = task.data_paths(tmp_path / "run")
    first = Path(paths["test"]).stat().st_mtime_ns
    assert task.data_paths(tmp_path / "run") == paths and Path(paths["test"]).stat().st_mtime_ns == first  # reused
    marker = json.loads((data / ".vlmtune-generated.json").read_text())
    (data / ".vlmtune-generated.json").write_text(json.dumps(dict(marker, complete=False)))
    (data / "test.json").unlink()
    assert task.data_paths(tmp_path / "run") == paths and Path(paths["test"]).is_file()


def test_write_text_refuses_a_link(tmp_path: Path) -> None:
    """The last line of defence, at the write itself (O_NOFOLLOW): a link planted after
    the checks is refused by name and its target untouched."""
    from vlmtune.errors import VlmtuneError
    from vlmtune.runfolder import write_text

    target = tmp_path / "target.txt"
    target.write_text("keep")
    os.symlink(target, tmp_path / "history.jsonl")
    for append in (False, True):
        with pytest.raises(VlmtuneError, match="history.jsonl: is a symbolic link"):
            write_text(tmp_path / "history.jsonl", "x\n", append=append)
    assert target.read_text() == "keep"


def test_write_catalogue_size() -> None:
    """Issue 10's cases: output folders, links, locks, generated data, sizes, errors."""
    assert len(WRITE_CASES) + len(INJECTED) == 85


# --------------------------------------------------------------------------- trust and data integrity (issue 10)
#
# Only the user decides that code may run; a checkpoint's own config.yaml asking for it
# (backbone.trust_remote_code: true) is ignored. The planted files below are resealed in
# the manifest, as a forger would, so what refuses them is the remote-code check, which
# runs before transformers reads the folder (an auto_map in config.json imports its module
# while the model loads). The marker file is what the planted code would create.


def _plant(json_name: str, marker: Path, nested: bool = False) -> Callable[[Path], None]:
    def fn(backbone: Path) -> None:
        (backbone / "evil_code.py").write_text(
            f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
            "class EvilTokenizer: pass\nclass EvilConfig: pass\nclass EvilModel: pass\n"
        )
        if not json_name:
            return  # code next to the model, no auto_map
        path = backbone / json_name
        data = json.loads(path.read_text()) if path.exists() else {}
        auto_map = (
            {"AutoTokenizer": ["evil_code.EvilTokenizer", None]}
            if json_name == "tokenizer_config.json"
            else {
                "AutoConfig": "evil_code.EvilConfig",
                "AutoModel": "evil_code.EvilModel",
                "AutoImageProcessor": "evil_code.EvilModel",
                "AutoProcessor": "evil_code.EvilModel",
            }
        )
        if nested:
            data.setdefault("text_config", {})["auto_map"] = auto_map
        else:
            data["auto_map"] = auto_map
        path.write_text(json.dumps(data))

    return fn


REMOTE_CODE_CASES = [
    ("tokenizer-config", "tokenizer_config.json", False, "backbone/tokenizer_config.json: asks to run code"),
    ("model-config", "config.json", False, "backbone/config.json: asks to run code"),
    ("model-config-nested", "config.json", True, "backbone/config.json: asks to run code"),
    ("preprocessor-config", "preprocessor_config.json", False, "backbone/preprocessor_config.json: asks to run code"),
    ("processor-config", "processor_config.json", False, "backbone/processor_config.json: asks to run code"),
    ("code-file-only", "", False, "backbone/evil_code.py: the model folder ships code"),
]


@pytest.mark.parametrize(
    ("json_name", "nested", "expected"), [c[1:] for c in REMOTE_CODE_CASES], ids=[c[0] for c in REMOTE_CODE_CASES]
)
def test_checkpoint_remote_code_never_runs(
    json_name: str,
    nested: bool,
    expected: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    trained: tuple[Path, list[str]],
) -> None:
    from vlmtune.checkpoint import write_manifest

    ckpt = _copy_ckpt(trained, tmp_path)
    marker = tmp_path / "pwned"
    _plant(json_name, marker, nested)(ckpt / "backbone")
    cfg_text = (ckpt / "config.yaml").read_text()
    assert "trust_remote_code: false" in cfg_text
    (ckpt / "config.yaml").write_text(cfg_text.replace("trust_remote_code: false", "trust_remote_code: true"))
    write_manifest(ckpt)
    before = _tree(tmp_path)
    code, _, err = _run(capsys, ["evaluate", str(ckpt), "--output-dir", str(tmp_path / "ev")])
    msg = _error_line(code, err)
    assert expected in msg and "--trust-remote-code" in msg, msg
    assert not marker.exists()
    assert _tree(tmp_path) == before  # nothing written, not even the output folder


def test_trust_remote_code_is_the_users_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], trained: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint's config says true: transformers is told false; --trust-remote-code says true."""
    import vlmtune.backbone as bb
    from vlmtune.checkpoint import write_manifest

    seen: list[bool] = []
    real = bb.load_pretrained
    monkeypatch.setattr(bb, "load_pretrained", lambda cfg, *a, **k: seen.append(cfg.trust_remote_code) or real(cfg, *a, **k))
    ckpt = _copy_ckpt(trained, tmp_path)
    text = (ckpt / "config.yaml").read_text()
    (ckpt / "config.yaml").write_text(text.replace("trust_remote_code: false", "trust_remote_code: true"))
    write_manifest(ckpt)
    for flag, expected in (([], False), (["--trust-remote-code"], True)):
        code, _, err = _run(capsys, ["evaluate", str(ckpt), "--output-dir", str(tmp_path / "ev"), *flag])
        assert code == 0, err
        assert seen.pop() is expected


def test_default_eval_folder_is_not_part_of_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], trained: tuple[Path, list[str]]
) -> None:
    """``evaluate CHECKPOINT`` writes CHECKPOINT/eval/metrics.json; the checkpoint still opens."""
    ckpt = _copy_ckpt(trained, tmp_path)
    for _ in range(2):
        code, _, err = _run(capsys, ["evaluate", str(ckpt)])
        assert code == 0, err
    assert (ckpt / "eval" / "metrics.json").is_file()


def test_unsealed_planted_code_is_refused_by_the_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], trained: tuple[Path, list[str]]
) -> None:
    """The same plant without resealing: the manifest names the first unlisted file."""
    ckpt = _copy_ckpt(trained, tmp_path)
    marker = tmp_path / "pwned"
    _plant("config.json", marker)(ckpt / "backbone")
    code, _, err = _run(capsys, ["evaluate", str(ckpt), "--output-dir", str(tmp_path / "ev"), "--trust-remote-code"])
    msg = _error_line(code, err)
    assert "backbone/evil_code.py: not listed in manifest.json" in msg, msg
    assert not marker.exists()


def test_user_model_folder_with_remote_code_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], trained: tuple[Path, list[str]]
) -> None:
    """backbone.name_or_path naming a local folder that asks for code: refused unless the
    user's config says backbone.trust_remote_code=true."""
    run, overrides = trained
    folder = tmp_path / "model"
    shutil.copytree(run / "checkpoints" / "last" / "backbone", folder)
    marker = tmp_path / "pwned"
    _plant("config.json", marker)(folder)
    out = tmp_path / "run"
    code, _, err = _run(capsys, ["train", RETRIEVAL, "--output-dir", str(out), *overrides, f"backbone.name_or_path={folder}"])
    msg = _error_line(code, err)
    assert f"{folder}/config.json: asks to run code" in msg, msg
    assert not marker.exists() and not (out / "checkpoints").exists()


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and mtime: what a command changed (the
    run lock aside: every process that takes it writes its PID there)."""
    return {
        str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if not p.is_dir() and p.name != ".vlmtune.lock"
    }


def test_copied_and_rotated_checkpoints_keep_valid_manifests(tmp_path: Path, trained: tuple[Path, list[str]]) -> None:
    from vlmtune.checkpoint import copy_checkpoint, verify_manifest

    run, _ = trained
    last = run / "checkpoints" / "last"
    copy_checkpoint(last, tmp_path / "best", keep=3)
    copy_checkpoint(last, tmp_path / "best", keep=3)  # the first becomes best-1
    for name in ("best", "best-1"):
        assert set(verify_manifest(tmp_path / name)) == set(verify_manifest(last))
    (tmp_path / "src").mkdir()
    bad = tmp_path / "src" / "last"
    shutil.copytree(last, bad)
    (bad / "weights.safetensors").write_bytes(b"x")
    from vlmtune.errors import CheckpointError

    with pytest.raises(CheckpointError, match="weights.safetensors: does not match"):
        copy_checkpoint(bad, tmp_path / "best", keep=3)
    assert set(verify_manifest(tmp_path / "best")) == set(verify_manifest(last))  # the good one stays


def _small_data(pairs_set: Path, dst: Path) -> Path:
    shutil.copytree(pairs_set, dst)
    return dst


def test_resume_refuses_changed_data_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], pairs_set: Path) -> None:
    data = _small_data(pairs_set, tmp_path / "data")
    out = tmp_path / "run"
    argv = ["train", RETRIEVAL, "--output-dir", str(out), *QUICK, f"data.synthetic_dir={data}", "data.synthetic.n=20"]
    code, _, err = _run(capsys, argv)
    assert code == 0, err
    recs = json.loads((data / "train.json").read_text())
    (data / "train.json").write_text(json.dumps(recs[:-1]))  # one record fewer
    before = _tree(out)
    code, _, err = _run(capsys, [*argv, "--resume"])
    msg = _error_line(code, err)
    assert f"{data / 'train.json'}: the train data file changed" in msg and "--accept-changed-data" in msg, msg
    assert _tree(out) == before
    code, _, err = _run(capsys, [*argv, "--resume", "--accept-changed-data"])
    assert code == 0, err
    assert "--accept-changed-data: continuing" in err and "train (" in err


def test_overlapping_splits_are_warned(tmp_path: Path, capsys: pytest.CaptureFixture[str], pairs_set: Path) -> None:
    train = pairs_set / "train.json"
    recs = json.loads(train.read_text())
    out = tmp_path / "run"
    code, _, err = _run(
        capsys,
        [
            "train",
            RETRIEVAL,
            "--output-dir",
            str(out),
            *QUICK,
            f"data.train={train}",
            f"data.val={pairs_set / 'val.json'}",
            f"data.test={train}",
        ],
    )
    assert code == 0, err
    n_images = len({r["image"] for r in recs})
    assert (
        f"the train and test splits overlap: {n_images} shared images, {len(recs)} identical records ({train} and {train})"
    ) in err, err
    assert "the train and val splits overlap" not in err and "the val and test splits overlap" not in err


def test_eval_ks_beyond_the_gallery_fails_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pairs_set: Path
) -> None:
    out = tmp_path / "run"
    n_val = len({r["image"] for r in json.loads((pairs_set / "val.json").read_text())})
    code, _, err = _run(
        capsys,
        [
            "train",
            RETRIEVAL,
            "--output-dir",
            str(out),
            *QUICK,
            f"data.synthetic_dir={pairs_set}",
            "data.synthetic.n=20",
            "eval.ks=[1,50]",
        ],
    )
    msg = _error_line(code, err)
    assert "eval.ks: K=50 is larger than the retrieval gallery" in msg and f"({n_val} images" in msg, msg
    assert not (out / "checkpoints").exists()


def test_eval_ks_beyond_the_gallery_in_evaluate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], trained: tuple[Path, list[str]], pairs_set: Path
) -> None:
    """The checkpoint's eval.ks [1, 2] on a data file of one image: refused, nothing written."""
    recs = json.loads((pairs_set / "val.json").read_text())
    one = [r for r in recs if r["image"] == recs[0]["image"]]
    data = pairs_set / "one_image.json"  # image paths are relative to the file's folder
    data.write_text(json.dumps(one))
    try:
        ckpt = _copy_ckpt(trained, tmp_path)
        code, _, err = _run(capsys, ["evaluate", str(ckpt), "--data", str(data), "--output-dir", str(tmp_path / "ev")])
    finally:
        data.unlink()
    msg = _error_line(code, err)
    assert f"eval.ks: K=2 is larger than the retrieval gallery of {data} (1 images" in msg, msg
    assert not (tmp_path / "ev" / "metrics.json").exists()


def test_corrupt_feature_cache_is_rebuilt(tmp_path: Path, capsys: pytest.CaptureFixture[str], pairs_set: Path) -> None:
    """A zeroed features.npy in a shared cache.dir once trained to other metrics with exit
    0: now its rows fail their digests, it is rebuilt with a warning, metrics are equal."""
    cache = tmp_path / "shared_cache"
    base = ["train", RETRIEVAL, *QUICK, f"data.synthetic_dir={pairs_set}", "data.synthetic.n=20", f"cache.dir={cache}"]
    code, _, err = _run(capsys, [*base, "--output-dir", str(tmp_path / "a")])
    assert code == 0, err
    stores = sorted(cache.glob("*/features.npy"))
    assert stores
    for f in stores:
        raw = bytearray(f.read_bytes())
        header = 128  # .npy v1 header; the rows after it
        raw[header:] = bytes(len(raw) - header)
        f.write_bytes(bytes(raw))
    code, _, err = _run(capsys, [*base, "--output-dir", str(tmp_path / "b")])
    assert code == 0, err
    assert "do not match their sha256" in err and "will be rebuilt" in err, err
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("a", "b"))
    for key in ("retrieval/mean_recall", "grounding/miou", "train/steps"):
        assert ma[key] == mb[key], key


def test_cache_needs_free_space(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pairs_set: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk would turn the memory-mapped write into SIGBUS: refused up front."""
    import vlmtune.data.cache as cache_mod

    real = shutil.disk_usage
    monkeypatch.setattr(cache_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=4096))
    out = tmp_path / "run"
    code, _, err = _run(
        capsys, ["train", RETRIEVAL, "--output-dir", str(out), *QUICK, f"data.synthetic_dir={pairs_set}", "data.synthetic.n=20"]
    )
    msg = _error_line(code, err)
    assert f"feature cache {out / 'cache'}" in msg and "bytes" in msg and "only 4096 free" in msg, msg  # the estimate, up front
    assert not list((out / "cache").glob("*/features*.npy"))


N_TRUST_CASES = len(REMOTE_CODE_CASES) + 11


def test_trust_catalogue_size() -> None:
    """Issue 10's trust and integrity cases beyond CHECKPOINT_CASES."""
    assert N_TRUST_CASES == 17


@pytest.mark.parametrize("name", ["rankings_t2i.jsonl", "examples.html"])
def test_rankings_are_not_written_through_a_link(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], trained: tuple[Path, list[str]]
) -> None:
    """evaluate --rankings writes its per-query files like every other output: a link
    planted at one of their names is refused and the file it points to is untouched."""
    run, _ = trained
    outside = tmp_path / "outside.txt"
    outside.write_text("mine")
    dest = tmp_path / "ev"
    dest.mkdir()
    (dest / name).symlink_to(outside)
    code, _, err = _run(capsys, ["evaluate", str(run / "checkpoints" / "last"), "--rankings", "--output-dir", str(dest)])
    msg = _error_line(code, err)
    assert name in msg and "symbolic link" in msg, msg
    assert outside.read_text() == "mine"
