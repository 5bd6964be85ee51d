"""Files inside tar shards, read in place: a webdataset image is ``SHARD.tar/KEY.jpg``.

A webdataset sample's image never leaves its shard: nothing is extracted (the storage
may be read-only, and a million-image set should not be copied to be read). A shard's
index (each regular member's name, data offset and size) is read once per process,
with :mod:`tarfile`, from the member headers; a member is then one ``seek`` + ``read``
of the shard. So :func:`~vlmtune.data.formats.images.load_image`, the frozen-feature
cache (keyed by the member's bytes, as for any image) and ``vlmtune embed --data``
read a member as they read a file, in any order, from any DataLoader worker.

Why :mod:`tarfile` and not the ``webdataset`` library: that library streams shards in
order into an ``IterableDataset`` pipeline (shuffle buffers, no index); vlmtune's
readers need every sample up front (checks, duplicates, splits, the feature cache) and
then random access by key, which an uncompressed tar gives for free. Compressed shards
(``.tar.gz``) have no such access and are refused with a message saying so.

Plain Python (no Pillow): the format modules load it.
"""

from __future__ import annotations

import errno
import posixpath
import tarfile
from dataclasses import dataclass
from pathlib import Path

SHARD_SUFFIX = ".tar"
COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")


@dataclass(frozen=True)
class Member:
    """One member of a shard as its header says: its name, kind, data offset and size."""

    name: str
    regular: bool
    offset: int
    size: int
    folder: bool = False


# (shard, size, mtime_ns) -> its members in file order; a rewritten shard is read again.
_MEMBERS: dict[tuple[str, int, int], list[Member]] = {}


def shard_members(shard: Path) -> list[Member]:
    """Every member of an uncompressed tar shard, from its headers (no data is read).

    Raises OSError naming the shard when it cannot be read or is not an uncompressed tar.
    """
    st = shard.stat()
    key = (str(shard), st.st_size, st.st_mtime_ns)
    if key not in _MEMBERS:
        try:
            with tarfile.open(shard, "r:") as tf:
                _MEMBERS[key] = [Member(m.name, m.isreg(), m.offset_data, m.size, m.isdir()) for m in tf.getmembers()]
        except tarfile.ReadError as e:
            compressed = " (compressed shards cannot be read by position: decompress them to .tar)"
            raise OSError(f"{shard}: not an uncompressed tar file: {e}{compressed}") from None
        except tarfile.TarError as e:
            raise OSError(f"{shard}: cannot read the tar file: {e}") from None
    return _MEMBERS[key]


def clean_name(name: str) -> str | None:
    """A member name as a relative path inside the shard, or None when it is not one
    (absolute, or leading out of the shard with '..')."""
    norm = posixpath.normpath(name)
    if norm.startswith("/") or norm == ".." or norm.startswith("../") or norm == ".":
        return None
    return norm


def _index(shard: Path) -> dict[str, Member]:
    return {n: m for m in shard_members(shard) if m.regular and (n := clean_name(m.name)) is not None}


def split_member(path: Path) -> tuple[Path, str] | None:
    """(shard, member name) when ``path`` lies inside a ``.tar`` file, else None."""
    for parent in path.parents:
        if parent.suffix.lower() == SHARD_SUFFIX and parent.is_file():
            return parent, path.relative_to(parent).as_posix()
    return None


def is_member(path: Path) -> bool:
    """Whether ``path`` names a regular member of a readable shard."""
    where = split_member(path)
    if where is None:
        return False
    try:
        return where[1] in _index(where[0])
    except OSError:
        return False


def _member(path: Path) -> tuple[Path, Member]:
    where = split_member(path)
    if where is None:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
    shard, name = where
    member = _index(shard).get(name)
    if member is None:
        raise FileNotFoundError(errno.ENOENT, f"no member {name} in the shard", str(shard))
    return shard, member


def read_member(path: Path) -> bytes:
    """The bytes of the shard member ``path`` names (one seek and one read).

    Raises FileNotFoundError when there is no such member, OSError when the shard
    cannot be read."""
    shard, member = _member(path)
    with open(shard, "rb") as f:
        f.seek(member.offset)
        data = f.read(member.size)
    if len(data) != member.size:
        raise OSError(f"{shard}: member {member.name} is cut short (the shard is truncated)")
    return data


def member_stamp(path: Path) -> tuple[int, int]:
    """(size, mtime_ns) of a member: its own size, the shard's modification time."""
    shard, member = _member(path)
    return member.size, shard.stat().st_mtime_ns


def read_members(shard: Path, names: list[str]) -> dict[str, bytes]:
    """The bytes of several members of one shard (the shard opened once)."""
    index = _index(shard)
    out: dict[str, bytes] = {}
    with open(shard, "rb") as f:
        for name in names:
            m = index[name]
            f.seek(m.offset)
            out[name] = f.read(m.size)
    return out
