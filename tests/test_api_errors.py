"""The Python API's refusals and the path mistakes every checkpoint command names.

The API raises vlmtune errors that are also the exceptions Python code expects
(ArgumentError is a ValueError, ArgumentTypeError a TypeError), each naming the
argument; a pickled weights file is refused in vlmtune's words (never torch's advice to
unpickle it anyway) and its payload never runs; a file or a run folder given for a
checkpoint is named as such by evaluate, predict, export and the API.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import vlmtune
from vlmtune.cli import main
from vlmtune.errors import ArgumentError, ArgumentTypeError, CheckpointError, ConfigError, VlmtuneError


@pytest.fixture(scope="module")
def model(retrieval_checkpoint: Path) -> vlmtune.Model:
    return vlmtune.load(retrieval_checkpoint, device="cpu")


def test_error_classes_are_what_python_expects() -> None:
    assert issubclass(ArgumentError, VlmtuneError) and issubclass(ArgumentError, ValueError)
    assert issubclass(ArgumentTypeError, VlmtuneError) and issubclass(ArgumentTypeError, TypeError)


def test_retrieval_methods_name_the_bad_argument(model: vlmtune.Model, scenes: Path) -> None:
    img = next((scenes / "images").iterdir())
    cases: list[tuple[Any, type[Exception], str]] = [
        (lambda: model.embed_images(5), ArgumentTypeError, r"^images: expected an image path .* got int$"),
        (lambda: model.embed_images([img, 3.5]), ArgumentTypeError, r"^images\[1\]: expected an image path .* got float$"),
        (lambda: model.embed_images(b"a.png"), ArgumentTypeError, r"^images: .* got bytes$"),
        (lambda: model.embed_texts(7), ArgumentTypeError, r"^texts: expected a string or a sequence of strings, got int$"),
        (lambda: model.embed_texts(["a", None]), ArgumentTypeError, r"^texts\[1\]: expected a string, got NoneType$"),
        (lambda: model.similarity([1.0], torch.zeros(1, model.dim)), ArgumentTypeError, r"^images: expected a tensor"),
        (lambda: model.similarity(torch.zeros(2, 3), torch.zeros(1, model.dim)), ArgumentError, r"^images: expected .*\[2, 3\]$"),
        (
            lambda: model.match_scores(torch.zeros(3, model.dim), torch.zeros(2, model.dim)),
            ArgumentError,
            r"^match_scores: images has 3 rows and texts 2",
        ),
        (lambda: model.ground(img, ""), ArgumentError, r"^text: empty"),
        (lambda: model.ground(img, ["a", " "]), ArgumentError, r"^text\[1\]: empty"),
        (lambda: model.ground(42, "a"), ArgumentTypeError, r"^image: expected an image path"),
    ]
    for call, kind, pattern in cases:
        with pytest.raises(kind, match=pattern):
            call()
    # Python's own idioms catch them too.
    with pytest.raises(TypeError):
        model.embed_images(5)
    with pytest.raises(ValueError):
        model.match_scores(torch.zeros(3, model.dim), torch.zeros(2, model.dim))
    # ...and what is right still works: equal lengths score pairwise, a row [D] is one pair.
    e = model.embed_images([img, img])
    t = model.embed_texts(["a red circle", "a star"])
    assert model.match_scores(e, t).shape == (2,)
    assert model.similarity(e[0], t).shape == (1, 2)


def test_load_names_a_bad_device_or_path(retrieval_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ArgumentError, match=r"^device: 'nope' is not a device; use 'cpu', 'cuda' or 'cuda:N'$"):
        vlmtune.load(retrieval_checkpoint, device="nope")
    with pytest.raises(ArgumentTypeError, match=r"^device: expected a string"):
        vlmtune.load(retrieval_checkpoint, device=3)
    if not torch.cuda.is_available():
        with pytest.raises(ArgumentError, match="CUDA is not available"):
            vlmtune.load(retrieval_checkpoint, device="cuda")
    with pytest.raises(ArgumentTypeError, match=r"^path: expected a folder path"):
        vlmtune.load(None)  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match=r"^path: empty"):
        vlmtune.load("")
    run = retrieval_checkpoint.parent.parent
    with pytest.raises(CheckpointError, match=r"is a run folder, not a checkpoint; use .*checkpoints/best$"):
        vlmtune.load(run)
    with pytest.raises(CheckpointError, match=r"weights.safetensors: is a file, not a checkpoint folder"):
        vlmtune.load(retrieval_checkpoint / "weights.safetensors")


def test_ask_refuses_an_empty_question(lora_counting_checkpoint: Path, tmp_path: Path) -> None:
    m = vlmtune.load(lora_counting_checkpoint, device="cpu")
    path = tmp_path / "p.png"
    Image.new("RGB", (48, 64), (200, 180, 160)).save(path)
    for q in ("", "   "):
        with pytest.raises(ArgumentError, match=r"^question: empty; ask a question, or pass question=None"):
            m.ask(path, q)
    with pytest.raises(ArgumentTypeError, match=r"^question: expected a string, got int$"):
        m.ask(path, 3)  # type: ignore[arg-type]
    with pytest.raises(ArgumentTypeError, match=r"^image: expected an image path"):
        m.ask(None, "How many?")  # type: ignore[arg-type]
    from vlmtune.predict import DEFAULT_QUESTION

    assert m.ask(path).answer == m.ask(path, DEFAULT_QUESTION).answer  # None: the documented default


# --------------------------------------------------------------------------- path mistakes


def _one_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_commands_name_a_run_folder_or_a_file_given_for_a_checkpoint(
    retrieval_checkpoint: Path, lora_counting_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    run = retrieval_checkpoint.parent.parent
    best = run / "checkpoints" / "best"
    assert best.is_dir()
    capsys.readouterr()
    for argv in (
        ["evaluate", str(run), "--output-dir", str(tmp_path / "e")],
        ["export", str(run), "--out", str(tmp_path / "x")],
    ):
        msg = _one_error(capsys, argv)
        assert f"is a run folder, not a checkpoint; use {best}" in msg, msg
    msg = _one_error(capsys, ["evaluate", str(run / "checkpoints"), "--output-dir", str(tmp_path / "e")])
    assert f"is a run's checkpoints folder, not a checkpoint; use {best}" in msg, msg
    msg = _one_error(capsys, ["evaluate", str(best / "config.yaml"), "--output-dir", str(tmp_path / "e")])
    assert "config.yaml: is a file, not a checkpoint folder" in msg and f"here {best}" in msg, msg
    counting_run = lora_counting_checkpoint.parent.parent
    img = tmp_path / "p.png"
    Image.new("RGB", (48, 64)).save(img)
    msg = _one_error(capsys, ["predict", str(counting_run), "--image", str(img)])
    assert "is a run folder, not a checkpoint; use" in msg and "checkpoints/" in msg, msg
    assert not (tmp_path / "e").exists() and not (tmp_path / "x").exists()


def test_a_folder_given_for_a_file_is_named_as_such(lora_counting_checkpoint: Path, tmp_path: Path, capsys) -> None:
    ckpt = str(lora_counting_checkpoint)
    run = lora_counting_checkpoint.parent.parent
    folder = tmp_path / "folder"
    folder.mkdir()
    img = tmp_path / "p.png"
    Image.new("RGB", (48, 64)).save(img)
    capsys.readouterr()
    cases = [
        (["predict", ckpt, "--image", str(folder)], f"--image {folder}: is a folder, not an image file"),
        (["predict", ckpt, "--image", str(img), "--attention-out", str(folder)], "--attention-out"),
        (["predict", ckpt, "--image", str(img), "--question", " "], "--question: empty"),
        (["attention", ckpt, "--output", str(folder)], f"--output {folder}: is a folder, not a JSON file"),
        (["attention", ckpt, "--data", str(folder)], f"{folder}: is a folder, not a counting annotation file"),
        (
            ["train", str(run), "--output-dir", str(tmp_path / "r")],
            f"is a folder, not a config file; this folder holds '{run / 'config.yaml'}': pass that file",
        ),
        (["train", str(folder), "--output-dir", str(tmp_path / "r")], "is a folder, not a config file (a YAML file"),
        (["compare", str(img), "--output-dir", str(tmp_path / "c")], f"{img}: is a file, not a run folder"),
        (["export", ckpt, "--out", str(img)], "is a file, not a folder"),
    ]
    for argv, want in cases:
        msg = _one_error(capsys, argv)
        assert want in msg, (argv, msg)
    assert list(folder.iterdir()) == [] and not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- pickled weights


class _Payload:
    """Unpickling this calls os.system: what a hostile pytorch_model.bin would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_backbone_is_refused_in_our_words(retrieval_checkpoint: Path, tmp_path: Path, capsys) -> None:
    from vlmtune.checkpoint import write_manifest

    ckpt = tmp_path / "ckpt"
    shutil.copytree(retrieval_checkpoint, ckpt, ignore=shutil.ignore_patterns("eval"))
    bb = ckpt / "backbone"
    from safetensors.torch import load_file

    weights = load_file(str(bb / "model.safetensors"))
    marker = tmp_path / "pwned"
    torch.save({"payload": _Payload(marker), **weights}, bb / "pytorch_model.bin")
    (bb / "model.safetensors").unlink()
    write_manifest(ckpt)  # a forger resealed it: what refuses it is the unpickler
    capsys.readouterr()
    msg = _one_error(capsys, ["evaluate", str(ckpt), "--output-dir", str(tmp_path / "e")])
    assert "backbone/pytorch_model.bin: refused: a pickled weights file" in msg and "posix.system" in msg, msg
    assert "nothing in it was run" in msg and "weights_only" not in msg and "trusted source" not in msg, msg
    with pytest.raises(ConfigError, match="pickled weights file"):
        vlmtune.load(ckpt)
    assert not marker.exists()
    # The payload is live: a plain unpickle would have run it.
    torch.load(bb / "pytorch_model.bin", weights_only=False)
    assert marker.exists()
