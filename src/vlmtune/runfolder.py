"""Where vlmtune writes: inside the folder it was given, never through a link, never
over another run or over files it did not write, and one process at a time.

A run folder (``train --output-dir``) holds the run's artifacts (:data:`RUN_ARTIFACTS`)
and a lock file. Before a run writes anything:

- the folder must be named (not '' or the current folder) and not be a file;
- none of the names vlmtune writes in it may be a symbolic link (a link would carry a
  write outside the folder); the files themselves are opened with ``O_NOFOLLOW`` too;
- a folder already holding a run is refused unless the user passes ``--resume`` (go
  on) or ``--overwrite`` (remove the earlier run's artifacts first);
- the main process holds an exclusive lock (``filelock``: ``flock`` on Linux, which
  the kernel releases when the process dies, so a killed run's lock is free at once)
  for the whole run; a second process gets one line naming the folder and the PID.

Generated data sets carry a marker file (:data:`GENERATED_MARKER`) that lists what
the generator wrote, so ``data.synthetic_dir`` regenerates only into folders that
vlmtune made and never over a user's own files.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any

from vlmtune.errors import VlmtuneError
from vlmtune.utils import shorten

log = logging.getLogger("vlmtune")

# A folder holding any of these holds a run (checkpoints: when not empty).
RUN_ARTIFACTS = ("config.yaml", "history.jsonl", "metrics.json", "checkpoints")
# What --overwrite removes: the run's artifacts and its TensorBoard logs (new event
# files would otherwise sit beside the old run's). data/ and cache/ are kept: the
# generated set is reused and cached features are keyed by their content.
INIT_RECORD = "init_from.json"  # what --init-from loaded, for --resume to re-check
# Figures a task draws beside metrics.json (Task.write_figures): counting's reliability diagram.
FIGURES = ("reliability.png",)
OVERWRITTEN = (*RUN_ARTIFACTS, *FIGURES, "tensorboard", INIT_RECORD)
LOCK_NAME = ".vlmtune.lock"
# Every name a run writes directly inside its folder: none may be a symbolic link.
WRITTEN = (*RUN_ARTIFACTS, *FIGURES, "cache", "data", "tensorboard", "wandb", LOCK_NAME, INIT_RECORD)
GENERATED_MARKER = ".vlmtune-generated.json"

OVERWRITE_HELP = (
    "replace the run in --output-dir: removes its "
    + ", ".join(f"{n}/" if "." not in n else n for n in OVERWRITTEN)
    + " first; keeps data/ (a generated set) and cache/ (features, keyed by content)"
)


# --------------------------------------------------------------------------- folders


def output_folder(path: str | Path | None, flag: str = "--output-dir") -> Path:
    """``path`` as a folder vlmtune may write into: refuses '' and the current folder
    under any spelling ('.', './', its absolute path, a link to it), the file-system
    root and an existing file."""
    text = "" if path is None else str(path)
    if not text.strip():
        raise VlmtuneError(f"{flag}: empty; name a folder for the output, e.g. runs/NAME")
    if "\x00" in text:
        raise VlmtuneError(f"{flag}: {shorten(text)}: contains a NUL character")
    p = Path(text)
    try:
        resolved = p.resolve()
        if resolved == Path.cwd().resolve():
            raise VlmtuneError(
                f"{flag} {shorten(text)}: is the current folder; name a folder of its own "
                f"(e.g. runs/NAME) so nothing here is overwritten"
            )
        if resolved == Path(resolved.anchor):
            raise VlmtuneError(f"{flag} {shorten(text)}: is the root of the file system; name a folder of its own")
        if p.exists() and not p.is_dir():
            raise VlmtuneError(f"{flag} {shorten(text)}: is a file, not a folder")
    except (OSError, RuntimeError) as e:  # a link loop, a name too long for the file system
        raise VlmtuneError(f"{flag} {shorten(text)}: {_reason(e)}") from None
    return p


def make_folder(path: Path, flag: str = "--output-dir") -> None:
    """``mkdir -p`` with a one-line error (read-only disk, no permission, a file in the way)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise VlmtuneError(f"{flag} {shorten(str(path))}: a file is in the way of this folder") from None
    except OSError as e:
        raise VlmtuneError(f"{flag} {shorten(str(e.filename or path))}: cannot create the folder ({_reason(e)})") from None


def refuse_links(folder: Path, names: tuple[str, ...] = WRITTEN) -> None:
    """Refuse a run folder in which a name vlmtune writes (or a checkpoint) is a symbolic
    link: writing through it would change a file outside the folder."""
    paths = [folder / n for n in names]
    ckpts = folder / "checkpoints"
    if ckpts.is_dir() and not ckpts.is_symlink():
        paths += sorted(ckpts.iterdir())
        paths += [
            p / name
            for p in sorted(ckpts.iterdir())
            if p.is_dir() and not p.is_symlink()
            for name in ("weights.safetensors", "config.yaml", "state.json", "trainer_state.pt", "eval")
        ]
    for p in paths:
        if p.is_symlink():
            raise VlmtuneError(
                f"{p}: is a symbolic link (to {shorten(os.readlink(p))}); vlmtune does not write "
                f"through links in a run folder; remove it"
            )


def run_artifacts(folder: Path) -> list[str]:
    """The run artifacts ``folder`` holds (``checkpoints`` only when it has entries)."""
    found = []
    for name in RUN_ARTIFACTS:
        p = folder / name
        if name == "checkpoints":
            if p.is_symlink() or (p.is_dir() and any(p.iterdir())) or (p.exists() and not p.is_dir()):
                found.append(name)
        elif p.exists() or p.is_symlink():
            found.append(name)
    return found


def prepare_run_folder(
    folder: Path,
    *,
    resume: bool,
    overwrite: bool,
    check_only: bool = False,
    sources: dict[str, str | Path | None] | None = None,
) -> None:
    """Checks before a run writes into ``folder`` (main process, lock held): no links;
    a folder holding a run needs --resume or --overwrite; --overwrite removes
    :data:`OVERWRITTEN` (not with ``check_only``). ``sources``: what the run will read
    (``train.init_from``, data files) by the key that names it; --overwrite refuses to
    remove one before it is read."""
    if resume and overwrite:
        raise VlmtuneError("--resume and --overwrite: choose one (continue the run, or replace it)")
    refuse_links(folder)
    found = run_artifacts(folder)
    if not found or resume:
        return
    if not overwrite:
        raise VlmtuneError(
            f"{folder}: already holds a run ({', '.join(found)}); pass --resume to continue it, "
            f"--overwrite to replace it, or choose another --output-dir"
        )
    refuse_removing_sources(folder, sources or {})
    if check_only:
        return
    for name in OVERWRITTEN:
        p = folder / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    log.info("--overwrite: removed the earlier run's %s from %s", ", ".join(found), folder)


def refuse_removing_sources(folder: Path, sources: dict[str, str | Path | None]) -> None:
    """Refuse an --overwrite that would remove what the run reads: a ``train.init_from``
    checkpoint (``--init-from X/checkpoints/last --output-dir X``) or a data file
    inside one of the names --overwrite removes."""
    for key, src in sources.items():
        if not src:
            continue
        try:
            target = Path(src).resolve()
        except (OSError, RuntimeError):
            continue  # named by the check that reads it
        for name in OVERWRITTEN:
            removed = folder / name
            try:
                gone = removed.resolve()
            except (OSError, RuntimeError):
                continue
            if (removed.exists() or removed.is_symlink()) and (target == gone or target.is_relative_to(gone)):
                flag = "--init-from" if key == "train.init_from" else key
                raise VlmtuneError(
                    f"{flag} {shorten(str(src))}: is inside {shorten(str(removed))}, which --overwrite would "
                    f"remove before the run reads it; copy it out of {shorten(str(folder))} first, or choose "
                    f"another --output-dir"
                )


# --------------------------------------------------------------------------- files


def write_bytes(path: Path, data: bytes) -> None:
    """:func:`write_text` for bytes (a PNG): never through a symbolic link."""
    write_text(path, data.decode("latin-1"), encoding="latin-1")


def write_text(path: Path, text: str, append: bool = False, encoding: str = "utf-8") -> None:
    """Write (or append) text without following a symbolic link at ``path``: a link is
    refused with a message naming it, so the file it points to stays untouched."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if append else os.O_TRUNC)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP and Path(path).is_symlink():
            raise VlmtuneError(
                f"{path}: is a symbolic link; vlmtune does not write through links "
                f"(the file it points to is left untouched); remove it"
            ) from None
        raise
    with os.fdopen(fd, "w", encoding=encoding, newline="") as f:
        f.write(text)


# --------------------------------------------------------------------------- lock


class RunLock:
    """The one-writer lock of a run folder (``FOLDER/.vlmtune.lock``, holding the PID).

    ``filelock.FileLock`` is ``flock`` on Linux: the lock belongs to the open file and
    the kernel drops it when the process ends, SIGKILL included, so a killed run never
    leaves a stale lock behind; the next run takes it and writes its own PID.
    """

    def __init__(self, folder: Path, what: str = "run folder", flag: str = "--output-dir"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what, self.flag = what, flag  # how the refusal names the folder and its flag
        self._lock: Any = None

    def acquire(self) -> RunLock:
        from filelock import FileLock, Timeout

        if self.path.is_symlink():
            raise VlmtuneError(f"{self.path}: is a symbolic link; remove it")
        lock = FileLock(str(self.path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            pid = _holder(self.path)
            raise VlmtuneError(
                f"{self.folder}: another vlmtune process ({f'PID {pid}' if pid else 'PID unknown'}) "
                f"is writing to this {self.what}; wait for it to end or choose another {self.flag}"
            ) from None
        self._lock = lock
        write_text(self.path, f"{os.getpid()}\n")
        return self

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _holder(path: Path) -> int | None:
    try:
        text = path.read_text()[:32].strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


# --------------------------------------------------------------------------- names


def safe_name(label: str, limit: int = 100) -> str:
    """A label as one folder name inside the output folder: every character other than
    letters, digits and ``._+=@-`` becomes '_' (so '/', '..' and absolute paths cannot
    leave the folder), no leading dot, at most ``limit`` characters."""
    name = re.sub(r"[^A-Za-z0-9._+=@-]+", "_", label).lstrip(".")[:limit]
    return name or "_"


# --------------------------------------------------------------------------- generated data


def generated_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a folder vlmtune generated, or None (no marker, or not readable)."""
    p = Path(folder) / GENERATED_MARKER
    if p.is_symlink() or not p.is_file():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("generator"), str) else None


def claim_generated(folder: Path, generator: str, params: dict[str, Any], overwrite: bool) -> None:
    """Before a generator writes into ``folder``: refuse a non-empty folder unless
    ``overwrite``; with it, first remove the files an earlier generation listed in its
    marker. Then write a marker saying the folder is being generated, so a kill
    half-way leaves a folder that is known to be vlmtune's."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise VlmtuneError(f"{folder}: is a file, not a folder")
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    if entries and not overwrite:
        names = ", ".join(shorten(p.name, 40) for p in entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise VlmtuneError(f"{folder}: not empty ({names}); pass --overwrite to generate over it, or choose an empty folder")
    refuse_links(
        folder,
        (
            "images",
            GENERATED_MARKER,
            "meta.json",
            "boxes.json",
            *(f"{s}{e}" for s in ("train", "val", "test") for e in (".json", ".jsonl")),
        ),
    )
    old = generated_marker(folder)
    base = folder.resolve()
    for rel in (old or {}).get("files", []) if isinstance((old or {}).get("files"), list) else []:
        p = folder / str(rel)
        if p.resolve().is_relative_to(base) and (p.is_file() or p.is_symlink()):
            p.unlink()
    make_folder(folder, "--out")
    write_text(
        folder / GENERATED_MARKER, json.dumps({"generator": generator, **params, "complete": False, "files": []}, indent=1) + "\n"
    )


def finish_generated(folder: Path, generator: str, params: dict[str, Any], files: list[Path]) -> None:
    """The marker of a complete generation, listing every file written (relative)."""
    folder = Path(folder)
    rel = sorted(str(Path(f).relative_to(folder)) for f in files)
    write_text(
        folder / GENERATED_MARKER, json.dumps({"generator": generator, **params, "complete": True, "files": rel}, indent=1) + "\n"
    )


def check_synthetic_dir(folder: Path, annotation_names: tuple[str, ...]) -> bool:
    """Whether a synthetic set may be generated into ``folder`` (True), or reused as it
    is (False). A folder with files but no marker is the user's: refused."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise VlmtuneError(f"data.synthetic_dir {folder}: is a file, not a folder")
    marker = generated_marker(folder)
    if marker is None:
        entries = sorted(folder.iterdir()) if folder.is_dir() else []
        if entries:
            found = [n for n in annotation_names if (folder / n).exists()]
            what = f"holds {', '.join(found)}" if found else f"is not empty ({shorten(entries[0].name, 40)}, ...)"
            raise VlmtuneError(
                f"data.synthetic_dir {folder}: {what} but no {GENERATED_MARKER}, so vlmtune did not "
                f"generate it; refused so nothing there is overwritten. Name your files with "
                f"data.train/data.val/data.test, or choose an empty folder"
            )
        return True
    return not (marker.get("complete") is True and all((folder / n).is_file() for n in annotation_names))


# --------------------------------------------------------------------------- messages


def _reason(e: BaseException) -> str:
    if isinstance(e, RuntimeError) and "loop" in str(e).lower():  # pathlib's resolve() on a link loop
        return "too many levels of symbolic links (a link loop)"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower() if e.errno != errno.ELOOP else "too many levels of symbolic links (a link loop)"
    return str(e)[:200] or type(e).__name__


# --------------------------------------------------------------------------- writes


def write_atomic(path: Path, write: Any) -> None:
    """Write ``path`` through ``write(tmp)`` and rename it into place: the one write path.

    The temporary file is created exclusively (``O_EXCL | O_NOFOLLOW``) under a random
    name no user's file has, with mode 0666 less the umask; ``path`` itself may not be
    a symbolic link; on failure only the temporary file vlmtune created is removed."""
    if path.is_symlink():
        raise VlmtuneError(f"{path}: is a symbolic link; vlmtune does not write through links; remove it")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.vlmtune-tmp-{os.urandom(6).hex()}")
        try:
            os.close(os.open(tmp, flags, 0o666))
            break
        except FileExistsError:
            continue
    else:
        raise VlmtuneError(f"{path}: cannot create a temporary file beside it")
    try:
        write(tmp)
        follow_umask(tmp)  # ``write`` may have replaced the file (safetensors writes 0600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_file(path: Path, data: str | bytes, encoding: str = "utf-8") -> None:
    """:func:`write_atomic` of a whole file's text or bytes: a link at ``path`` is
    refused (the file it points to stays untouched), the file is written under a hidden
    temporary name created exclusively and renamed into place (so a hard link or a
    reader never sees half a file), with the umask's mode."""
    raw = data.encode(encoding) if isinstance(data, str) else data

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(raw)

    write_atomic(Path(path), write)


def current_umask() -> int:
    """The process's umask, read from /proc where it says it (setting it to read it, the
    fallback, is a moment in which another thread's new file would get another mode)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def follow_umask(path: Path) -> None:
    """Give the file at ``path``, or every file under the folder ``path``, the mode a new
    file gets (0666 less the umask: 0644 under 022), as everything else vlmtune writes
    has. Libraries that write through a temporary file of their own (safetensors'
    ``save_file``, and so ``save_pretrained``) leave it 0600, which others sharing a
    checkpoint cannot read. Links are not followed; folders keep their mode."""
    mode = 0o666 & ~current_umask()
    path = Path(path)
    files = [path] if not path.is_dir() or path.is_symlink() else [Path(r) / f for r, _, fs in os.walk(path) for f in fs]
    for f in files:
        st = os.lstat(f)
        if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) != mode:
            os.chmod(f, mode)
