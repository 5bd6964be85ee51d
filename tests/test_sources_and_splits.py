"""What a command reads is never lost or widened in silence.

``train --overwrite`` never removes the checkpoint it warm-starts from; data commands
name a missing file in one line; Karpathy records of no known split are errors naming
the record; a ``save_to_disk`` folder cannot read arrow files outside itself;
``--accept-changed-data`` without ``--resume`` is refused before anything runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import ONE_STAGE, TWO_STAGE, small_set
from formats_fixtures import hf_save_to_disk, karpathy_flickr
from vlmtune.cli import main


def _one_error(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 2) -> str:
    got = main(argv)
    cap = capsys.readouterr()
    assert got == code and "Traceback" not in cap.err + cap.out, cap.err
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1, cap.err
    return lines[0]


def _validate_out(capsys: pytest.CaptureFixture[str], args: list[str]) -> list[str]:
    assert main(["data", "validate", *args]) == 1
    return capsys.readouterr().out.splitlines()


def test_overwrite_never_removes_the_init_from_source(one_stage_run: Path, scenes: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(one_stage_run, run, ignore=shutil.ignore_patterns("cache", "data"))
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    capsys.readouterr()
    argv = ["train", TWO_STAGE, "--output-dir", str(run), "--overwrite", *small_set(scenes), "train.epochs=1", ONE_STAGE]
    msg = _one_error(capsys, [*argv, "--init-from", str(run / "checkpoints" / "last")])
    assert msg.startswith("error: --init-from ") and "which --overwrite would remove before the run reads it" in msg, msg
    # The same through the config key, and through a link that leads into the run.
    (tmp_path / "alias").symlink_to(run / "checkpoints", target_is_directory=True)
    msg = _one_error(capsys, [*argv, f"train.init_from={tmp_path / 'alias' / 'best'}"])
    assert "--overwrite would remove" in msg, msg
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # nothing removed


def test_accept_changed_data_needs_resume(tmp_path: Path, capsys) -> None:
    msg = _one_error(capsys, ["train", TWO_STAGE, "--output-dir", str(tmp_path / "r"), "--accept-changed-data"])
    assert "--accept-changed-data: only with --resume" in msg
    assert not (tmp_path / "r").exists()


def test_data_inspect_of_what_cannot_be_read_is_one_line(tmp_path: Path, capsys) -> None:
    msg = _one_error(capsys, ["data", "inspect", str(tmp_path / "nope.json")])
    assert msg == f"error: {tmp_path / 'nope.json'}: annotation file not found"
    (tmp_path / "folder").mkdir()
    msg = _one_error(capsys, ["data", "inspect", str(tmp_path / "folder")])
    assert "is a folder but not" in msg, msg


def test_data_validate_of_a_missing_file_is_one_line(tmp_path: Path, capsys) -> None:
    """A missing file is not a report: one line and exit 2 (as data inspect), with --json too;
    a file that exists but is bad is still reported (exit 1)."""
    capsys.readouterr()
    for extra in ([], ["--json"], ["--kind", "counting"]):
        got = main(["data", "validate", str(tmp_path / "nope.json"), *extra])
        cap = capsys.readouterr()
        assert got == 2 and cap.out == "", cap.out
        assert cap.err.strip() == f"error: {tmp_path / 'nope.json'}: annotation file not found", cap.err
    (tmp_path / "gone.json").symlink_to(tmp_path / "nowhere.json")  # a dangling link: nothing to read either
    assert _one_error(capsys, ["data", "validate", str(tmp_path / "gone.json")]).endswith("annotation file not found")
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["data", "validate", str(tmp_path / "bad.json")]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("1 error, 0 notes")


def test_karpathy_records_of_no_known_split_are_reported(tmp_path: Path, capsys) -> None:
    layout = karpathy_flickr(tmp_path, n=8)
    data = json.loads(layout.train.read_text())
    del data["images"][6]["split"]  # a test record without a split
    data["images"][7]["split"] = "TEST"  # and one with a name that is none of Karpathy's
    layout.train.write_text(json.dumps(data))
    root = ["--image-root", str(layout.image_root)]
    capsys.readouterr()
    assert main(["data", "validate", str(layout.train), *root, "--split", "test"]) == 1
    out = capsys.readouterr().out
    assert "record 6: has no 'split'" in out and "record 7: split 'TEST' is none of" in out, out
    assert "2 records, 2 errors" in out
    # An image root that is a file is named as such.
    msg = [ln for ln in _validate_out(capsys, [str(layout.train), "--image-root", str(layout.train), "--split", "test"])]
    assert any(f"data.image_root {layout.train}: is a file, not a folder" in ln for ln in msg), msg
    # Every split reports them (not only the one they might have meant).
    assert main(["data", "validate", str(layout.train), *root, "--split", "train"]) == 1
    assert "record 7: split 'TEST'" in capsys.readouterr().out
    # With data.on_error=skip they are counted and skipped, never silently in no split.
    assert main(["data", "inspect", str(layout.train), *root, "--split", "test", "data.on_error=skip", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["errors"] == 2 and "record 6: has no 'split'" in info["first_error"]
    # Reading every split takes every record: none is refused for its split.
    assert main(["data", "validate", str(layout.train), *root]) == 0


def test_saved_dataset_cannot_read_files_outside_its_folder(tmp_path: Path, capsys) -> None:
    layout = hf_save_to_disk(tmp_path / "real", n=8)
    saved = layout.train
    # A data set whose state.json names the arrow file of another folder.
    other = tmp_path / "other"
    shutil.copytree(saved / "train", other)
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(saved / "train" / "dataset_info.json", bad)
    state = json.loads((saved / "train" / "state.json").read_text())
    state["_data_files"] = [{"filename": f"../other/{f['filename']}"} for f in state["_data_files"]]
    (bad / "state.json").write_text(json.dumps(state))
    root = ["--image-root", str(layout.image_root)]
    capsys.readouterr()
    assert main(["data", "validate", str(bad), *root, "--format", "hf"]) == 1
    out = capsys.readouterr().out
    assert "state.json: '_data_files' names '../other/" in out and "leads outside the data set's folder" in out, out
    # A DatasetDict whose split folder is outside.
    dd = tmp_path / "dd"
    dd.mkdir()
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["../other"]}))
    assert main(["data", "validate", str(dd), *root, "--format", "hf"]) == 1
    assert "dataset_dict.json: split '../other' leads outside" in capsys.readouterr().out
    # The untouched folder still reads.
    assert main(["data", "validate", str(saved), *root]) == 0
