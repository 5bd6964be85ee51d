"""What a newcomer meets in the first hour (issue 20): errors that name the fix, one epoch
numbering, files that follow the umask, quiet logs without carriage returns, seed sweeps
that share their data and cache."""

import json
import os
import re
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


# --------------------------------------------------------------------------- a seed sweep, as a log reads it

SWEEP = [
    "data.synthetic.n=40",
    "data.synthetic.image_size=48",
    "train.epochs=2",
    "train.batch_size=8",
    "eval.batch_size=16",
    "eval.ks=[1,2]",
    "train.progress=true",  # the bars on, written into a file: plain lines, never carriage returns
]
# What the libraries would print unless quieted (--verbose lets them through).
NOISE = ("Loading weights", "Writing model shards", "Loading faiss", "Successfully loaded faiss", "Using default tokenizer")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A two-seed sweep of the two-stage recipe on a freshly generated set: (folder, stdout, stderr)."""
    out = tmp_path_factory.mktemp("sweep") / "sw"
    import contextlib
    import io

    err, std = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        old = os.umask(0o022)
        try:
            rc = main(["train", str(CONFIGS / "retrieval_two_stage.yaml"), *SWEEP, "--output-dir", str(out), "--seeds", "0,1"])
        finally:
            os.umask(old)
    assert rc == 0, err.getvalue()
    return out, std.getvalue(), err.getvalue()


def _per_seed(err: str) -> list[str]:
    """The sweep's stderr cut into the seeds' parts (each starts with its thread line)."""
    parts = re.split(r"(?m)^(?=train\.num_threads: )", err)
    return [p for p in parts if p.strip()]


def test_seeds_share_one_synthetic_set_and_one_cache(sweep: tuple[Path, str, str]) -> None:
    out, _, err = sweep
    seed0, seed1 = _per_seed(err)
    assert seed0.count("generating the synthetic set") == 1 and "generating" not in seed1
    assert seed0.count("feature cache: computing") >= 2  # image and caption features ...
    assert "feature cache: computing" not in seed1  # ... built once for both seeds
    cfgs = [load_config(out / f"seed{s}" / "config.yaml") for s in (0, 1)]
    assert cfgs[0].data.synthetic_dir == cfgs[1].data.synthetic_dir and cfgs[0].cache.dir == cfgs[1].cache.dir
    assert Path(cfgs[0].data.synthetic_dir).parent == out / "shared" and Path(cfgs[0].cache.dir) == out / "shared" / "cache"
    assert not (out / "seed0" / "data").exists() and not (out / "seed1" / "cache").exists()
    states = [json.loads((out / f"seed{s}/checkpoints/last/state.json").read_text()) for s in (0, 1)]
    assert states[0]["data_sha256"] == states[1]["data_sha256"] and cfgs[0].seed != cfgs[1].seed
    # Two sweeps of one config are one group in a comparison, wherever each kept its data.
    from vlmtune.report import group_runs, load_run

    assert [len(g.runs) for g in group_runs([load_run(out / "seed0"), load_run(out / "seed1")])] == [2]


def test_what_seeds_share_is_named_by_the_config() -> None:
    from vlmtune.cli.run import _share_across_seeds

    def sweep_cfgs(*overrides: str) -> dict:
        return {s: load_config(CONFIGS / "retrieval_two_stage.yaml", [*overrides, f"seed={s}"]) for s in (0, 1)}

    base, other, named = sweep_cfgs(), sweep_cfgs("data.synthetic.n=50"), sweep_cfgs("data.synthetic_dir=mine", "cache.dir=c")
    for cfgs in (base, other, named):
        _share_across_seeds(cfgs, Path("runs/x"))
    assert base[0].data.synthetic_dir == base[1].data.synthetic_dir
    assert base[0].data.synthetic_dir.startswith("runs/x/shared/data-")
    assert other[0].data.synthetic_dir != base[0].data.synthetic_dir  # other data settings: another folder
    assert (named[0].data.synthetic_dir, named[1].cache.dir) == ("mine", "c")  # the user's folders stay


def test_one_epoch_numbering_from_one(sweep: tuple[Path, str, str]) -> None:
    out, std, err = sweep
    seed0 = _per_seed(err)[0]
    assert "stage 0 'align' (epoch 1):" in seed0 and "stage 1 'ground' (epoch 2):" in seed0
    assert re.findall(r"(?m)^epoch (\d+): retrieval/mean_recall", seed0) == ["1", "2"]
    metrics = json.loads((out / "seed0" / "metrics.json").read_text())
    best = metrics["train/best_epoch"]
    assert best in (1, 2) and f"best checkpoint: epoch {best}, stage {best - 1} " in std
    lines = [json.loads(x) for x in (out / "seed0" / "history.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines if x["type"] == "stage"] == [1, 2]
    epochs = {x["epoch"]: x for x in lines if x["type"] == "epoch"}
    assert sorted(epochs) == [1, 2]
    assert epochs[best]["val/retrieval/mean_recall"] == pytest.approx(metrics["train/best_val"])
    assert {x["epoch"] for x in lines if x["type"] == "step" and x["stage"] == 1} == {2}
    # The checkpoint's own state keeps counting epochs done (resume reads it as before).
    assert json.loads((out / "seed0/checkpoints/last/state.json").read_text())["epoch"] == 2


def test_a_log_has_no_carriage_returns_and_no_library_noise(sweep: tuple[Path, str, str]) -> None:
    _, std, err = sweep
    assert "\r" not in err and "\r" not in std
    for noise in NOISE:
        assert noise not in err, noise


def test_a_sweeps_files_follow_the_umask(sweep: tuple[Path, str, str]) -> None:
    out, _, _ = sweep
    files = [p for p in out.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name == "weights.safetensors" for p in files) and any(p.name == "model.safetensors" for p in files)
    bad = {str(p.relative_to(out)): oct(p.stat().st_mode & 0o777) for p in files if p.stat().st_mode & 0o777 != 0o644}
    assert not bad


# --------------------------------------------------------------------------- history files of before


def test_history_written_from_zero_is_read_and_continued_as_it_counts(tmp_path: Path) -> None:
    from vlmtune.history import EpochRecord, History, StageRecord, epochs_from_one, read_history

    def stage(epoch: int) -> StageRecord:
        return StageRecord(
            stage=0, name="a", epoch=epoch, step=0, train={"heads": 1.0}, losses=["x"], trainable=1, total=2, cache={}
        )

    def epoch(n: int) -> EpochRecord:
        return EpochRecord(epoch=n, step=n, stage=0, samples=n, train_wall_s=1.0, wall_s=1.0, peak_mem_mb=0.0, val={"m": 1.0})

    old = tmp_path / "old.jsonl"  # a run of vlmtune 0.2.0: epochs from 0
    old.write_text("".join(json.dumps(r.to_json()) + "\n" for r in (stage(0), epoch(0))))
    resumed = History(old, keep_lines=2)
    resumed.write(epoch(2))  # the loop counts from 1; the file goes on from 0
    assert [r.epoch for r in read_history(old)] == [0, 0, 1]
    assert [r.epoch for r in epochs_from_one(read_history(old))] == [1, 1, 2]
    new = History(tmp_path / "new.jsonl", keep_lines=None)
    for r in (stage(1), epoch(1), epoch(2)):
        new.write(r)
    assert [r.epoch for r in epochs_from_one(read_history(new.path))] == [1, 1, 2]


def test_progress_in_a_log_is_plain_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib
    import io
    import time

    from vlmtune import console

    monkeypatch.setattr(console, "LOG_EVERY_S", 0.01)
    monkeypatch.setattr(console, "LONG_S", 0.0)
    err = io.StringIO()  # not a terminal
    with contextlib.redirect_stderr(err):
        for _ in console.progress(range(5), desc="caching vision_tokens", unit="row"):
            time.sleep(0.02)
        with console.bars(False):  # train.progress=false: nothing at all
            for _ in console.progress(range(3), desc="quiet"):
                time.sleep(0.02)
    text = err.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and lines and all(ln.startswith("caching vision_tokens") for ln in lines)
    assert "5/5" in lines[-1] and "quiet" not in text


def test_counting_evaluate_is_quiet_and_says_its_steps(
    lora_counting_checkpoint: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The answers are scored with ROUGE (whose tokenizer announces itself) and BLEU; the
    LoRA model comes through peft: none of their messages reach the log."""
    assert main(["evaluate", str(lora_counting_checkpoint), "--output-dir", str(tmp_path / "ev")]) == 0
    out, err = capfd.readouterr()
    assert "\r" not in err
    for noise in (*NOISE, "FutureWarning", "UserWarning"):
        assert noise not in err, noise
    assert "evaluating " in err and "scoring the counts and answers" in err  # the steps around the bar
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["text/rougeL"] >= 0


def test_a_sweep_begun_before_sharing_resumes_with_its_own_folders(tmp_path: Path) -> None:
    from vlmtune.cli.run import _share_across_seeds
    from vlmtune.config import save_config

    cfgs = {s: load_config(CONFIGS / "retrieval_two_stage.yaml", [f"seed={s}"]) for s in (0, 1)}
    (tmp_path / "seed0").mkdir()
    save_config(load_config(CONFIGS / "retrieval_two_stage.yaml", ["seed=0"]), tmp_path / "seed0" / "config.yaml")
    _share_across_seeds(cfgs, tmp_path, resume=True)
    assert cfgs[0].data.synthetic_dir is None and cfgs[0].cache.dir is None  # as it started: seed0/data, seed0/cache
    assert cfgs[1].data.synthetic_dir.startswith(str(tmp_path / "shared" / "data-"))  # not started yet: shared
