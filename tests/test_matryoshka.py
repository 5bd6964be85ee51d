"""Matryoshka embeddings: the loss against a slow reference, R@K per width, embed/index/search --dim."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import CONFIGS, small_set
from vlmtune.cli import main
from vlmtune.config import load_config
from vlmtune.errors import ConfigError
from vlmtune.tasks.retrieval.matryoshka import trained_dims
from vlmtune.tasks.retrieval.spec import LOSSES


def _slow_infonce(image: list[list[float]], text: list[list[float]], ids: list[int], scale: float) -> float:
    """Symmetric InfoNCE, uniform over every caption of the same image, one number at a time."""

    def side(q: list[list[float]], c: list[list[float]], q_ids: list[int], c_ids: list[int]) -> float:
        total = 0.0
        for i, qi in enumerate(q):
            logits = [scale * sum(a * b for a, b in zip(qi, cj)) for cj in c]
            top = max(logits)
            log_z = top + math.log(sum(math.exp(x - top) for x in logits))
            pos = [j for j in range(len(c)) if c_ids[j] == q_ids[i]]
            total += -sum(logits[j] - log_z for j in pos) / len(pos)
        return total / len(q)

    return (side(image, text, ids, ids) + side(text, image, ids, ids)) / 2


def _unit_prefix(row: list[float], d: int) -> list[float]:
    norm = math.sqrt(sum(x * x for x in row[:d]))
    return [x / norm for x in row[:d]]


@pytest.mark.parametrize("weights", [[], [0.5, 2.0, 1.0]])
def test_mrl_loss_is_the_weighted_sum_over_truncated_renormalised_widths(weights: list[float]) -> None:
    g = torch.Generator().manual_seed(0)
    d, dims = 12, [3, 6]
    image = torch.nn.functional.normalize(torch.randn(7, d, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(7, d, generator=g), dim=-1)
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 4])  # repeated images: several positives
    scale = torch.tensor(1 / 0.07)
    cfg = SimpleNamespace(embed_dim=d, mrl_dims=dims, mrl_weights=weights)
    model = SimpleNamespace(cfg=cfg, logit_scale=lambda: scale)
    enc = SimpleNamespace(model=model, image=image, text=text, ids=ids, negatives=None)
    got = LOSSES["contrastive"].function()(enc)
    w = weights or [1.0, 1.0, 1.0]
    widths = trained_dims(d, dims)
    assert widths == [3, 6, 12]
    want = 0.0
    for wi, di in zip(w, widths):
        one = _slow_infonce(
            [_unit_prefix(r, di) for r in image.tolist()], [_unit_prefix(r, di) for r in text.tolist()], ids.tolist(), 1 / 0.07
        )
        assert float(got[f"diag/mrl{di}"]) == pytest.approx(one, rel=1e-5)
        want += wi * one
    assert float(got["contrastive"]) == pytest.approx(want, rel=1e-5)


def test_without_mrl_dims_the_loss_is_the_plain_one() -> None:
    from vlmtune.losses import contrastive_loss

    g = torch.Generator().manual_seed(1)
    image = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    ids, scale = torch.arange(5), torch.tensor(10.0)
    model = SimpleNamespace(cfg=SimpleNamespace(embed_dim=8, mrl_dims=[], mrl_weights=[]), logit_scale=lambda: scale)
    got = LOSSES["contrastive"].function()(SimpleNamespace(model=model, image=image, text=text, ids=ids, negatives=None))
    assert got.keys() == {"contrastive"}
    assert torch.equal(got["contrastive"], contrastive_loss(image, text, ids, scale))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.embed_dim=32", "model.mrl_dims=[8, 64]"], r"model.mrl_dims: 64 is not a width in 1..model.embed_dim \(32\)"),
        (["model.embed_dim=32", "model.mrl_dims=[8, 8]"], r"model.mrl_dims: \[8, 8\] repeats a width"),
        (["model.embed_dim=32", "model.mrl_dims=[8]", "model.mrl_weights=[1.0]"], r"model.mrl_weights: 1 weights for 2"),
    ],
)
def test_bad_mrl_settings_are_one_line_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "retrieval_two_stage.yaml", overrides)


@pytest.fixture(scope="module")
def mrl_run(tmp_path_factory: pytest.TempPathFactory, scenes: Path) -> Path:
    root = tmp_path_factory.mktemp("mrl")
    args = [
        *small_set(scenes),
        "train.epochs=1",
        "model.embed_dim=32",
        "model.head_hidden=16",
        "model.mrl_dims=[8, 16]",
        "stages=[{name: a, start_epoch: 0, train: {adapters: 1.0, heads: 1.0}, losses: [contrastive]}]",
    ]
    assert main(["train", str(CONFIGS / "retrieval_two_stage.yaml"), "--output-dir", str(root / "run"), *args]) == 0
    return root / "run"


def test_metrics_report_recall_at_every_trained_width(mrl_run: Path) -> None:
    m = json.loads((mrl_run / "metrics.json").read_text())
    for d in (8, 16):
        for key in ("i2t_r1", "t2i_r1", "i2t_r5", "mean_recall"):
            assert 0 <= m[f"retrieval/mrl{d}/{key}"] <= 100
    assert "retrieval/mrl32/i2t_r1" not in m  # the full width is retrieval/i2t_r1 itself


def test_embed_index_search_at_a_trained_width(mrl_run: Path, scenes: Path, tmp_path: Path, capsys) -> None:
    ckpt = mrl_run / "checkpoints" / "best"
    data = scenes / "test.json"
    assert main(["embed", str(ckpt), "--data", str(data), "--out", str(tmp_path / "e16"), "--dim", "16", "--no-progress"]) == 0
    meta = json.loads((tmp_path / "e16" / "embed.json").read_text())
    assert meta["dim"] == 16 and meta["trained_dims"] == [8, 16, 32]
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "e16" / "embeddings.safetensors"))
    assert t["images"].shape[1] == 16
    torch.testing.assert_close(t["images"].norm(dim=1), torch.ones(len(t["images"])))
    # The same vectors as the full width's first 16 coordinates, renormalised.
    assert main(["embed", str(ckpt), "--data", str(data), "--out", str(tmp_path / "e32"), "--no-progress"]) == 0
    full = load_file(str(tmp_path / "e32" / "embeddings.safetensors"))
    torch.testing.assert_close(t["texts"], torch.nn.functional.normalize(full["texts"][:, :16], dim=-1))
    # An index of the full-width folder at width 8, and one at 16.
    assert main(["index", str(tmp_path / "e32"), "--out", str(tmp_path / "i8"), "--dim", "8"]) == 0
    assert json.loads((tmp_path / "i8" / "index.json").read_text())["dim"] == 8
    assert main(["index", str(tmp_path / "e16"), "--out", str(tmp_path / "i16")]) == 0
    capsys.readouterr()
    assert main(["search", str(tmp_path / "i8"), "--text", "a red circle", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits["results"]) > 0
    # Queries of another width than the index's are refused.
    assert main(["search", str(tmp_path / "i8"), "--text", "a red circle", "--dim", "16"]) != 0
    err = capsys.readouterr().err
    assert "--dim: the index" in err and "width 8" in err and "Traceback" not in err
    # A width the checkpoint did not train; an index wider than its folder.
    assert main(["embed", str(ckpt), "--data", str(data), "--out", str(tmp_path / "e12"), "--dim", "12"]) != 0
    assert "--dim: " in capsys.readouterr().err
    assert main(["index", str(tmp_path / "e16"), "--out", str(tmp_path / "i32"), "--dim", "32"]) != 0
    assert "--dim: " in capsys.readouterr().err
