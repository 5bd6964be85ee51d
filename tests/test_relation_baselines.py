"""Relations that need the image, text-only baselines, and which stage the best checkpoint is from."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CONFIGS
from vlmtune.data.formats import RELATIONS, read_pairs
from vlmtune.data.relations import RELATION_MASK, mask_relation
from vlmtune.data.scenes import _PHRASES, _TEMPLATES
from vlmtune.metrics.text_baseline import fit_logistic, text_box_baseline, text_classifier_baseline

TWO_STAGE = str(CONFIGS / "retrieval_two_stage.yaml")


def test_every_scene_phrase_is_masked_in_every_template() -> None:
    """Whatever the relation, the masked caption is the same text: nothing of the phrase is left."""
    for template in _TEMPLATES:
        masked = {
            mask_relation(template.format(s="red circle", r="blue square", rel=phrase))
            for phrases in _PHRASES.values()
            for phrase in phrases
        }
        assert len(masked) == 1, (template, masked)
        text = masked.pop()
        assert RELATION_MASK in text and "red circle" in text and "blue square" in text


def test_masking_is_by_whole_words_and_any_case() -> None:
    assert mask_relation("The Green Ring is To  The Left Of the tree") == "The Green Ring is [rel] the tree"
    # "in" inside another word, "right" in "bright", "top" in "laptop": untouched.
    assert mask_relation("a bright laptop within the window") == "a bright laptop [rel] the window"
    assert mask_relation("") == ""


def test_logistic_regression_is_at_the_minimum_of_its_loss() -> None:
    """fit_logistic (scipy L-BFGS, hand-written gradient) against the obvious reference:
    torch autograd's gradient of the same regularised cross-entropy is zero at its
    solution, and the loss is lower there than at nearby points."""
    rng = np.random.default_rng(0)
    x = np.c_[rng.normal(size=(60, 4)), np.ones(60)]
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int) + (x[:, 2] > 1).astype(int)
    w = torch.tensor(fit_logistic(x, y, 3, l2=1.0), requires_grad=True)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    pen = torch.ones(5, 1, dtype=torch.float64)
    pen[-1] = 0  # the bias is not penalised

    def loss(weights: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(xt @ weights, yt) + 0.5 / 60 * (pen * weights * weights).sum()

    (grad,) = torch.autograd.grad(loss(w), w)
    assert grad.abs().max() < 1e-4
    for _ in range(5):
        assert loss(w + 0.01 * torch.randn_like(w)) > loss(w)


def test_text_classifier_reads_what_the_text_says_and_nothing_more() -> None:
    rng = random.Random(0)
    words = ["left", "right", "above", "below"]
    train = [(f"the cat {w} the dog", i) for i in range(200) for w in [words[i % 4]]]
    test = [(f"a cat {w} a dog", i % 4) for i, w in enumerate(words * 5)]
    out = text_classifier_baseline(
        [t for t, _ in train], [i % 4 for _, i in train], [t for t, _ in test], torch.tensor([y for _, y in test]), 4, "spatial"
    )
    assert out["spatial/baseline_text_accuracy"] == 100.0
    # Labels unrelated to the text: no better than the majority share, roughly.
    labels = [rng.randrange(4) for _ in train]
    noise = text_classifier_baseline(
        [t for t, _ in train],
        labels,
        [t for t, _ in test],
        torch.tensor([rng.randrange(4) for _ in test]),
        4,
        "spatial",
        "caption",
    )
    assert set(noise) == {f"spatial/baseline_caption_{k}" for k in ("accuracy", "macro_precision", "macro_recall", "macro_f1")}
    assert noise["spatial/baseline_caption_accuracy"] <= 50.0


def test_scene_captions_leak_the_relation_and_masked_ones_do_not(scenes: Path) -> None:
    """On the synthetic scenes the whole caption gives the relation away; the masked one
    the relation head reads leaves only weak hints (a frame or ring as the reference)."""
    train = [r for r in read_pairs(scenes / "train.json") if r.relation is not None]
    test = [r for r in read_pairs(scenes / "test.json") + read_pairs(scenes / "val.json") if r.relation is not None]
    y = torch.tensor([r.relation for r in test])
    caption = text_classifier_baseline(
        [r.text for r in train], [r.relation for r in train], [r.text for r in test], y, len(RELATIONS), "spatial", "caption"
    )
    masked = text_classifier_baseline(
        [mask_relation(r.text) for r in train],
        [r.relation for r in train],
        [mask_relation(r.text) for r in test],
        y,
        len(RELATIONS),
        "spatial",
        "text",
    )
    assert caption["spatial/baseline_caption_accuracy"] >= 90.0
    assert masked["spatial/baseline_text_accuracy"] <= 60.0


def test_text_box_baseline_learns_a_box_from_words() -> None:
    texts = ["the left thing", "the right thing"] * 20
    boxes = torch.tensor([[0.0, 0.0, 0.4, 0.4], [0.6, 0.6, 1.0, 1.0]] * 20, dtype=torch.float64)
    wh = torch.full((2, 2), 100.0)
    out = text_box_baseline(texts, boxes, ["the left thing", "the right thing"], boxes[:2] * 100, wh, l2=1e-3)
    assert out["grounding/baseline_text_acc50"] == 100.0 and out["grounding/baseline_text_miou"] > 95


def test_relation_head_never_sees_the_relation_phrase(tmp_path: Path, scenes: Path) -> None:
    """Changing the relation phrase of a caption leaves the relation logits unchanged;
    changing the image changes them."""
    from vlmtune.backbone import load_backbone
    from vlmtune.config import load_config
    from vlmtune.tasks import build_task

    cfg = load_config(TWO_STAGE, [f"data.synthetic_dir={scenes}"])
    task = build_task(cfg)
    backbone = load_backbone(cfg.backbone)
    model = task.build_model(backbone).eval()
    records = [r for r in read_pairs(scenes / "test.json") if r.relation is not None][:6]
    swapped = []
    for r in records:
        text = r.text
        for phrases in _PHRASES.values():
            for p in sorted(phrases, key=len, reverse=True):
                text = text.replace(f" {p} ", " to the right of ")
        swapped.append(type(r)(r.image, text, r.image_id, r.bbox, r.relation, r.source))
    assert any(a.text != b.text for a, b in zip(records, swapped))

    def logits(recs):
        batch = next(iter(task.make_loader(recs, backbone, train=False)))
        with torch.no_grad():
            v, patches = model.encode_image(batch["pixel_values"])
            return model.relation_logits(batch, batch["relation"] >= 0, v, patches)

    torch.testing.assert_close(logits(records), logits(swapped))
    other_images = [
        type(r)(records[(i + 1) % len(records)].image, r.text, r.image_id, r.bbox, r.relation, r.source)
        for i, r in enumerate(records)
    ]
    assert not torch.allclose(logits(records), logits(other_images))


def test_run_reports_text_baselines_and_the_best_stage(tmp_path: Path, fast: list[str], capsys) -> None:
    """metrics.json has the text-only baselines and the best checkpoint's stage. With a
    huge min_delta only the first validation counts as an improvement, so the best
    checkpoint is stage 0's: metrics.json, the log and the summary line say so."""
    from vlmtune.cli import main

    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                TWO_STAGE,
                "--output-dir",
                str(out),
                *fast,
                "train.epochs=2",
                "stages.1.start_epoch=1",
                "train.early_stopping.min_delta=1000",
            ]
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    for key in (
        "spatial/baseline_text_accuracy",
        "spatial/baseline_text_macro_f1",
        "spatial/baseline_caption_accuracy",
        "grounding/baseline_text_acc50",
        "grounding/baseline_text_miou",
    ):
        assert 0.0 <= m[key] <= 100.0, key
    assert m["train/best_epoch"] == 1 and m["train/best_stage"] == 0 and m["train/best_stage_name"] == "align"
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    vals = [x["val/retrieval/mean_recall"] for x in history if x["type"] == "epoch"]
    assert m["train/stage_best_val"] == pytest.approx(vals)  # one epoch per stage
    assert m["train/later_stages_improved"] is False
    captured = capsys.readouterr()
    assert "never beat stage 0 'align'" in captured.err
    assert "best checkpoint: epoch 1, stage 0 'align'" in captured.out
    assert "the later stages never beat stage 0" in captured.out
