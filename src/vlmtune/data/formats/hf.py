"""``hf``: Hugging Face ``datasets`` layouts, read as they ship: a ``save_to_disk`` folder
(a ``Dataset`` or a ``DatasetDict`` of splits), a parquet file, or an imagefolder with
``metadata.jsonl`` / ``metadata.csv`` (in the folder or in one folder per split); one
record per row, for pairs (``captions``/``sentences`` lists; negative columns ``negatives`` /
``negative`` / ``negative_captions`` / ``hard_negatives`` and ``negative_images`` /
``negative_image``) or counting (a count column).

``datasets`` and ``pyarrow`` are the ``hf`` extra, imported when such a layout is read.
"""

from __future__ import annotations

import csv
import io
import json
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.data.formats.csv_counts import count_row
from vlmtune.data.formats.fields import SPLITS, Bad, read_text
from vlmtune.data.formats.pairs import PAIR_FIELDS
from vlmtune.data.formats.records import Item, Kind
from vlmtune.data.formats.registry import Format, Probe, unread_fields

if TYPE_CHECKING:
    from vlmtune.data.formats.checker import Checker

_NEEDS_HF = "reading a Hugging Face datasets layout needs the 'hf' extra: pip install 'vlmtune[hf]'"

# The file names that make a folder (or a file) a datasets layout.
_LAYOUT_FILES = ("dataset_info.json", "state.json", "dataset_dict.json", "metadata.jsonl", "metadata.csv")
_METADATA = ("metadata.jsonl", "metadata.csv")


def read_hf_pairs(ck: Checker, path: Path, data: Any) -> list[Item]:
    return [Item(label, partial(_hf_pair, rec)) for label, rec in hf_rows(ck, path)]


def read_hf_counting(ck: Checker, path: Path, data: Any) -> list[Item]:
    return [Item(label, partial(count_row, rec, "hf")) for label, rec in hf_rows(ck, path)]


def is_hf_folder(path: Path) -> bool:
    """Whether ``path`` is a folder in a ``datasets`` layout (saved, or an imagefolder)."""
    return (
        path.is_dir()
        and any((path / n).is_file() for n in _LAYOUT_FILES)
        or (path.is_dir() and any((path / s / "metadata.jsonl").is_file() for s in ("train", "validation", "val", "test")))
    )


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise Bad(_NEEDS_HF) from None
    return datasets


def hf_rows(ck: Checker, path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a ``datasets`` layout as dicts, labelled ``record N`` (``SPLIT record N``
    where the layout has several splits); image paths relative to the image root."""
    if (
        path.is_dir()
        and not (path / "dataset_info.json").is_file()
        and not (path / "dataset_dict.json").is_file()
        and not (path / "state.json").is_file()
    ):
        return _imagefolder_rows(ck, path)
    if path.name.lower() in _METADATA:
        return _metadata_rows(ck, path, "")
    ds_mod = _datasets()
    if not path.is_dir():
        # A parquet file is read straight through pyarrow (datasets' own engine), so
        # nothing is written to a cache: read-only data and no side effects.
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise Bad(_NEEDS_HF) from None

        try:
            table = pq.read_table(str(path))
        except Exception as e:  # pyarrow raises several kinds for a bad file
            raise Bad(f"cannot read as parquet: {type(e).__name__}: {e}") from None
        return [(f"record {i}", _hf_image(rec)) for i, rec in enumerate(table.to_pylist())]
    _check_saved_files(path)  # before datasets opens any file the folder's JSON names
    try:
        loaded = ds_mod.load_from_disk(str(path))  # memory-maps the arrow files; writes nothing
    except Exception as e:  # datasets raises many kinds for a bad folder
        raise Bad(f"cannot load with datasets: {type(e).__name__}: {e}") from None
    parts = dict(loaded) if isinstance(loaded, ds_mod.DatasetDict) else {"": loaded}
    rows = []
    for split, ds in parts.items():
        if split and not _split_wanted(ck, split, len(ds)):
            continue
        for col, feat in ds.features.items():
            if type(feat).__name__ == "Image":  # the files themselves, not decoded pixels
                ds = ds.cast_column(col, ds_mod.Image(decode=False))
            elif type(getattr(feat, "feature", None)).__name__ == "Image":  # a list of images (negative_images)
                ds = ds.cast_column(col, type(feat)(ds_mod.Image(decode=False)))
            elif isinstance(feat, list) and len(feat) == 1 and type(feat[0]).__name__ == "Image":
                ds = ds.cast_column(col, [ds_mod.Image(decode=False)])
        prefix = f"{split} " if split else ""
        rows += [(f"{prefix}record {i}", _hf_image(rec)) for i, rec in enumerate(ds)]
    return rows


def _check_saved_files(folder: Path) -> None:
    """A ``save_to_disk`` folder reads only its own files: every split that
    ``dataset_dict.json`` names and every arrow file a ``state.json`` lists must stay
    inside the folder (no ``..``, no absolute path, no link out of it); datasets itself
    would open ``../other/*.arrow`` wherever it leads."""
    base = folder.resolve()

    def inside(name: Any, where: Path, what: str) -> Path:
        if not isinstance(name, str) or not name.strip() or "\x00" in name:
            raise Bad(f"{where.relative_to(folder)}: {what} {json.dumps(name)[:80]} is not a file name")
        target = (where.parent / name).resolve()
        if not target.is_relative_to(base):
            raise Bad(
                f"{where.relative_to(folder)}: {what} {name[:80]!r} leads outside the data set's folder {base} (to {str(target)[:120]}); "
                f"a saved data set reads only the files inside its folder"
            )
        return target

    def load(p: Path) -> Any:
        try:
            return json.loads(read_text(p))
        except (ValueError, RecursionError) as e:
            raise Bad(f"{p.name}: not valid JSON ({str(e)[:120]})") from None

    parts = [folder]
    if (folder / "dataset_dict.json").is_file():
        splits = load(folder / "dataset_dict.json")
        names = splits.get("splits") if isinstance(splits, dict) else None
        if not isinstance(names, list):
            raise Bad("dataset_dict.json: expected an object with a 'splits' list")
        parts = [folder / n for n in names if inside(n, folder / "dataset_dict.json", "split")]
    for part in parts:
        state = part / "state.json"
        if not state.is_file():
            continue  # datasets says what is missing
        data = load(state)
        files = data.get("_data_files") if isinstance(data, dict) else None
        if not isinstance(files, list):
            raise Bad(f"{state.relative_to(folder)}: expected '_data_files', a list")
        for f in files:
            inside(f.get("filename") if isinstance(f, dict) else f, state, "'_data_files' names")


def _split_wanted(ck: Checker, split: str, n: int) -> bool:
    ck.scan.splits[split] = n
    want = ck.opts.split
    return want is None or split in SPLITS.get(want, (want,))


def _hf_image(rec: dict[str, Any]) -> dict[str, Any]:
    """An ``Image`` feature stored as {"bytes", "path"} becomes its path."""
    rec = dict(rec)
    for key in ("image", "file_name"):
        v = rec.get(key)
        if isinstance(v, dict) and "path" in v:
            if v.get("path"):
                rec[key] = v["path"]
            else:
                rec[key] = None
                rec["__bad__"] = (
                    f"'{key}' is embedded as bytes without a file path; vlmtune reads image files: "
                    "keep the images as files and store their paths"
                )
    return rec


def _imagefolder_rows(ck: Checker, folder: Path) -> list[tuple[str, dict[str, Any]]]:
    for name in ("metadata.jsonl", "metadata.csv"):
        if (folder / name).is_file():
            return _metadata_rows(ck, folder / name, "")
    rows = []
    for split in sorted(p.name for p in folder.iterdir() if (p / "metadata.jsonl").is_file() or (p / "metadata.csv").is_file()):
        meta = folder / split / ("metadata.jsonl" if (folder / split / "metadata.jsonl").is_file() else "metadata.csv")
        part = _metadata_rows(ck, meta, split)
        if _split_wanted(ck, split, len(part)):
            rows += part
    if not rows and not ck.scan.splits:
        raise Bad("no metadata.jsonl or metadata.csv in the folder or its split folders")
    return rows


def _metadata_rows(ck: Checker, meta: Path, split: str) -> list[tuple[str, dict[str, Any]]]:
    """An imagefolder's metadata: ``file_name`` relative to the metadata file's folder."""
    rows: list[tuple[str, dict[str, Any]]] = []
    if meta.suffix == ".csv":
        raw = [(label.replace("line", f"{meta.name} line"), r) for label, r in _plain_csv(meta)]
    else:
        raw = []
        for n, line in enumerate(read_text(meta).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                raw.append((f"{meta.name} line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raw.append((f"{meta.name} line {n}", {"__bad__": f"not valid JSON: {e.msg} (column {e.colno})"}))
    # file_name is relative to the metadata file's folder (or to a declared image root);
    # the image root check still applies to where it leads.
    base = ck.base if ck.declared_root else meta.parent.resolve()
    for label, rec in raw:
        if isinstance(rec, dict) and isinstance(rec.get("file_name"), str) and "image" not in rec:
            rec = dict(rec)
            name = rec.pop("file_name")
            rec["image"] = name if Path(name).is_absolute() else str(base / name)
        for key in ("negative_images", "negative_image"):  # relative to the same folder as file_name
            if isinstance(rec, dict) and key in rec:
                rec = dict(rec)
                names = rec[key] if isinstance(rec[key], list) else [rec[key]]
                rec[key] = [str(base / n) if isinstance(n, str) and not Path(n).is_absolute() else n for n in names]
        rows.append((f"{split} {label}" if split else label, rec))
    return rows


def _plain_csv(path: Path) -> list[tuple[str, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    return [(f"line {reader.line_num}", dict(r)) for r in reader]


def _hf_pair(rec: Any) -> dict[str, Any]:
    """A ``datasets`` row in the pairs shape: ``file_name`` is the image, ``captions`` or
    ``sentences`` (a list) the captions."""
    if not isinstance(rec, dict):
        return rec
    rec = dict(rec)
    if "__bad__" in rec:
        raise Bad(rec["__bad__"])
    for alias in ("file_name", "image_path"):
        if alias in rec and "image" not in rec:
            rec["image"] = rec.pop(alias)
    for alias in ("captions", "sentences"):
        if alias in rec:
            if "caption" in rec:
                raise Bad(f"has both 'caption' and '{alias}'; use one")
            rec["caption"] = rec.pop(alias)
    _negative_columns(rec)
    unread_fields(rec, PAIR_FIELDS, "hf")
    return rec


# Negative columns as Hugging Face sets name them -> vlmtune's pairs fields: negative
# captions of the row's image, negative images of its caption (a list, or one per row).
_NEGATIVE_ALIASES = {
    "negatives": ("negative", "negative_captions", "hard_negatives"),
    "negative_images": ("negative_image",),
}


def _negative_columns(rec: dict[str, Any]) -> None:
    """A row's negative columns, read as ``negatives`` / ``negative_images``: one
    string is a list of one; an ``Image`` feature ({"bytes", "path"}) is its path."""
    for field, aliases in _NEGATIVE_ALIASES.items():
        for alias in (field, *aliases):
            if alias not in rec:
                continue
            if alias != field:
                if field in rec:
                    raise Bad(f"has both '{field}' and '{alias}'; use one")
                rec[field] = rec.pop(alias)
            value = rec[field]
            if value is None:
                rec[field] = []
            elif isinstance(value, (str, dict)):
                rec[field] = [value]
    images = rec.get("negative_images")
    if isinstance(images, list):
        paths = []
        for j, v in enumerate(images):
            if isinstance(v, dict) and "path" in v:
                if not v.get("path"):
                    raise Bad(f"negative image {j} is embedded as bytes without a file path; keep the images as files")
                v = v["path"]
            paths.append(v)
        rec["negative_images"] = paths


def hf_kind(ck: Checker, path: Path) -> Kind:
    """What a layout holds, by its columns: counting with a count column, else pairs (and
    pairs when it cannot be read: the pairs reader then says what is wrong)."""
    try:
        rows = hf_rows(ck, path)
    except (Bad, OSError):
        return "pairs"
    keys = set(rows[0][1]) if rows and isinstance(rows[0][1], dict) else set()
    return "counting" if keys & {"count", "receipt_count"} else "pairs"


def _is_layout(probe: Probe) -> bool:
    return is_hf_folder(probe.path) or (not probe.is_dir and (probe.suffix == ".parquet" or probe.name in _METADATA))


HF = Format(
    "hf",
    readers={"pairs": read_hf_pairs, "counting": read_hf_counting},
    carries={
        "captions": "captions",
        "caption": "a caption",
        "text": "a text",
        "count": "a count",
        "question": "a question",
        "answer": "an answer",
        "negatives": "negative captions",
        "negative_images": "negative images",
    },
    by_path=_is_layout,
    detect_rank=30,
    kind_of=hf_kind,
    folder_shape="a Hugging Face datasets folder (save_to_disk, or an imagefolder with metadata.jsonl)",
)
