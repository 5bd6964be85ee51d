"""Start-up: the CLI's parser, --help, ``config explain`` / ``config show`` and config
errors answer without importing torch, transformers or torchmetrics (the tasks'
declarations live in their torch-free ``spec.py``; the engine is imported after the
config is checked)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
CONFIG = str(ROOT / "configs" / "retrieval_single_stage.yaml")
HEAVY = ("torch", "transformers", "torchmetrics", "accelerate")
PROBE = f"""
import sys
from vlmtune.cli import build_parser, main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print("exit", code)
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
"""


def _run(*argv: str) -> tuple[str, str, str]:
    """(exit line, heavy modules imported, stderr) of the CLI run with ``argv`` in a fresh interpreter."""
    env = dict(os.environ, PYTHONPATH=str(SRC), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env, timeout=120)
    lines = out.stdout.strip().splitlines()
    return lines[-2], lines[-1], out.stderr


def _heavy(*argv: str) -> str:
    return _run(*argv)[1]


def test_help_imports_neither_torch_nor_transformers() -> None:
    assert _heavy("--help") == "[]"
    assert _heavy("train", "--help") == "[]"
    assert _heavy("bench", "--help") == "[]"


@pytest.mark.parametrize("argv", [("config", "explain"), ("config", "explain", "loss"), ("config", "show", CONFIG)])
def test_config_commands_import_no_torch(argv: tuple[str, ...]) -> None:
    code, heavy, _ = _run(*argv)
    assert code == "exit 0"
    assert heavy == "[]"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lrr=1"], "optim.lrr: unknown key (did you mean lr?)"),
        (["optim.lr=abc"], "optim.lr: expected a number"),
        (["task=nope"], "task: unknown task 'nope'"),
        (["stages.0.train={probe: 1.0}"], "stages[0].train.probe: unknown component"),
    ],
)
def test_config_errors_answer_before_torch(tmp_path: Path, overrides: list[str], message: str) -> None:
    for command in (["train", CONFIG, "--output-dir", str(tmp_path / "run")], ["cache", CONFIG, "--output-dir", str(tmp_path)]):
        code, heavy, err = _run(*command, *overrides)
        assert code == "exit 2", err
        assert message in err
        assert heavy == "[]"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("command", "override", "message"),
    [
        ("evaluate", "eval.rerank_kk=5", "eval.rerank_kk: unknown key (did you mean rerank_k?)"),
        ("evaluate", "optim.lr=1", "optim.lr"),  # a section evaluate does not take
        ("predict", "generation.max_new_tokenz=4", "max_new_tokenz: unknown key"),
    ],
)
def test_evaluate_and_predict_override_errors_answer_before_torch(
    tmp_path: Path, command: str, override: str, message: str
) -> None:
    """A checkpoint's config.yaml is enough to check the overrides (the engine, which
    verifies the whole checkpoint, is imported after)."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    recipe = "receipts_three_stage.yaml" if command == "predict" else "retrieval_single_stage.yaml"
    (ckpt / "config.yaml").write_text((ROOT / "configs" / recipe).read_text())
    argv = [command, str(ckpt), override] if command == "evaluate" else [command, str(ckpt), "--image", "x.png", override]
    code, heavy, err = _run(*argv)
    assert code == "exit 2", err
    assert message in err and "Traceback" not in err
    assert heavy == "[]"


def test_specs_agree_with_the_tasks_they_declare() -> None:
    """The torch-free declarations are the classes the engine runs (inherited, not copied)."""
    from vlmtune.tasks import TASKS, task_class, task_spec
    from vlmtune.tasks.retrieval.model import RetrievalModel

    for name in TASKS:
        spec, full = task_spec(name), task_class(name)
        assert issubclass(full, spec) and full is not spec
        assert full.losses is spec.losses and full.name == name
    assert task_spec("retrieval").components == tuple(RetrievalModel.COMPONENTS)
    # Every declared loss names a function that exists.
    for name in TASKS:
        for loss in task_spec(name).losses.specs():
            assert callable(loss.function())
