"""Negatives beyond the batch in whole runs: data negatives read and used, mined
negatives refreshed, saved in the checkpoint and restored exactly by --resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from conftest import ONE_STAGE, TWO_STAGE, small_set
from test_faults import _assert_same_run
from vlmtune.cli import main

MINE = ["negatives.mine=true", "negatives.per_query=3", "train.log_every=1"]
# One stage of two epochs: refreshes at epochs 0 and 1.
RUN = [ONE_STAGE, "train.epochs=2"]


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def mined_straight(tmp_path_factory: pytest.TempPathFactory, scenes: Path) -> Path:
    out = tmp_path_factory.mktemp("mined") / "run"
    assert main(["train", TWO_STAGE, "--output-dir", str(out), *small_set(scenes), *RUN, *MINE]) == 0
    return out


@pytest.mark.slow
def test_a_stop_during_a_refresh_resumes_bit_identically(
    tmp_path: Path, scenes: Path, mined_straight: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while the second refresh (epoch 1) mines: the refresh finishes, the epoch's
    first step runs, a mid-epoch checkpoint holds the lists; --resume does not mine
    again (the model has moved on since) but restores them, and ends exactly as the
    straight run: weights, metrics, history."""
    from vlmtune.tasks.retrieval.negatives import NegativeBank

    real = NegativeBank.refresh
    calls = {"n": 0}

    def refresh(self, model, loader, device):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, model, loader, device)

    monkeypatch.setattr(NegativeBank, "refresh", refresh)
    run = tmp_path / "run"
    args = ["train", TWO_STAGE, "--output-dir", str(run), *small_set(scenes), *RUN, *MINE]
    assert main(args) == 143
    st = json.loads((run / "checkpoints/last/state.json").read_text())
    assert (st["epoch"], st["epoch_batches"]) == (1, 1)
    assert main([*args, "--resume"]) == 0
    assert calls["n"] == 2  # no refresh: the rest of epoch 1 trains on the lists from the checkpoint
    _assert_same_run(mined_straight, run)
    for key in ("negatives/refreshes", "negatives/mined_used", "negatives/false_negatives_filtered"):
        assert _metrics(run)[key] == _metrics(mined_straight)[key], key


@pytest.mark.slow
def test_a_stop_after_a_refresh_resumes_bit_identically(
    tmp_path: Path, scenes: Path, mined_straight: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM during step 5 of epoch 0, after its refresh: the mid-epoch checkpoint's
    lists carry the rest of epoch 0, and epoch 1 mines anew as the straight run did."""
    from vlmtune.tasks.retrieval import RetrievalModel

    real = RetrievalModel.forward
    calls = {"n": 0}

    def forward(self, batch, active):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, batch, active)

    monkeypatch.setattr(RetrievalModel, "forward", forward)
    run = tmp_path / "run"
    args = ["train", TWO_STAGE, "--output-dir", str(run), *small_set(scenes), *RUN, *MINE]
    assert main(args) == 143
    st = json.loads((run / "checkpoints/last/state.json").read_text())
    assert (st["epoch"], st["epoch_batches"]) == (0, 5)
    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0
    _assert_same_run(mined_straight, run)
    for key in ("negatives/refreshes", "negatives/mined_used", "negatives/false_negatives_filtered"):
        assert _metrics(run)[key] == _metrics(mined_straight)[key], key


def _with_negatives(scenes: Path, dest: Path) -> Path:
    """The small set, each training record carrying a negative caption (another
    image's) and a negative image (another record's)."""
    shutil.copytree(scenes, dest)
    recs = json.loads((dest / "train.json").read_text())
    for i, r in enumerate(recs):
        other = recs[(i + 7) % len(recs)]
        r["negatives"] = [other["text"] + " and a square"]
        r["negative_images"] = [other["image"]] if other["image"] != r["image"] else []
    (dest / "train.json").write_text(json.dumps(recs))
    return dest


def test_data_and_mined_negatives_are_counted_used_and_saved(tmp_path: Path, scenes: Path, capsys) -> None:
    """One epoch with both sources: data inspect counts the data's negatives; the run
    uses them and the mined ones (sample=0: all of each row's), records it in
    metrics.json, and keeps the mined lists in the checkpoint."""
    import io

    import torch

    data = _with_negatives(scenes, tmp_path / "data")
    assert main(["data", "inspect", str(data / "train.json")]) == 0
    assert "88 records carry 88 negative captions" in capsys.readouterr().out
    run = tmp_path / "run"
    args = [*small_set(scenes), f"data.synthetic_dir={data}", "train.epochs=1", ONE_STAGE, *MINE]
    assert main(["train", TWO_STAGE, "--output-dir", str(run), *args, "negatives.data=true", "negatives.sample=0"]) == 0
    m = _metrics(run)
    n_images = sum(bool(r["negative_images"]) for r in json.loads((data / "train.json").read_text()))
    assert m["negatives/data_captions"] == 88 and m["negatives/data_images"] == n_images
    # 11 steps of 8 rows: every row's negative caption, and its negative image where it has one.
    assert 88 + 11 * 6 <= m["negatives/data_used"] <= 2 * 88
    assert m["negatives/refreshes"] == 1 and m["negatives/mined_per_query"] == 3
    assert 0 < m["negatives/mined_used"] <= 2 * 3 * 88
    assert m["negatives/false_negatives_filtered"] == m["negatives/filtered_same_text"] + m["negatives/filtered_above"]
    state = torch.load(io.BytesIO((run / "checkpoints/last/trainer_state.pt").read_bytes()), weights_only=True)
    mined = state["task"]["negatives"]["mined"]
    assert tuple(mined["i2t"].shape) == (32, 3) and tuple(mined["t2i"].shape) == (88, 3)  # 32 images, 88 captions


def test_data_negatives_without_any_in_the_data_is_one_line(tmp_path: Path, scenes: Path, capsys) -> None:
    run = tmp_path / "run"
    # The scenes set carries hard negatives: a copy of it without them.
    data = tmp_path / "data"
    shutil.copytree(scenes, data)
    recs = json.loads((data / "train.json").read_text())
    (data / "train.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "negatives"} for r in recs]))
    args = ["train", TWO_STAGE, "--output-dir", str(run), *small_set(scenes), f"data.synthetic_dir={data}"]
    args += ["train.epochs=1", ONE_STAGE, "negatives.data=true"]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = [x for x in err.splitlines() if "negatives.data" in x]
    assert len(line) == 1 and "train.json" in line[0] and "negatives.data=false" in line[0]


@pytest.mark.parametrize(
    "override,key",
    [
        ("negatives.per_query=8", "negatives.per_query"),
        ("negatives.sample=2", "negatives.sample"),
        ("negatives.refresh_every=0", "negatives.refresh_every"),
        ("negatives.exclude_above=0", "negatives.exclude_above"),
    ],
)
def test_bad_negatives_settings_are_one_line_naming_the_key(override: str, key: str) -> None:
    from vlmtune.config import load_config
    from vlmtune.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(key) and "\n" not in str(e.value)


@pytest.mark.slow  # a torchrun launch of two processes
def test_two_processes_train_with_data_and_mined_negatives(tmp_path: Path, scenes: Path) -> None:
    """Under DDP each process draws its own extra columns (their number differs between
    processes): the contrastive loss gathers the batch's columns and keeps its own
    extras, the matching head's pairs are counted globally; both processes mine the same
    lists, and the main process alone writes the run."""
    from test_distributed import _torchrun

    data = _with_negatives(scenes, tmp_path / "data")
    run = tmp_path / "run"
    args = [*small_set(scenes), f"data.synthetic_dir={data}", "train.epochs=1", ONE_STAGE, *MINE, "negatives.data=true"]
    res = _torchrun(["train", TWO_STAGE, "--output-dir", str(run), *args], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    m = _metrics(run)
    assert m["negatives/refreshes"] == 1 and m["negatives/mined_used"] > 0 and m["negatives/data_used"] > 0
    steps = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines() if json.loads(x)["type"] == "step"]
    assert steps and all(s["loss"] == s["loss"] for s in steps)  # finite, every step
