"""Faults lose nothing: SIGINT/SIGTERM save and stop, a kill at any point resumes to
the same weights, metrics and history as a straight run, non-finite losses are skipped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import RESUMABLE, ROOT, TWO_STAGE, small_set
from vlmtune.cli import main
from vlmtune.history import read_history

# The uninterrupted reference run is conftest's `straight`: small_set + RESUMABLE.
IGNORED = ("wall_s", "peak_mem_mb", "cache", "train_wall_s")


def _history(run: Path) -> list[dict]:
    read_history(run / "history.jsonl")  # every line follows the schema (vlmtune.history)
    lines = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    return [{k: v for k, v in x.items() if k not in IGNORED} for x in lines]


def _assert_same_run(a: Path, b: Path) -> None:
    wa = load_file(str(a / "checkpoints/last/weights.safetensors"))
    wb = load_file(str(b / "checkpoints/last/weights.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() < 1e-6, k
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    for key in (
        "retrieval/mean_recall",
        "retrieval/i2t_r1",
        "grounding/miou",
        "spatial/accuracy",
        "train/steps",
        "train/best_epoch",
        "train/samples",
    ):
        assert ma[key] == pytest.approx(mb[key], abs=1e-6), key
    ha, hb = _history(a), _history(b)
    assert len(ha) == len(hb)
    for x, y in zip(ha, hb):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], float):
                assert x[k] == pytest.approx(y[k], abs=1e-6), (x["step"], k)
            else:
                assert x[k] == y[k], (x["step"], k)


def _counting_forward(monkeypatch: pytest.MonkeyPatch, action) -> None:
    """Wrap the retrieval model's forward: ``action(n, terms)`` sees the n-th call (from 1)."""
    from vlmtune.tasks.retrieval import RetrievalModel

    real = RetrievalModel.forward
    calls = {"n": 0}

    def forward(self, batch, active):
        calls["n"] += 1
        terms = real(self, batch, active)
        return action(calls["n"], terms)

    monkeypatch.setattr(RetrievalModel, "forward", forward)


def test_sigterm_mid_epoch_saves_and_resumes_exactly(
    tmp_path: Path, scenes: Path, straight: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """SIGTERM during step 15 (epoch 2, stage 2): the step finishes, a mid-epoch checkpoint
    is saved, the run exits 143 with one line; --resume skips the 4 trained batches of
    epoch 2 and ends exactly as the straight run."""

    def sigterm_at_15(n, terms):
        if n == 15:
            os.kill(os.getpid(), signal.SIGTERM)
        return terms

    _counting_forward(monkeypatch, sigterm_at_15)
    run = tmp_path / "run"
    args = ["train", TWO_STAGE, "--output-dir", str(run), *small_set(scenes), *RESUMABLE]
    assert main(args) == 143
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = [ln for ln in err.splitlines() if ln.startswith("interrupted:")]
    assert len(line) == 1 and "SIGTERM" in line[0] and "--resume" in line[0]
    st = json.loads((run / "checkpoints/last/state.json").read_text())
    assert (st["epoch"], st["epoch_batches"], st["step"]) == (1, 4, 15)
    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0
    _assert_same_run(straight, run)


def test_non_finite_losses_are_skipped_and_counted(tmp_path: Path, scenes: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nan_steps = {3, 4}

    def nan_some(n, terms):
        if n in nan_steps:
            terms = dict(terms, contrastive=terms["contrastive"] * float("nan"))
        return terms

    _counting_forward(monkeypatch, nan_some)
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                TWO_STAGE,
                "--output-dir",
                str(run),
                *small_set(scenes),
                "stages.1.start_epoch=1",
                "train.epochs=2",
                "train.log_every=1",
                "train.max_bad_steps=3",
            ]
        )
        == 0
    )
    m = json.loads((run / "metrics.json").read_text())
    assert m["train/bad_steps"] == 2 and m["train/steps"] == 22
    w = load_file(str(run / "checkpoints/last/weights.safetensors"))
    assert all(torch.isfinite(v).all() for v in w.values())
    steps = [x for x in _history(run) if x["type"] == "step"]
    assert all(x["loss"] == x["loss"] for x in steps if "loss" in x)  # no NaN reaches the history
    assert steps[-1]["bad_steps"] == 2


def test_a_run_of_non_finite_losses_stops_with_a_checkpoint(
    tmp_path: Path, scenes: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    _counting_forward(monkeypatch, lambda n, t: dict(t, contrastive=t["contrastive"] * float("inf")) if n >= 3 else t)
    run = tmp_path / "run"
    code = main(
        [
            "train",
            TWO_STAGE,
            "--output-dir",
            str(run),
            *small_set(scenes),
            "train.epochs=1",
            "stages=[{name: a, start_epoch: 0, train: {adapters: 1.0, heads: 1.0}}]",
            "train.max_bad_steps=2",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "2 steps in a row" in line[0] and "checkpoint" in line[0]
    st = json.loads((run / "checkpoints/last/state.json").read_text())
    assert (st["step"], st["bad_in_row"], st["epoch_batches"]) == (4, 2, 4)
    assert not (run / "metrics.json").exists()


def test_keep_last_rotates_older_checkpoints(tmp_path: Path, scenes: Path) -> None:
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                TWO_STAGE,
                "--output-dir",
                str(run),
                *small_set(scenes),
                "train.epochs=3",
                "train.keep_last=2",
                "stages=[{name: a, start_epoch: 0, train: {adapters: 1.0}}]",
            ]
        )
        == 0
    )
    folders = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert folders == ["best", "last", "last-1"]
    epoch = lambda name: json.loads((run / "checkpoints" / name / "state.json").read_text())["epoch"]  # noqa: E731
    assert (epoch("last"), epoch("last-1")) == (3, 2)


def _wait(proc: subprocess.Popen, cond, what: str, timeout: float = 240) -> None:
    end = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}")
        if time.time() > end:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _state(run: Path) -> dict:
    try:
        return json.loads((run / "checkpoints/last/state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _step_lines(run: Path) -> int:
    try:
        return sum('"type": "step"' in ln for ln in (run / "history.jsonl").read_text().splitlines())
    except OSError:
        return 0


def _starter(run: Path, scenes: Path):
    """``start(resume)`` starts `vlmtune train` (the straight run's arguments) into ``run``
    as a process of its own."""
    cmd = [sys.executable, "-m", "vlmtune.cli", "train", TWO_STAGE, "--output-dir", str(run), *small_set(scenes), *RESUMABLE]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    def start(resume: bool) -> subprocess.Popen:
        return subprocess.Popen(
            cmd + (["--resume"] if resume else []),
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    return start


def test_sigkill_mid_epoch_then_resume(tmp_path: Path, scenes: Path, straight: Path) -> None:
    """`vlmtune train` as a process, killed with SIGKILL in the middle of its second epoch:
    the last checkpoint is the first epoch's, the history has step lines past it, and
    `--resume` ends exactly as the straight run. (Three more points: the slow test below.)"""
    run = tmp_path / "run"
    start = _starter(run, scenes)
    p = start(False)
    _wait(p, lambda: _step_lines(run) >= 14, "step 14")
    p.send_signal(signal.SIGKILL)
    p.wait()
    st = _state(run)
    assert st["epoch"] == 1  # nothing newer was saved
    assert st["history_lines"] < len((run / "history.jsonl").read_text().splitlines())  # lines a resume must drop
    p = start(True)
    _, err = p.communicate(timeout=400)
    assert p.returncode == 0, err
    _assert_same_run(straight, run)


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume(tmp_path: Path, scenes: Path, straight: Path) -> None:
    """`vlmtune train` as a process, killed with SIGKILL after its first checkpoint
    appears, in the middle of an epoch, right after a checkpoint's rename, and stopped
    by SIGTERM; each time `--resume` continues; the end equals the straight run."""
    run = tmp_path / "run"
    start = _starter(run, scenes)

    # 1. right after the first checkpoint appears
    p = start(False)
    _wait(p, lambda: _state(run).get("epoch") == 1, "the first checkpoint")
    p.send_signal(signal.SIGKILL)
    p.wait()
    # 2. in the middle of an epoch (a few step lines past the checkpoint)
    p = start(True)
    seen = _state(run)["history_lines"]
    _wait(p, lambda: _step_lines(run) >= 14, "step 14")
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert _state(run).get("history_lines") == seen  # nothing newer was saved
    # 3. as soon as the next checkpoint is renamed into place
    p = start(True)
    _wait(p, lambda: _state(run).get("epoch") == 2, "the second checkpoint")
    p.send_signal(signal.SIGKILL)
    p.wait()
    # 4. SIGTERM in the last epoch: a clean stop with a checkpoint
    p = start(True)
    _wait(p, lambda: _step_lines(run) >= 26, "step 26")
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=240)
    assert p.returncode == 143, err
    assert "Traceback" not in err and "interrupted: SIGTERM" in err
    # 5. to the end
    p = start(True)
    _, err = p.communicate(timeout=400)
    assert p.returncode == 0, err
    _assert_same_run(straight, run)


def _lock_pid(run: Path) -> int | None:
    try:
        text = (run / ".vlmtune.lock").read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def test_one_writer_per_run_folder_and_a_killed_run_resumes(tmp_path: Path, scenes: Path, capsys) -> None:
    """A second `train` on a folder that a running `train` holds fails at once with one
    line naming the folder and the holder's PID (with --resume too); after the holder
    is SIGKILLed its lock is free, and --resume finishes the run."""
    run = tmp_path / "run"
    args = ["train", TWO_STAGE, "--output-dir", str(run), *small_set(scenes), "stages.1.start_epoch=1", "train.epochs=2"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.Popen(
        [sys.executable, "-m", "vlmtune.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait(p, lambda: _lock_pid(run) == p.pid, "the lock")
        for extra in ([], ["--resume"]):
            assert main([*args, *extra]) == 2
            assert p.poll() is None  # refused while the holder runs: it did not wait for the lock
            err = capsys.readouterr().err
            line = [ln for ln in err.splitlines() if ln.startswith("error:")]
            assert len(line) == 1 and "Traceback" not in err
            assert f"{run}: another vlmtune process (PID {p.pid})" in line[0], line[0]
        _wait(p, lambda: _state(run).get("epoch") == 1, "the first checkpoint")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert _lock_pid(run) == p.pid  # the killed run's PID is still in the file, its lock is gone
    assert main([*args, "--resume"]) == 0
    assert json.loads((run / "metrics.json").read_text())["train/epochs"] == 2
    assert _lock_pid(run) == os.getpid()


def test_kill_during_final_evaluation_then_resume(
    tmp_path: Path, scenes: Path, straight: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run dies in its final evaluation (after the last checkpoint); --resume only
    redoes that evaluation, and metrics.json equals the uninterrupted run's, train/last_val
    included (kept in the checkpoint's state), wall-time fields aside."""
    from vlmtune.tasks.retrieval import RetrievalTask

    real = RetrievalTask.evaluate

    def die(self, model, records, **kw):
        if kw.get("train_records") is None:  # a per-epoch validation (validate() calls evaluate())
            return real(self, model, records, **kw)
        raise RuntimeError("killed during the final evaluation")

    monkeypatch.setattr(RetrievalTask, "evaluate", die)
    run = tmp_path / "run"
    args = ["train", TWO_STAGE, "--output-dir", str(run), *small_set(scenes), *RESUMABLE]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "killed during the final evaluation" in err, err
    assert not (run / "metrics.json").exists()
    assert json.loads((run / "checkpoints/last/state.json").read_text())["epoch"] == 3
    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0
    wall = ("train/wall_s", "train/train_wall_s", "train/samples_per_s", "train/peak_mem_mb")
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (straight, run))
    assert "train/last_val" in ma
    assert ma.keys() == mb.keys()
    for k in ma:
        if k not in wall and k != "checkpoint":
            assert ma[k] == mb[k], k
    assert Path(mb["checkpoint"]).name == Path(ma["checkpoint"]).name


def test_resume_at_a_stage_boundary_gives_the_next_stage_a_fresh_patience(
    tmp_path: Path, scenes: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The save at a stage's end keeps that stage's count of evaluations without
    improvement; a run stopped right after it and resumed stops early where the straight
    run does (stage 2's patience counts from 0), not an epoch sooner."""
    import vlmtune.train.loop as loop

    args = [
        *small_set(scenes),
        "stages.1.start_epoch=2",
        "train.epochs=5",
        "train.early_stopping.patience=2",
        "train.early_stopping.min_delta=1000",
    ]
    run = tmp_path / "run"
    real_apply = loop.apply_stage

    def stop_at_stage_2(model, stage, *a, **kw):
        if stage.index == 1:
            raise KeyboardInterrupt
        return real_apply(model, stage, *a, **kw)

    monkeypatch.setattr(loop, "apply_stage", stop_at_stage_2)
    assert main(["train", TWO_STAGE, "--output-dir", str(run), *args]) != 0
    assert json.loads((run / "checkpoints/last/state.json").read_text())["bad_evals"] == 1
    monkeypatch.undo()
    assert main(["train", TWO_STAGE, "--output-dir", str(run), *args, "--resume"]) == 0
    # Straight: epoch 0 is the best, epochs 1-3 are not; stage 2 (from epoch 2) stops after
    # its second such evaluation, epoch 3, with 4 epochs trained (without the fresh count: 3).
    m = json.loads((run / "metrics.json").read_text())
    assert m["train/stopped_early"] is True and m["train/epochs"] == 4
