"""Large contrastive batches: chunked, and through GradCache, the gradient is the full batch's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import CONFIGS
from vlmtune.backbone import load_backbone
from vlmtune.config import load_config
from vlmtune.data.formats import read_pairs
from vlmtune.errors import ConfigError
from vlmtune.tasks.retrieval import RetrievalTask


def _model_and_batch(scenes: Path, overrides: list[str], rows: int = 12):
    cfg = load_config(
        CONFIGS / "retrieval_two_stage.yaml",
        [
            f"data.synthetic_dir={scenes}",
            "model.embed_dim=32",
            "model.head_hidden=16",
            f"model.contrastive_batch={rows}",
            *overrides,
        ],
    )
    task = RetrievalTask.from_config(cfg)
    torch.manual_seed(0)
    model = task.build_model(load_backbone(cfg.backbone))
    model.train()
    model.backbone.eval()
    for p in model.parameters():  # end to end: every tower block trains too
        p.requires_grad_(True)
    records = read_pairs(str(scenes / "train.json"))
    loader = task.make_loader(records, model.backbone, train=True, seed=0)
    batch = next(iter(loader))
    assert len(batch["input_ids"]) == rows  # a training batch is the contrastive batch
    return cfg, task, model, batch


def _grads(model, batch, active, weights, seed: int = 1) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    terms = model(batch, set(active))
    loss = sum(weights[k] * terms[k] for k in sorted(active) if k in terms)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert len(a) > 20
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_grad_cache_gradient_equals_the_full_batch(scenes: Path) -> None:
    """Towers live (pixels), every parameter trainable, no dropout: the GradCache step's
    gradient of every parameter, the temperature's included, is the unchunked batch's."""
    _, task, model, batch = _model_and_batch(scenes, ["train.batch_size=4", "model.adapter_dropout=0"])
    w = task.loss_weights()
    model.cfg.grad_cache = "always"
    _, g_gc = _grads(model, batch, {"contrastive"}, w)
    model.chunk_rows = 0  # one forward of the whole batch, every activation kept
    _, g_full = _grads(model, batch, {"contrastive"}, w)
    _assert_same(g_gc, g_full)
    assert g_full["log_scale"].abs() > 0  # the temperature's gradient, from the loss pass
    assert any(n.startswith("backbone.") for n in g_full)  # the live tower's blocks got theirs


def test_grad_cache_equals_keeping_every_chunk_graph_with_dropout_and_matching(scenes: Path) -> None:
    """Dropout masks and the matching head's sampled negatives replay in the re-run (the
    random state of each chunk is restored), so GradCache gives the gradient of keeping
    every chunk's graph; and the random stream after the step is the same."""
    _, task, model, batch = _model_and_batch(scenes, ["train.batch_size=4", "model.adapter_dropout=0.3"])
    active, w = {"contrastive", "matching", "box", "relation"}, task.loss_weights()
    model.cfg.grad_cache = "never"
    loss_off, g_off = _grads(model, batch, active, w)
    after_off = torch.rand(3)
    model.cfg.grad_cache = "always"
    loss_on, g_on = _grads(model, batch, active, w)
    after_on = torch.rand(3)
    assert loss_on == pytest.approx(loss_off, rel=1e-6)
    _assert_same(g_on, g_off)
    assert torch.equal(after_on, after_off)
    # Without the replay the gradient would differ: another seed draws other masks.
    _, g_other = _grads(model, batch, active, w, seed=2)
    assert any(not torch.allclose(g_other[n], g_off[n]) for n in g_off)


def test_default_batch_is_today_s_path(scenes: Path) -> None:
    _, _, model, batch = _model_and_batch(scenes, ["train.batch_size=12"], rows=12)
    assert model.chunk_rows == 0  # contrastive_batch == batch_size: nothing changes


def test_contrastive_batch_must_be_a_multiple_of_the_batch(scenes: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.contrastive_batch: 10 is not a multiple of train.batch_size \(4\)"):
        load_config(CONFIGS / "retrieval_two_stage.yaml", ["train.batch_size=4", "model.contrastive_batch=10"])


def test_training_with_a_contrastive_batch_runs_grad_cache_only_where_a_tower_trains(
    tmp_path: Path, scenes: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through `vlmtune train`: stage 1 (frozen towers, the feature cache) steps through
    one graph; stage 2 (the last vision block trains from the cached prefix, live)
    through GradCache; a step is one contrastive batch of 16 pairs in chunks of 8."""
    import json

    from vlmtune.cli import main
    from vlmtune.tasks.retrieval import bigbatch

    calls: list[int] = []
    real = bigbatch.grad_cache

    def counted(run, chunks, params, *, device):
        calls.append(len(chunks))
        return real(run, chunks, params, device=device)

    monkeypatch.setattr(bigbatch, "grad_cache", counted)
    out = tmp_path / "run"
    args = [
        f"data.synthetic_dir={scenes}",
        "data.synthetic.n=40",
        "train.epochs=2",
        "train.batch_size=8",
        "model.contrastive_batch=16",
        "train.progress=false",
        "eval.batch_size=16",
        "model.embed_dim=32",
        "model.head_hidden=16",
    ]
    assert main(["train", str(CONFIGS / "retrieval_two_stage.yaml"), "--output-dir", str(out), *args]) == 0
    lines = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    train_records = len(read_pairs(str(scenes / "train.json")))
    steps_per_epoch = train_records // 16
    epochs = [x for x in lines if x.get("kind", x.get("type")) == "epoch" or "val" in x]
    assert epochs and epochs[-1]["step"] == 2 * steps_per_epoch  # 16 pairs a step
    assert calls == [2] * steps_per_epoch  # stage 2's epoch only, two chunks a step
    assert json.loads((out / "metrics.json").read_text())["negatives/contrastive_batch"] == 16


def test_grad_cache_under_fsdp_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"model.grad_cache: GradCache re-runs chunks .* set model.grad_cache=never"):
        load_config(
            CONFIGS / "retrieval_two_stage.yaml", ["train.batch_size=4", "model.contrastive_batch=8", "train.fsdp.enabled=true"]
        )
    cfg = load_config(
        CONFIGS / "retrieval_two_stage.yaml",
        ["train.batch_size=4", "model.contrastive_batch=8", "train.fsdp.enabled=true", "model.grad_cache=never"],
    )
    assert cfg.section("model").grad_cache == "never"
