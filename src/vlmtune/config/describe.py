"""``vlmtune config explain``: every key with its type, default, bounds and help."""

from __future__ import annotations

import dataclasses
import re
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from vlmtune.config.compose import config_class
from vlmtune.config.fields import field_bounds
from vlmtune.errors import ConfigError
from vlmtune.tasks import TASKS, task_spec


@dataclass(frozen=True)
class FieldDoc:
    """One config key as ``vlmtune config explain`` shows it."""

    key: str  # dotted; an item of a list of sections is [N]: stages[N].name
    type: str  # as the value is written: int, str | null, {max,min}, list[int]; "section" for a nested section
    default: Any  # plain data (what config_to_dict gives); None for a section
    help: str


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _type_text(tp: Any) -> str:
    """An annotation as the user writes the value: ``str | null``, ``{max,min}``, ``list[int]``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_text(a) for a in args)
    if origin is Literal:
        return "{" + ",".join(map(str, args)) + "}"
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_text(a) for a in args)}]"
    return "null" if tp is type(None) else _type_name(tp)


def _field_docs(cls: type, instance: Any, prefix: str) -> list[FieldDoc]:
    """Docs of ``cls``'s fields, nested sections and list items included, defaults
    taken from ``instance`` (so a parent's default for a section wins)."""
    hints = typing.get_type_hints(cls)
    docs: list[FieldDoc] = []
    for f in dataclasses.fields(cls):
        key, tp, value, help = prefix + f.name, hints[f.name], getattr(instance, f.name), f.metadata.get("help", "")
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # annotations are classes, never instances
            docs.append(FieldDoc(key, "section", None, help))
            docs += _field_docs(tp, value, key + ".")
            continue
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        plain = [dataclasses.asdict(v) for v in value] if dataclasses.is_dataclass(item) else value
        bounds = field_bounds(f)
        docs.append(FieldDoc(key, _type_text(tp), plain, help + (f" ({bounds.text()})" if bounds else "")))
        if isinstance(item, type) and dataclasses.is_dataclass(item):
            docs += _field_docs(item, item(), key + "[N].")
    return docs


def _with_losses(docs: list[FieldDoc]) -> list[FieldDoc]:
    """The ``loss`` mapping's keys: each registered task's losses, after the mapping itself."""
    at = next(i for i, d in enumerate(docs) if d.key == "loss")
    docs[at] = dataclasses.replace(docs[at], default={})  # the default is the run's task's, below
    at += 1
    rows = []
    for task in TASKS:
        losses = task_spec(task).losses
        helps = losses.help()
        rows += [
            FieldDoc(f"loss.{name}", "float", weight, f"{task}: {helps[name]}") for name, weight in losses.defaults().items()
        ]
    return docs[:at] + rows + docs[at:]


def explain(section: str | None = None) -> list[FieldDoc]:
    """Every config key under ``section``, in declaration order; all keys when None.

    ``section`` is dotted: ``optim``, ``train.early_stopping``, ``stages`` (or
    ``stages.1`` / ``stages[1]``, shown as ``stages[N]``), or one key such as ``optim.lr``.
    """
    cls = config_class()
    docs = [
        d if d.key != "train.early_stopping.metric" else dataclasses.replace(d, default=None)
        for d in _with_losses(_field_docs(cls, cls(), ""))
    ]
    if not section:
        return docs
    want = re.sub(r"\.(\d+)(?=\.|$)|\[(\d+|N)\]", "[N]", section.strip())
    picked = [d for d in docs if d.key == want or d.key.startswith((want + ".", want + "["))]
    if picked:
        return picked
    close = [d.key for d in docs if d.key.rsplit(".", 1)[-1] == want.rsplit(".", 1)[-1]]
    hint = f"did you mean {', '.join(close)}?" if close else f"sections: {', '.join(f.name for f in dataclasses.fields(cls))}"
    raise ConfigError(f"{section}: no such config section or key ({hint})")


def _yaml_text(value: Any) -> str:
    """A value on one line as YAML (and an override) writes it: null, true, [1, 5, 10]."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip().removesuffix("\n...")


def format_explain(docs: list[FieldDoc], width: int = 88) -> str:
    """``key: type = default`` per key with its help wrapped and indented below it; a
    blank line where a section starts or ends."""

    def parent(key: str) -> str:
        return key.rsplit(".", 1)[0] if "." in key else ""

    lines: list[str] = []
    prev: FieldDoc | None = None
    for d in docs:
        # No blank line between a section (or a list of sections) and its first key.
        first_key = prev is not None and parent(d.key) in (prev.key, prev.key + "[N]")
        if prev is not None and not first_key and (d.type == "section" or parent(d.key) != parent(prev.key)):
            lines.append("")
        lines.append(f"{d.key}: section" if d.type == "section" else f"{d.key}: {d.type} = {_yaml_text(d.default)}")
        lines += textwrap.wrap(d.help, width, initial_indent="    ", subsequent_indent="    ")
        prev = d
    return "\n".join(lines)
