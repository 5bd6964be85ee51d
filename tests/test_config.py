from pathlib import Path

import pytest

from vlmtune.config import Config, load_config
from vlmtune.errors import ConfigError

from conftest import CONFIGS


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.stages[0].start_epoch == 0


def test_two_stage_config_unfreezes_last_blocks_at_small_lr() -> None:
    cfg = load_config(CONFIGS / "retrieval_two_stage.yaml")
    assert len(cfg.stages) == 2
    assert set(cfg.stages[0].train) == {"adapters", "heads"}
    assert cfg.stages[0].losses == ["contrastive", "matching"]
    assert cfg.stages[1].train["vision_blocks"] == pytest.approx(0.01)
    assert cfg.stages[1].vision_blocks >= 1
    assert set(cfg.stages[1].losses) == {"contrastive", "matching", "box", "relation"}


def test_overrides_reach_nested_keys_and_lists() -> None:
    cfg = load_config(CONFIGS / "retrieval_two_stage.yaml", ["optim.lr=3e-4", "stages.1.vision_blocks=2", "eval.ks=[1,2]"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.stages[1].vision_blocks == 2
    assert cfg.eval.ks == [1, 2]


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.epoch=3", "train.epoch"),
        ("optim.lr=-1", "optim.lr"),
        ("train.batch_size=abc", "train.batch_size"),
        ("backbone.vision_pooling=max", "backbone.vision_pooling"),
        ("stages.0.train.gizmo=1", "stages[0].train.gizmo"),
        ("stages.1.start_epoch=0", "stages[1].start_epoch"),
        ("stages.1.start_epoch=99", "stages[1].start_epoch"),
        ("stages.1.train.heads=-1", "stages[1].train.heads"),
        ("stages.1.vision_blocks=0", "stages[1].vision_blocks"),
        ("stages.0.losses=[contrastive,foo]", "stages[0].losses"),
        ("model.temperature_init=5", "model.temperature_init"),
        ("stages.7.name=x", "stages.7"),
    ],
)
def test_bad_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "retrieval_two_stage.yaml", [override])
    assert str(e.value).startswith(key + ":"), str(e.value)


def test_unknown_key_in_file_is_named(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 2\n  batchsize: 4\n")
    with pytest.raises(ConfigError, match=r"^train\.batchsize: unknown key"):
        load_config(p)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
