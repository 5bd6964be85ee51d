"""Whole commands through main(argv): the run-directory contract, evaluate, resume, errors."""

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import CONFIGS, RESUMABLE, small_set
from vlmtune.cli import main
from vlmtune.history import read_history

TWO_STAGE = str(CONFIGS / "retrieval_two_stage.yaml")
STAGES = ["stages.1.start_epoch=1"]


def test_two_stage_run_writes_the_run_directory(tmp_path: Path, fast: list[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", TWO_STAGE, "--output-dir", str(out), *fast, *STAGES]) == 0
    for name in (
        "config.yaml",
        "metrics.json",
        "history.jsonl",
        "checkpoints/last/weights.safetensors",
        "checkpoints/best/weights.safetensors",
        "checkpoints/last/trainer_state.pt",
        "checkpoints/last/backbone",
    ):
        assert (out / name).exists(), name
    m = json.loads((out / "metrics.json").read_text())
    for key in (
        "retrieval/i2t_r1",
        "retrieval/t2i_r10",
        "retrieval/mean_recall",
        "retrieval/chance_i2t_r1",
        "grounding/acc50",
        "grounding/miou",
        "grounding/giou",
        "grounding/l1",
        "grounding/baseline_acc50",
        "spatial/accuracy",
        "spatial/macro_f1",
        "spatial/baseline_accuracy",
        "train/epochs",
        "train/wall_s",
        "train/peak_mem_mb",
        "params/trainable",
        "params/total",
    ):
        assert key in m, key
    assert m["train/epochs"] == 2
    assert 0 <= m["retrieval/i2t_r1"] <= 100 and m["params/trainable"] < m["params/total"]
    # Every line follows the schema (vlmtune.history), and written through it again gives the same bytes.
    text = (out / "history.jsonl").read_text().splitlines()
    assert [json.dumps(r.to_json()) for r in read_history(out / "history.jsonl")] == text
    lines = [json.loads(x) for x in text]
    stages = [x for x in lines if x["type"] == "stage"]
    assert [s["stage"] for s in stages] == [0, 1]
    assert stages[1]["trainable"] > stages[0]["trainable"]  # the last vision block joins
    epochs = [x for x in lines if x["type"] == "epoch"]
    assert len(epochs) == 2 and "val/retrieval/mean_recall" in epochs[0]
    steps = [x for x in lines if x["type"] == "step"]
    assert steps and "loss/contrastive" in steps[0] and any(k.startswith("lr/") for k in steps[0])
    # Stage 2 adds the grounding terms to the log.
    assert any("loss/box" in x and "loss/relation" in x for x in steps if x["stage"] == 1)
    # The checkpoint holds the trained vision block, not the frozen rest of the backbone.
    w = load_file(str(out / "checkpoints/last/weights.safetensors"))
    assert any("vision_tower.encoder.layer.1." in k for k in w)
    assert not any("language_model" in k or "encoder.layer.0." in k for k in w)

    # evaluate on its own test split reproduces the final metrics
    ev = tmp_path / "eval"
    assert main(["evaluate", str(out / "checkpoints/best"), "--output-dir", str(ev)]) == 0
    again = json.loads((ev / "metrics.json").read_text())
    for key in ("retrieval/i2t_r1", "retrieval/t2i_r5", "grounding/miou", "spatial/accuracy"):
        assert again[key] == pytest.approx(m[key]), key


def test_evaluate_on_another_data_file(tmp_path: Path, one_stage_run: Path, scenes: Path) -> None:
    ckpt = tmp_path / "last"  # a copy: evaluate writes into the checkpoint folder
    shutil.copytree(one_stage_run / "checkpoints/last", ckpt)
    assert main(["evaluate", str(ckpt), "--data", str(scenes / "val.json")]) == 0
    m = json.loads((ckpt / "eval/metrics.json").read_text())
    assert m["eval/data"].endswith("val.json")
    n_val = len({r["image"] for r in json.loads((scenes / "val.json").read_text())})
    assert m["retrieval/n_images"] == n_val


def test_resume_continues_exactly(tmp_path: Path, scenes: Path, straight: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stopped after its first epoch and resumed ends with the same weights and
    metrics as one that ran straight through (conftest's `straight`, same arguments)."""
    args = [*small_set(scenes), *RESUMABLE]

    import vlmtune.train.loop as tr

    real_save = tr.save_last
    calls = {"n": 0}

    def save_then_die(*a, **k):
        real_save(*a, **k)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(tr, "save_last", save_then_die)
    broken = tmp_path / "broken"
    assert main(["train", TWO_STAGE, "--output-dir", str(broken), *args]) == 130
    assert json.loads((broken / "checkpoints/last/state.json").read_text())["epoch"] == 1
    monkeypatch.setattr(tr, "save_last", real_save)
    assert main(["train", TWO_STAGE, "--output-dir", str(broken), "--resume", *args]) == 0

    a = load_file(str(straight / "checkpoints/last/weights.safetensors"))
    b = load_file(str(broken / "checkpoints/last/weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < 1e-6, k
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (straight, broken))
    for key in ("retrieval/mean_recall", "grounding/miou", "spatial/accuracy", "train/steps"):
        assert ma[key] == pytest.approx(mb[key]), key
    ha = [json.loads(x) for x in (straight / "history.jsonl").read_text().splitlines()]
    hb = [json.loads(x) for x in (broken / "history.jsonl").read_text().splitlines()]
    strip = lambda h: [{k: v for k, v in x.items() if k not in ("wall_s", "peak_mem_mb", "cache", "train_wall_s")} for x in h]  # noqa: E731
    assert strip(ha) == strip(hb)


def _run_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def test_bad_config_key_is_one_line_error(tmp_path: Path, capsys, fast: list[str]) -> None:
    err = _run_error(capsys, ["train", TWO_STAGE, "--output-dir", str(tmp_path / "x"), *fast, "optim.learning_rate=1"])
    assert "optim.learning_rate: unknown key" in err


def test_too_many_vision_blocks_fails_before_work(tmp_path: Path, capsys, fast: list[str]) -> None:
    err = _run_error(
        capsys, ["train", TWO_STAGE, "--output-dir", str(tmp_path / "x"), *fast, *STAGES, "stages.1.vision_blocks=9"]
    )
    assert "vision_blocks=9" in err and "only 2 blocks" in err
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_missing_data_file_is_named(tmp_path: Path, capsys, fast: list[str]) -> None:
    missing = tmp_path / "nope.json"
    err = _run_error(
        capsys,
        [
            "train",
            TWO_STAGE,
            "--output-dir",
            str(tmp_path / "x"),
            *fast,
            *STAGES,
            f"data.train={missing}",
            f"data.val={missing}",
            f"data.test={missing}",
        ],
    )
    assert str(missing) in err


def test_corrupt_image_is_named(tmp_path: Path, capsys, fast: list[str], scenes: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(scenes, data)
    first = json.loads((data / "train.json").read_text())[0]["image"]
    (data / first).write_bytes((data / first).read_bytes()[:60])  # truncated PNG
    err = _run_error(
        capsys, ["train", TWO_STAGE, "--output-dir", str(tmp_path / "x"), *fast, *STAGES, f"data.synthetic_dir={data}"]
    )
    assert Path(first).name in err


def test_missing_checkpoint_is_named(tmp_path: Path, capsys) -> None:
    err = _run_error(capsys, ["evaluate", str(tmp_path / "nope")])
    assert "checkpoint folder not found" in err


def test_existing_run_needs_resume(tmp_path: Path, capsys, fast: list[str]) -> None:
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                TWO_STAGE,
                "--output-dir",
                str(out),
                *fast,
                "train.epochs=1",
                "stages=[{name: a, start_epoch: 0, train: {adapters: 1.0}}]",
            ]
        )
        == 0
    )
    capsys.readouterr()
    err = _run_error(
        capsys,
        [
            "train",
            TWO_STAGE,
            "--output-dir",
            str(out),
            *fast,
            "train.epochs=1",
            "stages=[{name: a, start_epoch: 0, train: {adapters: 1.0}}]",
        ],
    )
    assert "--resume" in err


def test_data_scenes_command(tmp_path: Path) -> None:
    assert main(["data", "scenes", "--out", str(tmp_path / "s"), "--n", "12", "--seed", "1"]) == 0
    for split in ("train", "val", "test"):
        assert (tmp_path / "s" / f"{split}.json").is_file()


def test_early_stopping_accumulation_and_rerank(tmp_path: Path, fast: list[str], scenes: Path) -> None:
    """patience=1 with an impossible min_delta stops after the second epoch; grad_accum=2
    halves the optimizer steps; re-ranking by the matching head runs in evaluation."""
    out = tmp_path / "run"
    one_stage = "stages=[{name: a, start_epoch: 0, train: {adapters: 1.0, heads: 1.0}}]"
    assert (
        main(
            [
                "train",
                TWO_STAGE,
                "--output-dir",
                str(out),
                *fast,
                one_stage,
                "train.epochs=5",
                "train.early_stopping.patience=1",
                "train.early_stopping.min_delta=1000",
                "train.grad_accum=2",
                "eval.rerank_k=5",
            ]
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["train/epochs"] == 2 and m["train/stopped_early"] is True and m["train/best_epoch"] == 1
    n_train = len(json.loads((scenes / "train.json").read_text()))
    batches = n_train // 8  # drop_last
    assert m["train/steps"] == 2 * -(-batches // 2)


def test_evaluate_retrieval_format_without_boxes(tmp_path: Path, one_stage_run: Path, scenes: Path) -> None:
    """A plain retrieval file (caption lists, no boxes or relations) evaluates retrieval only."""
    out = one_stage_run
    records = json.loads((scenes / "test.json").read_text())
    by_image: dict[str, list[str]] = {}
    for r in records:
        by_image.setdefault(r["image"], []).append(r["text"])
    plain = scenes / "test_captions_only.json"
    plain.write_text(json.dumps([{"image": k, "caption": v} for k, v in by_image.items()]))
    assert main(["evaluate", str(out / "checkpoints/best"), "--data", str(plain), "--output-dir", str(tmp_path / "ev")]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["retrieval/n_images"] == len(by_image) and m["retrieval/n_captions"] == len(records)
    assert not any(k.startswith(("grounding/", "spatial/")) for k in m)
    # Same images and captions as the grounding file: the same retrieval numbers.
    full = json.loads((out / "metrics.json").read_text())
    assert m["retrieval/i2t_r1"] == pytest.approx(full["retrieval/i2t_r1"])
    assert m["retrieval/t2i_r5"] == pytest.approx(full["retrieval/t2i_r5"])
