"""Embed a folder or a data set, index the embeddings, search them.

``vlmtune embed CKPT (--images DIR | --data FILE) [--texts FILE] --out DIR`` writes
  embeddings.safetensors  ``images`` [N, D] and ``texts`` [M, D], float32, L2-normalised
  items.jsonl             one line per row: {"id", "kind": "image"|"text", "path" | "text", ...}
                          (images also carry "size" and "mtime_ns"; a data set's captions "image",
                          the id of their image)
  embed.json              the checkpoint (path and fingerprint), the source, counts, unreadable
                          files, and the sha256 of the two files above: the manifest of a save
A second run into the same folder embeds only what is new: images are keyed by path,
size and modification time (a changed file is re-embedded in its row, a new one is
appended, one no longer in the folder is removed, and each is counted in the summary),
captions by their text. Progress is saved every ``FLUSH_EVERY`` images through a
journal (:mod:`vlmtune.searchfiles`), so a run killed at any moment loses at most that
much and the next run goes on from the last save. One writer per folder (its lock).

``vlmtune index EMBED_DIR --out INDEX_DIR [--faiss ivf|hnsw]`` writes
  gallery.safetensors     ``gallery`` [N, D], the normalised matrix (exact search reads it)
  items.jsonl             the gallery's rows, as in the embed folder
  index.json              kind, size, the checkpoint's path and fingerprint, search settings and,
                          with --faiss, the recall@10 of the approximate index against exact search
                          and faiss.index's sha256 (checked before Faiss reads the file)
  faiss.index             with --faiss only

``vlmtune search INDEX (--text T | --image P | --queries FILE)`` embeds the query with
the checkpoint the index records (refusing one whose fingerprint differs), ranks the
gallery by cosine (exact: blocks of the matrix product with a running top-k, the
ranking rule of evaluation: higher score first, the lower row on ties) and prints a
table or JSON; ``--rerank`` re-scores the top candidates with the matching head and
re-orders them, as evaluation's ``eval.rerank_k`` does.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vlmtune import runfolder
from vlmtune import searchfiles as sf
from vlmtune.errors import CheckpointError, DataError, VlmtuneError
from vlmtune.tasks.retrieval.matryoshka import check_dim, trained_dims, truncate
from vlmtune.utils import sha256_bytes

if TYPE_CHECKING:
    from vlmtune.api import Model

log = logging.getLogger(__name__)

# What counts as an image file when walking a folder (PIL must also be able to decode it).
IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".png",
        ".bmp",
        ".gif",
        ".webp",
        ".tif",
        ".tiff",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".jfif",
        ".jpe",
        ".tga",
        ".ico",
    }
)
FLUSH_EVERY = 1024  # images embedded between two saves of the output files
EMBED_FORMAT = sf.EMBED_FORMAT
INDEX_FORMAT = 1


# --------------------------------------------------------------------------- files


def _write_atomic(path: Path, write: Any) -> None:
    """Write through runfolder's one write path (exclusive temp file, no link, umask)."""
    runfolder.write_atomic(path, write)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        data = sf.read_bytes(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    return [row for _, row in sf.read_jsonl_bytes(data, path)]


# --------------------------------------------------------------------------- embed


def read_embed_folder(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor], list[dict[str, Any]]]:
    """The committed state of an embed folder (see :mod:`vlmtune.searchfiles`), checked
    as input: embed.json's fields, both tensors 2-D float matrices of one width holding
    finite values, and the items of each kind numbered 0..rows-1 in order."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder}: is a file, not an embed folder")
    if not folder.exists():
        raise DataError(f"{folder}: folder not found")
    if not (folder / sf.META).exists() and (folder / "index.json").exists():
        raise DataError(f"{folder}: is an index folder, not an embed folder (give the folder vlmtune embed wrote)")
    meta, blobs = sf.read_committed(folder)
    emb_path, items_path, meta_path = folder / sf.EMBEDDINGS, folder / sf.ITEMS, folder / sf.META
    tensors = sf.load_tensor_bytes(blobs[sf.EMBEDDINGS], emb_path)
    mats = {name: sf.check_matrix(tensors, name, emb_path) for name in ("images", "texts")}
    widths = sorted({t.shape[1] for t in mats.values()})
    if len(widths) != 1:
        raise DataError(f"{emb_path}: 'images' and 'texts' have different widths {widths}")
    items = sf.check_rows(items_path, sf.read_jsonl_bytes(blobs[sf.ITEMS], items_path))
    _check_embed_meta(meta_path, meta, mats)
    of_kind = {}
    for kind, name, field in (("image", "images", "path"), ("text", "texts", "text")):
        rows = [r for r in items if r["kind"] == kind]
        if [r["id"] for r in rows] != list(range(len(mats[name]))):
            raise DataError(
                f"{items_path}: its {kind} lines do not number the {len(mats[name])} rows of "
                f"'{name}' in order (id 0, 1, ..., each with a '{field}')"
            )
        of_kind[name] = rows
    for r in of_kind["texts"]:
        if r.get("image") is not None and not 0 <= r["image"] < len(mats["images"]):
            raise DataError(
                f"{items_path}: text {r['id']}: 'image' {r['image']} is not an image id (0..{len(mats['images']) - 1})"
            )
    for name, t in mats.items():
        bad = sf.first_not_finite(t)
        if bad is not None:
            raise DataError(
                f"{emb_path}: '{name}' row {bad} ({sf.item_label(of_kind[name][bad])}) is not finite (NaN or Inf); "
                f"embed into a new folder"
            )
    return meta, mats, items


def _check_embed_meta(path: Path, meta: dict[str, Any], mats: dict[str, Tensor]) -> None:
    """embed.json's fields: texts where texts are meant, counts and width those of the
    tensors (a manifest's counts always; 'dim' where given)."""
    for key in ("checkpoint", "fingerprint", "task", "weights_sha256"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise DataError(f"{path}: '{key}' must be text, got {type(meta[key]).__name__}")
    src = meta.get("source")
    if src is not None and not (isinstance(src, dict) and all(v is None or isinstance(v, str) for v in src.values())):
        raise DataError(f"{path}: 'source' must be an object of paths")
    width = next(iter(mats.values())).shape[1]
    dim = meta.get("dim")
    if dim is not None and dim != width:
        raise DataError(f"{path}: 'dim' is {dim!r} but the embeddings are {width} wide")
    if meta.get("format") == sf.EMBED_FORMAT:
        for name in ("images", "texts"):
            if meta.get(name) != len(mats[name]):
                raise DataError(f"{path}: '{name}' is {meta.get(name)!r} but {sf.EMBEDDINGS} holds {len(mats[name])} rows")
    bad = meta.get("unreadable", [])
    if not isinstance(bad, list) or not all(isinstance(u, dict) and isinstance(u.get("error"), str) for u in bad):
        raise DataError(f"{path}: 'unreadable' must be a list of objects with an 'error' text")


def _check_embed_out(out: Path) -> None:
    """``out`` may receive embeddings: new, empty (but for vlmtune's own files), or an
    embed folder."""
    if not out.is_dir() or (out / sf.META).is_file() or (out / sf.META).is_symlink():
        return
    if any(not sf.own_name(name) for name in os.listdir(out)):
        raise VlmtuneError(f"{out}: exists and is not an embed folder (no embed.json); choose an empty or new folder")


def image_files(root: Path) -> tuple[list[Path], dict[str, str]]:
    """Every file under ``root`` (recursively) whose extension is an image's, sorted by
    path, and what could not be listed ({path: reason}: a symbolic link loop, a link
    to nothing, a folder that cannot be read). A symbolic link (to a folder, or an
    image file) that leads outside ``root`` is refused, as the data commands refuse an image path
    leading outside the data set's folder; one leading inside is read where it leads
    (a folder there is listed anyway)."""
    base = root.resolve()
    out: list[Path] = []
    problems: dict[str, str] = {}

    def cannot_list(e: OSError) -> None:
        where = str(e.filename or root)
        problems[where] = f"{where}: cannot list the folder ({(e.strerror or str(e)).lower()})"

    for folder, dirs, files in os.walk(root, onerror=cannot_list):
        for name in [*dirs, *files]:
            p = Path(folder) / name
            if not p.is_symlink():
                continue
            try:
                target = p.resolve(strict=True)
            except (RuntimeError, OSError) as e:
                if isinstance(e, OSError) and e.errno != errno.ELOOP and not isinstance(e, FileNotFoundError):
                    problems[str(p)] = f"{p}: cannot follow the link ({(e.strerror or str(e)).lower()})"
                elif isinstance(e, FileNotFoundError):
                    if p.suffix.lower() in IMAGE_EXTENSIONS:
                        problems[str(p)] = f"{p}: a symbolic link to nothing (to {os.readlink(p)})"
                else:
                    problems[str(p)] = f"{p}: a symbolic link loop"
                continue
            read = target.is_dir() or p.suffix.lower() in IMAGE_EXTENSIONS  # a link to notes.txt is never read
            if read and not target.is_relative_to(base):
                raise DataError(
                    f"{sf.printable(str(p))}: a symbolic link leading outside {sf.printable(str(root))} (to "
                    f"{sf.printable(str(target))}); embed reads only files inside the folder it is given, as the data "
                    f"commands do: remove the link, or embed the folder it leads to"
                )
        dirs.sort()
        for name in sorted(files):
            p = Path(folder) / name
            if p.suffix.lower() in IMAGE_EXTENSIONS and str(p) not in problems and p.is_file():
                out.append(p)
    return sorted(out), problems


def read_texts(path: Path) -> list[str]:
    """Captions to embed: one per line of a text file (blank lines skipped), or for
    ``.jsonl`` one JSON string or {"text": ...} object per line."""
    try:
        data = sf.read_bytes(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix.lower() == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise DataError(f"{path}: line {n}: nested too deeply") from None
            text = obj.get("text") if isinstance(obj, dict) else obj
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{path}: line {n}: expected a non-empty string or an object with a 'text' string")
            out.append(text)
        else:
            out.append(line.strip())
    if not out:
        raise DataError(f"{path}: holds no text")
    return out


def _stamp(p: Path) -> tuple[int, int]:
    """(size, mtime_ns) of an image file, or of a webdataset image in its shard."""
    from vlmtune.data.formats.shards import member_stamp, split_member

    if not p.exists() and split_member(p) is not None:
        return member_stamp(p)
    st = p.stat()
    return st.st_size, st.st_mtime_ns


def embed(
    checkpoint: str | Path,
    out: str | Path,
    *,
    images: str | Path | None = None,
    data: str | Path | None = None,
    texts: str | Path | None = None,
    progress: bool = True,
    model: Model | None = None,
    dim: int | None = None,
) -> dict[str, Any]:
    """``vlmtune embed``: embeddings of a folder's images or a data set's images and
    captions (plus ``texts``) into ``out``; only rows not already there are computed.
    ``dim``: a width the checkpoint trained (Matryoshka, ``model.mrl_dims``); the
    first ``dim`` coordinates, renormalised. None: the full width.
    One writer per folder (its lock); each save is journaled (:mod:`vlmtune.searchfiles`)."""
    from vlmtune.api import load

    if (images is None) == (data is None):
        raise VlmtuneError("embed: give exactly one of --images DIR or --data FILE")
    out = runfolder.output_folder(out, "--out")
    if images is not None and not Path(images).is_dir():
        raise DataError(f"{images}: {'is a file, not a folder' if Path(images).exists() else 'folder not found'}")
    if data is not None and not Path(data).exists() and not ("{" in Path(data).name and "}" in Path(data).name):
        raise DataError(f"{data}: annotation file not found")  # (a brace pattern names webdataset shards)
    extra_texts = read_texts(Path(texts)) if texts is not None else []
    _check_embed_out(out)
    m = model or load(checkpoint)
    m._require("embed_images")
    listed = None
    if images is not None:
        listed = image_files(Path(images))
        if not listed[0] and not listed[1]:
            raise DataError(f"{images}: holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    records = m.task.read_split(str(data)) if data is not None else None
    runfolder.make_folder(out, "--out")
    with runfolder.RunLock(out, what="embed folder", flag="--out"):
        runfolder.refuse_links(out, (*sf.JOURNALED, sf.META, *(sf.pending(out, n).name for n in sf.JOURNALED)))
        _check_embed_out(out)
        sf.settle(out)
        job = _EmbedJob(
            m,
            out,
            {
                "images": str(Path(images).resolve()) if images else None,
                "data": str(Path(data).resolve()) if data else None,
                "texts": str(Path(texts).resolve()) if texts else None,
            },
            dim,
        )
        job.read_previous()
        job.plan(listed, records)
        job.embed_images(progress)
        n_images = sum(r is not None for r in job.img_rows.values())
        if n_images == 0:
            raise DataError(
                f"{images or data}: none of the {len(job.order) + len(listed[1] if listed else ())} image files could "
                f"be read (first: {sf.printable(next(iter(job.unreadable.values()), ''))})"
            )
        new_texts = job.embed_texts(extra_texts, progress)
        meta = job.save(final=True)
    return {
        **meta,
        "embedded_images": n_images - job.kept,
        "kept_images": job.kept,
        "changed_images": job.changed,
        "removed_images": len(job.removed),
        "embedded_texts": len(new_texts),
        "out": str(out),
    }


class _EmbedJob:
    """One ``vlmtune embed`` run: what the output folder already holds, what to embed,
    and the writer of the folder's files (saved every FLUSH_EVERY images and at the end)."""

    def __init__(self, model: Model, out: Path, source: dict[str, str | None], dim: int | None = None):
        self.m, self.out, self.source = model, out, source
        self.trained = model_widths(model)
        if dim is not None:
            check_dim(dim, self.trained[-1], self.trained[:-1], f"the checkpoint {model.folder}")
        self.dim = dim or self.trained[-1]
        self.old_img: dict[str, tuple[dict[str, Any], Tensor]] = {}  # path -> (row, embedding) from before
        self.txt_emb: dict[str, Tensor] = {}  # text -> embedding (before and now)
        self.order: list[str] = []  # image paths, in output order
        self.captions: list[tuple[str, int]] = []  # a data set's (caption, image id)
        self.img_rows: dict[str, tuple[dict[str, Any], Tensor] | None] = {}  # None: still to embed
        self.text_rows: list[dict[str, Any]] = []
        self.todo: list[tuple[str, int, int]] = []  # (path, size, mtime_ns) to embed
        self.unreadable: dict[str, str] = {}
        self.removed: list[str] = []
        self.kept = self.changed = 0
        self.from_folder = source["images"] is not None

    def read_previous(self) -> None:
        """Rows of a previous run into the same folder (same checkpoint and source only)."""
        out = self.out
        if not (out / sf.META).is_file():
            return
        meta, tensors, old_items = read_embed_folder(out)
        if meta.get("fingerprint") != self.m.fingerprint:
            raise CheckpointError(
                f"{out}: holds embeddings made by another checkpoint ({meta.get('checkpoint')}); choose another --out"
            )
        if meta.get("dim", tensors["images"].shape[1]) != self.dim:
            raise VlmtuneError(
                f"{out}: holds embeddings of width {meta.get('dim')}, not {self.dim}; choose another --out or --dim {meta.get('dim')}"
            )
        before = meta.get("source") or {}
        if before.get("images") != self.source["images"] or before.get("data") != self.source["data"]:
            raise DataError(
                f"{out}: holds embeddings of {sf.printable(str(meta.get('source')))}, not of this source; choose another --out"
            )
        for row in old_items:
            if row["kind"] == "image":
                self.old_img[sf.item_path(row)] = (row, tensors["images"][row["id"]])
            else:
                self.txt_emb.setdefault(row["text"], tensors["texts"][row["id"]])

    def plan(self, listed: tuple[list[Path], dict[str, str]] | None, records: list[Any] | None) -> None:
        """The images wanted, in order (kept rows first, as they were, then new files), and
        which of them need embedding (new, or changed in size or mtime)."""
        if listed is not None:
            files, problems = listed
            for p, why in problems.items():
                self.unreadable[p] = why
                log.warning("skipped %s", sf.printable(why))
            wanted = list(dict.fromkeys(str(p.resolve()) for p in files))  # a link inside the folder: its file once
            present = set(wanted)
            self.order = [p for p in self.old_img if p in present] + [p for p in wanted if p not in self.old_img]
        else:
            assert records is not None
            by_id: dict[int, Path] = {}
            for r in records:
                by_id.setdefault(r.image_id, r.image)
            self.order = [str(Path(by_id[i]).resolve()) for i in sorted(by_id)]
            self.captions = [(r.text, r.image_id) for r in records]
        in_order = set(self.order)
        self.removed = [p for p in self.old_img if p not in in_order]
        for p in self.order:
            try:
                size, mtime = _stamp(Path(p))
            except OSError as e:  # gone or unreadable since the folder was listed
                self.unreadable[p] = f"{p}: cannot read ({e.strerror or e})"
                log.warning("skipped %s", sf.printable(self.unreadable[p]))
                continue
            prev = self.old_img.get(p)
            if prev is not None and prev[0].get("size") == size and prev[0].get("mtime_ns") == mtime:
                self.img_rows[p] = prev
                self.kept += 1
            else:
                self.changed += prev is not None
                self.img_rows[p] = None
                self.todo.append((p, size, mtime))

    def embed_images(self, progress: bool) -> None:
        from vlmtune.console import progress as progress_bar
        from vlmtune.data.formats import load_image

        # A bar on a terminal; plain periodic lines (no carriage returns) in a log.
        bar = progress_bar(total=len(self.todo), desc="embed images", unit="img", enabled=progress)
        since_save = 0
        for s in range(0, len(self.todo), self.m.batch_size):
            batch = self.todo[s : s + self.m.batch_size]
            loaded = []
            for p, size, mtime in batch:
                try:
                    loaded.append((p, size, mtime, load_image(Path(p))))
                except DataError as e:
                    self.unreadable[p] = str(e)
                    log.warning("skipped %s", sf.printable(str(e)))
            if loaded:
                emb = truncate(self.m.embed_images([x[3] for x in loaded]), self.dim)
                _refuse_not_finite(emb, [x[0] for x in loaded], "image")
                for (p, size, mtime, _), vec in zip(loaded, emb):
                    self.img_rows[p] = ({"id": -1, "kind": "image", "size": size, "mtime_ns": mtime}, vec)
            bar.update(len(batch))
            since_save += len(batch)
            if since_save >= FLUSH_EVERY:
                self.save()
                since_save = 0
        bar.close()

    def embed_texts(self, extra_texts: list[str], progress: bool) -> list[str]:
        """Captions (the data set's, in record order, then --texts); each distinct text
        embedded once. Returns the texts embedded now."""
        rows: list[dict[str, Any]] = [{"text": t, "image": i} for t, i in self.captions if self.order[i] not in self.unreadable]
        self.text_rows = rows + [{"text": t} for t in extra_texts]
        new_texts = list(dict.fromkeys(r["text"] for r in self.text_rows if r["text"] not in self.txt_emb))
        if new_texts:
            emb = truncate(self.m.embed_texts(new_texts, progress=progress), self.dim)
            _refuse_not_finite(emb, new_texts, "text")
            self.txt_emb.update(zip(new_texts, emb))
        return new_texts

    def rows(self, final: bool) -> tuple[list[dict[str, Any]], Tensor, Tensor]:
        """items.jsonl rows and the image and text matrices, as they stand now. Before
        the end a changed file not yet re-embedded keeps its old row (and old stamp, so
        a run after a kill re-embeds it in place)."""
        items: list[dict[str, Any]] = []
        img_e: list[Tensor] = []
        id_of: dict[str, int] = {}
        for p in self.order:
            r = self.img_rows.get(p)
            if r is None and not final and p not in self.unreadable:
                r = self.old_img.get(p)
            if r is None:
                continue
            id_of[p] = len(img_e)
            stamp: dict[str, Any] = {k: r[0][k] for k in ("size", "mtime_ns") if k in r[0]}
            items.append({"id": len(img_e), "kind": "image", **sf.name_fields(p), **stamp})
            img_e.append(r[1])
        t_e: list[Tensor] = []
        for row in self.text_rows:
            entry = {"id": len(t_e), "kind": "text", "text": row["text"]}
            if row.get("image") is not None:
                img = self.order[row["image"]] if not self.from_folder else None
                entry["image"] = id_of.get(img) if img is not None else None
            items.append(entry)
            t_e.append(self.txt_emb[row["text"]])
        return (
            items,
            torch.stack(img_e) if img_e else torch.zeros(0, self.dim),
            torch.stack(t_e) if t_e else torch.zeros(0, self.dim),
        )

    def save(self, final: bool = False) -> dict[str, Any]:
        """One journaled save (:func:`vlmtune.searchfiles.commit`)."""
        items, img_t, txt_t = self.rows(final)
        m = self.m
        meta = {
            "format": sf.EMBED_FORMAT,
            "checkpoint": str(Path(m.folder).resolve()),
            "fingerprint": m.fingerprint,
            "weights_sha256": m.checkpoint.digests.get("weights.safetensors"),
            "task": m.task_name,
            "dim": self.dim,
            "trained_dims": self.trained,
            "source": self.source,
            "images": len(img_t),
            "texts": len(txt_t),
            "unreadable": [{"path": p, "error": e} for p, e in self.unreadable.items()],
            "complete": final,
        }
        return sf.commit(self.out, {"images": img_t, "texts": txt_t}, items, meta)


def _refuse_not_finite(emb: Tensor, names: list[str], what: str) -> None:
    bad = sf.first_not_finite(emb)
    if bad is not None:
        raise CheckpointError(
            f"{sf.printable(names[bad])}: the checkpoint's embedding of this {what} is not finite (NaN or Inf); "
            f"nothing of it is saved (what was saved before is kept); is the checkpoint broken?"
        )


# --------------------------------------------------------------------------- exact search


def exact_topk(queries: Tensor, gallery: Tensor, k: int, block: int = 1 << 24) -> tuple[Tensor, Tensor]:
    """Top-k gallery rows of each query by dot product, exact, with evaluation's ranking
    rule (higher score first, the lower row on ties): the product is taken in blocks of
    at most ``block`` scores, each block's top-k merged into a running list."""
    from vlmtune.metrics.retrieval import block_topk, merge_topk

    n, m = queries.shape[0], gallery.shape[0]
    k = min(k, m)
    if n == 0 or k == 0:
        return torch.zeros(n, k), torch.zeros(n, k, dtype=torch.long)
    qb = min(n, 256)
    kb = max(4096, block // qb)
    out_s, out_i = [], []
    for q0 in range(0, n, qb):
        q = queries[q0 : q0 + qb].float()
        best_s, best_i = q.new_empty(q.shape[0], 0), torch.empty(q.shape[0], 0, dtype=torch.long)
        for k0 in range(0, m, kb):
            sim = q @ gallery[k0 : k0 + kb].T
            s, i = block_topk(sim, min(k, sim.shape[1]))
            best_s, best_i = (s, i + k0) if k0 == 0 else merge_topk(best_s, best_i, s, i + k0, k)
        out_s.append(best_s)
        out_i.append(best_i)
    return torch.cat(out_s), torch.cat(out_i)


# --------------------------------------------------------------------------- index


INDEX_FILES = ("gallery.safetensors", "items.jsonl", "faiss.index", "index.json")
FAISS_TYPES = {"ivf": "IndexIVFFlat", "hnsw": "IndexHNSWFlat"}
HNSW_M_RANGE, EF_SEARCH_RANGE = sf.HNSW_M_RANGE, sf.EF_SEARCH_RANGE


def _faiss():
    try:
        import faiss
    except ImportError:
        raise VlmtuneError("--faiss: needs the faiss-cpu package (pip install 'vlmtune[faiss]')") from None
    return faiss


def _normalise(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1).contiguous()


def check_faiss_options(
    faiss_kind: str | None, nlist: int | None, nprobe: int | None, hnsw_m: int | None, ef_search: int | None
) -> None:
    """Each FAISS option belongs to one kind and lies in its range (before Faiss sees it)."""
    if faiss_kind not in (None, "ivf", "hnsw"):
        raise VlmtuneError(f"--faiss: expected ivf or hnsw, got '{faiss_kind}'")
    for flag, value, kind in (
        ("--nlist", nlist, "ivf"),
        ("--nprobe", nprobe, "ivf"),
        ("--hnsw-m", hnsw_m, "hnsw"),
        ("--ef-search", ef_search, "hnsw"),
    ):
        if value is None:
            continue
        if faiss_kind != kind:
            raise VlmtuneError(f"{flag}: an option of --faiss {kind}; it would be ignored here")
        if isinstance(value, bool) or not isinstance(value, int):
            raise VlmtuneError(f"{flag}: expected an integer, got {value!r}")
    for flag, value, (low, high) in (
        ("--nlist", nlist, (1, 10**9)),
        ("--nprobe", nprobe, (1, 10**9)),
        ("--hnsw-m", hnsw_m, HNSW_M_RANGE),
        ("--ef-search", ef_search, EF_SEARCH_RANGE),
    ):
        if value is not None and not low <= value <= high:
            raise VlmtuneError(f"{flag}: must be between {low} and {high}, got {value}")
    if nlist is not None and nprobe is not None and nprobe > nlist:
        raise VlmtuneError(f"--nprobe: must be at most --nlist ({nlist}), got {nprobe}")


def _check_index_out(out: Path) -> None:
    """``out`` may receive an index: new, empty (but for vlmtune's own files), or an
    index whose build did not finish (its index.json says so)."""
    if not out.is_dir():
        return
    names = [n for n in os.listdir(out) if not sf.own_name(n)]
    if not names:
        return
    if "index.json" in names and set(names) <= set(INDEX_FILES):
        try:
            if sf.read_json_file(out / "index.json", "an index folder").get("complete") is False:
                return
        except DataError:
            pass
    raise VlmtuneError(f"{out}: exists and is not empty; choose a new folder for the index")


def build_index(
    embed_dir: str | Path,
    out: str | Path,
    *,
    kind: str | None = None,
    faiss_kind: str | None = None,
    nlist: int | None = None,
    nprobe: int | None = None,
    hnsw_m: int | None = None,
    ef_search: int | None = None,
    recall_queries: int = 1000,
    seed: int = 0,
    dim: int | None = None,
) -> dict[str, Any]:
    """``vlmtune index``: the gallery of an embed folder as an exact (and optionally a
    FAISS IVF or HNSW) index in ``out``; with ``dim``, of its embeddings' first ``dim``
    coordinates renormalised (a width the checkpoint trained, at most the folder's).
    Everything is computed before the folder is written; index.json is written first
    marked unfinished and last complete, so a build killed half-way can be run again
    into the same folder."""
    check_faiss_options(faiss_kind, nlist, nprobe, hnsw_m, ef_search)
    if kind not in (None, "images", "texts"):
        raise VlmtuneError(f"--kind: expected images or texts, got '{kind}'")
    embed_dir = Path(embed_dir)
    out = runfolder.output_folder(out, "--out")
    _check_index_out(out)
    meta, tensors, items = read_embed_folder(embed_dir)
    if meta.get("complete") is False:
        log.warning(
            "%s: its embed run did not finish (interrupted?); indexing the %d images and %d texts it saved",
            embed_dir,
            len(tensors["images"]),
            len(tensors["texts"]),
        )
    tensors, trained = _at_width(tensors, meta, dim, embed_dir)
    kind = kind or ("images" if len(tensors["images"]) else "texts")
    gallery = _normalise(tensors[kind])
    if len(gallery) == 0:
        raise DataError(f"{embed_dir}: holds no {kind} to index")
    one = kind[:-1]
    rows = [r for r in items if r["kind"] == one]
    info: dict[str, Any] = {
        "format": INDEX_FORMAT,
        "kind": kind,
        "count": len(gallery),
        "dim": gallery.shape[1],
        "trained_dims": trained,
        "checkpoint": meta.get("checkpoint"),
        "fingerprint": meta.get("fingerprint"),
        "weights_sha256": meta.get("weights_sha256"),
        "embed_dir": str(embed_dir.resolve()),
        "search": faiss_kind or "exact",
    }
    blob = None
    if faiss_kind:
        index, info["faiss"] = _build_faiss(gallery, faiss_kind, nlist, nprobe, hnsw_m, ef_search)
        info |= _faiss_recall(index, gallery, tensors, kind, recall_queries, seed)
        blob = bytes(_faiss().serialize_index(index))
        info["faiss"]["sha256"] = sha256_bytes(blob)
    runfolder.make_folder(out, "--out")
    with runfolder.RunLock(out, what="index folder", flag="--out"):
        runfolder.refuse_links(out, INDEX_FILES)
        _check_index_out(out)
        for name in os.listdir(out):  # what a killed build left under vlmtune's temporary names
            if sf.own_name(name) and name != runfolder.LOCK_NAME and not (out / name).is_dir():
                (out / name).unlink()
        _write_json(out / "index.json", {**info, "complete": False})
        data = _tensor_bytes({"gallery": gallery})
        _write_atomic(out / "gallery.safetensors", lambda p: p.write_bytes(data))
        lines = sf.jsonl_bytes([{**r, "row": r["id"], "id": i} for i, r in enumerate(rows)])
        _write_atomic(out / "items.jsonl", lambda p: p.write_bytes(lines))
        if blob is not None:
            _write_atomic(out / "faiss.index", lambda p: p.write_bytes(blob))
        elif (out / "faiss.index").exists():
            (out / "faiss.index").unlink()  # an unfinished build's, never a user's (see _check_index_out)
        info["complete"] = True
        _write_json(out / "index.json", info)
    return info


def _at_width(
    tensors: dict[str, Tensor], meta: dict[str, Any], dim: int | None, embed_dir: Path
) -> tuple[dict[str, Tensor], list[int]]:
    """An embed folder's matrices at ``dim`` (a width its checkpoint trained, at most the
    folder's; None: as they are), and the trained widths it records."""
    width = int(tensors["images"].shape[1])
    trained = [int(d) for d in meta.get("trained_dims") or [width]]
    if dim is None:
        return tensors, trained
    if dim > width:
        raise VlmtuneError(f"--dim: {embed_dir} holds embeddings of width {width}; an index of it is at most that wide")
    check_dim(dim, trained[-1], trained[:-1], f"the checkpoint of {embed_dir}")
    return {k: truncate(v.float(), dim) for k, v in tensors.items()}, trained


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False).encode("utf-8", "backslashreplace")
    _write_atomic(path, lambda p: p.write_bytes(text))


def _tensor_bytes(tensors: dict[str, Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()})


def _build_faiss(
    gallery: Tensor, faiss_kind: str, nlist: int | None, nprobe: int | None, hnsw_m: int | None, ef_search: int | None
) -> tuple[Any, dict[str, Any]]:
    """The FAISS IVF or HNSW index of the normalised ``gallery``, and its settings for index.json."""
    faiss = _faiss()
    n, d = gallery.shape
    x = gallery.numpy()
    if faiss_kind == "ivf":
        nlist = nlist or max(1, min(int(4 * math.sqrt(n)), n // 39 or 1))
        if not 1 <= nlist <= n:
            raise VlmtuneError(f"--nlist: must lie in 1..{n} (the gallery size), got {nlist}")
        if nprobe is not None and nprobe > nlist:
            raise VlmtuneError(f"--nprobe: must be at most the number of lists ({nlist}), got {nprobe}")
        nprobe = nprobe or min(nlist, max(1, nlist // 8, min(nlist, 16)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.add(x)
        index.nprobe = nprobe
        return index, {"type": "IndexIVFFlat", "nlist": nlist, "nprobe": nprobe}
    hnsw_m = hnsw_m or 32
    ef_search = ef_search or 128
    index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = max(40, 2 * hnsw_m)
    index.add(x)
    index.hnsw.efSearch = ef_search
    return index, {
        "type": "IndexHNSWFlat",
        "M": hnsw_m,
        "efConstruction": index.hnsw.efConstruction,
        "efSearch": ef_search,
    }


def _faiss_search(index: Any, q: Tensor, k: int) -> tuple[Any, Any]:
    """FAISS's top k; an HNSW index searches at least k wide (efSearch below k would
    return fewer than k rows)."""
    hnsw = getattr(index, "hnsw", None)
    if hnsw is None:
        return index.search(q.numpy(), k)
    ef = hnsw.efSearch
    hnsw.efSearch = max(ef, k)
    try:
        return index.search(q.numpy(), k)
    finally:
        hnsw.efSearch = ef


def _faiss_recall(
    index: Any, gallery: Tensor, tensors: dict[str, Tensor], kind: str, recall_queries: int, seed: int
) -> dict[str, Any]:
    """Recall@10 of the approximate ``index`` against exact search, on queries of the other
    kind where the folder has them (the realistic case), else on gallery rows themselves."""
    other = tensors.get("texts" if kind == "images" else "images")
    pool = _normalise(other) if other is not None and len(other) else gallery
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(pool), generator=g)[:recall_queries]
    q = pool[pick]
    kk = min(10, len(gallery))
    _, exact = exact_topk(q, gallery, kk)
    _, approx = _faiss_search(index, q, kk)
    hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact))
    return {
        "recall_at_10": 100.0 * hits / (len(q) * kk),
        "recall_queries": {
            "count": len(q),
            "from": "texts"
            if pool is not gallery and kind == "images"
            else "images"
            if pool is not gallery
            else f"gallery {kind}",
        },
    }


class Index:
    """An index folder opened for search; every file checked as input (index.json's
    fields, the gallery's shape, finite unit rows, the items' ids and kinds, the FAISS
    file's sha256 before Faiss reads it)."""

    def __init__(self, folder: str | Path):
        self.folder = folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise DataError(f"{folder}: is a file, not an index folder (run vlmtune index to make one)")
        if not folder.exists():
            raise DataError(f"{folder}: folder not found")
        if not (folder / "index.json").exists() and (folder / sf.META).exists():
            raise DataError(f"{folder}: is an embed folder, not an index (make one with vlmtune index {folder} --out INDEX)")
        self.info = info = sf.read_json_file(folder / "index.json", "an index folder (run vlmtune index first)")
        where = folder / "index.json"
        if info.get("format") != INDEX_FORMAT:
            raise DataError(f"{where}: index format {info.get('format')!r} is not {INDEX_FORMAT}")
        if info.get("complete", True) is not True:
            raise DataError(f"{where}: the index was not finished (the build was interrupted); run vlmtune index again")
        if info.get("kind") not in ("images", "texts"):
            raise DataError(f'{where}: \'kind\' must be "images" or "texts", got {info.get("kind")!r}')
        for key in ("count", "dim"):
            v = info.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise DataError(f"{where}: '{key}' must be a positive integer, got {v!r}")
        for key in ("checkpoint", "fingerprint"):
            if info.get(key) is not None and not isinstance(info[key], str):
                raise DataError(f"{where}: '{key}' must be text, got {type(info[key]).__name__}")
        if info.get("search", "exact") not in ("exact", "ivf", "hnsw"):
            raise DataError(f"{where}: 'search' must be exact, ivf or hnsw, got {info.get('search')!r}")
        self.kind: str = info["kind"]
        g_path = folder / "gallery.safetensors"
        try:
            g_bytes = sf.read_bytes(g_path)
        except FileNotFoundError:
            raise DataError(f"{g_path}: missing") from None
        self.gallery = sf.check_matrix(sf.load_tensor_bytes(g_bytes, g_path), "gallery", g_path)
        if tuple(self.gallery.shape) != (info["count"], info["dim"]):
            raise DataError(
                f"{g_path}: 'gallery' is {list(self.gallery.shape)}, but index.json says {info['count']} rows of "
                f"width {info['dim']}"
            )
        items_path = folder / "items.jsonl"
        try:
            raw = sf.read_bytes(items_path)
        except FileNotFoundError:
            raise DataError(f"{items_path}: missing") from None
        self.items = sf.check_rows(items_path, sf.read_jsonl_bytes(raw, items_path))
        if len(self.items) != len(self.gallery):
            raise DataError(f"{folder}: items.jsonl has {len(self.items)} rows, gallery.safetensors {len(self.gallery)}")
        for i, r in enumerate(self.items):
            if r["id"] != i or r["kind"] != self.kind[:-1]:
                raise DataError(
                    f"{items_path}: row {i + 1} must have 'id' {i} and 'kind' \"{self.kind[:-1]}\", got "
                    f"{r['id']!r} and {r['kind']!r}"
                )
        bad = sf.first_not_finite(self.gallery)
        if bad is not None:
            raise DataError(f"{g_path}: row {bad} ({sf.item_label(self.items[bad])}) is not finite (NaN or Inf)")
        norms = self.gallery.norm(dim=1)
        off = int((norms - 1).abs().argmax())
        if abs(float(norms[off]) - 1) > 1e-3:
            raise DataError(f"{g_path}: row {off} has length {float(norms[off]):.4g}, not 1 (not written by vlmtune index)")
        self._faiss = None
        if info.get("search") in ("ivf", "hnsw"):
            self._faiss = self._read_faiss()

    def _read_faiss(self) -> Any:
        where, path = self.folder / "index.json", self.folder / "faiss.index"
        settings = self.info.get("faiss")
        want = FAISS_TYPES[self.info["search"]]
        if not isinstance(settings, dict) or not isinstance(settings.get("sha256"), str):
            raise DataError(
                f"{where}: 'faiss.sha256' is missing (an index of an earlier vlmtune, or edited); faiss.index is "
                f"never read unchecked: build the index again with vlmtune index"
            )
        if settings.get("type") != want:
            raise DataError(
                f"{where}: 'faiss.type' must be {want} for search {self.info['search']}, got {settings.get('type')!r}"
            )
        try:
            blob = sf.read_bytes(path)
        except FileNotFoundError:
            raise DataError(f"{path}: missing") from None
        if sha256_bytes(blob) != settings["sha256"]:
            raise DataError(f"{path}: does not match its sha256 in index.json (changed outside vlmtune); build the index again")
        faiss = _faiss()
        import numpy as np

        try:
            index = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
        except (RuntimeError, MemoryError, ValueError) as e:
            raise DataError(f"{path}: Faiss cannot read it ({sf.printable(str(e).splitlines()[0][:200])})") from None
        if type(index).__name__ != want or index.ntotal != self.info["count"] or index.d != self.info["dim"]:
            raise DataError(
                f"{path}: a {type(index).__name__} of {index.ntotal} rows of width {index.d}, not the {want} of "
                f"{self.info['count']} x {self.info['dim']} that index.json records"
            )
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise DataError(f"{path}: does not rank by inner product (metric {index.metric_type})")
        return index

    def __len__(self) -> int:
        return len(self.gallery)

    def topk(self, queries: Tensor, k: int, exact: bool | None = None) -> tuple[Tensor, Tensor]:
        """(scores [Q, k], rows [Q, k]) of the normalised ``queries``; FAISS when the
        index has one (unless ``exact``), else exact."""
        queries = _normalise(queries)
        if self._faiss is not None and not exact:
            s, i = _faiss_search(self._faiss, queries, min(k, len(self)))
            return torch.from_numpy(s), torch.from_numpy(i).long()
        return exact_topk(queries, self.gallery, k)


def open_query_model(index: Index, checkpoint: str | Path | None = None) -> Model:
    """The model that made the index (or ``checkpoint``), refused unless its fingerprint
    is the one the index records."""
    from vlmtune.api import load

    path = checkpoint or index.info.get("checkpoint")
    if not path:
        raise CheckpointError(f"{index.folder / 'index.json'}: records no checkpoint; pass --checkpoint")
    model = load(path)
    if model.fingerprint != index.info.get("fingerprint"):
        raise CheckpointError(
            f"{path}: is not the model that built {index.folder} (made by "
            f"{index.info.get('checkpoint')}); {what_differs(model, index.info)}; "
            f"its embeddings would not be comparable"
        )
    return model


def what_differs(model: Model, info: dict[str, Any]) -> str:
    """ "differs in: ..." for a query model whose fingerprint is not the one ``info`` (an
    index.json) records: the parts of both fingerprints compared where the checkpoint
    that built it can still be read as it was; else the weights' digest it records."""
    from vlmtune.checkpoint import open_checkpoint
    from vlmtune.fingerprint import PART_LABELS, checkpoint_fingerprint, fingerprint_parts, parts_differ

    mine = fingerprint_parts(model.checkpoint)
    recorded = info.get("checkpoint")
    built = None
    if isinstance(recorded, str) and recorded:
        try:
            ckpt = open_checkpoint(recorded)
            if checkpoint_fingerprint(ckpt) == info.get("fingerprint"):  # not changed since it built the index
                built = fingerprint_parts(ckpt)
        except (VlmtuneError, OSError, ValueError):
            built = None
    if built is not None:
        diffs = parts_differ(mine, built)
    elif isinstance(info.get("weights_sha256"), str) and info["weights_sha256"] != mine["weights"]:
        diffs = [PART_LABELS["weights"]]
    else:
        diffs = []
    if diffs:
        return "differs in: " + ", ".join(diffs)
    return (
        f"which part differs cannot be said: the checkpoint that built it ({recorded}) is gone or changed since, "
        f"and the weights' digest the index records is this model's"
    )


def read_queries(path: Path) -> list[dict[str, Any]]:
    """Queries of --queries FILE: text lines, or JSONL objects {"text": ...} or
    {"image": path relative to the file's folder} (an "id" is passed through)."""
    if path.suffix.lower() != ".jsonl":
        return [{"text": t} for t in read_texts(path)]
    out = []
    for n, row in enumerate(_read_jsonl(path), 1):
        text, image = row.get("text"), row.get("image")
        if (text is None) == (image is None):
            raise DataError(f"{path}: query {n}: needs exactly one of 'text' or 'image'")
        if text is not None and (not isinstance(text, str) or not text.strip()):
            raise DataError(f"{path}: query {n}: 'text' must be a non-empty string")
        if image is not None:
            if not isinstance(image, str) or not image.strip() or "\x00" in image:
                raise DataError(f"{path}: query {n}: 'image' must be a path string")
            row = {**row, "image": str(path.parent / image)}
        out.append(row)
    if not out:
        raise DataError(f"{path}: holds no query")
    return out


def search(
    index: Index,
    model: Model,
    queries: list[dict[str, Any]],
    k: int = 10,
    rerank: bool = False,
    rerank_k: int | None = None,
    dim: int | None = None,
) -> list[dict[str, Any]]:
    """Ranked results of each query ({"text": ...} or {"image": path}): a list of
    {"query", "results": [{"rank", "score", "id", "path" | "text", ("match")}]}
    (an image whose name is not UTF-8 also carries "path_bytes"). ``k`` and
    ``rerank_k`` are at least 1; ``rerank_k`` only with ``rerank``. Queries are
    embedded at the index's width; ``dim``, when given, must be it."""
    for flag, v in (("-k", k), ("--rerank-k", rerank_k)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise VlmtuneError(f"{flag}: must be an integer of at least 1, got {v!r}")
    if rerank_k is not None and not rerank:
        raise VlmtuneError("--rerank-k: only with --rerank (it sets how many candidates the matching head re-scores)")
    width = int(index.gallery.shape[1])
    if dim is not None and dim != width:
        raise VlmtuneError(
            f"--dim: the index {index.folder} holds embeddings of width {width}, not {dim}; "
            f"search it at width {width} (omit --dim) or build an index with vlmtune index --dim {dim}"
        )
    trained = model_widths(model)
    check_dim(width, trained[-1], trained[:-1], f"the checkpoint {model.folder}")
    if rerank and width != trained[-1]:
        raise VlmtuneError(
            f"--rerank: the matching head reads full-width embeddings ({trained[-1]}); the index {index.folder} is {width} wide"
        )
    texts = [i for i, q in enumerate(queries) if "text" in q]
    imgs = [i for i, q in enumerate(queries) if "image" in q]
    emb = torch.zeros(len(queries), index.gallery.shape[1])
    if texts:
        emb[texts] = _query_embeddings(truncate(model.embed_texts([queries[i]["text"] for i in texts]), width), index)
    if imgs:
        emb[imgs] = _query_embeddings(truncate(model.embed_images([Path(queries[i]["image"]) for i in imgs]), width), index)
    bad = sf.first_not_finite(emb)
    if bad is not None:
        q = queries[bad]
        shown = sf.printable(str(q.get("text", q.get("image"))))[:120]
        raise CheckpointError(f"query {bad + 1} ({shown}): the checkpoint's embedding is not finite (NaN or Inf)")
    r = (rerank_k or k) if rerank else 0
    scores, rows = index.topk(emb, max(k, r))
    match = None
    if rerank:
        scores, rows, match = _rerank(index, model, queries, emb, scores, rows, r)
    out = []
    for qi, q in enumerate(queries):
        res = []
        for rank, (s, row) in enumerate(zip(scores[qi].tolist(), rows[qi].tolist())):
            if row < 0 or rank >= k:  # FAISS pads with -1 when it finds fewer than k
                break
            item = index.items[row]
            entry = {"rank": rank + 1, "score": _finite(s, "score", qi), "id": item["id"]}
            entry.update({key: item[key] for key in ("path", "path_bytes", "text", "image") if key in item})
            if match is not None:
                entry["match"] = _finite(float(match[qi][rank]), "matching head's score", qi)
            res.append(entry)
        out.append({"query": q, "results": res})
    return out


def _query_embeddings(emb: Tensor, index: Index) -> Tensor:
    if emb.ndim != 2 or emb.shape[1] != index.gallery.shape[1]:
        raise CheckpointError(
            f"{index.folder}: holds {index.gallery.shape[1]}-wide embeddings, but the checkpoint gives "
            f"{list(emb.shape)[1:]}; search it with the checkpoint that built it"
        )
    return emb


def _finite(v: float, what: str, qi: int) -> float:
    if not math.isfinite(v):
        raise CheckpointError(f"query {qi + 1}: the {what} is not finite ({v}); is the checkpoint broken?")
    return round(float(v), 6)


def _rerank(
    index: Index, model: Model, queries: list[dict[str, Any]], emb: Tensor, scores: Tensor, rows: Tensor, r: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Re-order each query's first ``r`` candidates by the matching head's score,
    stably (equal scores keep the contrastive order), the rest following in contrastive
    order: evaluation's re-rank (``metrics.retrieval._rerank_head``). Returns scores,
    rows and match scores in the new order."""
    model._require("similarity")
    gallery_images = index.kind == "images"
    for q in queries:
        if ("image" in q) == gallery_images:
            raise VlmtuneError(
                f"--rerank: the matching head scores image-text pairs; a {'image' if 'image' in q else 'text'} "
                f"query against a gallery of {index.kind} has none"
            )
    r = min(r, rows.shape[1])  # a gallery smaller than the list asked for
    valid = rows.clamp_min(0)
    qidx = torch.arange(len(rows)).unsqueeze(1).expand_as(valid).reshape(-1)
    flat = valid.reshape(-1)
    # Queries are the texts (a gallery of images) or the images (a gallery of texts).
    match = (
        model.match_scores(index.gallery[flat], emb[qidx])
        if gallery_images
        else model.match_scores(emb[qidx], index.gallery[flat])
    ).view(rows.shape)
    match = torch.where(rows < 0, torch.full_like(match, -math.inf), match)
    head = match[:, :r].argsort(dim=1, descending=True, stable=True)
    order = torch.cat([head, torch.arange(r, rows.shape[1]).expand(len(rows), -1)], dim=1)
    return scores.gather(1, order), rows.gather(1, order), match.gather(1, order)


def model_widths(model: Model) -> list[int]:
    """The widths a retrieval checkpoint trained, ascending (the full one last)."""
    section = model.cfg.section("model")
    return trained_dims(int(section.embed_dim), list(getattr(section, "mrl_dims", []) or []))


def format_table(result: dict[str, Any]) -> str:
    """A ranked table of one query's results, each path or text escaped for the
    terminal (:func:`vlmtune.searchfiles.printable`)."""
    rows = result["results"]
    has_match = any("match" in r for r in rows)
    head = "rank  score     " + ("match     " if has_match else "") + "item"
    lines = [head]
    for r in rows:
        item = sf.printable(sf.item_path(r)) if "path" in r else sf.printable(str(r.get("text", "")))
        lines.append(f"{r['rank']:>4}  {r['score']:<8.4f}  " + (f"{r['match']:<8.4f}  " if has_match else "") + item)
    return "\n".join(lines)
