"""The task boundary: a third task is one new class plus one registry line.

``ToyTask`` below is a complete task (a linear probe on the frozen vision tower's mean
token predicting the spatial relation of the synthetic scenes) with a config section of
its own (``toy:``, :class:`ToyConfig`). Registering it is the only change to vlmtune:
config validation, the stage plan, the training loop, the CLI's metric printout and
the report's section order all read what the class declares.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from vlmtune import tasks
from vlmtune.cli import main
from vlmtune.config import BACKBONE_COMPONENTS, load_config, setting
from vlmtune.errors import ConfigError, VlmtuneError
from vlmtune.losses import Loss, LossRegistry


@dataclass
class ToyConfig:
    """The toy task's own section, ``toy:``."""

    samples: int = setting(20, "Images of the toy task's synthetic scenes set.", low=10, high=1000)


class ToyModel(nn.Module):
    def __init__(self, backbone: Any, n_classes: int):
        super().__init__()
        self.backbone = backbone
        self.probe = nn.Linear(backbone.info.vision_hidden, n_classes)

    def component_modules(self, name: str, vision_blocks: int = 0) -> list[nn.Module]:
        return [self.probe] if name == "probe" else self.backbone.component_modules(name, vision_blocks)

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.probe(self.backbone.vision_tokens(batch["pixel_values"])[:, 1:].mean(1).float())

    def forward(self, batch: dict[str, torch.Tensor], active: frozenset[str]) -> dict[str, torch.Tensor]:
        return ToyTask.losses.terms((self, batch), active, {})


def probe_loss(enc: tuple[ToyModel, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    model, batch = enc
    return {"toy": F.cross_entropy(model.logits(batch), batch["relation"].clamp_min(0))}


class ToyTask(tasks.Task):
    name: ClassVar[str] = "toy"
    components: ClassVar[tuple[str, ...]] = ("probe",)
    config_sections: ClassVar[dict[str, type]] = {"toy": ToyConfig}
    losses: ClassVar[LossRegistry] = LossRegistry([Loss("toy", 1.0, "Weight of the probe's cross-entropy.", probe_loss)])
    default_metric: ClassVar[str] = "toy/accuracy"
    key_metrics: ClassVar[tuple[str, ...]] = ("toy/accuracy",)
    report_sections: ClassVar[tuple[str, ...]] = ("toy",)

    def __init__(self, *, toy: ToyConfig, data: Any, batch_size: int, max_text_tokens: int):
        super().__init__()
        self.toy, self.data, self.batch_size, self.max_text_tokens = toy, data, batch_size, max_text_tokens

    @classmethod
    def from_config(cls, cfg: Any) -> ToyTask:
        return cls(
            toy=cfg.section("toy"), data=cfg.data, batch_size=cfg.train.batch_size, max_text_tokens=cfg.backbone.max_text_tokens
        )

    @classmethod
    def check_sections(cls, cfg: Any) -> None:
        toy = cfg.section("toy")
        if toy.samples % 2:
            raise ConfigError(f"toy.samples: must be even, got {toy.samples}")

    def build_model(self, backbone: Any) -> ToyModel:
        from vlmtune.data.formats import RELATIONS

        return ToyModel(backbone, len(RELATIONS))

    def data_paths(self, output_dir: Path) -> dict[str, str]:
        from vlmtune.data.scenes import generate_scenes

        return tasks.data_paths(self.data, output_dir, lambda f: generate_scenes(f, n=self.toy.samples, seed=0), ".json")

    def read_split(self, path: str, split: str | None = None) -> list[Any]:
        from vlmtune.data.formats import read_pairs

        return read_pairs(path)

    def make_loader(self, records: list[Any], backbone: Any, *, train: bool, seed: int = 0, cache: Any = None) -> DataLoader:
        from vlmtune.data.pairs import PairCollator, PairDataset

        return DataLoader(
            PairDataset(records),
            batch_size=self.batch_size,
            shuffle=train,
            generator=torch.Generator().manual_seed(seed) if train else None,
            collate_fn=PairCollator(backbone.tokenizer, backbone.image_processor, self.max_text_tokens),
        )

    @torch.no_grad()
    def evaluate(
        self,
        model: ToyModel,
        records: list[Any],
        *,
        device: torch.device,
        train_records: Any = None,
        progress: bool = False,
        cache: Any = None,
    ) -> dict[str, Any]:
        right = total = 0
        for batch in self.make_loader(records, model.backbone, train=False):
            keep = batch["relation"] >= 0
            right += int((model.logits(batch).argmax(-1) == batch["relation"])[keep].sum())
            total += int(keep.sum())
        return {"toy/accuracy": 100.0 * right / max(total, 1), "toy/n": total}


@pytest.fixture()
def toy_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(tasks.TASKS, "toy", ToyTask)  # the one registry line


TOY = [
    "task=toy",
    "stages=[{name: probe, start_epoch: 0, train: {probe: 1.0}}]",
    "train.early_stopping.metric=toy/accuracy",
    "train.epochs=2",
    "train.batch_size=8",
    "train.progress=false",
]


def test_config_reads_components_and_losses_from_the_task_class(toy_registered: None) -> None:
    assert load_config(None, TOY).task == "toy"
    with pytest.raises(ConfigError, match=r"stages\[0\]\.train\.adapters: unknown component; choose from probe"):
        load_config(None, [*TOY, "stages.0.train={adapters: 1.0}"])
    with pytest.raises(ConfigError, match=r"unknown loss 'contrastive'; choose from toy"):
        load_config(None, [*TOY, "stages.0.losses=[contrastive]"])
    # Backbone components come on top of every task's own.
    assert load_config(None, [*TOY, "stages.0.train={probe: 1.0, vision_tower: 0.1}"]).stages[0].train["vision_tower"] == 0.1


def test_unregistered_task_is_an_error_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"^task: unknown task 'toy'; choose from retrieval, counting"):
        load_config(None, ["task=toy"])


def test_a_registered_task_trains_evaluates_and_reports(
    toy_registered: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    config = tmp_path / "toy.yaml"
    config.write_text(
        "task: toy\nstages: [{name: probe, start_epoch: 0, train: {probe: 1.0}}]\n"
        "train: {early_stopping: {metric: toy/accuracy}}\n"
    )
    assert main(["train", str(config), *TOY[3:], "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["toy/accuracy"] <= 100.0 and metrics["toy/n"] > 0
    assert metrics["train/epochs"] == 2
    assert "toy/accuracy" in capsys.readouterr().out  # the CLI prints the task's key metrics
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert [h["train"] for h in history if h["type"] == "stage"] == [{"probe": 1.0}]
    assert all("val/toy/accuracy" in h for h in history if h["type"] == "epoch")

    from vlmtune.report import order_metrics

    assert tasks.report_sections()[-1] == "toy"
    assert order_metrics(["train/epochs", "toy/accuracy", "zzz/x", "retrieval/i2t_r1"]) == [
        "retrieval/i2t_r1",
        "toy/accuracy",
        "zzz/x",
        "train/epochs",
    ]


def test_a_task_declares_its_defaults_in_one_base_class(toy_registered: None) -> None:
    """What ToyTask does not declare comes from tasks.Task: the engine never needs a fallback."""
    assert ToyTask.backbone_components == BACKBONE_COMPONENTS
    assert ToyTask.evaluation_sections == ("data", "eval") and ToyTask.cache_kinds == () and not ToyTask.cacheable
    task = tasks.build_task(load_config(None, TOY))
    assert task.loss_weights() == {"toy": 1.0} and task.loss_targets([object()]) == {"toy"}
    assert task.loss_targets([]) == set()
    task.check_eval_records([], "nowhere")  # no rule by default
    with pytest.raises(VlmtuneError, match="the toy task has no per-query results"):
        task.evaluate_with_rankings(None, [], device=torch.device("cpu"), rankings_k=5)


def test_a_task_with_its_own_config_section(toy_registered: None, capsys: pytest.CaptureFixture[str]) -> None:
    """The toy task's ``toy:`` section is read, documented and checked as the built-in ones are."""
    cfg = load_config(None, [*TOY, "toy.samples=12"])
    assert cfg.toy.samples == 12
    assert tasks.build_task(cfg).toy.samples == 12
    with pytest.raises(ConfigError, match=r"^toy\.samples: must be even, got 13"):  # the task's own rule
        load_config(None, [*TOY, "toy.samples=13"])
    with pytest.raises(ConfigError, match=r"^toy\.samples: "):  # the field's bound (setting(low=10))
        load_config(None, [*TOY, "toy.samples=4"])
    # Like counting's sections in a retrieval run, every config holds every registered task's.
    assert load_config(None, ["toy.samples=12"]).toy.samples == 12
    assert main(["config", "explain", "toy"]) == 0
    assert "toy.samples: int = 20" in capsys.readouterr().out
