"""Counting with answer generation: config, prompt and labels, tiling, generation, the
whole three-stage run through main(argv), evaluate, predict and the LoRA path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CONFIGS
from vlmtune.cli import main
from vlmtune.config import load_config
from vlmtune.errors import ConfigError
from vlmtune.history import read_history

RECIPE = str(CONFIGS / "receipts_three_stage.yaml")
METRIC_KEYS = (
    "count/accuracy",
    "count/macro_precision",
    "count/macro_recall",
    "count/macro_f1",
    "count/confusion",
    "count/baseline_accuracy",
    "count/baseline_macro_f1",
    "text/bleu1",
    "text/bleu2",
    "text/bleu3",
    "text/bleu4",
    "text/rouge1",
    "text/rouge2",
    "text/rougeL",
    "text/perplexity",
    "answer/count_accuracy",
    "answer/parse_rate",
    "answer/baseline_count_accuracy",
    "train/epochs",
    "train/wall_s",
    "train/peak_mem_mb",
    "params/trainable",
    "params/total",
)


@pytest.fixture(scope="session")
def receipts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlmtune.data.receipts import generate_receipts

    folder = tmp_path_factory.mktemp("receipts")
    generate_receipts(folder, n=40, seed=5, max_count=3, image_size=(64, 96))
    return folder


def fast_overrides(data: Path) -> list[str]:
    return [
        f"data.synthetic_dir={data}",
        "data.synthetic.n=40",
        "train.epochs=3",
        "stages.1.start_epoch=1",
        "stages.2.start_epoch=2",
        "train.batch_size=8",
        "train.progress=false",
        "eval.batch_size=16",
        "counting.max_dynamic_patch=2",
        "generation.max_new_tokens=6",
        "generation.num_beams=2",
        "generation.val_num_images=2",
    ]


@pytest.fixture(scope="session")
def tiny_cfg():
    return load_config(RECIPE, ["counting.max_dynamic_patch=4"])


@pytest.fixture(scope="session")
def backbone(tiny_cfg):
    from vlmtune.backbone import load_backbone

    return load_backbone(tiny_cfg.backbone)


# --------------------------------------------------------------------------- config


def test_recipe_config_has_three_stages() -> None:
    cfg = load_config(RECIPE)
    assert cfg.task == "counting"
    assert [len(s.train) for s in cfg.stages] == [3, 4, 4]
    assert "vision_tower" not in cfg.stages[0].train and "vision_blocks" not in cfg.stages[0].train
    assert cfg.stages[1].train["vision_blocks"] == pytest.approx(0.01) and cfg.stages[1].vision_blocks >= 1
    assert "vision_tower" in cfg.stages[2].train
    assert cfg.train.early_stopping.metric == "count/accuracy"
    assert cfg.generation.num_beams > 1 and cfg.generation.val_do_sample


@pytest.mark.parametrize(
    "override, key",
    [
        ("counting.buckets=[1,2]", "counting.buckets"),
        ("counting.buckets=[0,2,1]", "counting.buckets"),
        ("counting.buckets=[0,1,9]", "counting.buckets"),
        ("counting.max_dynamic_patch=0", "counting.max_dynamic_patch"),
        ("counting.lm_mode=adapter", "counting.lm_mode"),
        ("generation.num_beams=0", "generation.num_beams"),
        ("stages.0.train.adapters=1", "stages[0].train.adapters"),
        ("stages.0.losses=[contrastive]", "stages[0].losses"),
    ],
)
def test_bad_counting_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(RECIPE, [override])
    assert str(e.value).startswith(key + ":"), str(e.value)


# --------------------------------------------------------------------------- prompt, labels, tiling


def test_prompt_and_labels_mask_everything_but_the_answer(tiny_cfg, backbone) -> None:
    from vlmtune.data.counting import IGNORE_INDEX, CountingCollator
    from vlmtune.tasks.counting import prompt_builder

    tok = backbone.tokenizer
    tpt = backbone.info.tokens_per_tile
    sp = tok.convert_tokens_to_ids

    def text(s: str) -> list[int]:
        return tok(s, add_special_tokens=False)["input_ids"]

    question, answer = "How many receipts do you see?", "There are 2 receipts."
    # Built by hand from the chat template: user turn with the image, assistant turn.
    prompt = (
        [sp("<|im_start|>")]
        + text("user")
        + text("\n")
        + [sp("<img>")]
        + [sp("<IMG_CONTEXT>")] * tpt
        + [sp("</img>")]
        + text("\n")
        + text(question)
        + [sp("<|im_end|>")]
        + text("\n")
        + [sp("<|im_start|>")]
        + text("assistant")
        + text("\n")
    )
    target = text(answer) + [sp("<|im_end|>")]

    ids, labels = prompt_builder(backbone, tiny_cfg.counting).example(question, answer, num_tiles=1)
    assert ids == prompt + target
    assert labels == [IGNORE_INDEX] * len(prompt) + target
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == answer + "<|im_end|>"

    # In a batch: right padding for teacher forcing (pads unlabelled), left for generation.
    collate = CountingCollator(prompt_builder(backbone, tiny_cfg.counting), backbone.image_processor, 1, tok.pad_token_id)
    img = Image.new("RGB", (64, 64), "gray")
    batch = collate(
        [
            {"index": 0, "image": img, "question": question, "answer": answer, "label": 2},
            {"index": 1, "image": img, "question": "Count.", "answer": "I see no receipts.", "label": 0},
        ]
    )
    assert batch["input_ids"][0].tolist() == prompt + target
    short = batch["attention_mask"][1].sum().item()
    assert (batch["labels"][1, short:] == IGNORE_INDEX).all() and (batch["input_ids"][1, short:] == tok.pad_token_id).all()
    assert batch["prompt_ids"][0].tolist() == prompt
    assert batch["prompt_mask"][1, 0].item() == 0 and batch["prompt_ids"][1, -1].item() == prompt[-1]
    assert batch["count"].tolist() == [2, 0]


def test_tall_image_is_tiled_and_placeholders_match(tiny_cfg, backbone) -> None:
    from vlmtune.data.counting import CountingCollator, tile_grid
    from vlmtune.tasks.counting import prompt_builder

    collate = CountingCollator(
        prompt_builder(backbone, tiny_cfg.counting), backbone.image_processor, 4, backbone.tokenizer.pad_token_id
    )
    tall, square = Image.new("RGB", (60, 190), "white"), Image.new("RGB", (64, 64), "white")
    batch = collate(
        [
            {"index": i, "image": im, "question": "How many?", "answer": "There is 1 receipt.", "label": 1}
            for i, im in enumerate([tall, square])
        ]
    )
    assert batch["num_tiles"].tolist() == [4, 1]  # a 1 x 3 column of tiles + thumbnail; one square tile
    assert tile_grid(backbone.image_processor, 60, 190, 4) == (1, 3)
    assert batch["pixel_values"].shape[0] == 5
    per_row = (batch["input_ids"] == backbone.image_token_id).sum(1)
    assert per_row.tolist() == [4 * backbone.info.tokens_per_tile, backbone.info.tokens_per_tile]
    assert backbone.embed_multimodal(batch["input_ids"], batch["pixel_values"]).shape[:2] == batch["input_ids"].shape


def test_batched_beam_search_matches_one_image_at_a_time(tiny_cfg, backbone) -> None:
    """Image features go in as embeddings, so beams and left padding pair each answer
    with its own tiles (images here have 4, 1 and 5 tiles)."""
    from vlmtune.data.counting import CountingCollator
    from vlmtune.tasks.counting import CountingModel, generate_answers, prompt_builder

    model = CountingModel(backbone, tiny_cfg.counting, tiny_cfg.model).eval()
    collate = CountingCollator(
        prompt_builder(backbone, tiny_cfg.counting), backbone.image_processor, 4, backbone.tokenizer.pad_token_id
    )
    rng = np.random.default_rng(0)
    items = [
        {
            "index": i,
            "image": Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)),
            "question": q,
            "answer": "x",
            "label": 0,
        }
        for i, ((h, w), q) in enumerate(
            zip([(200, 64), (64, 64), (128, 128)], ["How many?", "How many receipts are there?", "Count."])
        )
    ]
    # A random LM stops at once; perturbed weights make it say something.
    state = {k: v.clone() for k, v in backbone.language_model.state_dict().items()}
    try:
        with torch.no_grad():
            torch.manual_seed(1)
            for p in backbone.language_model.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        b = collate(items)
        assert b["num_tiles"].tolist() == [4, 1, 5]
        together = generate_answers(model, b["prompt_ids"], b["prompt_mask"], b["pixel_values"], 6, num_beams=3)
        for i, it in enumerate(items):
            one = collate([it])
            alone = generate_answers(model, one["prompt_ids"], one["prompt_mask"], one["pixel_values"], 6, num_beams=3)
            n = alone.shape[1]
            assert together[i, :n].tolist() == alone[0].tolist()
    finally:
        backbone.language_model.load_state_dict(state)


def test_answer_loss_ignores_the_prompt() -> None:
    from vlmtune.tasks.counting import answer_token_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, -100, -100, 1, -100]])
    loss, n = answer_token_loss(logits, torch.nn.Identity(), labels)  # the states are the logits here
    # position t predicts token t+1
    expected = torch.nn.functional.cross_entropy(torch.stack([logits[0, 1], logits[0, 2], logits[1, 2]]), torch.tensor([3, 4, 1]))
    assert n == 3 and loss.item() == pytest.approx(expected.item())


def test_count_token_is_found_in_the_answer(backbone) -> None:
    from vlmtune.predict import count_token_index

    tok = backbone.tokenizer
    for answer, word in (("There are 3 receipts.", "3"), ("I see no receipts.", "no"), ("There is 1 receipt.", "1")):
        ids = tok(answer, add_special_tokens=False)["input_ids"]
        i = count_token_index(tok, ids)
        assert i is not None and tok.decode([ids[i]]).strip() == word
    assert count_token_index(tok, tok("I see receipts.", add_special_tokens=False)["input_ids"]) is None


def test_attention_heatmap_places_tiles_and_thumbnail() -> None:
    from vlmtune.predict import attention_heatmap

    masses = np.zeros((3, 2, 2))  # a 2 x 1 grid of tiles, then the thumbnail
    masses[1, 0, 0] = 0.5  # right tile, its top-left token
    masses[2, 1, 1] = 0.5  # thumbnail, bottom-right token
    heat = attention_heatmap(masses, (2, 1), (80, 40))  # W=80, H=40
    assert heat.shape == (40, 80) and heat.sum() == pytest.approx(1.0)
    assert heat[:20, 40:60].sum() == pytest.approx(0.5)  # right tile's top-left quarter
    assert heat[20:, 40:].sum() == pytest.approx(0.5)  # thumbnail's bottom-right quarter of the image
    assert heat[:, :40].sum() == pytest.approx(0.0)


# --------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, receipts: Path) -> Path:
    out = tmp_path_factory.mktemp("counting") / "run"
    assert main(["train", RECIPE, "--output-dir", str(out), *fast_overrides(receipts)]) == 0
    return out


def test_three_stage_run_writes_the_run_directory(run: Path) -> None:
    for name in (
        "config.yaml",
        "metrics.json",
        "history.jsonl",
        "checkpoints/last/weights.safetensors",
        "checkpoints/best/weights.safetensors",
        "checkpoints/last/backbone",
    ):
        assert (run / name).exists(), name
    m = json.loads((run / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert key in m, key
    assert m["train/epochs"] == 3 and m["answer/n_generated"] == m["count/n"]
    assert len(m["count/confusion"]) == 4 and sum(map(sum, m["count/confusion"])) == m["count/n"]
    assert m["count/baseline_accuracy"] == pytest.approx(25.0, abs=15)
    # Every line follows the schema (vlmtune.history), and written through it again gives the same bytes.
    text = (run / "history.jsonl").read_text().splitlines()
    assert [json.dumps(r.to_json()) for r in read_history(run / "history.jsonl")] == text
    lines = [json.loads(x) for x in text]
    stages = [x for x in lines if x["type"] == "stage"]
    assert [s["stage"] for s in stages] == [0, 1, 2]
    assert stages[0]["trainable"] < stages[1]["trainable"] < stages[2]["trainable"] == stages[2]["total"]
    steps = [x for x in lines if x["type"] == "step"]
    assert steps and all("loss/lm" in x and "loss/count" in x for x in steps)
    epochs = [x for x in lines if x["type"] == "epoch"]
    assert len(epochs) == 3 and "val/count/accuracy" in epochs[0] and "val/text/perplexity" in epochs[0]
    assert epochs[0]["val/answer/n_generated"] == 2  # validation samples a few answers only
    # The trained language model and projector are saved; the frozen-in-every-stage rest is not needed.
    from safetensors.torch import load_file

    w = load_file(str(run / "checkpoints/last/weights.safetensors"))
    assert any(k.startswith("count_head.") for k in w)
    assert any("multi_modal_projector" in k for k in w) and any("language_model.layers.0." in k for k in w)


def test_evaluate_reproduces_the_final_metrics(run: Path, tmp_path: Path) -> None:
    m = json.loads((run / "metrics.json").read_text())
    assert main(["evaluate", str(run / "checkpoints/best"), "--output-dir", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("count/accuracy", "count/macro_f1", "text/perplexity", "text/bleu4", "text/rougeL", "answer/count_accuracy"):
        assert again[key] == pytest.approx(m[key]), key


def test_predict_on_grayscale_jpeg_and_rgba_png(run: Path, tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    gray = tmp_path / "gray.jpg"
    Image.fromarray(rng.integers(0, 255, (301, 97), dtype=np.uint8), "L").save(gray)
    rgba = tmp_path / "odd.png"
    Image.fromarray(rng.integers(0, 255, (53, 211, 4), dtype=np.uint8), "RGBA").save(rgba)
    for image in (gray, rgba):
        png = tmp_path / f"{image.stem}_att.png"
        capsys.readouterr()
        assert (
            main(
                [
                    "predict",
                    str(run / "checkpoints/best"),
                    "--image",
                    str(image),
                    "--question",
                    "How many receipts do you see?",
                    "--attention-out",
                    str(png),
                ]
            )
            == 0
        )
        out = json.loads(capsys.readouterr().out)
        assert isinstance(out["answer"], str) and 0 <= out["count"] <= 3
        assert 0 < out["confidence"] <= 1 and sum(out["probabilities"]) == pytest.approx(1, abs=1e-3)
        assert out["num_tiles"] > 1  # both are far from square
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width > 100


def test_attention_heatmap_of_a_prediction_sums_to_one(run: Path, receipts: Path) -> None:
    from vlmtune.data.formats import load_image
    from vlmtune.predict import load_counting_checkpoint, predict_image

    model, cfg = load_counting_checkpoint(run / "checkpoints/best")
    image = load_image(receipts / "images/receipts_00000.png")
    pred = predict_image(model, cfg, image, attention=True)
    assert pred.heatmap.shape == (image.height, image.width)
    assert pred.heatmap.min() >= 0 and pred.heatmap.sum() == pytest.approx(1.0, abs=1e-5)


def test_attention_command_reports_inside_share(run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "att.json"
    capsys.readouterr()
    assert main(["attention", str(run / "checkpoints/best"), "--limit", "3", "--output", str(out)]) == 0
    shown = json.loads(capsys.readouterr().out)
    report = json.loads(out.read_text())
    assert shown["attention/n_images"] == len(report["per_image"]) >= 1
    assert 0 < report["attention/area_share"] < 100 and 0 <= report["attention/inside_share"] <= 100
    assert 0 <= report["attention/inside_share_all_tokens"] <= 100
    assert all(r["count"] >= 1 for r in report["per_image"])


def test_predict_refuses_a_retrieval_checkpoint(tmp_path: Path, capsys, one_stage_run: Path) -> None:
    out = one_stage_run
    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(img)
    capsys.readouterr()
    assert main(["predict", str(out / "checkpoints/last"), "--image", str(img)]) == 2
    err = capsys.readouterr().err
    assert "retrieval" in err and "counting" in err and "Traceback" not in err


def test_lora_trains_adapters_only_and_round_trips(tmp_path: Path, receipts: Path) -> None:
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    from vlmtune.predict import load_counting_checkpoint, predict_image

    out = tmp_path / "lora"
    args = [
        *fast_overrides(receipts),
        "train.epochs=1",
        "counting.lm_mode=lora",
        "counting.lora_r=4",
        "counting.lora_target_modules=[q_proj,v_proj]",
        "stages=[{name: a, start_epoch: 0, train: {count_head: 1.0, language_model: 1.0}}]",
    ]
    assert main(["train", RECIPE, "--output-dir", str(out), *args]) == 0
    w = load_file(str(out / "checkpoints/last/weights.safetensors"))
    lm = [k for k in w if "language_model" in k]
    assert lm and all(".lora_A." in k or ".lora_B." in k for k in lm)
    assert any(".lora_B." in k and w[k].abs().sum() > 0 for k in lm)  # B starts at zero: it trained

    # The base weights did not move: they equal the untouched preset's, and the saved
    # backbone holds no adapter.
    from vlmtune.backbone import load_backbone

    model, cfg = load_counting_checkpoint(out / "checkpoints/last")
    fresh = load_backbone(cfg.backbone)
    base = {n: p for n, p in fresh.language_model.named_parameters()}
    for name, mod in model.backbone.language_model.named_modules():
        if isinstance(mod, LoraLayer):
            assert torch.equal(mod.base_layer.weight, base[f"{name}.weight"])
    assert not any(p.requires_grad for p in model.backbone.parameters())  # loading leaves the backbone frozen
    saved = load_file(str(out / "checkpoints/last/backbone/model.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in saved)
    # ...and the component the stage plan trains is exactly the LoRA matrices.
    from vlmtune.stages import apply_stage, build_plan

    plan = build_plan(cfg, {"lm": 1.0, "count": 1.0})
    groups = apply_stage(model, plan[0], 1e-3, 0.0)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("count_head.") or ".lora_" in n for n in names)
    assert {g["name"].split("/")[0] for g in groups} == {"count_head", "language_model"}

    image = Image.open(receipts / "images/receipts_00001.png").convert("RGB")
    assert predict_image(model.eval(), cfg, image).answer is not None
