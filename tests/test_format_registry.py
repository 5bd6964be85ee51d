"""The data-format registry: a new format is one declaration plus one registration line.

The toy format below (``tsv``: ``IMAGE<TAB>CAPTION`` per line) is declared here, in one
place, and registered for each test with ``FORMATS.registered(TSV)``; nothing else in
vlmtune names it, yet detection, ``data.format``, the readers, their errors and the
unread-field check all know it.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import vlmtune.data.formats as formats_pkg
from vlmtune.data.formats import FORMATS, Bad, Checker, Format, Item, Probe, ReadOptions, read_pairs, scan_pairs
from vlmtune.data.formats.registry import carriers, detect, format_names
from vlmtune.data.validate import detect_kind
from vlmtune.errors import DataError

# --------------------------------------------------------------------------- the toy format


def _read_tsv(ck: Checker, path: Path, data: Any) -> list[Item]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [Item(f"line {n}", partial(_tsv_record, line)) for n, line in enumerate(lines, start=1) if line.strip()]


def _tsv_record(line: str) -> dict[str, Any]:
    image, tab, caption = line.partition("\t")
    if not tab:
        raise Bad("expected IMAGE<TAB>CAPTION")
    return {"image": image, "caption": caption}


TSV = Format(
    "tsv",
    readers={"pairs": _read_tsv},
    carries={"caption": "a caption", "alt_text": "alt text"},
    by_path=lambda probe: not probe.is_dir and probe.suffix == ".tsv",
)


@pytest.fixture
def tsv() -> Iterator[Format]:
    with FORMATS.registered(TSV) as fmt:
        yield fmt
    assert "tsv" not in FORMATS and "alt_text" not in carriers()  # the registry is as it was


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 30)).save(tmp_path / name)
    return tmp_path


# --------------------------------------------------------------------------- the toy format, end to end


def test_toy_format_is_detected_chosen_and_read(tsv: Format, root: Path) -> None:
    path = root / "train.tsv"
    path.write_text("a.png\ta red square\nb.png\ta blue square\na.png\tthe red one again\n")
    assert "tsv" in format_names() and "tsv" in format_names("pairs") and "tsv" not in format_names("counting")
    assert detect(path) == "tsv"
    for fmt in ("auto", "tsv"):
        scan = scan_pairs(path, opts=ReadOptions(format=fmt))
        assert scan.format == "tsv" and not scan.problems
        recs = read_pairs(path, opts=ReadOptions(format=fmt))
        assert [(r.image.name, r.text, r.image_id) for r in recs] == [
            ("a.png", "a red square", 0),
            ("b.png", "a blue square", 1),
            ("a.png", "the red one again", 0),
        ]
        assert recs[1].source == f"{path}: line 2"
    assert detect_kind(path) == "pairs"


def test_toy_format_bad_record_is_one_line_naming_file_and_record(tsv: Format, root: Path) -> None:
    path = root / "bad.tsv"
    path.write_text("a.png\ta red square\nb.png a blue square without a tab\n")
    with pytest.raises(DataError) as e:
        read_pairs(path)
    assert str(e.value) == f"{path}: line 2: expected IMAGE<TAB>CAPTION"
    recs = read_pairs(path, on_error="skip")
    assert [r.text for r in recs] == ["a red square"]


def test_toy_format_is_refused_for_counting(tsv: Format, root: Path) -> None:
    from vlmtune.data.formats import read_counting

    path = root / "train.tsv"
    path.write_text("a.png\ta red square\n")
    with pytest.raises(
        DataError,
        match=r"format 'tsv' holds no counting data; counting reads counting, csv, hf, internvl, llava, swift, sharegpt$",
    ):
        read_counting(path)


def test_toy_format_carried_fields_join_the_carriers_table(tsv: Format, root: Path) -> None:
    assert carriers()["alt_text"] == ("alt text", ("tsv",))
    assert "tsv" in carriers()["caption"][1]
    path = root / "pairs.json"
    path.write_text(json.dumps([{"image": "a.png", "caption": "red", "alt_text": "a red square"}]))
    with pytest.raises(DataError) as e:
        read_pairs(path, opts=ReadOptions(format="pairs"))
    assert str(e.value) == (
        f"{path}: record 0: field 'alt_text' carries alt text that format 'pairs' does not read; "
        "format 'tsv' reads it (data.format=...)"
    )


def test_registering_a_name_twice_or_auto_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        FORMATS.register(Format("pairs", readers={"pairs": _read_tsv}))
    with pytest.raises(ValueError, match="already registered"):
        FORMATS.register(Format("auto", readers={"pairs": _read_tsv}))


# --------------------------------------------------------------------------- derived from the registry


def test_format_names_are_the_registered_formats() -> None:
    names = format_names()
    assert names == (
        *("auto", "pairs", "coco", "karpathy", "albef", "refcoco", "geotext", "grounding", "counting", "csv", "hf"),
        *("internvl", "llava", "swift", "sharegpt", "webdataset", "flickr30k"),
    )
    assert all(f.name in names for f in FORMATS)
    assert format_names("counting") == ("counting", "csv", "hf", "internvl", "llava", "swift", "sharegpt")
    assert set(format_names("pairs")) == {f.name for f in FORMATS if "pairs" in f.kinds}


def test_carriers_table_is_derived_from_the_formats() -> None:
    table = carriers()
    for fmt in FORMATS:
        for key in fmt.carries:
            assert fmt.name in table[key][1], (fmt.name, key)
    # Fields no format reads are carriers too: a record holding one is refused.
    assert table["segmentation"] == ("a mask", ())
    assert table["bbox"][0] == "a box" and set(table["bbox"][1]) == {"pairs", "grounding", "albef", "refcoco"}


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("refs(unc).p", b"", "refcoco"),
        ("train.csv", b"", "csv"),
        ("metadata.csv", b"", "csv"),
        ("metadata.jsonl", b"", "hf"),
        ("train.parquet", b"", "hf"),
        ("train.jsonl", b"", "counting"),
        ("coco.json", b'{"images": [], "annotations": []}', "coco"),
        ("k.json", b'{"images": [], "dataset": "coco"}', "karpathy"),
        ("g.json", b'[{"image": "a", "sentences": [], "ref_id": 1}]', "geotext"),
        ("r.json", b'[{"ref_id": 1, "bbox": 1}]', "refcoco"),
        ("b.json", b'[{"image": "a", "bbox": [1, 2, 3, 4], "image_id": 3}]', "grounding"),
        ("x.json", b'[{"image": "a", "caption": "c", "image_id": 3}]', "albef"),
        ("p.json", b'[{"image": "a", "caption": "c"}]', "pairs"),
        ("a.jsonl", b'{"image": "a", "conversations": []}\n', "internvl"),
        ("m.json", b'{"coco": {"root": "images", "annotation": "a.jsonl"}}', "internvl"),
        ("l.json", b'[{"id": 1, "image": "a", "conversations": []}]', "llava"),
        ("s.jsonl", b'\n{"messages": [], "images": ["a"]}\n', "swift"),
        ("s.json", b'[{"messages": [], "images": ["a"]}]', "swift"),
        ("g.jsonl", b'{"conversation": []}\n', "sharegpt"),
        ("g2.json", b'[{"conversation": []}]', "sharegpt"),
        ("results_20130124.token", b"1.jpg#0\ta dog\n", "flickr30k"),
        ("results.csv", b"image_name| comment_number| comment\n1.jpg| 0| a dog\n", "flickr30k"),
        ("00000.tar", b"", "webdataset"),
        ("shards-{000..009}.tar", None, "webdataset"),
    ],
)
def test_detection_order(tmp_path: Path, name: str, content: bytes | None, expected: str) -> None:
    path = tmp_path / name
    if content is not None:  # a brace pattern names shards, not a file of its own
        path.write_bytes(content)
    assert detect(path) == expected


@pytest.mark.parametrize(
    "content, message",
    [
        (
            b'{"images": 3}',
            "top level is an object but not COCO captions ('images' and 'annotations') nor a Karpathy split "
            "file ('images' with 'filename' and 'sentences') nor an InternVL meta JSON ({name: {'root', "
            "'annotation'}}); expected a list of records",
        ),
        (b'"text"', "top level must be a list of records, got string"),
        (b"[1, ", "not valid JSON: Expecting value (line 1, column 5)"),
    ],
)
def test_detection_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "x.json"
    path.write_bytes(content)
    with pytest.raises(Bad, match=f"^{re.escape(message)}$"):
        detect(path)
    with pytest.raises(Bad, match=r"^is a folder but not a Hugging Face datasets folder \(save_to_disk, or an imagefolder"):
        detect(tmp_path)
    assert Probe(path).parsed is None  # nothing read before it is asked for


# --------------------------------------------------------------------------- imports


def test_registry_loads_without_pillow_numpy_or_torch() -> None:
    code = (
        "import sys; from vlmtune.data.formats.registry import format_names; format_names(); "
        "print(sorted(m for m in ('PIL', 'numpy', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _data_imports() -> dict[str, set[str]]:
    """Module -> the vlmtune.data modules it imports at module level (not under TYPE_CHECKING)."""
    base = Path(formats_pkg.__file__).parents[1]
    graph: dict[str, set[str]] = {}
    for path in base.rglob("*.py"):
        rel = path.relative_to(base.parents[1]).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        deps: set[str] = set()
        for node in ast.parse(path.read_text()).body:  # module level only: in-function imports run later
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vlmtune.data"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("vlmtune.data"))
        graph[name] = deps
    return {k: {d for d in v if d in graph and d != k} for k, v in graph.items()}


def test_no_import_circles_in_data() -> None:
    graph = _data_imports()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                pytest.fail("import circle: " + " -> ".join([*stack[stack.index(dep) :], dep]))
            if dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
