"""Model folders that would run their own code: refused unless the user asks.

transformers imports a module named by a folder's ``auto_map`` while the model loads,
whatever ``trust_remote_code`` says later, so the check runs before transformers opens
the folder (:func:`vlmtune.backbone.load_backbone`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vlmtune.errors import CheckpointError

_REMOTE_CODE_KEYS = ("auto_map", "custom_pipelines")
# Files that are code (Python source or compiled, native libraries).
_CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyd", ".pyw", ".so", ".dylib", ".dll")


def check_no_remote_code(folder: str | Path) -> None:
    """Refuse a model folder that asks transformers to run code it ships: an ``auto_map``
    (or ``custom_pipelines``) in any of its JSON files -- config.json,
    tokenizer_config.json, preprocessor_config.json, processor_config.json, ... -- or a
    Python or native-code file. Runs before transformers reads the folder: an auto_map
    in config.json imports its module while the model is being loaded."""
    folder = Path(folder)
    paths = sorted(Path(root) / name for root, _dirs, files in os.walk(folder, followlinks=False) for name in files)
    advice = "pass --trust-remote-code, or set backbone.trust_remote_code=true, only if you trust its author"
    # The JSON files first: the one that asks for code is the better culprit to name.
    for path in sorted(paths, key=lambda p: not p.name.lower().endswith(".json")):
        name = path.name.lower()
        if name.endswith(_CODE_SUFFIXES):
            raise CheckpointError(f"{path}: the model folder ships code; refused ({advice})")
        if not name.endswith(".json"):
            continue
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, ValueError, RecursionError):
            continue  # not JSON that transformers could read either
        key = _remote_code_key(data)
        if key:
            raise CheckpointError(f"{path}: asks to run code shipped with the model ('{key}'); refused ({advice})")


def _remote_code_key(data: Any) -> str | None:
    """The first remote-code key anywhere in a parsed JSON document (iterative: depth-proof)."""
    todo = [data]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            for k, v in node.items():
                if k in _REMOTE_CODE_KEYS and v not in (None, {}, [], ""):
                    return k
                todo.append(v)
        elif isinstance(node, list):
            todo.extend(node)
    return None
