"""Seed sweeps, run comparison, several checkpoints in one table, trackers: real commands."""

import json
from pathlib import Path
from statistics import mean, stdev

import pytest

from conftest import CONFIGS
from vlmtune.cli import main

ONE_STAGE = "stages=[{name: a, start_epoch: 0, train: {adapters: 1.0, heads: 1.0}}]"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, scenes: Path) -> Path:
    """Two configs: single-stage (2 seeds) and a variant with another LR (1 seed)."""
    root = tmp_path_factory.mktemp("sweep")
    fast = [
        f"data.synthetic_dir={scenes}",
        "data.synthetic.n=40",
        "train.epochs=2",
        "train.batch_size=8",
        "train.progress=false",
        "eval.batch_size=16",
    ]
    cfg = str(CONFIGS / "retrieval_single_stage.yaml")
    assert main(["train", cfg, "--output-dir", str(root / "base"), "--seeds", "0,1", *fast]) == 0
    assert main(["train", cfg, "--output-dir", str(root / "lowlr"), "--seeds", "0", *fast, "optim.lr=1e-4"]) == 0
    return root


def test_seed_sweep_writes_sibling_runs(sweep: Path) -> None:
    for d in ("base/seed0", "base/seed1", "lowlr/seed0"):
        assert (sweep / d / "metrics.json").is_file(), d
    s0 = json.loads((sweep / "base/seed0/metrics.json").read_text())
    s1 = json.loads((sweep / "base/seed1/metrics.json").read_text())
    assert s0["retrieval/mean_recall"] != s1["retrieval/mean_recall"] or s0["train/best_val"] != s1["train/best_val"]


def test_compare_report_numbers_come_from_the_runs(sweep: Path, tmp_path: Path) -> None:
    runs = [sweep / "base/seed0", sweep / "base/seed1", sweep / "lowlr/seed0"]
    assert main(["compare", *map(str, runs), "--output-dir", str(tmp_path / "rep")]) == 0
    for f in ("report.md", "report.html", "comparison.json", "losses.png", "val_curve.png", "recall_at_k.png"):
        assert (tmp_path / "rep" / f).is_file(), f
    result = json.loads((tmp_path / "rep" / "comparison.json").read_text())
    assert [g["n"] for g in result["groups"]] == [2, 1]
    base, low = (g["name"] for g in result["groups"])
    vals = [json.loads((r / "metrics.json").read_text())["retrieval/i2t_r1"] for r in runs[:2]]
    stats = result["metrics"]["retrieval/i2t_r1"]["groups"]
    assert stats[base]["mean"] == pytest.approx(mean(vals))
    assert stats[base]["std"] == pytest.approx(stdev(vals))
    low_val = json.loads((runs[2] / "metrics.json").read_text())["retrieval/i2t_r1"]
    assert stats[low]["mean"] == pytest.approx(low_val)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"{mean(vals):.2f}" in md or f"{mean(vals):.1f}" in md
    assert "chance" in md


def test_several_checkpoints_one_table_shared_features(sweep: Path, tmp_path: Path, scenes: Path) -> None:
    a, b = sweep / "base/seed0/checkpoints/best", sweep / "lowlr/seed0/checkpoints/best"
    out = tmp_path / "ev"
    assert main(["evaluate", str(a), str(b), "--labels", "base", "lowlr", "--output-dir", str(out)]) == 0
    table = (out / "evaluation.md").read_text()
    assert "| metric | base | lowlr |" in table
    both = json.loads((out / "evaluation.json").read_text())
    for label, ckpt in (("base", a), ("lowlr", b)):
        single = tmp_path / f"single_{label}"
        assert main(["evaluate", str(ckpt), "--output-dir", str(single)]) == 0
        alone = json.loads((single / "metrics.json").read_text())
        for key in ("retrieval/i2t_r1", "retrieval/t2i_r5", "grounding/miou", "spatial/accuracy"):
            assert both[label][key] == pytest.approx(alone[key], abs=1e-6), (label, key)
    # Neither checkpoint trained the backbone: one set of image features, one of text.
    kinds = [json.loads((d / "namespace.json").read_text())["kind"] for d in (out / "cache").iterdir()]
    assert sorted(kinds) == ["text_tokens", "vision_tokens"]


def test_tensorboard_and_wandb_trackers(tmp_path: Path, fast: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = str(CONFIGS / "retrieval_single_stage.yaml")
    out = tmp_path / "tb"
    assert (
        main(
            [
                "train",
                cfg,
                "--output-dir",
                str(out),
                *fast,
                "train.epochs=1",
                "train.log_every=1",
                ONE_STAGE,
                "--tracker",
                "tensorboard",
            ]
        )
        == 0
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/contrastive", "loss/matching", "val/retrieval/mean_recall", "test/retrieval/i2t_r1"} <= tags
    assert any(t.startswith("lr/") for t in tags) and "peak_mem_mb" in tags

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    assert main(["train", cfg, "--output-dir", str(out), *fast, "train.epochs=1", ONE_STAGE, "--tracker", "wandb"]) == 0
    runs = list((out / "wandb").glob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())
