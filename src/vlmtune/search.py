"""Embed a folder or a data set, index the embeddings, search them.

``vlmtune embed CKPT (--images DIR | --data FILE) [--texts FILE] --out DIR`` writes
  embeddings.safetensors  ``images`` [N, D] and ``texts`` [M, D], float32, L2-normalised
  items.jsonl             one line per row: {"id", "kind": "image"|"text", "path" | "text", ...}
                          (images also carry "size" and "mtime_ns"; a data set's captions "image",
                          the id of their image)
  embed.json              the checkpoint (path and fingerprint), the source, counts, unreadable files
A second run into the same folder embeds only what is new: images are keyed by path,
size and modification time (a changed file is re-embedded in its row, a new one is
appended, one no longer in the folder is removed, and each is counted in the summary),
captions by their text. Progress is saved every ``FLUSH_EVERY`` images, so an
interrupted run loses at most that much.

``vlmtune index EMBED_DIR --out INDEX_DIR [--faiss ivf|hnsw]`` writes
  gallery.safetensors     ``gallery`` [N, D], the normalised matrix (exact search reads it)
  items.jsonl             the gallery's rows, as in the embed folder
  index.json              kind, size, the checkpoint's path and fingerprint, search settings and,
                          with --faiss, the recall@10 of the approximate index against exact search
  faiss.index             with --faiss only

``vlmtune search INDEX (--text T | --image P | --queries FILE)`` embeds the query with
the checkpoint the index records (refusing one whose fingerprint differs), ranks the
gallery by cosine (exact: blocks of the matrix product with a running top-k, the
ranking rule of evaluation: higher score first, the lower row on ties) and prints a
table or JSON; ``--rerank`` re-scores the top candidates with the matching head and
re-orders them, as evaluation's ``eval.rerank_k`` does.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vlmtune import runfolder
from vlmtune.errors import CheckpointError, DataError, VlmtuneError
from vlmtune.tasks.retrieval.matryoshka import check_dim, trained_dims, truncate
from vlmtune.utils import jsonl_objects

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
EMBED_FORMAT = 1
INDEX_FORMAT = 1


# --------------------------------------------------------------------------- files


def _write_atomic(path: Path, write: Any) -> None:
    """Write through runfolder's one write path (exclusive temp file, no link, umask)."""
    runfolder.write_atomic(path, write)


def _save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    from safetensors.torch import save_file

    _write_atomic(path, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, str(p)))


def _load_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    _write_atomic(path, lambda p: p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"))


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path.parent}: not {what} ({path.name} is missing)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({str(e)[:200]})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return data


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: missing") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a file") from None
    rows.extend(row for _, row in jsonl_objects(lines, path))
    return rows


# --------------------------------------------------------------------------- embed


def read_embed_folder(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor], list[dict[str, Any]]]:
    """embed.json, the tensors and the items of an embed folder, checked against each
    other: both tensors [rows, D] of one D, and the items of each kind numbered
    0..rows-1 in order."""
    meta = _read_json(folder / "embed.json", "an embed folder (run vlmtune embed first)")
    tensors = _load_tensors(folder / "embeddings.safetensors")
    items = _read_jsonl(folder / "items.jsonl")
    where = folder / "embeddings.safetensors"
    dims = set()
    for name in ("images", "texts"):
        t = tensors.get(name)
        if t is None or t.ndim != 2 or not t.dtype.is_floating_point:
            raise DataError(f"{where}: needs a 2-D float tensor '{name}'")
        dims.add(t.shape[1])
    if len(dims) != 1:
        raise DataError(f"{where}: 'images' and 'texts' have different widths {sorted(dims)}")
    for kind, name, field in (("image", "images", "path"), ("text", "texts", "text")):
        rows = [r for r in items if r.get("kind") == kind]
        if [r.get("id") for r in rows] != list(range(len(tensors[name]))) or not all(isinstance(r.get(field), str) for r in rows):
            raise DataError(
                f"{folder / 'items.jsonl'}: its {kind} lines do not number the {len(tensors[name])} rows of "
                f"'{name}' in order (id 0, 1, ..., each with a '{field}')"
            )
    return meta, {k: tensors[k] for k in ("images", "texts")}, items


def _new_folder(out: Path, what: str) -> None:
    if out.exists() and not out.is_dir():
        raise VlmtuneError(f"{out}: is a file, not a folder for {what}")


def image_files(root: Path) -> list[Path]:
    """Every file under ``root`` (recursively, symlinked folders not followed) whose
    extension is an image's, sorted by path."""
    out = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            p = Path(folder) / name
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
                out.append(p)
    return sorted(out)


def read_texts(path: Path) -> list[str]:
    """Captions to embed: one per line of a text file (blank lines skipped), or for
    ``.jsonl`` one JSON string or {"text": ...} object per line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a file") from None
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
    first ``dim`` coordinates, renormalised. None: the full width."""
    from vlmtune.api import load

    if (images is None) == (data is None):
        raise VlmtuneError("embed: give exactly one of --images DIR or --data FILE")
    out = Path(out)
    if images is not None and not Path(images).is_dir():
        raise DataError(f"{images}: folder not found")
    if data is not None and not Path(data).exists() and not ("{" in Path(data).name and "}" in Path(data).name):
        raise DataError(f"{data}: annotation file not found")  # (a brace pattern names webdataset shards)
    _new_folder(out, "embeddings")
    extra_texts = read_texts(Path(texts)) if texts is not None else []
    m = model or load(checkpoint)
    m._require("embed_images")
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
    job.plan(images, data)
    job.embed_images(progress)
    n_images = sum(r is not None for r in job.img_rows.values())
    if n_images == 0:
        raise DataError(
            f"{images or data}: none of the {len(job.order)} image files could be read "
            f"(first: {next(iter(job.unreadable.items()), ('', ''))[1]})"
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
        if not (out / "embed.json").is_file():
            if out.exists() and any(out.iterdir()):
                raise VlmtuneError(f"{out}: exists and is not an embed folder (no embed.json); choose an empty or new folder")
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
            raise DataError(f"{out}: holds embeddings of {meta.get('source')}, not of this source; choose another --out")
        for row in old_items:
            if row.get("kind") == "image":
                self.old_img[row["path"]] = (row, tensors["images"][row["id"]])
            elif row.get("kind") == "text":
                self.txt_emb.setdefault(row["text"], tensors["texts"][row["id"]])

    def plan(self, images: str | Path | None, data: str | Path | None) -> None:
        """The images wanted, in order (kept rows first, as they were, then new files), and
        which of them need embedding (new, or changed in size or mtime)."""
        if images is not None:
            files = image_files(Path(images))
            if not files:
                raise DataError(f"{images}: holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            wanted = [str(p.resolve()) for p in files]
            present = set(wanted)
            self.order = [p for p in self.old_img if p in present] + [p for p in wanted if p not in self.old_img]
        else:
            records = self.m.task.read_split(str(data))
            by_id: dict[int, Path] = {}
            for r in records:
                by_id.setdefault(r.image_id, r.image)
            self.order = [str(Path(by_id[i]).resolve()) for i in sorted(by_id)]
            self.captions = [(r.text, r.image_id) for r in records]
        self.removed = [p for p in self.old_img if p not in set(self.order)]
        for p in self.order:
            try:
                size, mtime = _stamp(Path(p))
            except OSError as e:  # gone or unreadable since the folder was listed
                self.unreadable[p] = f"{p}: cannot read ({e.strerror or e})"
                log.warning("skipped %s", self.unreadable[p])
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
        from tqdm.auto import tqdm

        from vlmtune.data.formats import load_image

        bar = tqdm(total=len(self.todo), desc="embed images", unit="img", disable=not progress)
        since_save = 0
        for s in range(0, len(self.todo), self.m.batch_size):
            batch = self.todo[s : s + self.m.batch_size]
            loaded = []
            for p, size, mtime in batch:
                try:
                    loaded.append((p, size, mtime, load_image(Path(p))))
                except DataError as e:
                    self.unreadable[p] = str(e)
                    log.warning("skipped %s", e)
            if loaded:
                emb = truncate(self.m.embed_images([x[3] for x in loaded]), self.dim)
                for (p, size, mtime, _), vec in zip(loaded, emb):
                    self.img_rows[p] = ({"id": -1, "kind": "image", "path": p, "size": size, "mtime_ns": mtime}, vec)
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
            self.txt_emb.update(zip(new_texts, truncate(self.m.embed_texts(new_texts, progress=progress), self.dim)))
        return new_texts

    def rows(self) -> tuple[list[dict[str, Any]], Tensor, Tensor]:
        """items.jsonl rows and the image and text matrices, as they stand now."""
        items: list[dict[str, Any]] = []
        img_e: list[Tensor] = []
        id_of: dict[str, int] = {}
        for p in self.order:
            r = self.img_rows.get(p)
            if r is None:
                continue
            id_of[p] = len(img_e)
            items.append({**r[0], "id": len(img_e)})
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
        items, img_t, txt_t = self.rows()
        out, m = self.out, self.m
        out.mkdir(parents=True, exist_ok=True)
        _save_tensors(out / "embeddings.safetensors", {"images": img_t, "texts": txt_t})
        _write_jsonl(out / "items.jsonl", items)
        meta = {
            "format": EMBED_FORMAT,
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
        _write_atomic(out / "embed.json", lambda f: f.write_text(json.dumps(meta, indent=2), encoding="utf-8"))
        return meta


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


def _faiss():
    try:
        import faiss
    except ImportError:
        raise VlmtuneError("--faiss: needs the faiss-cpu package (pip install 'vlmtune[faiss]')") from None
    return faiss


def _normalise(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1).contiguous()


def build_index(
    embed_dir: str | Path,
    out: str | Path,
    *,
    kind: str | None = None,
    faiss_kind: str | None = None,
    nlist: int | None = None,
    nprobe: int | None = None,
    hnsw_m: int = 32,
    ef_search: int = 128,
    recall_queries: int = 1000,
    seed: int = 0,
    dim: int | None = None,
) -> dict[str, Any]:
    """``vlmtune index``: the gallery of an embed folder as an exact (and optionally a
    FAISS IVF or HNSW) index in ``out``; with ``dim``, of its embeddings' first ``dim``
    coordinates renormalised (a width the checkpoint trained, at most the folder's)."""
    embed_dir, out = Path(embed_dir), Path(out)
    meta, tensors, items = read_embed_folder(embed_dir)
    width = int(tensors["images"].shape[1])
    trained = [int(d) for d in meta.get("trained_dims") or [width]]
    if dim is not None:
        if dim > width:
            raise VlmtuneError(f"--dim: {embed_dir} holds embeddings of width {width}; an index of it is at most that wide")
        check_dim(dim, trained[-1], trained[:-1], f"the checkpoint of {embed_dir}")
        tensors = {k: truncate(v.float(), dim) for k, v in tensors.items()}
    kind = kind or ("images" if len(tensors.get("images", [])) else "texts")
    if kind not in ("images", "texts"):
        raise VlmtuneError(f"--kind: expected images or texts, got '{kind}'")
    gallery = _normalise(tensors[kind])
    if len(gallery) == 0:
        raise DataError(f"{embed_dir}: holds no {kind} to index")
    if faiss_kind not in (None, "ivf", "hnsw"):
        raise VlmtuneError(f"--faiss: expected ivf or hnsw, got '{faiss_kind}'")
    _new_folder(out, "the index")
    if out.exists() and any(out.iterdir()):
        raise VlmtuneError(f"{out}: exists and is not empty; choose a new folder for the index")
    one = kind[:-1]
    rows = [r for r in items if r.get("kind") == one]
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
    index = None
    if faiss_kind:
        index, info["faiss"] = _build_faiss(gallery, faiss_kind, nlist, nprobe, hnsw_m, ef_search)
        info |= _faiss_recall(index, gallery, tensors, kind, recall_queries, seed)
    out.mkdir(parents=True, exist_ok=True)
    _save_tensors(out / "gallery.safetensors", {"gallery": gallery})
    _write_jsonl(out / "items.jsonl", [{**r, "row": r["id"], "id": i} for i, r in enumerate(rows)])
    if index is not None:
        faiss = _faiss()
        _write_atomic(out / "faiss.index", lambda p: faiss.write_index(index, str(p)))
    _write_atomic(out / "index.json", lambda p: p.write_text(json.dumps(info, indent=2), encoding="utf-8"))
    return info


def _build_faiss(
    gallery: Tensor, faiss_kind: str, nlist: int | None, nprobe: int | None, hnsw_m: int, ef_search: int
) -> tuple[Any, dict[str, Any]]:
    """The FAISS IVF or HNSW index of the normalised ``gallery``, and its settings for index.json."""
    faiss = _faiss()
    n, d = gallery.shape
    x = gallery.numpy()
    if faiss_kind == "ivf":
        nlist = nlist or max(1, min(int(4 * math.sqrt(n)), n // 39 or 1))
        if not 1 <= nlist <= n:
            raise VlmtuneError(f"--nlist: must lie in 1..{n} (the gallery size), got {nlist}")
        nprobe = min(nlist, nprobe or max(1, nlist // 8, min(nlist, 16)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.add(x)
        index.nprobe = nprobe
        return index, {"type": "IndexIVFFlat", "nlist": nlist, "nprobe": nprobe}
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
    _, approx = index.search(q.numpy(), kk)
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
    """An index folder opened for search."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.info = _read_json(self.folder / "index.json", "an index folder (run vlmtune index first)")
        if self.info.get("format") != INDEX_FORMAT:
            raise DataError(f"{self.folder / 'index.json'}: index format {self.info.get('format')} is not {INDEX_FORMAT}")
        self.gallery = _load_tensors(self.folder / "gallery.safetensors")["gallery"]
        self.items = _read_jsonl(self.folder / "items.jsonl")
        if len(self.items) != len(self.gallery):
            raise DataError(f"{self.folder}: items.jsonl has {len(self.items)} rows, gallery.safetensors {len(self.gallery)}")
        self.kind: str = self.info["kind"]
        self._faiss = None
        if self.info.get("search") in ("ivf", "hnsw"):
            faiss = _faiss()
            self._faiss = faiss.read_index(str(self.folder / "faiss.index"))

    def __len__(self) -> int:
        return len(self.gallery)

    def topk(self, queries: Tensor, k: int, exact: bool | None = None) -> tuple[Tensor, Tensor]:
        """(scores [Q, k], rows [Q, k]) of the normalised ``queries``; FAISS when the
        index has one (unless ``exact``), else exact."""
        queries = _normalise(queries)
        if self._faiss is not None and not exact:
            s, i = self._faiss.search(queries.numpy(), min(k, len(self)))
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
            f"{index.info.get('checkpoint')}); its embeddings would not be comparable"
        )
    return model


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
            if not isinstance(image, str):
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
    {"query", "results": [{"rank", "score", "id", "path" | "text", ("match")}]}.
    Queries are embedded at the index's width; ``dim``, when given, must be it."""
    if k < 1:
        raise VlmtuneError(f"-k: must be at least 1, got {k}")
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
        emb[texts] = truncate(model.embed_texts([queries[i]["text"] for i in texts]), width)
    if imgs:
        emb[imgs] = truncate(model.embed_images([Path(queries[i]["image"]) for i in imgs]), width)
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
            entry = {"rank": rank + 1, "score": round(float(s), 6), "id": item["id"]}
            entry.update({key: item[key] for key in ("path", "text", "image") if key in item})
            if match is not None:
                entry["match"] = round(float(match[qi][rank]), 6)
            res.append(entry)
        out.append({"query": q, "results": res})
    return out


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
    """A ranked table of one query's results."""
    rows = result["results"]
    has_match = any("match" in r for r in rows)
    head = "rank  score     " + ("match     " if has_match else "") + "item"
    lines = [head]
    for r in rows:
        item = r.get("path", r.get("text", ""))
        lines.append(f"{r['rank']:>4}  {r['score']:<8.4f}  " + (f"{r['match']:<8.4f}  " if has_match else "") + str(item))
    return "\n".join(lines)
