"""Frozen-feature cache: a frozen tower's outputs, computed once, memory-mapped from disk.

While a tower is frozen and its preprocessing deterministic, every epoch would
recompute the same features. A :class:`FeatureStore` keeps them in one ``.npy``
file opened as a memory map, with an index from content key to row. Its folder name
is a hash of everything that determines the features besides the input itself
(backbone identity, preprocessing settings, feature kind, dtype), so a changed
setting lands in another folder and can never be read by mistake; a changed image
has another content key, so its row is recomputed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vlmtune.errors import VlmtuneError
from vlmtune.utils import sha256_bytes, sha256_file

if TYPE_CHECKING:
    from torch import nn

    from vlmtune.backbone import Backbone


log = logging.getLogger("vlmtune")

_KEYS: dict[tuple[str, int, int], str] = {}


def content_key(path: str | Path) -> str:
    """sha256 of a file's bytes: the same image under another name shares its features,
    an edited image does not. Remembered per (path, size, mtime) within a process, so
    the validation set is not re-read every epoch; a rewritten file is hashed again.
    A webdataset image (``SHARD.tar/KEY.jpg``) is keyed by its bytes in the shard, the
    same as the extracted file would be."""
    from vlmtune.data.formats.shards import member_stamp, read_member, split_member

    p = Path(path)
    if not p.exists() and split_member(p) is not None:
        size, mtime = member_stamp(p)
        stamp = (str(p), size, mtime)
        if stamp not in _KEYS:
            _KEYS[stamp] = sha256_bytes(read_member(p))
        return _KEYS[stamp]
    st = os.stat(path)
    stamp = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if stamp not in _KEYS:
        _KEYS[stamp] = sha256_file(path)
    return _KEYS[stamp]


def text_key(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


def namespace_id(namespace: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(namespace, sort_keys=True, default=str).encode()).hexdigest()[:20]


# --------------------------------------------------------------------------- fingerprints
# What a namespace holds of the backbone besides its identity: the weights, which a
# stage may have trained, and the preprocessing.


def vision_fingerprint(backbone: Backbone) -> str:
    """sha256 of the vision tower's current weights (cache keys must change when a
    stage has trained it, which the architecture hash alone would not show)."""
    return _memo_sha256(backbone.vision_tower)


def vision_prefix_fingerprint(backbone: Backbone, start: int) -> str:
    """sha256 of exactly the weights that decide the hidden state entering vision block
    ``start`` (patch embeddings and ``blocks[:start]``): a stage that trains only the
    blocks above keeps it; an end-to-end stage or a warm start that changed any prefix
    weight changes it. Each module's digest is remembered as :func:`vision_fingerprint`'s."""
    h = hashlib.sha256(f"vision_prefix:{start}".encode())
    for i, module in enumerate(backbone.vision_prefix_modules(start)):
        h.update(f"\0{i}:".encode() + _memo_sha256(module).encode())
    return h.hexdigest()


def text_fingerprint(backbone: Backbone) -> str:
    """sha256 of the language model's weights and the tokenizer's vocabulary."""
    vocab = json.dumps(sorted(backbone.tokenizer.get_vocab().items())).encode()
    return hashlib.sha256(_memo_sha256(backbone.language_model).encode() + vocab).hexdigest()


def preprocess_signature(processor: Any) -> dict[str, Any]:
    """The image processor's settings that decide the pixels a tower sees."""
    p = processor
    return {
        "size": dict(p.size) if p.size else None,
        "mean": list(p.image_mean),
        "std": list(p.image_std),
        "resample": str(p.resample),
    }


# module -> (tensor versions, digest); forgotten with the module.
_DIGESTS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[tuple[int, int], ...], str]] = weakref.WeakKeyDictionary()


def _memo_sha256(module: nn.Module) -> str:
    """_weights_sha256, recomputed only when a weight changed: every in-place update
    (optimizer step, load_state_dict) bumps a tensor's version counter, so the
    versions of all tensors say whether the last digest still holds. Validation asks
    for it every epoch; hashing a 300M-parameter tower each time is not free."""
    tensors = [*module.parameters(), *module.buffers()]
    stamp = tuple((id(t), t._version) for t in tensors)
    if _DIGESTS.get(module, (None,))[0] != stamp:
        _DIGESTS[module] = (stamp, _weights_sha256(module))
    return _DIGESTS[module][1]


def _weights_sha256(module: nn.Module) -> str:
    """sha256 over a module's named weights and buffers."""
    h = hashlib.sha256()
    for name, t in _named_weights(module):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _named_weights(module: nn.Module) -> Any:
    """``module.state_dict().items()``'s names, order and tensors, read from the modules
    themselves: under FSDP2 every module that owns a sharded weight carries a state-dict
    hook that reshards the weights vlmtune.fsdp.full_params gathered (also a submodule
    of a unit, such as the vision embeddings a prefix fingerprint hashes), and only
    gathered weights can be hashed by one process alone."""
    out = []
    for prefix, m in module.named_modules(remove_duplicate=False):
        dot = prefix + "." if prefix else ""
        out += [(dot + n, p) for n, p in m._parameters.items() if p is not None]
        out += [(dot + n, b) for n, b in m._buffers.items() if b is not None and n not in m._non_persistent_buffers_set]
    for name, t in out:
        if type(t).__name__ == "DTensor":
            raise RuntimeError(f"{name}: a sharded weight; fingerprint it inside vlmtune.fsdp.full_params")
    # Copies, one at a time: .numpy() on FSDP's gathered storage would pin it (FSDP frees it by resizing).
    return ((name, t.detach().clone()) for name, t in out)


def resolve_cache_dtype(dtype: str) -> str:
    """``cache.dtype``: as given, or for "auto" float16 where CUDA is (half the disk of
    float32 at the real shapes), float32 on CPU."""
    if dtype != "auto":
        return dtype
    import torch

    return "float16" if torch.cuda.is_available() else "float32"


class CacheCorrupt(VlmtuneError):
    """A cache row no longer matches its digest (the file changed after it was checked)."""


# Rows already checked in this process: (store folder, features.npy identity) -> rows.
# A store is opened again every epoch (validation); its rows are hashed once.
_VERIFIED: dict[tuple[str, tuple[int, int, int, int]], set[int]] = {}
INDEX_VERSION = 2
# Room beyond the array itself when checking free space (header, index, slack).
_SPACE_MARGIN = 16 << 20


def _row_digest(key: str, row: np.ndarray) -> str:
    """sha256 of a row's key and bytes: a row moved under another key fails too."""
    return hashlib.sha256(key.encode() + b"\0" + np.ascontiguousarray(row).tobytes()).hexdigest()


class FeatureStore:
    """Rows of a fixed shape, addressed by content key, in a memory-mapped ``.npy``.

    ``index.json`` maps each key to its row and keeps each row's sha256. A row is
    checked against its digest the first time a process uses it (:meth:`ensure` checks
    the rows it is asked for, :meth:`get` any other), so a damaged store -- zeroed,
    truncated, an index that does not fit -- is found before its numbers are used; it
    is then rebuilt with a warning. Hashing runs at memory speed (sha256, about 1.5
    GB/s here), once per row per process, not once per epoch.
    """

    def __init__(self, root: str | Path, namespace: dict[str, Any]):
        self.dir = Path(root) / namespace_id(namespace)
        self.namespace = namespace
        self._index: dict[str, int] | None = None
        self._digests: list[str] = []
        self._data: np.ndarray | None = None
        self._ok: set[int] | None = None

    # ---- reading and checking
    def _load_index(self) -> None:
        """Read index.json; a damaged one resets the store (rebuilt by ensure)."""
        path = self.dir / "index.json"
        self._index, self._digests = {}, []
        if not path.is_file():
            return
        try:
            raw = json.loads(path.read_text())
            ok = (
                isinstance(raw, dict)
                and raw.get("version") == INDEX_VERSION
                and isinstance(raw.get("rows"), dict)
                and isinstance(raw.get("sha256"), list)
            )
            rows, digests = (raw["rows"], raw["sha256"]) if ok else ({}, [])
            n = len(digests)
            ok = (
                ok
                and all(isinstance(d, str) and len(d) == 64 for d in digests)
                and all(
                    isinstance(k, str) and isinstance(r, int) and not isinstance(r, bool) and 0 <= r < n for k, r in rows.items()
                )
            )
        except (OSError, ValueError, RecursionError):
            ok = False
        if not ok:
            self._discard("its index.json is damaged or from an older version")
            return
        self._index, self._digests = rows, digests

    @property
    def index(self) -> dict[str, int]:
        if self._index is None:
            self._load_index()
        assert self._index is not None
        return self._index

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            self._data = np.load(self.dir / "features.npy", mmap_mode="r")
        return self._data

    def _open_data(self) -> bool:
        """Open features.npy and check it fits the index; False (store discarded) if not."""
        if not self.index:
            return True
        try:
            data = self.data
            ok = data.ndim >= 1 and data.shape[0] == len(self._digests)
        except (OSError, ValueError, EOFError) as e:  # truncated, not an .npy, header damaged
            self._data = None
            self._discard(f"its features.npy cannot be read ({str(e)[:100]})")
            return False
        if not ok:
            self._discard(f"its features.npy has {data.shape[0] if data.ndim else 0} rows, the index {len(self._digests)}")
            return False
        return True

    def _verified(self) -> set[int]:
        """The rows of the open features.npy already checked in this process (shared by
        every store object on the same file; remembered while this one keeps it open)."""
        if self._ok is None or self._data is None:
            st = os.stat(self.dir / "features.npy")
            key = (str(self.dir.resolve()), (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
            self._ok = _VERIFIED.setdefault(key, set())
        return self._ok

    def _bad_rows(self, keys: Iterable[str]) -> list[int]:
        """Rows of ``keys`` (not yet checked in this process) whose key and bytes differ
        from their digest."""
        done = self._verified()
        bad = []
        for k in sorted(set(keys), key=self.index.__getitem__):
            r = self.index[k]
            if r in done:
                continue
            if _row_digest(k, self.data[r]) == self._digests[r]:
                done.add(r)
            else:
                bad.append(r)
        return bad

    def _discard(self, why: str) -> None:
        """Forget a damaged store (a warning says why); ensure rebuilds what is asked."""
        log.warning("feature cache %s: %s; it is not used and will be rebuilt", self.dir, why)
        self._data = None
        self._index, self._digests = {}, []
        for name in ("features.npy", "index.json"):
            try:
                (self.dir / name).unlink()
            except FileNotFoundError:
                pass

    def check(self, keys: Sequence[str] | None = None) -> bool:
        """Check the rows of ``keys`` (default: all) against their digests once per
        process; a damaged store is discarded (True if it was sound)."""
        if not self.index:
            return True  # empty, or damaged and already discarded
        if not self._open_data():
            return False
        bad = self._bad_rows(self.index if keys is None else [k for k in keys if k in self.index])
        if bad:
            self._discard(f"{len(bad)} of its rows do not match their sha256 (corrupt; first: row {bad[0]})")
            return False
        return True

    def missing(self, keys: Sequence[str]) -> list[str]:
        seen: set[str] = set()
        out = []
        for k in keys:
            if k not in self.index and k not in seen:
                seen.add(k)
                out.append(k)
        return out

    # ---- writing
    def _check_space(self, nbytes: int) -> None:
        """Refuse before a memory-mapped write that the disk cannot hold (on a full disk
        a write to a mapped page is a SIGBUS, not an error)."""
        free = shutil.disk_usage(self.dir).free
        if free < nbytes + _SPACE_MARGIN:
            raise VlmtuneError(
                f"feature cache {self.dir}: needs {nbytes + _SPACE_MARGIN} bytes, only {free} free on "
                f"its disk; free space, point cache.dir elsewhere or set cache.enabled=false"
            )

    def ensure(
        self,
        keys: Sequence[str],
        compute: Callable[[list[str]], np.ndarray],
        batch_size: int,
        dtype: str = "float32",
        progress: Callable[[int], Any] | None = None,
    ) -> int:
        """Compute and store the rows of ``keys`` not yet in the store; returns how many.

        The rows of ``keys`` already stored are checked first (once per process); a
        damaged store is rebuilt. ``compute(keys)`` returns an array [len(keys), ...]
        for a batch. The new file is written beside the old one and renamed into place
        with the index, so an interrupted build leaves the previous store intact.
        """
        self.check(list(keys))
        todo = self.missing(keys)
        if not todo:
            return 0
        from vlmtune.console import progress as progress_bar

        # A build is a long step: said once (a seed sweep sharing the cache says it once
        # in all), with a bar on a terminal and plain lines in a log.
        kind = str(self.namespace.get("kind", "features"))
        log.info("feature cache: computing %d %s rows into %s", len(todo), kind, self.dir)
        bar = None
        if progress is None:
            bar = progress_bar(desc=f"caching {kind}", total=len(todo), unit="row")
            progress = bar.update
        try:
            return self._build(todo, compute, batch_size, dtype, progress)
        finally:
            if bar is not None:
                bar.close()

    def _build(
        self, todo: list[str], compute: Callable[[list[str]], np.ndarray], batch_size: int, dtype: str, progress: Any
    ) -> int:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "namespace.json").write_text(json.dumps(self.namespace, indent=2, sort_keys=True, default=str))
        old_rows = len(self._digests)
        first = np.asarray(compute(todo[:batch_size]))
        shape = (old_rows + len(todo), *first.shape[1:])
        if old_rows and self.data.shape[1:] != first.shape[1:]:
            raise ValueError(f"{self.dir}: stored rows have shape {self.data.shape[1:]}, new ones {first.shape[1:]}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        self._check_space(nbytes)
        tmp = self.dir / "features.tmp.npy"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=shape)
        _reserve(tmp, self.dir)
        if old_rows:
            out[:old_rows] = self.data
        index, digests = dict(self.index), list(self._digests)
        row = old_rows
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            arr = first if start == 0 else np.asarray(compute(batch))
            out[row : row + len(batch)] = arr
            for k in batch:
                index[k] = row
                digests.append(_row_digest(k, out[row]))
                row += 1
            if progress:
                progress(len(batch))
        out.flush()
        del out
        self._data, self._ok = None, None
        verified = set(range(row))  # old rows were checked above, new ones hashed as written
        os.replace(tmp, self.dir / "features.npy")
        tmp_index = self.dir / "index.tmp.json"
        tmp_index.write_text(json.dumps({"version": INDEX_VERSION, "rows": index, "sha256": digests}))
        os.replace(tmp_index, self.dir / "index.json")
        self._index, self._digests = index, digests
        self._verified().update(verified)
        return len(todo)

    def get(self, key: str) -> np.ndarray:
        row = self.index[key]
        ok = self._ok if self._ok is not None and self._data is not None else self._verified()
        if row not in ok and self._bad_rows([key]):
            raise CacheCorrupt(
                f"feature cache {self.dir}: row {row} does not match its sha256 (the cache changed "
                f"while in use); run the command again to rebuild it"
            )
        return self.data[row]

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)


def _reserve(path: Path, where: Path) -> None:
    """Allocate the file's blocks now, so writing through the memory map cannot run out
    of disk (where the file system supports it; the free-space check covers the rest)."""
    if not hasattr(os, "posix_fallocate"):
        return
    size = os.path.getsize(path)
    try:
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, size)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            return  # EOPNOTSUPP, EINVAL: the file system cannot reserve; the free-space check stands
        path.unlink(missing_ok=True)
        raise VlmtuneError(
            f"feature cache {where}: no space left on its disk for {size} bytes of features; free "
            f"space, point cache.dir elsewhere or set cache.enabled=false"
        ) from None
