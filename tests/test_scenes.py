"""Tests of the synthetic scenes generator."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vlmtune.data.formats import RELATIONS, read_pairs
from vlmtune.data.scenes import generate_scenes

N = 200


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    out = tmp_path_factory.mktemp("scenes")
    return out, generate_scenes(out, N, seed=5)


def _records(paths: dict[str, Path]) -> dict[str, list[dict]]:
    return {k: json.loads(p.read_text()) for k, p in paths.items()}


def test_layout_and_meta(scenes: tuple[Path, dict[str, Path]]) -> None:
    out, paths = scenes
    assert set(paths) == {"train", "val", "test"}
    assert all(p == out / f"{k}.json" and p.is_file() for k, p in paths.items())
    assert len(list((out / "images").glob("scene_*.png"))) == N
    assert (out / "images" / "scene_00000.png").is_file()
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["n"], meta["seed"], meta["image_size"]) == (N, 5, 96)
    assert meta["generator"]
    recs = _records(paths)
    assert {k: v["records"] for k, v in meta["counts"].items()} == {k: len(v) for k, v in recs.items()}
    assert [meta["counts"][k]["images"] for k in ("train", "val", "test")] == [160, 20, 20]


def test_records_are_valid_and_read_back(scenes: tuple[Path, dict[str, Path]]) -> None:
    out, paths = scenes
    per_image: Counter[str] = Counter()
    for split, recs in _records(paths).items():
        for r in recs:
            assert set(r) == {"image", "text", "bbox", "relation", "negatives"}
            assert r["image"].startswith("images/scene_") and not Path(r["image"]).is_absolute()
            assert r["relation"] in RELATIONS
            x, y, w, h = r["bbox"]
            assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= 96 and y + h <= 96
            per_image[r["image"]] += 1
        pairs = read_pairs(paths[split])  # also checks every box against the real image size
        assert len(pairs) == len(recs)
        assert {p.image_id for p in pairs} == set(range(len({r["image"] for r in recs})))
    assert len(per_image) == N and set(per_image.values()) <= {2, 3, 4}
    with Image.open(out / "images" / "scene_00007.png") as img:
        assert img.size == (96, 96) and img.mode == "RGB"


def test_hard_negatives_are_false_of_their_image(scenes: tuple[Path, dict[str, Path]]) -> None:
    """Each record's negatives: its caption with the opposite relation, and (where a
    colour is free) with the subject in a colour no object of that shape has in the image."""
    _, paths = scenes
    recs = _records(paths)["train"]
    by_image: dict[str, set[str]] = {}
    for r in recs:
        by_image.setdefault(r["image"], set()).add(r["text"])
    opposite = {"left": "right", "right": "left", "above": "below", "below": "above", "inside": "outside", "outside": "inside"}
    colours = Counter()
    for r in recs:
        assert 1 <= len(r["negatives"]) <= 2
        flipped = r["negatives"][0]
        assert flipped != r["text"] and not by_image[r["image"]] & set(r["negatives"])
        words, neg_words = r["text"].split(), flipped.split()
        assert len(neg_words) - len(words) in (-2, -1, 0, 1, 2)  # only the relation phrase changed
        assert read_rel(flipped) == opposite[r["relation"]], (r["text"], flipped)
        if len(r["negatives"]) == 2:
            changed = [(a, b) for a, b in zip(r["text"].split(), r["negatives"][1].split()) if a != b]
            assert len(changed) == 1 or (len(changed) == 2 and changed[0][0] in ("a", "an")), changed
            colours[changed[-1][1]] += 1
    assert len(colours) >= 4  # the swapped colour varies
    pairs = read_pairs(paths["train"])
    assert [p.negatives for p in pairs] == [tuple(r["negatives"]) for r in recs]


def read_rel(text: str) -> str:
    """The relation a caption's phrase names (longest phrase first: "to the left of" before "left of")."""
    from vlmtune.data.scenes import _PHRASES

    found = [(len(ph), rel) for rel, phs in _PHRASES.items() for ph in phs if f" {ph} " in f" {text} "]
    return max(found)[1]


def test_all_relations_reasonably_balanced(scenes: tuple[Path, dict[str, Path]]) -> None:
    _, paths = scenes
    rels = Counter(r["relation"] for recs in _records(paths).values() for r in recs)
    total = sum(rels.values())
    assert set(rels) == set(RELATIONS)
    for rel in RELATIONS:
        assert 0.08 < rels[rel] / total < 0.30, rels


def test_split_by_image(scenes: tuple[Path, dict[str, Path]]) -> None:
    _, paths = scenes
    images = {k: {r["image"] for r in recs} for k, recs in _records(paths).items()}
    assert not images["train"] & images["val"]
    assert not images["train"] & images["test"]
    assert not images["val"] & images["test"]


def test_captions_name_their_relation(scenes: tuple[Path, dict[str, Path]]) -> None:
    _, paths = scenes
    words = {
        "left": "left",
        "right": "right",
        "above": ("above", "on top of"),
        "below": ("below", "beneath", "under"),
        "inside": ("inside", " in ", "within"),
        "outside": "outside",
    }
    for recs in _records(paths).values():
        for r in recs:
            w = words[r["relation"]]
            assert any(x in f" {r['text']} " for x in ((w,) if isinstance(w, str) else w)), r


def test_deterministic(tmp_path: Path) -> None:
    a = generate_scenes(tmp_path / "a", 12, seed=3)
    b = generate_scenes(tmp_path / "b", 12, seed=3)
    c = generate_scenes(tmp_path / "c", 12, seed=4)
    for k in a:
        assert a[k].read_text() == b[k].read_text()
    for img in sorted((tmp_path / "a" / "images").iterdir()):
        assert img.read_bytes() == (tmp_path / "b" / "images" / img.name).read_bytes()
    assert any(a[k].read_text() != c[k].read_text() for k in a)  # another seed, another set
    assert (tmp_path / "a" / "images" / "scene_00000.png").read_bytes() != (
        tmp_path / "c" / "images" / "scene_00000.png"
    ).read_bytes()


def test_small_n_and_other_sizes(tmp_path: Path) -> None:
    paths = generate_scenes(tmp_path / "s", 3, seed=0, image_size=64)
    assert all(len(read_pairs(p)) >= 2 for p in paths.values())
    with pytest.raises(ValueError, match="split_fractions"):
        generate_scenes(tmp_path / "x", 10, split_fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="too small"):
        generate_scenes(tmp_path / "y", 2)


def test_generating_over_a_planted_link_never_writes_through_it(tmp_path: Path) -> None:
    """--overwrite of a generated folder where an image the new run writes is a link to
    a file outside: the file stays as it was (the link is refused, never followed)."""
    from vlmtune.errors import VlmtuneError

    out, outside = tmp_path / "set", tmp_path / "outside.png"
    generate_scenes(out, n=10, seed=0, image_size=64)
    outside.write_bytes(b"mine")
    (out / "images" / "scene_00012.png").symlink_to(outside)
    with pytest.raises(VlmtuneError, match=r"scene_00012.png: is a symbolic link"):
        generate_scenes(out, n=14, seed=0, image_size=64, overwrite=True)
    assert outside.read_bytes() == b"mine"
