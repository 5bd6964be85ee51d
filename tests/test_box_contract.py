"""The box contract (vlmtune.data.formats.boxes): every reader converts its boxes to pixel
x, y, w, h of the image as loaded, and records the convention the file wrote them in.

Each convention is written the way its format writes it, on a non-square image and on
an EXIF-rotated one (stored 48x40 on its side, loaded 40x48), read back through the
real reader, and must give the box it started from; ``data inspect`` shows both.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

import formats_fixtures as ff
from vlmtune.cli import main
from vlmtune.data.formats import ReadOptions, image_size, read_pairs
from vlmtune.data.formats.boxes import CONVENTIONS, from_pixels, to_norm1000, to_pixels
from vlmtune.errors import DataError

TRUTH = [5.0, 7.0, 21.0, 17.0]  # pixel x, y, w, h, inside 40x48 and 48x40


@pytest.fixture(autouse=True)
def _no_stale_log_handler() -> None:
    for h in list(logging.getLogger().handlers):
        logging.getLogger().removeHandler(h)


@pytest.mark.parametrize("convention", list(CONVENTIONS))
@pytest.mark.parametrize("size", [(48, 40), (40, 48), (1, 1000)])
def test_conversions_round_trip(convention: str, size: tuple[int, int]) -> None:
    box = from_pixels(TRUTH, convention, size)
    assert all(abs(a - b) < 1e-9 for a, b in zip(to_pixels(box, convention, size), TRUTH))


def _write_grounding(folder: Path, image: str, box: list[float], convention: str) -> Path:
    """One grounding record in ``convention``, in the format that writes boxes that way."""
    phrase = "the square"
    if convention == "xywh":  # vlmtune's grounding list (and COCO)
        path = folder / "g.json"
        path.write_text(json.dumps([{"image": image, "text": phrase, "bbox": box}]))
    elif convention == "xyxy":  # ms-swift, bbox_type real
        path = folder / "s.jsonl"
        msgs = [{"role": "user", "content": "<image>Find <ref-object>"}, {"role": "assistant", "content": "<bbox>"}]
        path.write_text(json.dumps({"messages": msgs, "images": [image], "objects": {"ref": [phrase], "bbox": [box]}}) + "\n")
    elif convention == "norm1000":  # InternVL
        path = folder / "a.jsonl"
        conv = [
            {"from": "human", "value": f"<image>\nWhere is <ref>{phrase}</ref>?"},
            {"from": "gpt", "value": f"<ref>{phrase}</ref><box>[{[round(v) for v in box]}]</box>"},
        ]
        path.write_text(json.dumps({"image": image, "conversations": conv}) + "\n")
    elif convention == "norm_cxcywh":  # GeoText
        path = folder / "geo.json"
        path.write_text(json.dumps([{"image": image, "caption": "a picture", "sentences": [phrase], "bboxes": [box]}]))
    else:  # normalised 0-1 corners: vlmtune's grounding list naming the convention
        path = folder / "n.json"
        path.write_text(json.dumps([{"image": image, "text": phrase, "bbox": box, "box_convention": convention}]))
    return path


MAKERS: dict[str, Callable[[Path], tuple[int, int]]] = {
    "non-square": lambda p: ff._image(p, 3),
    "exif-rotated": lambda p: ff.exif_rotated(p, 3),
}


@pytest.mark.parametrize("convention", list(CONVENTIONS))
@pytest.mark.parametrize("image", list(MAKERS))
def test_every_convention_reads_back_to_its_pixels(convention: str, image: str, tmp_path: Path) -> None:
    size = MAKERS[image](tmp_path / "img.jpg")
    assert image_size(tmp_path / "img.jpg") == size
    box = list(from_pixels(TRUTH, convention, size))
    if convention == "norm1000":
        box = [float(v) for v in to_norm1000(TRUTH, size)]  # InternVL writes integers
    path = _write_grounding(tmp_path, "img.jpg", box, convention)
    recs = [r for r in read_pairs(path) if r.bbox is not None]
    assert len(recs) == 1
    tol = max(size) / 1000 if convention == "norm1000" else 1e-6
    assert all(abs(a - b) <= tol for a, b in zip(recs[0].bbox, TRUTH)), (recs[0].bbox, TRUTH)
    if image == "exif-rotated" and convention != "xywh" and convention != "xyxy":
        stored = size[::-1]  # what the header says before the orientation is applied
        wrong = to_pixels(box, convention, stored)
        assert max(abs(a - b) for a, b in zip(wrong, TRUTH)) > 1  # the header size would have drifted it


@pytest.mark.parametrize("convention", list(CONVENTIONS))
def test_inspect_shows_the_source_and_the_internal_convention(
    convention: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    size = ff._image(tmp_path / "img.jpg", 3)
    box = [float(v) for v in to_norm1000(TRUTH, size)] if convention == "norm1000" else list(from_pixels(TRUTH, convention, size))
    path = _write_grounding(tmp_path, "img.jpg", box, convention)
    assert main(["data", "inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["box_conventions"]["source"] == {convention: {"boxes": 1, "means": CONVENTIONS[convention]}}
    assert info["box_conventions"]["internal"].startswith("xywh: pixel x, y, w, h")
    assert info["box_example"]["convention"] == convention and info["box_example"]["source"] == box
    assert main(["data", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "boxes as written" in out and f"{convention} (" in out and "boxes in vlmtune" in out


def test_sub_pixel_overruns_are_clipped_by_default(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Normalised boxes overrun by float rounding (0.01 px): clipped and counted; 1.5 px stays an error."""
    layout = ff.geotext(tmp_path / "g")
    recs = json.loads(layout.train.read_text())
    w = 48
    recs[0]["bboxes"][0] = [0.75 + 0.01 / w / 2, 0.5, 0.5 + 0.01 / w, 1.0]  # right edge 0.01 px past the image
    layout.train.write_text(json.dumps(recs))
    caplog.set_level("INFO")
    got = [r for r in read_pairs(layout.train) if r.bbox is not None and r.image.name == "image-40.jpeg"]
    assert got[0].bbox[0] + got[0].bbox[2] == pytest.approx(48.0)
    assert "1 boxes clipped to the image (they overran it by under a pixel)" in caplog.text
    recs[0]["bboxes"][0] = [0.75 + 1.5 / w / 2, 0.5, 0.5 + 1.5 / w, 1.0]
    layout.train.write_text(json.dumps(recs))
    with pytest.raises(DataError, match=r"record 0 sentence 0: bbox .* extends outside the image \(48x40 pixels\)"):
        read_pairs(layout.train)
    assert len(read_pairs(layout.train, opts=ReadOptions(box_tolerance_px=2))) == 15


def test_box_outside_0_1000_names_the_record(tmp_path: Path) -> None:
    ff._image(tmp_path / "img.jpg", 3)
    path = _write_grounding(tmp_path, "img.jpg", [10, 10, 1200, 500], "norm1000")
    with pytest.raises(DataError) as e:
        read_pairs(path)
    assert f"{path}: line 1 turn 0 box 0: box [10.0, 10.0, 1200.0, 500.0] is not normalised to 0-1000" in str(e.value)
