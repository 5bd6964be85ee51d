import time
from pathlib import Path

import pytest

from conftest import CONFIGS
from vlmtune.config import Config, load_config
from vlmtune.errors import ConfigError


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


def _load_error(tmp_path: Path, text: str | bytes) -> str:
    p = tmp_path / "c.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as e:
        load_config(p)
    return str(e.value)


def test_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    err = _load_error(tmp_path, "optim:\n  lr: 0.1  # café\n".encode("latin-1"))
    assert err == f"{tmp_path / 'c.yaml'}: not UTF-8 text (byte 23 is 0xe9)"


def test_key_written_twice_is_named_with_its_lines(tmp_path: Path) -> None:
    err = _load_error(tmp_path, "optim:\n  lr: 0.1\ntrain:\n  epochs: 2\noptim:\n  weight_decay: 0.0\n")
    assert err == f"{tmp_path / 'c.yaml'}: line 5: key 'optim' appears twice in one mapping (first on line 1)"
    assert "line 3: key 'lr'" in _load_error(tmp_path, "optim:\n  lr: 0.1\n  lr: 0.2\n")
    # A YAML merge ('<<') is not a repeated key: the key written after it wins.
    p = tmp_path / "merge.yaml"
    p.write_text("optim:\n  <<: {lr: 0.1, weight_decay: 0.0}\n  lr: 0.2\n")
    assert load_config(p).optim.lr == pytest.approx(0.2)
    assert load_config(p).optim.weight_decay == 0.0


def _alias_bomb(levels: int = 10) -> str:
    """A few hundred bytes whose value, written out, has 9**levels numbers."""
    value = "&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"
    for i in range(1, levels):
        value = f"&a{i} [{value}, " + ", ".join([f"*a{i - 1}"] * 8) + "]"
    return value


@pytest.mark.parametrize("where", ["optim:\n  lr: {}\n", "eval:\n  ks: {}\n", "backbone:\n  dtype: {}\n"])
def test_alias_bomb_is_refused_quickly_with_a_short_message(tmp_path: Path, where: str) -> None:
    t0 = time.perf_counter()
    err = _load_error(tmp_path, where.format(_alias_bomb()))
    assert time.perf_counter() - t0 < 5
    assert len(err) < 300 and "..." in err, err


def test_deeply_nested_yaml_is_a_config_error(tmp_path: Path) -> None:
    for value in ("[" * 3000 + "]" * 3000, "{a: " * 3000 + "1" + "}" * 3000):
        err = _load_error(tmp_path, f"optim:\n  lr: {value}\n")
        assert err == f"{tmp_path / 'c.yaml'}: nested too deeply to be a config"


def test_each_bound_has_one_home_read_by_validation_and_the_cli_flag(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """data.synthetic.image_size's bound lives on its field: the config refuses 32 up front
    (the scenes generator needs 48), and `data scenes --image-size` takes the same bounds."""
    from vlmtune.cli import main
    from vlmtune.config import key_bounds
    from vlmtune.config.schema import Config as Schema

    with pytest.raises(ConfigError, match=r"^data\.synthetic\.image_size: must be between 48 and 4096, got 32$"):
        load_config(CONFIGS / "retrieval_single_stage.yaml", ["data.synthetic.image_size=32"])
    bounds = key_bounds(Schema, "data.synthetic.image_size")
    assert (bounds.low, bounds.high) == (48, 4096)
    assert main(["data", "scenes", "--out", str(tmp_path / "s"), "--image-size", "47"]) != 0
    assert "--image-size: must be between 48 and 4096, got 47" in capsys.readouterr().err


def test_unknown_key_suggests_the_close_one() -> None:
    with pytest.raises(ConfigError, match=r"^optim\.lrr: unknown key \(did you mean lr\?\)$"):
        load_config(None, ["optim.lrr=1"])


def test_loss_mapping_is_checked_against_the_runs_task() -> None:
    cfg = load_config(CONFIGS / "retrieval_two_stage.yaml", ["loss.box=0.5"])
    assert cfg.loss["box"] == 0.5 and cfg.loss["box_l1"] == 1.0 and "lm" not in cfg.loss
    with pytest.raises(ConfigError, match=r"^loss\.lm: not a loss of the retrieval task; choose from contrastive, "):
        load_config(CONFIGS / "retrieval_two_stage.yaml", ["loss.lm=1"])
    with pytest.raises(ConfigError, match=r"^loss\.box: must be >= 0, got -1"):
        load_config(CONFIGS / "retrieval_two_stage.yaml", ["loss.box=-1"])
    assert load_config(CONFIGS / "receipts_three_stage.yaml").train.early_stopping.metric == "count/accuracy"


def test_an_override_may_complete_the_file(tmp_path: Path) -> None:
    """The file alone is checked for keys and types; the whole once the overrides are in, so
    ``task=counting`` on the command line makes the file's counting losses valid."""
    p = tmp_path / "c.yaml"
    p.write_text("loss: {lm: 0.5}\nstages:\n  - {name: s, start_epoch: 0, train: {count_head: 1.0}}\n")
    cfg = load_config(p, ["task=counting"])
    assert cfg.task == "counting" and cfg.loss == {"lm": 0.5, "count": 1.0}
    with pytest.raises(ConfigError, match=r"^loss\.lm: not a loss of the retrieval task"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"^loss\.lm: expected a number"):
        load_config(p, ["loss.lm=abc", "task=counting"])


def test_a_config_saved_by_0_1_with_every_tasks_loss_weights_still_loads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """vlmtune 0.1 wrote all eight loss weights into every run's config.yaml; the other
    task's never counted, so a checkpoint's config drops them with a note, and a user's
    own config with a typo is still refused."""
    from vlmtune.config import config_yaml, load_saved_config

    cfg = load_config(CONFIGS / "retrieval_two_stage.yaml")
    old = tmp_path / "config.yaml"
    old.write_text(config_yaml(cfg).replace("loss:\n", "loss:\n  lm: 1.0\n  count: 1.0\n", 1))
    with caplog.at_level("INFO", logger="vlmtune"):
        assert load_saved_config(old).loss == cfg.loss
    assert "loss weights of other tasks' losses (count, lm) left out" in caplog.text
    with pytest.raises(ConfigError, match=r"^loss\.lm: not a loss of the retrieval task"):
        load_config(old)
    typo = tmp_path / "typo.yaml"
    typo.write_text(config_yaml(cfg).replace("loss:\n", "loss:\n  contrastiv: 1.0\n", 1))
    with pytest.raises(ConfigError, match=r"^loss\.contrastiv: not a loss"):
        load_saved_config(typo)
