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

import hashlib
import json
import os
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

if TYPE_CHECKING:
    from torch import nn

    from vlmtune.backbone import Backbone


_KEYS: dict[tuple[str, int, int], str] = {}


def content_key(path: str | Path) -> str:
    """sha256 of a file's bytes: the same image under another name shares its features,
    an edited image does not. Remembered per (path, size, mtime) within a process, so
    the validation set is not re-read every epoch; a rewritten file is hashed again."""
    st = os.stat(path)
    stamp = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if stamp not in _KEYS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _KEYS[stamp] = h.hexdigest()
    return _KEYS[stamp]


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def namespace_id(namespace: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(namespace, sort_keys=True, default=str).encode()).hexdigest()[:20]


# --------------------------------------------------------------------------- fingerprints
# What a namespace holds of the backbone besides its identity: the weights, which a
# stage may have trained, and the preprocessing.

def vision_fingerprint(backbone: Backbone) -> str:
    """sha256 of the vision tower's current weights (cache keys must change when a
    stage has trained it, which the architecture hash alone would not show)."""
    return _memo_sha256(backbone.vision_tower)


def text_fingerprint(backbone: Backbone) -> str:
    """sha256 of the language model's weights and the tokenizer's vocabulary."""
    vocab = json.dumps(sorted(backbone.tokenizer.get_vocab().items())).encode()
    return hashlib.sha256(_memo_sha256(backbone.language_model).encode() + vocab).hexdigest()


def preprocess_signature(processor: Any) -> dict[str, Any]:
    """The image processor's settings that decide the pixels a tower sees."""
    p = processor
    return {"size": dict(p.size) if p.size else None, "mean": list(p.image_mean), "std": list(p.image_std), "resample": str(p.resample)}


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
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


class FeatureStore:
    """Rows of a fixed shape, addressed by content key, in a memory-mapped ``.npy``."""

    def __init__(self, root: str | Path, namespace: dict[str, Any]):
        self.dir = Path(root) / namespace_id(namespace)
        self.namespace = namespace
        self._index: dict[str, int] | None = None
        self._data: np.ndarray | None = None

    @property
    def index(self) -> dict[str, int]:
        if self._index is None:
            path = self.dir / "index.json"
            self._index = json.loads(path.read_text()) if path.is_file() else {}
        return self._index

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            self._data = np.load(self.dir / "features.npy", mmap_mode="r")
        return self._data

    def missing(self, keys: Sequence[str]) -> list[str]:
        seen: set[str] = set()
        out = []
        for k in keys:
            if k not in self.index and k not in seen:
                seen.add(k)
                out.append(k)
        return out

    def ensure(self, keys: Sequence[str], compute: Callable[[list[str]], np.ndarray], batch_size: int,
               dtype: str = "float32", progress: Callable[[int], Any] | None = None) -> int:
        """Compute and store the rows of ``keys`` not yet in the store; returns how many.

        ``compute(keys)`` returns an array [len(keys), ...] for a batch. The new file is
        written beside the old one and renamed into place with the index, so an
        interrupted build leaves the previous store intact.
        """
        todo = self.missing(keys)
        if not todo:
            return 0
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "namespace.json").write_text(json.dumps(self.namespace, indent=2, sort_keys=True, default=str))
        old_rows = len(self.index)
        first = np.asarray(compute(todo[:batch_size]))
        shape = (old_rows + len(todo), *first.shape[1:])
        tmp = self.dir / "features.tmp.npy"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=shape)
        if old_rows:
            if self.data.shape[1:] != first.shape[1:]:
                raise ValueError(f"{self.dir}: stored rows have shape {self.data.shape[1:]}, new ones {first.shape[1:]}")
            out[:old_rows] = self.data
        index = dict(self.index)
        row = old_rows
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            arr = first if start == 0 else np.asarray(compute(batch))
            out[row:row + len(batch)] = arr
            for k in batch:
                index[k] = row
                row += 1
            if progress:
                progress(len(batch))
        out.flush()
        del out
        self._data = None
        os.replace(tmp, self.dir / "features.npy")
        tmp_index = self.dir / "index.tmp.json"
        tmp_index.write_text(json.dumps(index))
        os.replace(tmp_index, self.dir / "index.json")
        self._index = index
        return len(todo)

    def get(self, key: str) -> np.ndarray:
        return self.data[self.index[key]]

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)
