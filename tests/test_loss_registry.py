"""A new loss is one registered function: ``toy_loss`` below, added to the retrieval task
with one registry line (``RetrievalTask.losses.extended(TOY)``, undone after each test).

It is then a ``loss:`` key with its default weight (settable as ``loss.toy=0.5``),
documented in ``config explain loss``, computed in training and logged as ``loss/toy``,
and refused at start-up, naming it, when no training record has the field it needs.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, small_set
from vlmtune.cli import main
from vlmtune.config import load_config
from vlmtune.errors import ConfigError
from vlmtune.losses import Loss
from vlmtune.tasks.retrieval import RetrievalTask
from vlmtune.tasks.retrieval.model import RetrievalEncodings


def toy_loss(enc: RetrievalEncodings) -> dict[str, torch.Tensor]:
    """Pulls each image's embedding towards its caption's (squared distance)."""
    return {"toy": (enc.image - enc.text).pow(2).sum(-1).mean()}


TOY = Loss("toy", 0.25, "Weight of the toy alignment loss (a test's).", toy_loss)
SINGLE = str(CONFIGS / "retrieval_single_stage.yaml")
ONE_STAGE = "stages=[{name: all, start_epoch: 0, train: {adapters: 1.0, heads: 1.0}}]"


@pytest.fixture()
def toy() -> Iterator[Loss]:
    with RetrievalTask.losses.extended(TOY):  # the one registry line
        yield TOY


def test_the_registry_declares_without_any_model(toy: Loss) -> None:
    losses = RetrievalTask.losses
    assert list(losses) == ["contrastive", "matching", "box", "relation", "toy"]
    assert losses.defaults()["toy"] == 0.25 and losses.defaults()["box_l1"] == 1.0
    assert "toy alignment" in losses.help()["toy"]
    with pytest.raises(ValueError, match="'toy' is already registered"):
        losses.add(TOY)


def test_the_registration_is_undone_after_the_block() -> None:
    assert "toy" not in RetrievalTask.losses and "toy" not in RetrievalTask.losses.defaults()


def test_the_toy_loss_is_a_config_key(toy: Loss, capsys: pytest.CaptureFixture[str]) -> None:
    assert load_config(None, []).loss["toy"] == 0.25
    assert load_config(None, ["loss.toy=0.5"]).loss["toy"] == 0.5
    with pytest.raises(ConfigError, match=r"loss\.toy"):
        load_config(None, ["loss.toy=-1"])
    assert main(["config", "explain", "loss"]) == 0
    assert "loss.toy: float = 0.25" in capsys.readouterr().out


def test_the_toy_loss_trains_and_is_logged(toy: Loss, tmp_path: Path, scenes: Path) -> None:
    out = tmp_path / "run"
    assert (
        main(["train", SINGLE, "--output-dir", str(out), *small_set(scenes), ONE_STAGE, "train.epochs=1", "train.log_every=1"])
        == 0
    )
    steps = [h for h in map(json.loads, (out / "history.jsonl").read_text().splitlines()) if h["type"] == "step"]
    assert steps and all("loss/toy" in h and h["loss/toy"] > 0 for h in steps)
    assert all("loss/contrastive" in h for h in steps)  # beside the built-in ones


def test_a_toy_loss_without_targets_is_refused_at_start_up(
    tmp_path: Path, scenes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    needy = dataclasses.replace(TOY, fields=("depth",))  # no scenes record has a depth
    with RetrievalTask.losses.extended(needy):
        assert RetrievalTask.losses["toy"].fields == ("depth",)
        assert (
            main(["train", SINGLE, "--output-dir", str(tmp_path / "run"), *small_set(scenes), ONE_STAGE, "train.epochs=1"]) == 2
        )
    err = capsys.readouterr().err
    assert "stages[0] 'all': the 'toy' loss is active but no training record" in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any training


def test_data_inspect_lists_the_losses_the_registry_says_a_set_feeds(scenes: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """data inspect asks the tasks: a registered toy loss is listed where the data has its fields."""
    train = str(scenes / "train.json")
    with RetrievalTask.losses.extended(TOY):
        assert main(["data", "inspect", train, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["losses"] == ["contrastive", "matching", "box", "relation", "toy"]
    with RetrievalTask.losses.extended(dataclasses.replace(TOY, fields=("depth",))):
        assert main(["data", "inspect", train, "--json"]) == 0
        assert "toy" not in json.loads(capsys.readouterr().out)["losses"]
