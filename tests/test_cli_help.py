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
