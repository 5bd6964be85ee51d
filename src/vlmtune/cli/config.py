"""``vlmtune config explain | show``: what the config keys are, and what a config
resolves to, each command beside its flags."""

from __future__ import annotations

import argparse
from typing import Any

from vlmtune.cli.args import add_overrides


def add_config(sub: Any) -> None:
    g = sub.add_parser("config", help="explain the config keys or show a resolved config")
    gsub = g.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    for add in (add_explain, add_show):
        add(gsub)


def add_explain(gsub: Any) -> None:
    x = gsub.add_parser(
        "explain",
        help="every config key with its type, default and help",
        description="List the config keys in declaration order, each with its type, default and help. "
        "SECTION narrows the list: optim, train.early_stopping, stages, or one key such as optim.lr.",
    )
    x.add_argument("section", nargs="?", metavar="SECTION", help="dotted section or key (default: all)")
    x.set_defaults(func=cmd_config_explain)


def cmd_config_explain(args: argparse.Namespace) -> int:
    from vlmtune.config import explain, format_explain

    print(format_explain(explain(args.section)))
    return 0


def add_show(gsub: Any) -> None:
    w = gsub.add_parser(
        "show",
        help="print a config with its defaults and overrides applied, as YAML",
        description="Load and check a config as train would, then print every key as YAML.",
    )
    w.add_argument("config", help="YAML config")
    add_overrides(w)
    w.set_defaults(func=cmd_config_show)


def cmd_config_show(args: argparse.Namespace) -> int:
    from vlmtune.config import config_yaml, load_config

    print(config_yaml(load_config(args.config, args.overrides)), end="")
    return 0
