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
import logging
import os
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
    """A bad command line (argparse's own checks and the flag types of :mod:`.args`)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one ``error:`` line and exit status 2 from
    :func:`main` (not a usage block and ``SystemExit``)."""

    def error(self, message: str) -> Any:
        raise _UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vlmtune", description="Staged fine-tuning of a frozen InternVL with small trainable parts.")
    p.add_argument("--version", action="version", version=f"vlmtune {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after options (argparse cannot intermix a
    # trailing positional list with a subcommand's options by itself).
    try:
        args, extra = parser.parse_known_args(argv)
        stray = [x for x in extra if x.startswith("-") or "=" not in x or getattr(args, "overrides", None) is None]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
    except _UsageError as e:
        say(f"error: {e}")
        return 2
    if extra:
        args.overrides = list(args.overrides) + extra
    _set_up_logging(args.debug)
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


def _set_up_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s", force=True)
    if debug:
        return
    # transformers and accelerate are chatty at INFO; keep their warnings only.
    for name in ("transformers", "accelerate", "urllib3", "huggingface_hub", "PIL", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
