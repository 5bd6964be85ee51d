"""The whole config: the engine's sections plus each registered task's own.

A task declares its sections on its class (``config_sections = {"counting":
CountingConfig}``); :func:`config_class` adds them to :class:`~vlmtune.config.schema.Config`
as fields, so a task's settings read, override, explain and save like the engine's,
and a new task with settings is its own file plus its registry line. The class is
composed again whenever the registry changes (a task registered at run time, as the
tests do).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vlmtune.config.checks import resolve_and_check
from vlmtune.config.fields import setting
from vlmtune.config.schema import Config
from vlmtune.tasks import TASKS, task_spec

_COMPOSED: dict[tuple[tuple[tuple[str, int], ...], bool], type[Config]] = {}


def task_sections() -> dict[str, type]:
    """Section name -> dataclass, over every registered task, in registry order."""
    engine = {f.name for f in dataclasses.fields(Config)}
    sections: dict[str, type] = {}
    for name in TASKS:
        for key, cls in task_spec(name).config_sections.items():
            if key in engine or sections.get(key, cls) is not cls:
                raise TypeError(f"task {name!r}: config section {key!r} is already another section")
            sections[key] = cls
    return sections


def _post_init(self: Config) -> None:
    resolve_and_check(self)


def config_class(checked: bool = True) -> type[Config]:
    """:class:`Config` with every registered task's sections: the class configs are built as.
    ``checked=False``: the same keys and types, built without resolving or checking the
    whole (a file read on its own, before the overrides that complete it are applied)."""
    snapshot = (tuple((name, id(entry)) for name, entry in TASKS.items()), checked)
    if snapshot not in _COMPOSED:
        fields: list[Any] = []
        for key, cls in task_sections().items():
            doc = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
            fields.append((key, cls, setting(cls(), " ".join(doc.split()) or f"Settings of the {key} section.")))
        _COMPOSED[snapshot] = dataclasses.make_dataclass(
            "Config",
            fields,
            bases=(Config,),
            namespace={"__doc__": Config.__doc__, "__module__": __name__} | ({"__post_init__": _post_init} if checked else {}),
        )
    return _COMPOSED[snapshot]


def default_dict() -> dict[str, Any]:
    """Every key at its default, before a task resolves it: the ``loss`` mapping empty (the
    run's task fills in its losses' weights) and no early-stopping metric (the task's default)."""
    data = dataclasses.asdict(config_class()())
    data["loss"] = {}
    data["train"]["early_stopping"]["metric"] = None
    return data
