"""What a newcomer meets in the first hour (issue 20): errors that name the fix, one epoch
numbering, files that follow the umask, quiet logs without carriage returns, seed sweeps
that share their data and cache."""

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import CONFIGS
from vlmtune.cli import main
from vlmtune.config import load_config, stage_starts
from vlmtune.errors import ConfigError

RECEIPTS = CONFIGS / "receipts_three_stage.yaml"


# --------------------------------------------------------------------------- stage starts


def test_stage_start_past_the_epochs_names_the_fraction(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args = ["train", str(RECEIPTS), "train.epochs=3", "stages.1.start_epoch=6", "--output-dir", str(tmp_path / "r")]
    assert main(args) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "stages[1].start_epoch: 6 is not before train.epochs 3" in err
    assert "stages.1.start=0.33" in err and "raise train.epochs to at least 7" in err
    # The suggested fraction is one that fits: the stage then starts inside the run.
    cfg = load_config(RECEIPTS, ["train.epochs=3", "stages.1.start=0.33", "stages.2.start_epoch=2"])
    assert stage_starts(cfg.stages, 3) == [0, 1, 2]
    # Too few epochs for one each: only more epochs can fix it, and the message says so.
    with pytest.raises(ConfigError, match=r"raise train.epochs to at least 6 \(or to 3, one epoch per stage"):
        load_config(RECEIPTS, ["train.epochs=2", "stages.1.start_epoch=5", "stages.2.start_epoch=6"])


def test_receipts_recipe_starts_its_stages_as_fractions() -> None:
    cfg = load_config(RECEIPTS)
    assert [st.start for st in cfg.stages[1:]] == [0.48, 0.75] and all(st.start_epoch is None for st in cfg.stages[1:])
    # The same epochs as the absolute starts it had (0, 6, 9 of 12): its figures do not move.
    assert cfg.train.epochs == 12 and stage_starts(cfg.stages, 12) == [0, 6, 9]
    # A short run keeps every stage, one epoch each.
    assert stage_starts(load_config(RECEIPTS, ["train.epochs=3"]).stages, 3) == [0, 1, 2]


# --------------------------------------------------------------------------- same split by digest


def _moved_copy(ckpt: Path, scenes: Path, dest: Path) -> Path:
    """A copy of ``ckpt`` whose run generated the same synthetic set in another folder:
    its state records the copy's files, byte-identical to ``scenes``."""
    from vlmtune.checkpoint import write_manifest

    data = dest / "data"
    shutil.copytree(scenes, data)
    copy = dest / "checkpoints" / "best"
    shutil.copytree(ckpt, copy)
    state = json.loads((copy / "state.json").read_text())
    state["data_paths"] = {k: str(data / Path(v).name) for k, v in state["data_paths"].items()}
    (copy / "state.json").write_text(json.dumps(state, indent=2))
    write_manifest(copy)
    return copy


def test_identical_test_files_are_the_same_split(
    retrieval_checkpoint: Path, scenes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = _moved_copy(retrieval_checkpoint, scenes, tmp_path / "other")
    paths = {json.loads((c / "state.json").read_text())["data_paths"]["test"] for c in (retrieval_checkpoint, copy)}
    assert len(paths) == 2  # two names ...
    out = tmp_path / "ev"
    args = ["evaluate", str(retrieval_checkpoint), str(copy), "--labels", "a", "b", "--output-dir", str(out)]
    assert main(args) == 0, capsys.readouterr().err  # ... one split
    both = json.loads((out / "evaluation.json").read_text())
    assert both["a"]["retrieval/mean_recall"] == pytest.approx(both["b"]["retrieval/mean_recall"])
    # An edited image under the same annotation file is another split.
    test = json.loads((tmp_path / "other" / "data" / "test.json").read_text())
    image = tmp_path / "other" / "data" / test[0]["image"]
    shutil.copyfile(tmp_path / "other" / "data" / test[-1]["image"], image)
    assert main([*args[:-1], str(tmp_path / "ev2")]) != 0
    err = capsys.readouterr().err
    assert "record different test splits" in err and "differ in their records or images" in err


# --------------------------------------------------------------------------- file modes


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoint_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    import torch
    from safetensors.torch import save_file

    from vlmtune.checkpoint import open_checkpoint, save_checkpoint
    from vlmtune.runfolder import write_atomic
    from vlmtune.state import TrainState

    old = os.umask(umask)
    try:
        folder = tmp_path / "ckpt"
        cfg = load_config(None)
        save_checkpoint(folder, weights={"w": torch.zeros(3)}, cfg=cfg, state=TrainState(), trainer_state={"x": 1}, backbone=None)
        write_atomic(tmp_path / "embeddings.safetensors", lambda p: save_file({"e": torch.ones(2)}, str(p)))
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    assert {p.name for p in files} >= {"weights.safetensors", "trainer_state.pt", "state.json", "config.yaml", "manifest.json"}
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in [*files, tmp_path / "embeddings.safetensors"]}
    assert set(modes.values()) == {oct(want)}, modes
    open_checkpoint(folder)  # the manifest lists the files as they are
