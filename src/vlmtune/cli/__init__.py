"""``vlmtune <command>``. ``main(argv)`` is what tests call, so a whole run is a test.

One module per command group, each command's flags beside its handler: :mod:`.run`
(train, evaluate, cache), :mod:`.analysis` (compare, bench), :mod:`.use` (predict,
attention, embed, index, search, export), :mod:`.data` and :mod:`.config`; the flag
types and flags several commands share are in :mod:`.args`, the one-line error
messages in :mod:`.messages`. A handler parses its flags, calls one library function
and prints.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import re
import sys
from collections.abc import Callable
from typing import Any

from vlmtune import __version__
from vlmtune.cli import analysis, config, data, run, use
from vlmtune.cli.args import non_negative_float, non_negative_int, positive_int, seed_int
from vlmtune.cli.messages import MAX_MESSAGE, describe_error, say
from vlmtune.errors import Interrupted, VlmtuneError

__all__ = [
    "COMMANDS",
    "MAX_MESSAGE",
    "build_parser",
    "describe_error",
    "main",
    "non_negative_float",
    "non_negative_int",
    "positive_int",
    "seed_int",
]

# Each adds one command (data and config: a command with its own subcommands) in the
# order `vlmtune --help` lists them.
COMMANDS: tuple[Callable[[Any], None], ...] = (
    run.add_train,
    run.add_evaluate,
    use.add_predict,
    use.add_attention,
    analysis.add_compare,
    analysis.add_bench,
    run.add_cache,
    data.add_data,
    config.add_config,
    use.add_embed,
    use.add_index,
    use.add_search,
    use.add_export,
)


class _UsageError(VlmtuneError):
    """A bad command line (argparse's own checks and the flag types of :mod:`.args`):
    ``what`` is wrong, ``prog`` the command whose --help to see."""

    def __init__(self, what: str, prog: str):
        super().__init__(f"{what} (see {prog} --help)")
        self.what, self.prog = what, prog


DEBUG_HELP = "show tracebacks and debug logs"
VERBOSE_HELP = "also show the libraries' own progress bars, banners and warnings (transformers, faiss, ...)"


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one ``error:`` line and exit status 2 from
    :func:`main` (not a usage block and ``SystemExit``); a misspelt command or choice
    gets a "did you mean"."""

    subcommands: Any = None  # the action of add_subparsers, when this parser has commands

    def add_subparsers(self, **kwargs: Any) -> Any:
        self.subcommands = super().add_subparsers(**kwargs)
        return self.subcommands

    def error(self, message: str) -> Any:
        raise _UsageError(with_suggestion(message), self.prog)


def with_suggestion(message: str) -> str:
    """argparse's "invalid choice: 'trian' (choose from ...)" with the closest choices
    named: "... did you mean 'train'?"."""
    m = re.search(r"invalid choice: '?(.*?)'? \(choose from (.*)\)$", message)
    if m is None:
        return message
    choices = [c.strip().strip("'\"") for c in m.group(2).split(",")]
    close = difflib.get_close_matches(m.group(1), choices, n=3, cutoff=0.6)
    return f"{message}; did you mean {' or '.join(repr(c) for c in close)}?" if close else message


def command_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The parser of the (sub)command ``argv`` names (``parser`` itself when none)."""
    command = parser
    for token in argv:
        if isinstance(command, _Parser) and command.subcommands is not None and token in command.subcommands.choices:
            command = command.subcommands.choices[token]
    return command


def flag_hints(command: argparse.ArgumentParser, argv: list[str]) -> str:
    """ " (--outptu-dir: did you mean --output-dir?)" for each flag of ``argv`` that the
    command does not know (nor abbreviates) but one of its flags is close to; else ""."""
    flags = sorted(set(re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", command.format_help())))
    hints = []
    for token in argv:
        flag = token.split("=", 1)[0]
        if not flag.startswith("-") or any(f.startswith(flag) for f in flags):
            continue
        close = difflib.get_close_matches(flag, flags, n=2, cutoff=0.6)
        if close:
            hints.append(f"{flag}: did you mean {' or '.join(close)}?")
    return f" ({'; '.join(hints)})" if hints else ""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vlmtune", description="Staged fine-tuning of a frozen InternVL with small trainable parts.")
    p.add_argument("--version", action="version", version=f"vlmtune {__version__}")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    _add_global_flags(sub)
    return p


def _add_global_flags(sub: Any) -> None:
    """--debug and --verbose after the command too (``vlmtune train ... --debug``); a
    command's copy never resets what was given before the command (default SUPPRESS)."""
    for child in sub.choices.values():
        if isinstance(child, _Parser) and child.subcommands is not None:
            _add_global_flags(child.subcommands)
            continue
        child.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        child.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after options (argparse cannot intermix a
    # trailing positional list with a subcommand's options by itself).
    given = sys.argv[1:] if argv is None else list(argv)
    command = command_parser(parser, given)
    try:
        args, extra = parser.parse_known_args(argv)
        stray = [x for x in extra if x.startswith("-") or "=" not in x or getattr(args, "overrides", None) is None]
        if stray:
            raise _UsageError(f"unrecognized arguments: {' '.join(stray)}", command.prog)
    except _UsageError as e:
        say(f"error: {e.what}{flag_hints(command, given)} (see {e.prog} --help)")
        return 2
    if extra:
        args.overrides = list(args.overrides) + extra
    _set_up_logging(args.debug, args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except VlmtuneError as e:
        if args.debug:
            raise
        # An interruption's message is ours (where it stopped, the command that resumes
        # it), never the input's: it is printed whole, so the command can be copied.
        say(f"{getattr(e, 'label', 'error')}: {e}", whole=isinstance(e, Interrupted))
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, never a traceback
        if args.debug:
            raise
        say(f"error: {describe_error(e)}")
        return 2


def _set_up_logging(debug: bool, verbose: bool) -> None:
    """Our messages at INFO (DEBUG with --debug); the libraries' at WARNING, their own
    bars and banners off, unless --verbose or --debug (see :mod:`vlmtune.console`)."""
    from vlmtune.console import quiet_loggers, set_verbose

    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s", force=True)
    set_verbose(verbose or debug)
    quiet_loggers(not (verbose or debug))
