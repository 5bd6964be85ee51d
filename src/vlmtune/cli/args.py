"""What several commands share: the flag types (a bad value is argparse's one-line
usage error, naming the flag) and the flags and help texts more than one command takes."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from vlmtune.cli.messages import shorten

OVERRIDES_HELP = "optional dotted config overrides, e.g. optim.lr=3e-4 train.epochs=3 (vlmtune config explain lists every key)"
EVAL_OVERRIDES_HELP = (
    "optional overrides of the checkpoint's config for this command: data.* and eval.* keys (and generation.* "
    "for counting), e.g. data.on_error=skip, eval.rerank_k=5 (retrieval) or generation.num_beams=1 (counting); "
    "any other key is an error"
)
COUNTING_OVERRIDES_HELP = (
    "optional overrides of the checkpoint's config for this command: data.*, eval.* and generation.* keys, "
    "e.g. generation.num_beams=1 generation.max_new_tokens=8 data.on_error=skip; any other key is an error"
)


def add_overrides(parser: argparse.ArgumentParser, help_text: str = OVERRIDES_HELP) -> None:
    """The trailing ``KEY=VALUE ...`` overrides: optional (``default=[]``, so argparse
    neither lists them among the required arguments nor shows them as such)."""
    parser.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help=help_text)


def _int(text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{shorten(text, 40)}'") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {shorten(text, 40)}")
    return value


def positive_int(text: str) -> int:
    """A count or a size: 1 .. 10^9."""
    return _int(text, 1, 10**9)


def int_between(low: int, high: int) -> Callable[[str], int]:
    """The type of a flag taking an integer in ``low`` .. ``high``."""

    def parse(text: str) -> int:
        return _int(text, low, high)

    parse.__name__ = f"integer {low}..{high}"  # argparse names the type in its message
    return parse


def non_negative_int(text: str) -> int:
    return _int(text, 0, 10**9)


def seed_int(text: str) -> int:
    """What numpy and torch accept as a seed."""
    return _int(text, 0, 2**32 - 1)


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{shorten(text, 40)}'") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {shorten(text, 40)}")
    return value


def add_trust_flag(parser: argparse.ArgumentParser) -> None:
    """Only the user decides that code shipped with a checkpoint may run: a checkpoint
    whose backbone folder asks for it (an auto_map, a .py file) is refused without this,
    and its config.yaml's backbone.trust_remote_code is ignored."""
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow code shipped in the checkpoint's backbone folder (auto_map, *.py) to run; "
        "off unless you pass it (the checkpoint's own config is never asked)",
    )
