"""Tests of the annotation readers and the image loader in vlmtune.data.formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmtune.data.formats import RELATIONS, CountRecord, PairRecord, load_image, read_counting, read_pairs
from vlmtune.errors import DataError


def _img(path: Path, size: tuple[int, int] = (40, 30), mode: str = "RGB", fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path, format=fmt)
    return path


def _json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A folder with two 40x30 images next to where annotation files go."""
    _img(tmp_path / "img" / "a.png")
    _img(tmp_path / "img" / "b.png")
    return tmp_path


def _pairs_error(root: Path, records: object, name: str = "ann.json") -> str:
    path = _json(root / name, records)
    with pytest.raises(DataError) as e:
        read_pairs(path)
    msg = str(e.value)
    assert name in msg and "\n" not in msg
    return msg


# ------------------------------------------------------------------ read_pairs: formats


def test_retrieval_caption_lists_expand_and_image_ids_group(root: Path) -> None:
    path = _json(
        root / "ret.json",
        [
            {"image": "img/b.png", "caption": ["one", "two"]},
            {"image": "img/a.png", "caption": "three"},
            {"image": "img/b.png", "caption": "four"},
        ],
    )
    recs = read_pairs(path)
    assert [r.text for r in recs] == ["one", "two", "three", "four"]
    assert [r.image_id for r in recs] == [0, 0, 1, 0]
    assert recs[0].image == (root / "img" / "b.png").resolve() and recs[0].image.is_absolute()
    assert all(r.bbox is None and r.relation is None for r in recs)
    assert recs[2].source == f"{path}: record 1"


def test_grounding_with_optional_bbox_and_relation(root: Path) -> None:
    path = _json(
        root / "g.json",
        [
            {"image": "img/a.png", "text": "red thing", "bbox": [0, 0, 40, 30], "relation": "inside"},
            {"image": "img/a.png", "text": "blue thing", "bbox": [1.5, 2, 3, 4]},
            {"image": str((root / "img" / "b.png").resolve()), "text": "no box"},
            {"image": "img/b.png", "caption": "mixed retrieval record"},
        ],
    )
    recs = read_pairs(path)
    assert isinstance(recs[0], PairRecord)
    assert recs[0].bbox == (0, 0, 40, 30) and recs[0].relation == RELATIONS.index("inside")
    assert recs[1].bbox == (1.5, 2.0, 3.0, 4.0) and recs[1].relation is None
    assert recs[2].bbox is None and recs[2].image_id == recs[3].image_id == 1


def test_coco_captions(root: Path) -> None:
    path = _json(
        root / "coco.json",
        {
            "images": [{"id": 7, "file_name": "img/a.png"}, {"id": 3, "file_name": "img/b.png"}],
            "annotations": [
                {"image_id": 3, "caption": "b one"},
                {"image_id": 7, "caption": "a one"},
                {"image_id": 3, "caption": "b two"},
            ],
        },
    )
    recs = read_pairs(path)
    assert [(r.text, r.image_id, r.image.name) for r in recs] == [
        ("b one", 0, "b.png"),
        ("a one", 1, "a.png"),
        ("b two", 0, "b.png"),
    ]


# ------------------------------------------------------------------ read_pairs: errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.json: annotation file not found"):
        read_pairs(tmp_path / "nope.json")


def test_invalid_json_names_line_and_column(root: Path) -> None:
    path = root / "bad.json"
    path.write_text('[\n  {"image": "img/a.png",\n   "caption": "x"\n  \n')
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON: .*\(line \d+, column \d+\)"):
        read_pairs(path)
    path.write_text("")
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON.*line 1, column 1"):
        read_pairs(path)


@pytest.mark.parametrize("data", [3, "text", None])
def test_top_level_wrong_type(root: Path, data: object) -> None:
    assert "top level must be a list" in _pairs_error(root, data)


def test_top_level_object_not_coco(root: Path) -> None:
    assert "not COCO captions" in _pairs_error(root, {"records": []})


def test_empty_list_is_an_error(root: Path) -> None:
    assert "no records" in _pairs_error(root, [])


OK = {"image": "img/a.png", "text": "fine"}


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ("just a string", "must be an object, got string"),
        ({"text": "x"}, "missing 'image'"),
        ({"image": "img/a.png"}, "missing 'caption' (retrieval) or 'text' (grounding)"),
        ({"image": "img/a.png", "text": "  "}, "'text' is empty"),
        ({"image": "img/a.png", "caption": ""}, "'caption' is empty"),
        ({"image": "img/a.png", "caption": []}, "'caption' is an empty list"),
        ({"image": "img/a.png", "caption": ["ok", ""]}, "caption 1 is empty"),
        ({"image": "img/a.png", "caption": ["ok", 5]}, "caption 1 must be a string, got number"),
        ({"image": "img/a.png", "caption": 5}, "'caption' must be a string or a list"),
        ({"image": "img/a.png", "text": ["x"]}, "'text' must be a string, got array"),
        ({"image": 12, "text": "x"}, "'image' must be a string, got number"),
        ({"image": "img/a.png", "text": "x", "caption": "y"}, "both 'caption' and 'text'"),
        ({"image": "img/missing.png", "text": "x"}, "image not found"),
        ({**OK, "bbox": [1, 2, 3]}, "'bbox' must be 4 numbers"),
        ({**OK, "bbox": [1, 2, "3", 4]}, "'bbox' must be 4 numbers"),
        ({**OK, "bbox": [1, 2, True, 4]}, "'bbox' must be 4 numbers"),
        ({**OK, "bbox": {"x": 1}}, "'bbox' must be 4 numbers"),
        ({**OK, "bbox": [-1, 2, 3, 4]}, "negative coordinates"),
        ({**OK, "bbox": [1, 2, 0, 4]}, "zero area"),
        ({**OK, "bbox": [1, 2, 3, -4]}, "zero area"),
        ({**OK, "bbox": [30, 2, 11, 4]}, "outside the image (40x30 pixels)"),
        ({**OK, "bbox": [0, 25, 5, 6]}, "outside the image"),
        ({**OK, "relation": "beside"}, 'unknown relation "beside"; expected one of ' + ", ".join(RELATIONS)),
        ({**OK, "relation": 2}, "unknown relation 2"),
    ],
)
def test_bad_record(root: Path, bad: object, expected: str) -> None:
    msg = _pairs_error(root, [OK, {**OK, "text": "also fine"}, bad])
    assert "ann.json: record 2: " in msg
    assert expected in msg


def test_bbox_check_on_unreadable_image(root: Path) -> None:
    (root / "img" / "fake.png").write_text("not an image")
    msg = _pairs_error(root, [{"image": "img/fake.png", "text": "x", "bbox": [0, 0, 1, 1]}])
    assert "record 0" in msg and "fake.png" in msg and "not an image" in msg


def test_bbox_uses_exif_rotated_size(root: Path) -> None:
    img = Image.new("RGB", (40, 20))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90: the loaded image is 20 wide, 40 high
    img.save(root / "img" / "rot.jpg", exif=exif)
    ok = [{"image": "img/rot.jpg", "text": "x", "bbox": [0, 0, 20, 40]}]
    assert read_pairs(_json(root / "r.json", ok))[0].bbox == (0, 0, 20, 40)
    bad = [{"image": "img/rot.jpg", "text": "x", "bbox": [0, 0, 40, 20]}]
    assert "outside the image (20x40 pixels)" in _pairs_error(root, bad)
    assert load_image(root / "img" / "rot.jpg").size == (20, 40)


@pytest.mark.parametrize(
    ("coco", "expected"),
    [
        ({"images": {}, "annotations": []}, "must be arrays"),
        ({"images": [{"id": 1}], "annotations": []}, "image entry 0: missing 'file_name'"),
        ({"images": [{"file_name": "img/a.png"}], "annotations": []}, "image entry 0: missing or non-integer 'id'"),
        ({"images": [{"id": 1, "file_name": "img/a.png"}] * 2, "annotations": []}, "image entry 1: duplicate image id 1"),
        (
            {"images": [{"id": 1, "file_name": "img/a.png"}], "annotations": [{"image_id": 2, "caption": "x"}]},
            "record 0: image_id 2 is not in 'images'",
        ),
        ({"images": [{"id": 1, "file_name": "img/a.png"}], "annotations": [{"caption": "x"}]}, "record 0: missing 'image_id'"),
        (
            {"images": [{"id": 1, "file_name": "img/a.png"}], "annotations": [{"image_id": 1, "caption": ""}]},
            "record 0: 'caption' is empty",
        ),
        (
            {"images": [{"id": 1, "file_name": "img/gone.png"}], "annotations": [{"image_id": 1, "caption": "x"}]},
            "record 0: image not found",
        ),
        ({"images": [{"id": 1, "file_name": "img/a.png"}], "annotations": []}, "no records"),
    ],
)
def test_bad_coco(root: Path, coco: dict, expected: str) -> None:
    assert expected in _pairs_error(root, coco, name="coco.json")


# ------------------------------------------------------------------ read_counting


def _jsonl(path: Path, lines: list[object | str]) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


COUNT = {"image": "img/a.png", "question": "How many?", "answer": "There are 3.", "count": 3}


def test_read_counting(root: Path) -> None:
    path = _jsonl(root / "c.jsonl", [COUNT, "", "   ", {**COUNT, "count": 0, "image": "img/b.png"}])
    recs = read_counting(path, max_count=3)
    assert [type(r) for r in recs] == [CountRecord, CountRecord]
    assert recs[0].image == (root / "img" / "a.png").resolve()
    assert (recs[0].question, recs[0].answer, recs[0].count) == ("How many?", "There are 3.", 3)
    assert recs[1].count == 0 and recs[1].source == f"{path}: line 4"


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ('{"image": "img/a.png", "question": ', "not valid JSON"),
        ("[1, 2]", "must be an object, got array"),
        ({k: v for k, v in COUNT.items() if k != "count"}, "missing 'count'"),
        ({k: v for k, v in COUNT.items() if k != "image"}, "missing 'image'"),
        ({**COUNT, "count": "3.5"}, "'count' must be an integer"),
        ({**COUNT, "count": "three"}, "'count' must be an integer"),
        ({**COUNT, "count": 2.5}, "'count' must be an integer"),
        ({**COUNT, "count": True}, "'count' must be an integer"),
        ({**COUNT, "question": 4}, "'question' must be a string"),
        ({**COUNT, "answer": ""}, "'answer' is empty"),
        ({**COUNT, "count": -1}, "'count' is negative"),
        ({**COUNT, "count": 11}, "'count' 11 is above max_count 10"),
        ({**COUNT, "image": "img/none.png"}, "image not found"),
    ],
)
def test_bad_counting_line(root: Path, bad: object, expected: str) -> None:
    path = _jsonl(root / "count.jsonl", [COUNT, "", bad])
    with pytest.raises(DataError) as e:
        read_counting(path, max_count=10)
    msg = str(e.value)
    assert msg.startswith(f"{path}: line 3: ") and expected in msg and "\n" not in msg


def test_counting_missing_and_empty(root: Path) -> None:
    with pytest.raises(DataError, match=r"gone\.jsonl: annotation file not found"):
        read_counting(root / "gone.jsonl")
    with pytest.raises(DataError, match=r"empty\.jsonl: no records"):
        read_counting(_jsonl(root / "empty.jsonl", ["", " "]))


# ------------------------------------------------------------------ load_image


def test_load_image_modes(tmp_path: Path) -> None:
    gray = Image.new("L", (4, 3), 77)
    gray.save(tmp_path / "l.png")
    out = load_image(tmp_path / "l.png")
    assert out.mode == "RGB" and out.size == (4, 3) and out.getpixel((0, 0)) == (77, 77, 77)

    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 255, 0))  # fully transparent blue -> white, not black/blue
    rgba.save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png")
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 0, 0)
    assert out.getpixel((1, 0)) == (255, 255, 255)

    Image.new("LA", (1, 1), (0, 0)).save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png").getpixel((0, 0)) == (255, 255, 255)

    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "p.png", transparency=0)
    out = load_image(tmp_path / "p.png")
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (0, 200, 0)

    Image.new("P", (1, 1), 1).save(tmp_path / "p2.gif")  # palette without transparency
    assert load_image(tmp_path / "p2.gif").mode == "RGB"


def test_load_image_16_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "d16.png")
    assert Image.open(tmp_path / "d16.png").mode.startswith("I")
    out = np.asarray(load_image(tmp_path / "d16.png"))[0, :, 0]
    assert out.tolist() == [0, 4, 128, 255]

    signed = Image.fromarray(np.array([[-10, 0, 10]], dtype=np.int32), mode="I")
    signed.save(tmp_path / "s.tiff")
    assert np.asarray(load_image(tmp_path / "s.tiff"))[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_load_image_truncated(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"t.{fmt.lower()}"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"train\.json: record 4: image .*t\.{fmt.lower()}: truncated or corrupt"):
        load_image(path, source="train.json: record 4")


def test_load_image_missing_and_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"none\.png: file not found"):
        load_image(tmp_path / "none.png")
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(DataError, match=r"notes\.png: not an image"):
        load_image(tmp_path / "notes.png")


def test_load_image_decompression_bomb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _img(tmp_path / "big.png", size=(100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # 10000 px: a warning, not an error
    with pytest.raises(DataError, match=r"big\.png: too many pixels"):
        load_image(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # over twice the limit: Pillow's error
    with pytest.raises(DataError, match=r"big\.png: too many pixels"):
        load_image(tmp_path / "big.png")
