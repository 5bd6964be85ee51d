"""Every command and every option of the CLI says what it is: walks the parser that
``main`` uses (argparse has no public way to list a parser's actions, hence ``_actions``)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from vlmtune.cli import build_parser, main


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return found[0] if found else None


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """(command path, its parser) for the top level and every command and subcommand."""
    yield path, parser
    sub = _subcommands(parser)
    if sub is not None:
        for name, child in sub.choices.items():
            yield from _commands(child, (*path, name))


COMMANDS = [path for path, _ in _commands(build_parser())]


def test_the_walk_sees_every_command() -> None:
    names = {" ".join(p) for p in COMMANDS}
    for expected in (
        "train",
        "evaluate",
        "cache",
        "compare",
        "bench",
        "predict",
        "attention",
        "embed",
        "index",
        "search",
        "export",
        "data scenes",
        "data receipts",
        "data validate",
        "data inspect",
        "data convert",
        "config explain",
        "config show",
    ):
        assert expected in names


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "vlmtune")
def test_every_option_has_help(path: tuple[str, ...]) -> None:
    parser = dict(_commands(build_parser()))[path]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, f"{' '.join(path)} {name}"


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "vlmtune")
def test_help_lists_every_subcommand_with_its_help(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps to the terminal: one summary, one line
    parser = dict(_commands(build_parser()))[path]
    with pytest.raises(SystemExit) as e:
        main([*path, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for action in parser._actions:
        for flag in action.option_strings:
            assert flag in text, f"{' '.join(path)} --help: {flag}"
    sub = _subcommands(parser)
    if sub is None:  # a command that runs: it has a handler
        assert callable(parser.get_default("func")), " ".join(path)
        return
    listed = {a.dest: a.help for a in sub._choices_actions}
    assert set(listed) == set(sub.choices), " ".join(path)
    lines = text.splitlines()
    for name, summary in listed.items():
        assert summary and summary.strip(), f"{' '.join(path)} {name}: no summary"
        at = [i for i, line in enumerate(lines) if line.split()[:1] == [name]]
        assert at, f"{' '.join(path) or 'vlmtune'} --help does not list {name}"
        # The summary follows the name, or starts the next line when the name is longer than the column.
        rest = lines[at[0]].split(None, 1)[1:] or [lines[at[0] + 1].strip()]
        assert rest == [summary], f"{' '.join(path) or 'vlmtune'} --help: {name} without its summary"


# --------------------------------------------------------------------------- required and optional


def _leaf_commands() -> list[tuple[str, ...]]:
    return [path for path, p in _commands(build_parser()) if path and _subcommands(p) is None]


@pytest.mark.parametrize("path", _leaf_commands(), ids=" ".join)
def test_overrides_are_optional_in_usage_and_errors(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """KEY=VALUE overrides are optional: bracketed in the usage line, never in the
    "required" list of a bare command; every positional that is required is named there."""
    monkeypatch.setenv("COLUMNS", "1000")
    parser = dict(_commands(build_parser()))[path]
    positionals = [a for a in parser._actions if not a.option_strings]
    code = main(list(path))
    err = capsys.readouterr().err
    usage = parser.format_usage()
    for a in positionals:
        name = a.metavar or a.dest
        if a.nargs in ("*", "?"):
            assert f"[{name}" in usage, f"{' '.join(path)}: {name} not shown optional in {usage!r}"
            assert name not in err.split("required:", 1)[-1].split("(see")[0], f"{' '.join(path)}: {err}"
        else:
            assert code == 2 and name in err, f"{' '.join(path)}: required {name} not named: {err}"


def test_counting_commands_give_counting_override_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("predict", "attention"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "generation.num_beams=1" in text and "rerank_k" not in text, command


def test_train_help_names_num_threads(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "train.num_threads" in capsys.readouterr().out


def test_data_lists_commands_not_generators(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["data", "--help"])
    text = capsys.readouterr().out
    assert "GENERATOR" not in text and "COMMAND" in text


# --------------------------------------------------------------------------- did you mean


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (["trian", "x.yaml"], "did you mean 'train'?"),
        (["data", "scenez", "--out", "x"], "did you mean 'scenes'?"),
        (["config", "explian"], "did you mean 'explain'?"),
        (["train", "x.yaml", "--output-dri", "out"], "(--output-dri: did you mean --output-dir?) (see vlmtune train --help)"),
        (["evaluate", "ckpt", "--rankigns"], "--rankigns (--rankigns: did you mean --rankings"),
        (["export", "ckpt", "--out", "x", "--format", "merge"], "did you mean 'merged'?"),
    ],
)
def test_misspelt_commands_choices_and_flags_get_did_you_mean(
    argv: list[str], hint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and hint in err, err


def test_an_unknown_flag_far_from_any_gets_no_guess(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "x.yaml", "--output-dir", "o", "--zzzzqqq"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --zzzzqqq" in err and "did you mean" not in err


def test_debug_and_verbose_also_after_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "explain", "optim.lr", "--verbose"]) == 0
    assert main(["config", "explain", "optim.lr", "--debug"]) == 0
    assert main(["--verbose", "config", "explain", "optim.lr"]) == 0
    assert "optim.lr" in capsys.readouterr().out
