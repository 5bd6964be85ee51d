"""Run options and seed workflows: evaluate/predict overrides, fractional stage starts,
loss targets, warm start (--init-from), unused components, the --seeds resume hint,
LoRA checkpoints evaluated together, train.num_threads, the attention colour bar."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import CONFIGS
from vlmtune.cli import main
from vlmtune.config import load_config
from vlmtune.errors import ConfigError

TWO_STAGE = str(CONFIGS / "retrieval_two_stage.yaml")
SINGLE = str(CONFIGS / "retrieval_single_stage.yaml")
RECEIPTS = str(CONFIGS / "receipts_three_stage.yaml")
ALIGN_ONLY = "stages=[{name: align, start_epoch: 0, train: {adapters: 1.0, heads: 1.0}, losses: [contrastive, matching]}]"
GROUND_ONLY = (
    "stages=[{name: ground, start_epoch: 0, train: {adapters: 1.0, heads: 1.0, vision_blocks: 0.01}, "
    "vision_blocks: 1, losses: [contrastive, matching, box, relation]}]"
)


def _error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    text = capsys.readouterr().err
    err = [ln for ln in text.splitlines() if ln.startswith("error:")]  # log lines (detected format, ...) aside
    assert len(err) == 1 and "Traceback" not in text, text
    return err[0]


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory: pytest.TempPathFactory, fast: list[str]) -> Path:
    """The shipped two-stage recipe with train.epochs=2 (no start override) and one thread."""
    out = tmp_path_factory.mktemp("two") / "run"
    before = torch.get_num_threads()
    assert main(["train", TWO_STAGE, "--output-dir", str(out), *fast, "train.num_threads=1"]) == 0
    assert torch.get_num_threads() == before  # restored after the run
    return out


@pytest.fixture(scope="module")
def fast(scenes: Path) -> list[str]:  # module scope for the fixtures above (conftest's is per test)
    return [
        f"data.synthetic_dir={scenes}",
        "data.synthetic.n=40",
        "train.epochs=2",
        "train.batch_size=8",
        "train.progress=false",
        "eval.batch_size=16",
    ]


# --------------------------------------------------------------------------- stage start fractions


def test_shipped_fraction_keeps_epoch_5_of_20_and_fits_two_epochs() -> None:
    from vlmtune.stages import build_plan

    cfg = load_config(TWO_STAGE)
    assert cfg.stages[1].start == 0.25 and cfg.stages[1].start_epoch is None
    assert [(s.start_epoch, s.end_epoch) for s in build_plan(cfg, {})] == [(0, 5), (5, 20)]
    for epochs, start in ((2, 1), (3, 1), (4, 1), (6, 2), (8, 2), (10, 3)):  # round half up: 0.25 * 6 = 1.5 -> 2
        plan = build_plan(load_config(TWO_STAGE, [f"train.epochs={epochs}"]), {})
        assert plan[1].start_epoch == start, epochs
    # Rounding never makes two stages meet: each starts at least one epoch after the one before.
    cfg = load_config(RECEIPTS, ["train.epochs=4", "stages.1.start=0.1", "stages.2.start=0.2"])
    assert [s.start_epoch for s in build_plan(cfg, {})] == [0, 1, 2]
    # A command-line override of one key replaces the other from the file.
    assert build_plan(load_config(TWO_STAGE, ["stages.1.start_epoch=3"]), {})[1].start_epoch == 3
    assert build_plan(load_config(RECEIPTS, ["stages.1.start=0.25"]), {})[1].start_epoch == 3


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            [
                "stages=[{name: a, start_epoch: 0, train: {adapters: 1.0}}, {name: b, start_epoch: 1, start: 0.5, train: {adapters: 1.0}}]"
            ],
            "stages[1]: give start_epoch (1) or start (0.5), not both",
        ),
        (["stages.1.start=1.0"], "stages[1].start: must be a fraction of train.epochs in (0, 1)"),
        (["stages.1.start=0"], "stages[1].start: must be a fraction"),
        (["stages.0.start=0.5"], "stages[0].start: the first stage must start at 0"),
        (["train.epochs=1"], "stages[1].start: 0.25 of train.epochs (1) gives start_epoch 1"),
        (["stages=[{name: a, train: {adapters: 1.0}}, {name: b, train: {adapters: 1.0}}]"], "stages[1].start_epoch: missing"),
        (
            [
                "stages=[{name: a, train: {adapters: 1.0}}, {name: b, start: 0.5, train: {adapters: 1.0}},"
                " {name: c, start: 0.4, train: {adapters: 1.0}}]"
            ],
            "stages[2].start: must be above stages[1].start (0.5)",
        ),
        (["stages.1.start=half"], "stages[1].start: expected a number"),
    ],
)
def test_bad_stage_starts_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(TWO_STAGE, overrides)
    assert message in str(e.value)


def test_explain_shows_the_fraction_key(capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "explain", "stages.1.start"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("stages[N].start: float | null = null") and "round(start * train.epochs)" in out


def test_two_epochs_run_both_stages(two_stage: Path) -> None:
    lines = [json.loads(x) for x in (two_stage / "history.jsonl").read_text().splitlines()]
    stages = [(x["stage"], x["epoch"]) for x in lines if x["type"] == "stage"]
    assert stages == [(0, 1), (1, 2)]  # each stage line names its first epoch, counted from 1
    metrics = json.loads((two_stage / "metrics.json").read_text())
    assert metrics["train/num_threads"] == 1 and metrics["train/epochs"] == 2


# --------------------------------------------------------------------------- evaluate / predict overrides


def test_evaluate_takes_data_and_eval_overrides(
    two_stage: Path, scenes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import vlmtune.tasks.retrieval.evaluation as retrieval

    seen: list[int] = []
    real = retrieval.retrieval_metrics

    def spy(*a, **kw):
        seen.append(kw["rerank_k"] if kw.get("rerank") is not None else 0)
        return real(*a, **kw)

    monkeypatch.setattr(retrieval, "retrieval_metrics", spy)
    # A copy of the test split with one record whose image is missing.
    data = tmp_path / "data"
    shutil.copytree(scenes / "images", data / "images")
    shutil.copytree(scenes / "images_extra", data / "images_extra")
    records = json.loads((scenes / "test.json").read_text())
    (data / "test.json").write_text(json.dumps(records + [{**records[0], "image": "images/missing.png"}]))
    ckpt = str(two_stage / "checkpoints/best")
    err = _error(capsys, ["evaluate", ckpt, "--data", str(data / "test.json"), "--output-dir", str(tmp_path / "e0")])
    assert "missing.png" in err
    # Overrides before and after the options; neither is taken for a checkpoint.
    assert (
        main(
            [
                "evaluate",
                ckpt,
                "eval.rerank_k=5",
                "--data",
                str(data / "test.json"),
                "--output-dir",
                str(tmp_path / "e1"),
                "data.on_error=skip",
            ]
        )
        == 0
    )
    m = json.loads((tmp_path / "e1/metrics.json").read_text())
    assert seen == [5] and m["eval/overrides"] == "eval.rerank_k=5 data.on_error=skip"
    assert m["retrieval/n_captions"] == len(records)  # the bad record was left out
    # Several checkpoints: overrides after them apply to each.
    assert (
        main(
            [
                "evaluate",
                ckpt,
                str(two_stage / "checkpoints/last"),
                "eval.rerank_k=3",
                "--labels",
                "a",
                "b",
                "--output-dir",
                str(tmp_path / "e2"),
            ]
        )
        == 0
    )
    assert seen[1:] == [3, 3]
    # The model's keys cannot change at evaluation: the error names the key.
    err = _error(capsys, ["evaluate", ckpt, "optim.lr=1", "--output-dir", str(tmp_path / "e3")])
    assert err.startswith("error: optim.lr: cannot be set for evaluate; only data.*, eval.* keys can")
    err = _error(capsys, ["evaluate", ckpt, "generation.num_beams=1", "--output-dir", str(tmp_path / "e3")])
    assert "generation.num_beams: cannot be set" in err  # retrieval has no generation
    assert "eval.rerank_k: must be between 0 and 1000000" in _error(
        capsys, ["evaluate", ckpt, "eval.rerank_k=-1", "--output-dir", str(tmp_path / "e3")]
    )
    assert not (tmp_path / "e3").exists()


# --------------------------------------------------------------------------- loss targets


def _without(scenes: Path, folder: Path, *fields: str) -> str:
    folder.mkdir()
    shutil.copytree(scenes / "images", folder / "images")
    records = [{k: v for k, v in r.items() if k not in fields} for r in json.loads((scenes / "train.json").read_text())]
    (folder / "pairs.json").write_text(json.dumps(records))
    path = str(folder / "pairs.json")
    return [f"data.train={path}", f"data.val={path}", f"data.test={path}"]


def test_active_loss_without_targets_is_an_error_naming_stage_and_loss(
    tmp_path: Path, scenes: Path, fast: list[str], capsys
) -> None:
    no_boxes = _without(scenes, tmp_path / "nobox", "bbox", "relation")
    err = _error(capsys, ["train", TWO_STAGE, "--output-dir", str(tmp_path / "r1"), *fast, *no_boxes])
    assert "stages[1] 'ground': the 'box' loss is active but no training record" in err
    assert "remove it from stages[1].losses" in err
    err = _error(capsys, ["train", SINGLE, "--output-dir", str(tmp_path / "r2"), *fast, *no_boxes])
    assert "stages[0] 'all': the 'box' loss" in err and "set loss.box=0" in err
    no_relation = _without(scenes, tmp_path / "norel", "relation")
    err = _error(capsys, ["train", SINGLE, "--output-dir", str(tmp_path / "r3"), *fast, *no_relation])
    assert "the 'relation' loss is active" in err
    # Turned off as the message says, the run trains.
    assert (
        main(["train", SINGLE, "--output-dir", str(tmp_path / "r4"), *fast, *no_relation, "train.epochs=1", "loss.relation=0"])
        == 0
    )


# --------------------------------------------------------------------------- components a task never uses


def test_component_the_task_never_uses_is_a_config_error(capsys) -> None:
    err = _error(capsys, ["config", "show", TWO_STAGE, "stages.1.train.mm_projector=1.0"])
    assert err.startswith("error: stages[1].train.mm_projector: the retrieval task never uses the backbone's mm_projector")
    load_config(RECEIPTS, ["stages.0.train.mm_projector=1.0"])  # counting feeds the LM through the projector


def test_retrieval_language_model_component_leaves_the_unused_lm_head_out() -> None:
    from vlmtune.backbone import load_backbone
    from vlmtune.stages import apply_stage, build_plan
    from vlmtune.tasks import build_task

    cfg = load_config(TWO_STAGE, ["stages.1.train.language_model=0.1"])
    task = build_task(cfg)
    model = task.build_model(load_backbone(cfg.backbone))
    apply_stage(model, build_plan(cfg, task.loss_weights())[1], 1e-3, 0.0)
    lm_head = {id(p) for p in model.backbone.model.lm_head.parameters()}
    lm = {id(p) for p in model.backbone.language_model.parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert lm <= trainable and not (lm_head - lm) & trainable  # tied to the embeddings or frozen


# --------------------------------------------------------------------------- warm start


def test_init_from_starts_stage_two_from_a_stage_one_checkpoint(
    tmp_path: Path, fast: list[str], monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import vlmtune.train.loop as train_mod

    first, second = tmp_path / "align", tmp_path / "ground"
    assert main(["train", TWO_STAGE, "--output-dir", str(first), *fast, "train.epochs=1", ALIGN_ONLY]) == 0
    source = load_file(str(first / "checkpoints/best/weights.safetensors"))

    at_start: dict[str, torch.Tensor] = {}
    real = train_mod.start_stage

    def spy(run, stage):
        if not at_start:
            at_start.update({k: v.detach().clone() for k, v in run.model.state_dict().items()})
        return real(run, stage)

    monkeypatch.setattr(train_mod, "start_stage", spy)
    argv = [
        "train",
        TWO_STAGE,
        "--output-dir",
        str(second),
        *fast,
        "train.epochs=1",
        GROUND_ONLY,
        "--init-from",
        str(first / "checkpoints/best"),
    ]
    assert main(argv) == 0
    assert set(source) <= set(at_start)
    for k, v in source.items():
        assert torch.equal(at_start[k], v), k
    cfg = load_config(second / "config.yaml")
    assert cfg.train.init_from == str((first / "checkpoints/best").resolve())
    metrics = json.loads((second / "metrics.json").read_text())
    assert metrics["init/from"] == cfg.train.init_from and metrics["init/loaded"] == len(source)
    record = json.loads((second / "init_from.json").read_text())
    # The vision block only stage 2 trains is not in the stage-1 checkpoint: left as loaded, reported.
    assert record["left_at_init"] and all(k.startswith("backbone.") for k in record["left_at_init"])
    # A fresh schedule and history: one stage line, from step 0.
    lines = [json.loads(x) for x in (second / "history.jsonl").read_text().splitlines()]
    assert [(x["stage"], x["step"]) for x in lines if x["type"] == "stage"] == [(0, 0)]
    # --resume re-checks the source: gone, it is an error naming the key.
    monkeypatch.undo()
    shutil.move(first / "checkpoints/best", tmp_path / "moved")
    err = _error(capsys, [*argv, "--resume"])
    assert err.startswith("error: train.init_from:") and "checkpoint folder not found" in err
    shutil.move(tmp_path / "moved", first / "checkpoints/best")
    assert main([*argv, "--resume"]) == 0


def test_init_from_refuses_other_shapes_naming_the_tensor(tmp_path: Path, fast: list[str], capsys) -> None:
    first = tmp_path / "a"
    assert main(["train", TWO_STAGE, "--output-dir", str(first), *fast, "train.epochs=1", ALIGN_ONLY, "model.embed_dim=32"]) == 0
    err = _error(
        capsys,
        [
            "train",
            TWO_STAGE,
            "--output-dir",
            str(tmp_path / "b"),
            *fast,
            "train.epochs=1",
            ALIGN_ONLY,
            "--init-from",
            str(first / "checkpoints/last"),
        ],
    )
    assert "train.init_from:" in err and "tensor 'vision_adapter.0.weight' has shape (32, 64), this model's has (256, 64)" in err
    err = _error(
        capsys,
        [
            "train",
            TWO_STAGE,
            "--output-dir",
            str(tmp_path / "c"),
            *fast,
            "train.epochs=1",
            ALIGN_ONLY,
            "--init-from",
            str(tmp_path / "nowhere"),
        ],
    )
    assert "train.init_from:" in err and "nowhere" in err
    assert not (tmp_path / "b" / "checkpoints").exists()


# --------------------------------------------------------------------------- --seeds interrupted


def test_seed_sweep_interrupt_hint_resumes_the_sweep(
    tmp_path: Path, scenes: Path, fast: list[str], monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from vlmtune.tasks.retrieval import RetrievalModel

    real, calls = RetrievalModel.forward, {"n": 0}
    steps = len(json.loads((scenes / "train.json").read_text())) // 8  # one epoch of seed 0 (batch 8, last dropped)

    def forward(self, batch, active):
        calls["n"] += 1
        if calls["n"] == steps + 3:  # SIGINT in seed 1's third step
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, batch, active)

    monkeypatch.setattr(RetrievalModel, "forward", forward)
    out = tmp_path / "sweep"
    argv = ["train", TWO_STAGE, *fast, "train.epochs=1", ALIGN_ONLY, "--output-dir", str(out), "--seeds", "0,1"]
    assert main(argv) == 130
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("interrupted:")]
    assert len(err) == 1 and "seed 1 of --seeds 0,1" in err[0]
    command = shlex.split(err[0].split("continue the sweep with: ", 1)[1])
    assert command[:2] == ["vlmtune", "train"] and command[-1] == "--resume" and "--seeds" in command
    monkeypatch.undo()
    assert main(command[1:]) == 0
    for s in (0, 1):
        assert json.loads((out / f"seed{s}" / "metrics.json").read_text())["train/epochs"] == 1


# --------------------------------------------------------------------------- counting: LoRA together, predict


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlmtune.data.receipts import generate_receipts

    data = tmp_path_factory.mktemp("receipts_lora")
    generate_receipts(data, n=24, seed=5, max_count=3, image_size=(64, 64))
    out = tmp_path_factory.mktemp("lora") / "run"
    assert (
        main(
            [
                "train",
                RECEIPTS,
                "--output-dir",
                str(out),
                f"data.synthetic_dir={data}",
                "data.synthetic.n=24",
                "train.epochs=1",
                "train.batch_size=8",
                "train.progress=false",
                "eval.batch_size=16",
                "counting.max_dynamic_patch=1",
                "generation.max_new_tokens=4",
                "generation.num_beams=1",
                "generation.val_num_images=0",
                "counting.lm_mode=lora",
                "counting.lora_r=4",
                "counting.lora_target_modules=[q_proj,v_proj]",
                "stages=[{name: a, start_epoch: 0, train: {count_head: 1.0, language_model: 1.0}}]",
            ]
        )
        == 0
    )
    return out


def test_several_lora_checkpoints_evaluate_together(lora_run: Path, tmp_path: Path) -> None:
    ckpt = str(lora_run / "checkpoints/best")
    assert (
        main(["evaluate", ckpt, ckpt, ckpt, "--labels", "a", "b", "c", "--output-dir", str(tmp_path), "generation.num_beams=1"])
        == 0
    )
    a, b, c = (json.loads((tmp_path / x / "metrics.json").read_text()) for x in "abc")
    for key in ("count/accuracy", "text/perplexity", "answer/parse_rate"):
        assert a[key] == pytest.approx(b[key]) == pytest.approx(c[key]), key  # adapters never stacked
    single = tmp_path / "single"
    assert main(["evaluate", ckpt, "--output-dir", str(single), "generation.num_beams=1"]) == 0
    assert json.loads((single / "metrics.json").read_text())["text/perplexity"] == pytest.approx(a["text/perplexity"])


def test_predict_takes_generation_overrides(lora_run: Path, tmp_path: Path, capsys) -> None:
    from PIL import Image

    image = tmp_path / "x.png"
    Image.new("RGB", (64, 64), "white").save(image)
    ckpt = str(lora_run / "checkpoints/best")
    assert main(["predict", ckpt, "--image", str(image), "generation.max_new_tokens=2", "generation.num_beams=1"]) == 0
    assert "answer" in json.loads(capsys.readouterr().out)
    err = _error(capsys, ["predict", ckpt, "--image", str(image), "counting.max_count=9"])
    assert err.startswith("error: counting.max_count: cannot be set for predict")


def test_attention_overlay_has_a_colour_bar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np
    from matplotlib.figure import Figure
    from PIL import Image

    from vlmtune.predict import Prediction, save_overlay

    figures: list[Figure] = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **kw: (figures.append(self), real(self, *a, **kw))[1])
    heat = np.zeros((40, 60))
    heat[10:20, 30:40] = 1.0
    heat /= heat.sum()
    pred = Prediction("There are 2 receipts.", 2, "2", 0.9, [0.05, 0.05, 0.9], 1, (1, 1), heat, heat)
    save_overlay(Image.new("RGB", (60, 40)), pred, tmp_path / "att.png")
    (fig,) = figures
    bar = [ax for ax in fig.axes if "even spread" in ax.get_ylabel()]
    assert len(fig.axes) == 2 and len(bar) == 1
    lo, hi = bar[0].get_ylim()
    assert lo == 0 and hi == pytest.approx(heat.max() * heat.size)  # 24 = 2400 px / 100 px of attention


def test_num_threads_is_validated(capsys) -> None:
    assert "train.num_threads: must be >= 1" in _error(capsys, ["config", "show", TWO_STAGE, "train.num_threads=-2"])
    assert load_config(TWO_STAGE, ["train.num_threads=0"]).train.num_threads == 0
