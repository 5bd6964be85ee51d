"""``vlmtune data convert``: the same records in InternVL's, ms-swift's and vlmtune's own
format; reading the output back gives the records it was written from (InternVL's boxes
up to its 0-1000 rounding), and nothing is written outside --out, replaced or linked through."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

import formats_fixtures as ff
from vlmtune.cli import main
from vlmtune.data.formats import ReadOptions, read_counting, read_pairs


@pytest.fixture(autouse=True)
def _no_stale_log_handler() -> None:
    for h in list(logging.getLogger().handlers):
        logging.getLogger().removeHandler(h)


def _convert(capsys: pytest.CaptureFixture[str], layout: ff.Layout, target: str, out: Path) -> dict:
    root = [f"data.image_root={layout.image_root}"] if layout.image_root else []
    code = main(["data", "convert", str(layout.train), "--to", target, "--out", str(out), *root, "data.duplicates=keep"])
    cap = capsys.readouterr()
    assert code == 0 and "Traceback" not in cap.err, cap.err
    return json.loads(cap.out)


def _pairs(path: Path, image_root: str | None) -> list[tuple]:
    recs = read_pairs(path, opts=ReadOptions(image_root=image_root, duplicates="keep"))
    return sorted(
        (str(r.image), r.text, r.bbox is not None, r.relation, r.negatives, tuple(map(str, r.negative_images))) for r in recs
    )


def _boxes(path: Path, image_root: str | None) -> dict[tuple[str, str], tuple[float, ...]]:
    recs = read_pairs(path, opts=ReadOptions(image_root=image_root, duplicates="keep"))
    return {(str(r.image), r.text): r.bbox for r in recs if r.bbox is not None}


PAIR_LAYOUTS = ("internvl-meta", "swift", "webdataset", "grounding", "swift-embedding")


@pytest.mark.parametrize("target", ["internvl", "swift", "vlmtune"])
@pytest.mark.parametrize("name", PAIR_LAYOUTS)
def test_pairs_round_trip(name: str, target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = ff.BUILDERS[name](tmp_path / name)
    source_root = str(layout.image_root) if layout.image_root else None
    if name == "swift-embedding" and target == "internvl":
        root = [f"data.image_root={layout.image_root}"] if layout.image_root else []
        code = main(["data", "convert", str(layout.train), "--to", "internvl", "--out", str(tmp_path / "out"), *root])
        assert code == 2 and "negatives have no place in InternVL's format" in capsys.readouterr().err
        return
    done = _convert(capsys, layout, target, tmp_path / "out")
    back = Path(done["written"][-1] if target == "internvl" else done["written"][0])
    root = None if target == "internvl" else done["image_root"]
    assert _pairs(back, root) == _pairs(layout.train, source_root)
    before, after = _boxes(layout.train, source_root), _boxes(back, root)
    assert before.keys() == after.keys()
    for key, box in before.items():
        tol = 1e-6 if target != "internvl" else 48 / 1000 + 1e-6
        assert all(abs(a - b) <= tol for a, b in zip(box, after[key])), (key, box, after[key])


@pytest.mark.parametrize("target", ["internvl", "swift", "vlmtune"])
@pytest.mark.parametrize("name", ["internvl-counting", "counting"])
def test_counting_round_trip(name: str, target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = ff.BUILDERS[name](tmp_path / name)
    source_root = str(layout.image_root) if layout.image_root else None
    done = _convert(capsys, layout, target, tmp_path / "out")
    back = Path(done["written"][-1] if target == "internvl" else done["written"][0])
    root = None if target == "internvl" else done["image_root"]
    key = lambda r: (str(r.image), r.question, r.answer, r.count)  # noqa: E731
    assert [key(r) for r in read_counting(back, opts=ReadOptions(image_root=root))] == [
        key(r) for r in read_counting(layout.train, opts=ReadOptions(image_root=source_root))
    ]


def test_relations_are_refused_where_the_target_has_no_place(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = ff.grounding(tmp_path / "g")
    recs = json.loads(layout.train.read_text())
    recs[2]["relation"] = "left"
    layout.train.write_text(json.dumps(recs))
    code = main(["data", "convert", str(layout.train), "--to", "swift", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and f"{layout.train}: record 2: relation 'left' has no place in ms-swift's format" in err
    assert not (tmp_path / "out" / "grounding.jsonl").exists()
    done = _convert(capsys, layout, "vlmtune", tmp_path / "out2")
    assert _pairs(Path(done["written"][0]), done["image_root"]) == _pairs(layout.train, None)


def _snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p)] = (st.st_mode, st.st_size, st.st_mtime_ns, os.readlink(p) if p.is_symlink() else None)
    return out


def test_convert_writes_only_inside_out_never_replaces_never_follows_links(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = ff.pairs(tmp_path / "data")
    out = tmp_path / "out"
    _convert(capsys, layout, "vlmtune", out)
    written = (out / "pairs.json").read_text()
    before = _snapshot(tmp_path)
    assert main(["data", "convert", str(layout.train), "--to", "vlmtune", "--out", str(out)]) == 2
    assert "pairs.json: exists; data convert never replaces a file" in capsys.readouterr().err
    victim = tmp_path / "victim.json"
    victim.write_text("keep me")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "meta.json").symlink_to(victim)
    before = _snapshot(tmp_path)
    assert main(["data", "convert", str(layout.train), "--to", "internvl", "--out", str(linked)]) == 2
    assert "meta.json: exists" in capsys.readouterr().err
    assert victim.read_text() == "keep me" and _snapshot(tmp_path) == before
    assert not (linked / "pairs.jsonl").exists()  # refused before anything was written
    link_out = tmp_path / "link_out"
    link_out.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert main(["data", "convert", str(layout.train), "--to", "swift", "--out", str(link_out)]) == 2
    assert "is a symbolic link" in capsys.readouterr().err and not (tmp_path / "elsewhere").exists()
    assert (out / "pairs.json").read_text() == written
