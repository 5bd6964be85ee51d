"""Reading configs: YAML files, ``key.sub=value`` overrides, type checks and coercion.

Values are checked against the annotations of :class:`~vlmtune.config.Config` as they
are read: a key that does not exist, a value of the wrong type or an unreadable file is
a :class:`~vlmtune.errors.ConfigError` that names the key, file or line. Range checks
and combinations are the schema's own (:mod:`vlmtune.config.checks`), run when the
config object is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from vlmtune.config.compose import config_class, default_dict
from vlmtune.config.fields import short
from vlmtune.config.schema import Config
from vlmtune.errors import ConfigError, VlmtuneError
from vlmtune.runfolder import write_text
from vlmtune.tasks import TASKS, task_spec

log = logging.getLogger("vlmtune")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and build nested dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {short(value)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {short(value)} is not one of {', '.join(map(repr, args))}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # an annotation: a class, never an instance
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {short(value)}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {short(value)}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {short(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {short(value)}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 3e-4 (no dot) as a string; accept what Python reads as a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {short(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {short(value)}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")  # pragma: no cover


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = set(difflib.get_close_matches(str(k), names, n=3, cutoff=0.6)) | {
                n for n in names if n.startswith(str(k)[:3])
            }
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise ConfigError(f"{key}: unknown key{hint}")
        kwargs[k] = _coerce(v, hints[k], key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - all fields have defaults
        raise ConfigError(f"{prefix or 'config'}: {e}") from None


def config_from_dict(data: dict[str, Any]) -> Config:
    if not isinstance(data, dict):
        raise ConfigError("config: the top level must be a mapping")
    return _build(config_class(), data)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``a.b.c=value`` (value parsed as YAML) to a nested dict in place."""
    if "=" not in override:
        raise ConfigError(f"{override}: overrides look like key.sub=value")
    key, raw = override.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    except (ValueError, RecursionError) as e:  # a number of thousands of digits, deep nesting
        raise ConfigError(f"{short(key)}: cannot read the value ({short(str(e) or type(e).__name__, 120)})") from None
    node: Any = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        sub = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = _list_item(node, part, sub)
            continue
        if part not in node or node[part] is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"{sub}: is a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        idx = int(last) if last.isdigit() else None
        if idx is None or idx >= len(node):
            raise ConfigError(f"{key}: no such list item")
        node[idx] = value
    else:
        node[last] = value


def with_overrides(cfg: Config, overrides: list[str] | None, sections: tuple[str, ...], what: str) -> Config:
    """``cfg`` (a checkpoint's training config) with ``key=value`` overrides applied to
    the keys under ``sections`` only (evaluate / predict: ``data.*``, ``eval.*``, ...);
    any other key is a :class:`ConfigError` naming it, since the model's shape and
    training come from the checkpoint. ``what`` names the command in the message."""
    if not overrides:
        return cfg
    data = config_to_dict(cfg)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"{ov}: overrides look like key.sub=value")
        key = ov.split("=", 1)[0].strip()
        if key.split(".", 1)[0] not in sections or "." not in key:
            raise ConfigError(
                f"{key}: cannot be set for {what}; only {', '.join(s + '.*' for s in sections)} keys can "
                f"(the rest comes from the checkpoint's training config)"
            )
        apply_override(data, ov)
    return config_from_dict(data)


def _list_item(node: list, part: str, key: str) -> Any:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{key}: no such list item (the list has {len(node)})")
    return node[int(part)]


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping: plain YAML loading
    keeps the last one silently, so a second ``optim:`` section would drop the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' merges a mapping; not a key
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in first:
                    raise ConfigError(f"line {line}: key {short(key)} appears twice in one mapping (first on line {first[key]})")
                first[key] = line
            except TypeError:  # unhashable: the base class reports it
                pass
        return super().construct_mapping(node, deep=deep)


def _read_yaml(p: Path) -> dict[str, Any]:
    """The mapping a YAML config file holds; every way it can fail is a ConfigError naming the file."""
    if "\x00" in str(p):
        raise ConfigError(f"{short(str(p))}: the file name contains a NUL character")
    try:
        found = p.is_file()
    except (OSError, ValueError) as e:  # a NUL in the name, a name too long, a link loop
        raise ConfigError(f"{short(str(p))}: cannot open ({getattr(e, 'strerror', None) or e})") from None
    if not found and p.is_symlink():
        raise ConfigError(f"{short(str(p))}: a symbolic link to nothing or a link loop, not a config file")
    if not found and p.is_dir():
        inner = next((p / n for n in ("config.yaml", "config.yml") if (p / n).is_file()), None)
        hint = f"; this folder holds {short(str(inner))}: pass that file" if inner else " (a YAML file such as configs/NAME.yaml)"
        raise ConfigError(f"{short(str(p))}: is a folder, not a config file{hint}")
    if not found:
        raise ConfigError(f"{short(str(p))}: config file not found")
    try:
        loaded = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise ConfigError(f"{p}: nested too deeply to be a config") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"{p}: {short(str(e).splitlines()[0] if str(e) else type(e).__name__)}") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror or e})") from None
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    return loaded


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults) and apply dotted overrides."""
    data = _read_yaml(Path(path)) if path is not None else {}
    # Unknown keys and wrong types are caught first, on the file as written, so the message
    # names them; the whole is checked once the overrides are in (one may set the task).
    _build(config_class(checked=False), data)
    merged = _merge(default_dict(), data)
    for ov in overrides or []:
        _clear_other_start(merged, ov)
        apply_override(merged, ov)
    return config_from_dict(merged)


_START_KEY = re.compile(r"^\s*stages\.(\d+)\.(start_epoch|start)\s*=(.*)$", re.S)


def _clear_other_start(data: dict[str, Any], override: str) -> None:
    """``stages.N.start_epoch=E`` on the command line replaces the stage's ``start``
    fraction from the file, and ``stages.N.start=F`` its ``start_epoch``: a stage has
    exactly one of the two, and an override says which the user means now."""
    m = _START_KEY.match(override)
    stages = data.get("stages")
    if not m or not isinstance(stages, list) or int(m.group(1)) >= len(stages) or not m.group(3).strip():
        return
    try:
        if yaml.safe_load(m.group(3)) is None:
            return
    except yaml.YAMLError:
        return
    stage = stages[int(m.group(1))]
    if isinstance(stage, dict):
        stage["start" if m.group(2) == "start_epoch" else "start_epoch"] = None


def _merge(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; anything else (lists included) is replaced."""
    out = dict(base)
    for k, v in new.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def config_yaml(cfg: Config) -> str:
    """The whole config as YAML, every key written out, in declaration order."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    write_text(Path(path), config_yaml(cfg))  # a symbolic link at ``path`` is refused, not written through


def evaluation_config(cfg: Config, overrides: list[str] | None, what: str = "evaluate") -> Config:
    """A checkpoint's config with the ``evaluate`` / ``predict`` overrides applied: only
    the sections its task declares (``evaluation_sections``; data.* and eval.* by default)."""
    return with_overrides(cfg, overrides, task_spec(cfg.task).evaluation_sections, what)


def precheck_overrides(checkpoints: list[str] | list[Path], overrides: list[str] | None, what: str) -> None:
    """``evaluate`` / ``predict`` overrides checked against each checkpoint's config.yaml
    before the engine (and torch) is imported, so a bad key answers at once. The same
    :func:`evaluation_config` the engine applies; a checkpoint whose config.yaml cannot
    be read here (missing, a link, not a config) is left to the checkpoint's own checks,
    which run next and say what is wrong with it."""
    if not overrides:
        return
    for folder in checkpoints:
        path = Path(folder) / "config.yaml"
        if path.is_symlink() or not path.is_file():
            continue
        try:
            cfg = load_saved_config(path)
        except VlmtuneError:
            continue
        evaluation_config(cfg, overrides, what)


def load_saved_config(path: str | Path) -> Config:
    """A config.yaml that vlmtune wrote into a run or a checkpoint. Those written before
    the ``loss`` section became the task's own mapping (0.1) list every task's weights;
    the weights of losses only other registered tasks have never counted in that run, and
    are left out with a note. Anything else is checked as :func:`load_config` checks it."""
    cfg_dict = _read_yaml(Path(path))
    loss, task = cfg_dict.get("loss"), cfg_dict.get("task", "retrieval")
    if isinstance(loss, dict) and isinstance(task, str) and task in TASKS:
        own = task_spec(task).losses.defaults()
        others = {name for t in TASKS if t != task for name in task_spec(t).losses.defaults()}
        foreign = sorted(k for k in loss if k not in own and k in others)
        if foreign:
            log.info(
                "%s: loss weights of other tasks' losses (%s) left out: they never counted in this %s run",
                path,
                ", ".join(map(str, foreign)),
                task,
            )
            cfg_dict["loss"] = {k: v for k, v in loss.items() if k not in foreign}
    _build(config_class(checked=False), cfg_dict)
    return config_from_dict(_merge(default_dict(), cfg_dict))
