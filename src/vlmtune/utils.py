"""Small helpers shared by the training loop and the report."""

from __future__ import annotations

from typing import Any


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts, and lists that hold dicts or lists, as one level of dotted keys:
    ``{"optim": {"lr": 1e-3}, "stages": [{"name": "a"}]}`` gives
    ``{"optim.lr": 1e-3, "stages.0.name": "a"}``. Lists of plain values stay one value;
    an empty dict leaves no key."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: value}
