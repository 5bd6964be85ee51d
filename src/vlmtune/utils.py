"""Small helpers shared across vlmtune (the loop, the report, checkpoints, the cache)."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any


def path_mistake(path: str | Path, want: str, what: str) -> str | None:
    """Why ``path`` is not the ``want`` ("file" or "folder") a command takes, naming a
    folder given for a file (and the reverse) as such rather than "not found"; None when
    it is one (or does not exist yet, for an output). ``what`` names it: "a PNG file"."""
    p = Path(path)
    try:
        if want == "file" and p.is_dir():
            return f"{shorten(str(p))}: is a folder, not {what}"
        if want == "folder" and p.exists() and not p.is_dir():
            return f"{shorten(str(p))}: is a file, not {what}"
    except (OSError, ValueError):  # a name too long, a NUL: the command's own check names it
        return None
    return None


def jsonl_objects(
    lines: list[str], path: str | Path, decode: Callable[[str], Any] | None = None
) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line of a JSONL file, each decoded by
    ``decode`` (default ``json.loads``); a line that is not a JSON object is a DataError
    naming the file and line."""
    import json

    from vlmtune.errors import DataError

    decode = decode or json.loads
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = decode(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise DataError(f"{path}: line {n}: nested too deeply") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {n}: not a JSON object")
        rows.append((n, row))
    return rows


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, error: type[Exception] | None = None) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks. An OSError is the caller's to
    name, or with ``error`` (CheckpointError, DataError) one naming the file."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        if error is None:
            raise
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    return h.hexdigest()


def shorten(text: str, limit: int = 120) -> str:
    """``text`` as one bounded piece of a message: newlines and NULs escaped, and a text
    longer than ``limit`` characters cut to that many, ending in "..."."""
    text = text.replace("\n", "\\n").replace("\x00", "\\0")
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def derived_seed(seed: int, *keys: int) -> int:
    """A 32-bit seed for the stream named by ``keys`` under the run's ``seed`` (NumPy's
    SeedSequence: streams of different keys are independent, and the same (seed, keys)
    always gives the same seed). Used for each process's training stream (keys: rank)
    and each record's sampled answer (keys: record index)."""
    import numpy as np

    return int(np.random.SeedSequence(seed, spawn_key=tuple(int(k) for k in keys)).generate_state(1)[0])


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A package's module ``__getattr__`` (PEP 562) handing on ``exports`` (name -> the
    submodule of ``package`` that defines it), each imported when first asked for: the
    package's face costs nothing (no torch, no Pillow) until a name is used."""

    def get(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    return get


_FREEZES = [0]  # nesting depth of frozen_gc blocks: the outermost one unfreezes


@contextlib.contextmanager
def frozen_gc() -> Iterator[None]:
    """Leave the objects alive now (imported modules, a loaded backbone and model: some
    400,000 with transformers) out of the cyclic garbage collector's passes until the
    block ends (``gc.freeze``). A full pass over them costs 0.4-0.8 s on a CPU here, and a
    run pays it at every stage start (Accelerate's ``free_memory`` collects) and at each
    automatic full collection: 10% of a short two-stage run. Reference counting frees
    everything as before; only cycles among the frozen objects wait for the block's end."""
    _FREEZES[0] += 1
    gc.freeze()
    try:
        yield
    finally:
        _FREEZES[0] -= 1
        if not _FREEZES[0]:
            gc.unfreeze()


def unpickling_reason(e: BaseException) -> str:
    """The refused object of a weights_only ``torch.load`` failure ("posix.system"), as
    "it names posix.system", or a plain description when torch's message names none."""
    import re

    text = str(e)
    m = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"[Uu]nsupported (?:class|global|operand)\W*([\w.]+)", text)
    if m:
        return f"it names {m.group(1)[:80]}, which is not a tensor or plain data"
    return "it holds objects other than tensors and plain data"
