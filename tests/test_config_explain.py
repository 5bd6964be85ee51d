"""``vlmtune config explain`` and ``config show``: every key documented and shown."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator

import pytest
import yaml

from conftest import CONFIGS
from vlmtune.cli import main
from vlmtune.config import config_class, config_from_dict, load_config
from vlmtune.tasks import TASKS, task_class


def _walk(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field]]:
    """(dotted key, field) of every field of ``cls``, into nested sections and list items."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        yield prefix + f.name, f
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if dataclasses.is_dataclass(tp):
            yield from _walk(tp, f"{prefix}{f.name}.")
        elif dataclasses.is_dataclass(item):
            yield from _walk(item, f"{prefix}{f.name}[N].")


Config = config_class()
LOSS_KEYS = [f"loss.{name}" for task in TASKS for name in task_class(task).losses.defaults()]
# Every field in declaration order; after the loss mapping, each task's registered losses.
KEYS = [k for key, _ in _walk(Config) for k in ([key, *LOSS_KEYS] if key == "loss" else [key])]


def _explain(capsys: pytest.CaptureFixture[str], *section: str) -> list[str]:
    assert main(["config", "explain", *section]) == 0
    return capsys.readouterr().out.splitlines()


def test_every_config_field_has_help() -> None:
    missing = [key for key, f in _walk(Config) if not f.metadata.get("help", "").strip()]
    assert not missing
    assert {"optim.lr", "train.early_stopping.patience", "data.synthetic.n", "stages[N].vision_blocks"} <= set(KEYS)


def test_explain_shows_every_key_once_in_declaration_order(capsys: pytest.CaptureFixture[str]) -> None:
    heads = [ln.split(":", 1)[0] for ln in _explain(capsys) if ln and not ln.startswith(" ")]
    assert heads == KEYS


def test_explain_section_shows_type_default_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    out = _explain(capsys, "optim")
    i = out.index("optim.lr: float = 0.001")
    assert out[i + 1].startswith("    Base learning rate")
    assert "optim.betas: list[float] = [0.9, 0.999]" in out
    assert not any(ln.startswith(("train.", "optim.lr.")) for ln in out)


@pytest.mark.parametrize(
    "section, first, last",
    [
        ("train.early_stopping", "train.early_stopping: section", "train.early_stopping.min_delta: float = 0.0"),
        ("data.synthetic", "data.synthetic: section", "data.synthetic.image_size: int = 96"),
        ("stages.1", "stages[N].name: str = stage", "stages[N].losses: list[str] | null = null"),
        ("backbone.dtype", "backbone.dtype: {auto,float32,bfloat16,float16} = auto", None),
    ],
)
def test_explain_narrows_to_a_nested_section_or_key(
    capsys: pytest.CaptureFixture[str], section: str, first: str, last: str | None
) -> None:
    heads = [ln for ln in _explain(capsys, section) if ln and not ln.startswith(" ")]
    assert heads[0] == first
    assert heads[-1] == (last or first)


@pytest.mark.parametrize("section, hint", [("optimz", "sections: task, seed"), ("lr", "did you mean optim.lr?")])
def test_unknown_section_is_one_line_error(capsys: pytest.CaptureFixture[str], section: str, hint: str) -> None:
    assert main(["config", "explain", section]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [captured.err.strip()]
    assert captured.err.startswith(f"error: {section}: no such config section or key")
    assert hint in captured.err


def test_show_prints_the_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    path = CONFIGS / "retrieval_two_stage.yaml"
    assert main(["config", "show", str(path), "optim.lr=3e-4", "stages.1.vision_blocks=2"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert config_from_dict(shown) == load_config(path, ["optim.lr=3e-4", "stages.1.vision_blocks=2"])
    assert shown["optim"]["lr"] == pytest.approx(3e-4)


def test_show_rejects_a_bad_override(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", str(CONFIGS / "retrieval_two_stage.yaml"), "optim.lr=-1"]) == 2
    assert capsys.readouterr().err.startswith("error: optim.lr: must be > 0")
