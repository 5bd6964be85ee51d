"""The cached frozen prefix (issue 13, item 5): a stage that trains only the last N
vision blocks reads the hidden state entering them from the feature cache and runs
those blocks live. Losses and gradients equal the uncached path; a changed prefix
weight lands in another namespace; whole runs and resumes agree with the uncached run."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, RESUMABLE, TWO_STAGE, small_set
from vlmtune.cli import main

ACTIVE = frozenset({"contrastive", "matching", "box", "relation"})


def _stage2_setup(scenes: Path, overrides: list[str] | None = None):
    """The two-stage recipe's model frozen as its stage 2 freezes it (last block + final
    norm train), its task and the training records."""
    from vlmtune.backbone import load_backbone
    from vlmtune.config import load_config
    from vlmtune.data.formats import read_pairs
    from vlmtune.stages import apply_stage, build_plan
    from vlmtune.tasks.retrieval import RetrievalTask

    cfg = load_config(CONFIGS / "retrieval_two_stage.yaml", ["train.batch_size=8", "train.epochs=2", *(overrides or [])])
    task = RetrievalTask.from_config(cfg)
    model = task.build_model(load_backbone(cfg.backbone))
    stage = build_plan(cfg, task.loss_weights())[1]
    assert set(stage.train) >= {"vision_blocks"} and stage.vision_blocks == 1
    apply_stage(model, stage, cfg.optim.lr, cfg.optim.weight_decay)
    return cfg, task, model, stage, read_pairs(scenes / "train.json")


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_prefix_cached_losses_and_gradients_equal_the_uncached_path(scenes: Path, tmp_path: Path, checkpointing: bool) -> None:
    """Every loss term (dropout on, same seed for both paths) and the gradient of every
    trained parameter, the last vision block's included, match the live tower to 1e-5;
    with gradient checkpointing on the trained blocks too."""
    from vlmtune.tasks import FeatureCache

    cfg, task, model, stage, records = _stage2_setup(scenes)
    model.train()
    model.backbone.set_gradient_checkpointing(set(stage.train) if checkpointing else set())
    model.backbone.eval()  # as the training loop: the backbone's own dropout off (checkpointed towers follow train)
    L = model.backbone.info.num_vision_blocks
    live = task.make_loader(records, model.backbone, train=True, seed=0)
    cached = task.make_loader(
        records, model.backbone, train=True, seed=0, cache=FeatureCache(tmp_path / "cache", vision_start=L - 1)
    )
    block = model.backbone.vision_blocks[L - 1]
    assert all(p.requires_grad for p in block.parameters())
    assert not any(p.requires_grad for p in model.backbone.vision_blocks[0].parameters())
    n = 0
    for a, b in zip(live, cached):
        assert "pixel_values" in a and "pixel_values" not in b and "vision_tokens" not in b
        assert b["vision_start"] == L - 1 and b["vision_hidden"].dtype == torch.float32
        assert torch.equal(a["index"], b["index"])
        out = []
        for batch in (a, b):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(n)
            terms = model(batch, ACTIVE)
            sum(terms[k] for k in ACTIVE).backward()
            out.append(({k: terms[k].item() for k in ACTIVE}, _grads(model)))
        (ta, ga), (tb, gb) = out
        for k in ACTIVE:
            assert ta[k] == pytest.approx(tb[k], rel=1e-5, abs=1e-6), k
        assert ga.keys() == gb.keys()
        assert any(k.startswith("backbone.") and ".encoder.layer." in k for k in ga), "the trained block got no gradient"
        for k in ga:
            torch.testing.assert_close(ga[k], gb[k], rtol=1e-5, atol=1e-5, msg=k)
        n += 1
        if n == 3:
            break
    assert n == 3


def test_a_changed_prefix_weight_lands_in_another_namespace(scenes: Path, tmp_path: Path) -> None:
    """The namespace holds the split point and exactly the prefix's weights: a trained
    block above the split keeps it (stage 2 reads one store throughout); a changed
    weight below it, or another split point, gives another folder."""
    from vlmtune.data.cache import namespace_id
    from vlmtune.tasks.retrieval import build_vision_cache, vision_namespace

    _, _, model, _, records = _stage2_setup(scenes)
    bb = model.backbone
    L = bb.info.num_vision_blocks
    first = vision_namespace(bb, "float32", L - 1)
    store, _, _ = build_vision_cache(records[:6], bb, tmp_path, start=L - 1)
    assert store.dir.name == namespace_id(first) and len(store) > 0
    with torch.no_grad():
        bb.vision_blocks[L - 1].mlp.fc1.weight.add_(1.0)  # a trained block: above the split
    assert vision_namespace(bb, "float32", L - 1) == first
    assert vision_namespace(bb, "float32", L - 2) != first  # another split point
    assert vision_namespace(bb, "float16", L - 1) != first  # another storage type
    assert vision_namespace(bb, "float32", None)["kind"] == "vision_tokens"  # the tower's output: its own kind
    with torch.no_grad():
        bb.vision_blocks[0].mlp.fc1.weight.add_(1e-3)  # a prefix weight (an end-to-end stage)
    changed = vision_namespace(bb, "float32", L - 1)
    assert changed["weights"] != first["weights"]
    again, _, _ = build_vision_cache(records[:6], bb, tmp_path, start=L - 1)
    assert again.dir != store.dir and len(again) == len(store)
    with torch.no_grad():
        bb.vision_tower.embeddings.patch_embeddings.projection.weight.mul_(1.5)  # the patch embeddings are the prefix too
    assert vision_namespace(bb, "float32", L - 1)["weights"] != changed["weights"]
    with pytest.raises(ValueError, match="blocks"):
        vision_namespace(bb, "float32", L + 1)


def _lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]


def test_two_stage_run_with_prefix_cache_equals_the_uncached_run(tmp_path: Path, scenes: Path) -> None:
    """The whole two-stage recipe through the CLI, cache on and off: every step's loss
    terms, every validation and the final metrics agree; stage 1 read the tower's
    output, stage 2 the prefix entering its last block (the history says which)."""
    args = [*small_set(scenes), "stages.1.start_epoch=1", "train.epochs=3", "train.log_every=1"]
    assert main(["train", TWO_STAGE, "--output-dir", str(tmp_path / "on"), *args]) == 0
    assert main(["train", TWO_STAGE, "--output-dir", str(tmp_path / "off"), *args, "cache.enabled=false"]) == 0
    on, off = _lines(tmp_path / "on"), _lines(tmp_path / "off")
    stages = [x for x in on if x["type"] == "stage"]
    assert stages[0]["cache"]["cache_vision"] is True and "cache_vision_start" not in stages[0]["cache"]
    assert stages[1]["cache"]["cache_vision"] is True and stages[1]["cache"]["cache_vision_start"] == 1
    assert all(x["cache"] == {} for x in off if x["type"] == "stage")
    steps_on, steps_off = ([x for x in h if x["type"] == "step"] for h in (on, off))
    assert len(steps_on) == len(steps_off) == 33
    for a, b in zip(steps_on, steps_off):
        assert a["step"] == b["step"]
        for k, v in a.items():
            if k.startswith(("loss", "train/")) and isinstance(v, float):
                assert v == pytest.approx(b[k], rel=1e-5, abs=1e-5), (a["step"], k)
    assert any("relation" in k for k in steps_on[-1])  # stage 2's terms were compared
    epochs_on, epochs_off = ([x for x in h if x["type"] == "epoch"] for h in (on, off))
    for a, b in zip(epochs_on, epochs_off):
        for k, v in a.get("val", {}).items():
            if isinstance(v, float):
                assert v == pytest.approx(b["val"][k], abs=1e-5), (a["epoch"], k)
    m_on, m_off = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("on", "off"))
    for key in ("retrieval/mean_recall", "retrieval/i2t_r1", "retrieval/t2i_r1", "grounding/miou", "spatial/accuracy"):
        assert m_on[key] == pytest.approx(m_off[key], abs=1e-6), key
    kinds = sorted(json.loads((d / "namespace.json").read_text())["kind"] for d in (tmp_path / "on" / "cache").iterdir())
    assert kinds == ["text_tokens", "vision_hidden", "vision_tokens"]


def test_resume_after_a_stop_in_stage_2_reads_the_prefix_cache_and_ends_exact(
    tmp_path: Path, scenes: Path, straight: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`vlmtune cache` fills the prefix store up front; SIGTERM inside stage 2 (step 15);
    the first run and the resumed one read that store (never rebuilt) and the run ends
    exactly as the straight run."""
    from test_faults import _assert_same_run, _counting_forward

    def sigterm_at_15(n, terms):
        if n == 15:
            os.kill(os.getpid(), signal.SIGTERM)
        return terms

    run = tmp_path / "run"
    assert main(["cache", TWO_STAGE, "--output-dir", str(run), *small_set(scenes), *RESUMABLE]) == 0
    (prefix,) = [
        d for d in (run / "cache").iterdir() if json.loads((d / "namespace.json").read_text())["kind"] == "vision_hidden"
    ]
    assert json.loads((prefix / "namespace.json").read_text())["start"] == 1
    built = (prefix / "features.npy").stat().st_mtime_ns
    _counting_forward(monkeypatch, sigterm_at_15)
    args = ["train", TWO_STAGE, "--output-dir", str(run), *small_set(scenes), *RESUMABLE]
    assert main(args) == 143
    monkeypatch.undo()
    assert (prefix / "features.npy").stat().st_mtime_ns == built
    assert main([*args, "--resume"]) == 0
    assert (prefix / "features.npy").stat().st_mtime_ns == built
    stage2 = [x for x in _lines(run) if x["type"] == "stage"][1]
    assert stage2["cache"]["cache_vision_start"] == 1
    _assert_same_run(straight, run)


def test_bench_stages_names_a_missing_recipe(tmp_path: Path, capsys) -> None:
    """--recipes that is not a file: one line naming it, exit 2, before any work."""
    missing = tmp_path / "nope.yaml"
    assert main(["bench", "--out", str(tmp_path / "b"), "--sections", "stages", "--recipes", str(missing), TWO_STAGE]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --recipes:") and "nope.yaml" in err[0]
