"""The files of embed and index folders: written through one journal, read as inputs.

An embed folder is journaled. Each save (every ``FLUSH_EVERY`` images and at the end)

1. writes the new ``embeddings.safetensors`` and ``items.jsonl`` complete under
   vlmtune's own hidden names (``.NAME.vlmtune-next``, each through
   :func:`vlmtune.runfolder.write_atomic`);
2. writes ``embed.json``, the manifest: the counts and the sha256 and size of both
   files. This replace is the commit;
3. renames the two files over ``embeddings.safetensors`` and ``items.jsonl``.

A reader takes each file whose sha256 is the manifest's, under its own name or, when a
kill fell between steps 2 and 3, under the hidden one; so a SIGKILL at any moment
leaves the last committed state readable, and the next ``embed`` (holding the folder's
lock) finishes the renames, removes what an unfinished save left, and goes on.

Everything read back is checked as input: shapes, widths, finite values, ids, kinds
and field types, each error naming the file and the field.

File names are stored whatever their bytes: a name that is not valid Unicode (a
non-UTF-8 name) keeps its bytes in ``path_bytes`` (hex) beside a readable ``path``;
:func:`printable` escapes what a terminal would act on (escape sequences, newlines).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune import runfolder
from vlmtune.errors import DataError
from vlmtune.utils import jsonl_objects, sha256_bytes

if TYPE_CHECKING:
    from torch import Tensor

EMBEDDINGS, ITEMS, META = "embeddings.safetensors", "items.jsonl", "embed.json"
JOURNALED = (EMBEDDINGS, ITEMS)
EMBED_FORMAT = 2  # 2: embed.json is the manifest ("files"); 1 (the first release): no manifest
# Faiss's own limits are crashes (HNSW M=1 divides by log 1, M=0 aborts, a negative M
# allocates without end): the ranges vlmtune lets through (the CLI checks them at parse time).
HNSW_M_RANGE = (2, 256)
EF_SEARCH_RANGE = (1, 65536)


def pending(folder: Path, name: str) -> Path:
    """Where a save writes ``name`` before its commit."""
    return folder / f".{name}.vlmtune-next"


def own_name(name: str) -> bool:
    """Whether a name in an embed or index folder is vlmtune's own bookkeeping (the lock,
    a save's pending files, a temporary file of write_atomic)."""
    return name == runfolder.LOCK_NAME or (name.startswith(".") and (".vlmtune-next" in name or ".vlmtune-tmp-" in name))


# --------------------------------------------------------------------------- names


def name_fields(path: str) -> dict[str, str]:
    """The items.jsonl fields of a file name: ``path``, plus for a name that is not valid
    Unicode (bytes that are not UTF-8, held as surrogates) ``path_bytes``, its bytes in
    hex; ``path`` then shows those bytes as ``\\xNN``."""
    try:
        path.encode("utf-8")
        return {"path": path}
    except UnicodeEncodeError:
        raw = os.fsencode(path)
        return {"path": raw.decode("utf-8", "backslashreplace"), "path_bytes": raw.hex()}


def item_path(row: dict[str, Any]) -> str:
    """The file name an items.jsonl row stands for (checked rows only)."""
    raw = row.get("path_bytes")
    return os.fsdecode(bytes.fromhex(raw)) if isinstance(raw, str) else row["path"]


def printable(text: str) -> str:
    """``text`` safe to print on a terminal, escaped as Python's repr escapes: a
    backslash doubled, newlines, tabs, escape sequences and every other character that
    is not printable as ``\\n``, ``\\x1b``, ``\\u202e``; the bytes of a non-UTF-8 name
    as ``\\xNN``."""
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        elif 0xDC80 <= ord(ch) <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch.encode("unicode_escape", "backslashreplace").decode("ascii"))
    return "".join(out)


def json_line(obj: Any, indent: int | None = None) -> str:
    """Strict JSON (no NaN or Infinity) that prints safely: non-ASCII text as it is,
    but every character that is not printable (outside JSON's own structure) as a
    ``\\uXXXX`` escape, so a terminal never receives a control character."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, indent=indent)
    out = []
    for ch in text:
        if ch.isprintable() or ch == "\n":  # json.dumps escapes newlines in strings: a raw one is structure
            out.append(ch)
        elif ord(ch) > 0xFFFF:
            v = ord(ch) - 0x10000
            out.append(f"\\u{0xD800 + (v >> 10):04x}\\u{0xDC00 + (v & 0x3FF):04x}")
        else:
            out.append(f"\\u{ord(ch):04x}")
    return "".join(out)


def jsonl_bytes(rows: list[dict[str, Any]]) -> bytes:
    """items.jsonl's bytes: one JSON object a line, UTF-8. A text holding a lone
    surrogate (a JSON file may carry one) is written with ASCII escapes, which read
    back as the same text, so a save never fails on a name or a caption."""
    lines = []
    for r in rows:
        line = json.dumps(r, ensure_ascii=False, allow_nan=False)
        try:
            lines.append(line.encode("utf-8"))
        except UnicodeEncodeError:
            lines.append(json.dumps(r, ensure_ascii=True, allow_nan=False).encode("ascii"))
    return b"".join(line + b"\n" for line in lines)


def read_jsonl_bytes(data: bytes, path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of a JSONL file's bytes; lines end at '\\n' only (a caption
    may hold U+2028 or U+0085, which str.splitlines would split at)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    return jsonl_objects(text.split("\n"), path, _DECODER.decode)


def _no_constant(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not JSON", name, 0)


_DECODER = json.JSONDecoder(parse_constant=_no_constant)  # strict JSON: no NaN or Infinity


def read_json_file(path: Path, what: str) -> dict[str, Any]:
    """A JSON object file (``what``: what the folder should be, for a missing file)."""
    try:
        data = read_bytes(path)
    except FileNotFoundError:
        raise DataError(f"{path.parent}: not {what} ({path.name} is missing)") from None
    try:
        obj = _DECODER.decode(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({str(e)[:200]})") from None
    except RecursionError:
        raise DataError(f"{path}: nested too deeply") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object")
    return obj


def read_bytes(path: Path) -> bytes:
    """A file's bytes; FileNotFoundError is the caller's, other failures one line."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({(e.strerror or str(e)).lower()})") from None


def load_tensor_bytes(data: bytes, path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DataError(f"{path}: cannot read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


# --------------------------------------------------------------------------- the journal


def commit(folder: Path, tensors: dict[str, Tensor], items: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """One save of an embed folder (see the module's text): pending files, the manifest
    (the commit), the renames. Returns the manifest written."""
    from safetensors.torch import save

    blobs = {EMBEDDINGS: save({k: v.contiguous() for k, v in tensors.items()}), ITEMS: jsonl_bytes(items)}
    files = {}
    for name, data in blobs.items():
        runfolder.write_atomic(pending(folder, name), lambda p, d=data: _write_synced(p, d))
        files[name] = {"sha256": sha256_bytes(data), "bytes": len(data)}
    manifest = {**meta, "format": EMBED_FORMAT, "files": files}
    text = json.dumps(manifest, indent=2, ensure_ascii=False, allow_nan=False)
    _sync_folder(folder)  # the pending files' names on disk before the manifest that names them
    runfolder.write_atomic(folder / META, lambda p: _write_synced(p, text.encode("utf-8", "backslashreplace")))
    for name in blobs:
        os.replace(pending(folder, name), folder / name)
    _sync_folder(folder)
    return manifest


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_folder(folder: Path) -> None:
    """fsync a folder, so the renames in it reach the disk in order (where the system allows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def settle(folder: Path) -> None:
    """Before a writer goes on (lock held): finish the renames of a save that was killed
    after its commit, then remove what unfinished saves left (pending and temporary
    files, vlmtune's own names only)."""
    meta_path = folder / META
    if meta_path.is_file():
        meta = read_json_file(meta_path, "an embed folder")
        files = meta.get("files")
        if isinstance(files, dict):
            for name in JOURNALED:
                want = files.get(name)
                p = pending(folder, name)
                if isinstance(want, dict) and not _matches(folder / name, want) and _matches(p, want):
                    os.replace(p, folder / name)
    for entry in os.listdir(folder):
        if own_name(entry) and entry != runfolder.LOCK_NAME:
            p = folder / entry
            if p.is_symlink() or p.is_file():
                p.unlink()


def _matches(path: Path, want: dict[str, Any]) -> bool:
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size != want.get("bytes"):
            return False
        return sha256_bytes(path.read_bytes()) == want.get("sha256")
    except OSError:
        return False


def read_committed(folder: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and the bytes of the committed embeddings and items. A manifest of
    format 2 names each file by sha256 (found under its own name or its pending one);
    one of format 1 (no manifest) reads the files as they are."""
    meta_path = folder / META
    missing = EMBEDDINGS
    out: dict[str, bytes] = {}
    for _ in range(3):
        meta = read_json_file(meta_path, "an embed folder (run vlmtune embed first)")
        files = meta.get("files")
        out = {}
        if files is None and meta.get("format", 1) == 1:
            for name in JOURNALED:
                try:
                    out[name] = read_bytes(folder / name)
                except FileNotFoundError:
                    raise DataError(f"{folder / name}: missing") from None
            return meta, out
        if meta.get("format") != EMBED_FORMAT or not isinstance(files, dict):
            raise DataError(
                f"{meta_path}: 'format' {meta.get('format')!r} with 'files' {type(files).__name__}: "
                f"not an embed manifest this vlmtune reads (format {EMBED_FORMAT} with 'files')"
            )
        missing = ""
        for name in JOURNALED:
            want = files.get(name)
            if not (
                isinstance(want, dict)
                and isinstance(want.get("sha256"), str)
                and isinstance(want.get("bytes"), int)
                and not isinstance(want.get("bytes"), bool)
            ):
                raise DataError(f"{meta_path}: 'files.{name}' must be an object with 'sha256' (text) and 'bytes' (integer)")
            for p in (folder / name, pending(folder, name)):
                try:
                    data = read_bytes(p) if not p.is_symlink() else None
                except FileNotFoundError:
                    data = None
                if data is not None and len(data) == want["bytes"] and sha256_bytes(data) == want["sha256"]:
                    out[name] = data
                    break
            else:
                missing = name
                break
        if not missing:
            return meta, out
        try:  # a writer may have committed in between: then read again
            if read_json_file(meta_path, "an embed folder") == meta:
                break
        except DataError:
            break
    raise DataError(
        f"{folder / missing}: does not match its sha256 in {META} (changed or truncated outside vlmtune); "
        f"embed again into a new folder"
    )


# --------------------------------------------------------------------------- checks


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_rows(path: Path, rows: list[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each items.jsonl row: 'kind' image or text, an integer 'id', an image's 'path'
    (text; 'path_bytes' hex text; 'size', 'mtime_ns' integers), a text's 'text' (text;
    'image' an integer or null)."""
    out = []
    for n, row in rows:
        where = f"{path}: line {n}"
        kind = row.get("kind")
        if kind not in ("image", "text"):
            raise DataError(f'{where}: \'kind\' must be "image" or "text", got {_shown(kind)}')
        if not _int(row.get("id")):
            raise DataError(f"{where}: 'id' must be an integer, got {_shown(row.get('id'))}")
        if kind == "image":
            if not isinstance(row.get("path"), str):
                raise DataError(f"{where}: 'path' must be text, got {_shown(row.get('path'))}")
            raw = row.get("path_bytes")
            if raw is not None:
                try:
                    ok = isinstance(raw, str) and len(bytes.fromhex(raw)) > 0
                except ValueError:
                    ok = False
                if not ok:
                    raise DataError(f"{where}: 'path_bytes' must be the name's bytes in hex, got {_shown(raw)}")
            for key in ("size", "mtime_ns"):
                if key in row and not _int(row[key]):
                    raise DataError(f"{where}: '{key}' must be an integer, got {_shown(row[key])}")
        else:
            if not isinstance(row.get("text"), str):
                raise DataError(f"{where}: 'text' must be text, got {_shown(row.get('text'))}")
            if row.get("image") is not None and not _int(row["image"]):
                raise DataError(f"{where}: 'image' must be an integer id or null, got {_shown(row['image'])}")
        out.append(row)
    return out


def check_matrix(tensors: dict[str, Tensor], name: str, path: Path) -> Tensor:
    """``tensors[name]``: a 2-D floating-point matrix, as float32."""
    t = tensors.get(name)
    if t is None:
        raise DataError(f"{path}: has no tensor '{name}' (holds {', '.join(sorted(tensors)) or 'none'})")
    if t.ndim != 2 or not t.dtype.is_floating_point:
        raise DataError(f"{path}: '{name}' must be a 2-D float matrix [rows, width], got {t.dtype} {list(t.shape)}")
    return t.float()


def first_not_finite(t: Tensor) -> int | None:
    """The first row of ``t`` holding a NaN or an infinity, or None."""
    import torch

    bad = (~torch.isfinite(t)).any(dim=1).nonzero()
    return int(bad[0]) if len(bad) else None


def item_label(row: dict[str, Any]) -> str:
    """An item as a message names it: its path or its text, escaped and shortened."""
    text = item_path(row) if row.get("kind") == "image" else str(row.get("text", ""))
    shown = printable(text)
    return shown if len(shown) <= 120 else shown[:117] + "..."


def _shown(v: Any) -> str:
    text = json.dumps(v, ensure_ascii=True, default=str) if not (isinstance(v, float) and not math.isfinite(v)) else str(v)
    return text if len(text) <= 60 else text[:57] + "..."
