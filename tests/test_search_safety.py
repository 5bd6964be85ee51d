"""embed, index and search as hardened as training: a kill at every write and rename of
embed leaves the last committed state usable and a re-run ends as an uninterrupted run;
names of any bytes are stored and printed escaped; one writer per folder; links out of
an image folder refused and loops reported; every stored file checked as input; every
flag range-checked at parse time; search --out never replaces a file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vlmtune
import vlmtune.search as vs
from conftest import ROOT
from vlmtune import searchfiles as sf
from vlmtune.cli import main
from vlmtune.errors import VlmtuneError
from vlmtune.runfolder import RunLock

CLEAN = [".vlmtune.lock", "embed.json", "embeddings.safetensors", "items.jsonl"]


@pytest.fixture(scope="module")
def model(retrieval_checkpoint: Path) -> vlmtune.Model:
    return vlmtune.load(retrieval_checkpoint)


def _photos(scenes: Path, root: Path, n: int = 6) -> Path:
    root.mkdir(parents=True)
    for p in sorted((scenes / "images").iterdir())[:n]:
        shutil.copy(p, root / p.name)
    return root


def _state(folder: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    _, mats, items = vs.read_embed_folder(folder)
    return items, mats


def _assert_same(a: Path, b: Path) -> None:
    ia, ta = _state(a)
    ib, tb = _state(b)
    assert ia == ib
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=1e-5, rtol=1e-5)
    assert sorted(os.listdir(b)) == CLEAN  # nothing a killed save left behind


def _killed_states(run, out: Path, snaps: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every state ``out`` passes through while ``run()`` writes it: a copy before and
    after each rename into it (each write_atomic's and each journal rename), i.e. what
    a SIGKILL at that moment would leave. Distinct states only."""
    seen: dict[tuple, Path] = {}
    real = os.replace

    def snap() -> None:
        key = tuple(sorted((p.name, p.read_bytes()) for p in out.iterdir() if p.is_file()))
        if key not in seen:
            dest = snaps / str(len(seen))
            shutil.copytree(out, dest, symlinks=True)
            seen[key] = dest

    def replace(src, dst, *a, **kw):
        inside = Path(dst).parent == out
        if inside:
            snap()
        real(src, dst, *a, **kw)
        if inside:
            snap()

    with monkeypatch.context() as mp:
        mp.setattr(os, "replace", replace)
        run()
    return list(seen.values())


def test_embed_killed_at_every_write_and_rename_resumes_exactly(
    model: vlmtune.Model, scenes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = _photos(scenes, tmp_path / "photos")
    texts = tmp_path / "texts.txt"
    texts.write_text("a red circle\na blue square\n")
    monkeypatch.setattr(model, "batch_size", 2)
    monkeypatch.setattr(vs, "FLUSH_EVERY", 2)  # a save after every batch: 3 saves and the final one

    def run(out: Path) -> dict:
        return vs.embed(model.folder, out, images=photos, texts=texts, progress=False, model=model)

    ref = tmp_path / "ref"
    run(ref)
    ref_items, ref_t = _state(ref)
    states = _killed_states(lambda: run(tmp_path / "out"), tmp_path / "out", tmp_path / "snaps", monkeypatch)
    assert len(states) >= 12  # several points of each of the four saves
    pending_seen = False
    for s in states:
        if not (s / "embed.json").exists():  # killed before the first commit: only vlmtune's own files
            assert all(sf.own_name(n) for n in os.listdir(s)), os.listdir(s)
        else:  # the last committed state, readable, a prefix of the straight run
            items, t = _state(s)
            imgs = [r for r in items if r["kind"] == "image"]
            assert imgs == [r for r in ref_items if r["kind"] == "image"][: len(imgs)]
            torch.testing.assert_close(t["images"], ref_t["images"][: len(imgs)], atol=1e-5, rtol=1e-5)
            want = json.loads((s / "embed.json").read_text())["files"]["items.jsonl"]["sha256"]
            p = sf.pending(s, "items.jsonl")
            pending_seen |= p.exists() and sf.sha256_bytes(p.read_bytes()) == want  # committed, not yet renamed
        r = run(s)  # the same command again
        assert r["complete"] and r["images"] == 6
        _assert_same(ref, s)
    assert pending_seen  # a kill between the commit and the renames was among them

    # A second run on a changed folder (one file changed, one removed, one added),
    # killed anywhere: the re-run equals the uninterrupted second run, rows in place.
    base = tmp_path / "base"
    shutil.copytree(ref, base)
    shutil.copy(sorted((scenes / "images").iterdir())[8], photos / "new.png")
    changed = sorted(photos.iterdir())[1]
    shutil.copy(sorted((scenes / "images").iterdir())[9], changed)
    os.utime(changed, ns=(1, 1))
    sorted(photos.iterdir())[3].unlink()
    ref2 = tmp_path / "ref2"
    shutil.copytree(base, ref2)
    r = run(ref2)
    assert (r["kept_images"], r["changed_images"], r["removed_images"]) == (4, 1, 1)
    out2 = tmp_path / "out2"
    shutil.copytree(base, out2)
    states = _killed_states(lambda: run(out2), out2, tmp_path / "snaps2", monkeypatch)
    assert len(states) >= 6
    for s in states:
        _state(s)  # usable as it is
        run(s)
        _assert_same(ref2, s)


@pytest.mark.slow  # a process of its own (about 20 s here); every kill point runs in the test above
def test_embed_sigkill_between_the_two_renames_loses_nothing(
    model: vlmtune.Model, retrieval_checkpoint: Path, scenes: Path, tmp_path: Path
) -> None:
    """`vlmtune embed` as a process, SIGKILLed right after its second save renamed
    embeddings.safetensors and before items.jsonl (the state that used to leave 9 rows
    against 6 item lines): the folder reads as the second save, and the same command
    again ends as an uninterrupted run."""
    photos = _photos(scenes, tmp_path / "photos")
    out = tmp_path / "out"
    child = f"""
import os, signal, sys
from pathlib import Path
import vlmtune.api as api
import vlmtune.search as vs
vs.FLUSH_EVERY = 2
real_load, real_replace, seen = api.load, os.replace, []
def load(*a, **k):
    m = real_load(*a, **k)
    m.batch_size = 2
    return m
def replace(src, dst, *a, **k):
    real_replace(src, dst, *a, **k)
    if Path(dst).name == "embeddings.safetensors":
        seen.append(dst)
        if len(seen) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
api.load, os.replace = load, replace
from vlmtune.cli import main
sys.exit(main(["embed", {str(retrieval_checkpoint)!r}, "--images", {str(photos)!r}, "--out", {str(out)!r}, "--no-progress"]))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-c", child], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert ".items.jsonl.vlmtune-next" in os.listdir(out)  # killed between the renames
    items, t = _state(out)
    assert len(t["images"]) == 4 and len([r for r in items if r["kind"] == "image"]) == 4
    assert main(["embed", str(retrieval_checkpoint), "--images", str(photos), "--out", str(out), "--no-progress"]) == 0
    ref = tmp_path / "ref"
    vs.embed(retrieval_checkpoint, ref, images=photos, progress=False, model=model)
    _assert_same(ref, out)


def test_names_of_any_bytes_are_stored_and_printed_escaped(
    model: vlmtune.Model, retrieval_checkpoint: Path, scenes: Path, tmp_path: Path, capsys
) -> None:
    photos = _photos(scenes, tmp_path / "photos", 3)
    raw = os.fsencode(str(photos)) + b"/caf\xe9 \x1b[31mred\x1b[0m\nline.png"  # not UTF-8, an escape sequence, a newline
    shutil.copy(sorted((scenes / "images").iterdir())[5], raw)
    name = os.fsdecode(raw)
    (photos / "bad\x1b[2J\nname.png").write_bytes(b"not an image")  # unreadable: its name printed escaped
    emb, idx = tmp_path / "emb", tmp_path / "idx"
    ck = str(retrieval_checkpoint)
    capsys.readouterr()
    assert main(["embed", ck, "--images", str(photos), "--out", str(emb), "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert "\x1b" not in cap.out + cap.err and "bad\\x1b[2J\\nname.png" in cap.err
    lines = (emb / "items.jsonl").read_bytes().decode("utf-8").split("\n")  # valid UTF-8 throughout
    row = next(json.loads(x) for x in lines if "path_bytes" in x)
    assert bytes.fromhex(row["path_bytes"]) == raw and row["path"].endswith("caf\\xe9 \x1b[31mred\x1b[0m\nline.png")
    assert sf.item_path(row) == name
    assert main(["embed", ck, "--images", str(photos), "--out", str(emb), "--no-progress"]) == 0
    assert "0 images (4 kept from before" in capsys.readouterr().out  # the name matched across runs
    items, t = _state(emb)
    at = next(r["id"] for r in items if r.get("path_bytes"))
    torch.testing.assert_close(t["images"][at], model.embed_images([name])[0], atol=1e-5, rtol=1e-5)
    assert main(["index", str(emb), "--out", str(idx)]) == 0
    capsys.readouterr()
    assert main(["search", str(idx), "--text", "a red circle", "-k", "4"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and len(out.strip().split("\n")) == 5  # one line per result
    assert "caf\\xe9 \\x1b[31mred\\x1b[0m\\nline.png" in out
    assert main(["search", str(idx), "--text", "a red circle", "-k", "4", "--json"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    got = json.loads(out)
    hit = next(r for r in got["results"] if "path_bytes" in r)
    assert os.fsdecode(bytes.fromhex(hit["path_bytes"])) == name


def test_printable_and_strict_json() -> None:
    assert sf.printable("a\nb\x1b[2J\u202e\\c\udce9") == "a\\nb\\x1b[2J\\u202e\\\\c\\xe9"
    assert sf.printable("café, 東京 ok") == "café, 東京 ok"
    text = sf.json_line({"t": "x\x7f\u0085\U000e0001y", "n": [1, 2]}, indent=2)
    assert all(ch.isprintable() or ch == "\n" for ch in text)
    assert json.loads(text) == {"t": "x\x7f\u0085\U000e0001y", "n": [1, 2]}
    with pytest.raises(ValueError):
        sf.json_line({"score": float("nan")})
    # A caption with a line separator or a lone surrogate survives a save and a read.
    rows = [{"id": 0, "kind": "text", "text": "a\u2028b\x85c"}, {"id": 1, "kind": "text", "text": "d\udc80"}]
    back = [r for _, r in sf.read_jsonl_bytes(sf.jsonl_bytes(rows), Path("items.jsonl"))]
    assert back == rows


def test_one_writer_per_embed_and_index_folder(model: vlmtune.Model, scenes: Path, tmp_path: Path, capsys) -> None:
    photos = _photos(scenes, tmp_path / "photos", 2)
    emb = tmp_path / "emb"
    emb.mkdir()
    ck = str(model.folder)
    with RunLock(emb):
        assert main(["embed", ck, "--images", str(photos), "--out", str(emb), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{emb}: another vlmtune process (PID {os.getpid()}) is writing to this embed folder" in err[0]
        assert "--out" in err[0] and sorted(os.listdir(emb)) == [".vlmtune.lock"]
    assert main(["embed", ck, "--images", str(photos), "--out", str(emb), "--no-progress"]) == 0
    idx = tmp_path / "idx"
    idx.mkdir()
    with RunLock(idx):
        assert main(["index", str(emb), "--out", str(idx)]) == 2
        err = capsys.readouterr().err
        assert "is writing to this index folder" in err and sorted(os.listdir(idx)) == [".vlmtune.lock"]
    assert main(["index", str(emb), "--out", str(idx)]) == 0


def test_image_folder_links_outside_refused_loops_reported(model: vlmtune.Model, scenes: Path, tmp_path: Path, capsys) -> None:
    photos = _photos(scenes, tmp_path / "photos", 3)
    outside = tmp_path / "elsewhere"
    _photos(scenes, outside, 1)
    secret = next(outside.iterdir())
    ck = str(model.folder)
    for link, target in ((photos / "leak.png", secret), (photos / "shared", outside)):
        link.symlink_to(target)
        assert main(["embed", ck, "--images", str(photos), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{link}: a symbolic link leading outside {photos}" in err[0], err
        assert not (tmp_path / "o").exists()
        link.unlink()
    (photos / "loop.png").symlink_to(photos / "loop.png")
    (photos / "a").symlink_to(photos / "b")
    (photos / "b").symlink_to(photos / "a")
    (photos / "gone.png").symlink_to(photos / "nothing.png")
    inside = sorted(photos.glob("scene*"))[0]
    (photos / "alias.png").symlink_to(inside)  # inside the folder: read where it leads, once
    (photos / "notes.txt").symlink_to(secret)  # never read (not an image): no matter where it leads
    (photos / "readme.md").symlink_to(secret)
    assert main(["embed", ck, "--images", str(photos), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert "embedded 3 images" in cap.out and "4 unreadable" in cap.out
    assert f"{photos / 'loop.png'}: a symbolic link loop" in cap.err
    assert f"{photos / 'a'}: a symbolic link loop" in cap.err and f"{photos / 'b'}: a symbolic link loop" in cap.err
    assert f"{photos / 'gone.png'}: a symbolic link to nothing" in cap.err
    meta = json.loads((tmp_path / "o" / "embed.json").read_text())
    assert len(meta["unreadable"]) == 4  # three loops, one link to nothing
    paths = [r["path"] for r in _state(tmp_path / "o")[0] if r["kind"] == "image"]
    assert paths == [str(p.resolve()) for p in sorted(photos.glob("scene*"))]
    # A link planted where embed writes (its pending file) is refused by name, its target untouched.
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    (tmp_path / "o" / ".items.jsonl.vlmtune-next").symlink_to(victim)
    assert main(["embed", ck, "--images", str(photos), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ".items.jsonl.vlmtune-next: is a symbolic link" in err[0]
    assert victim.read_text() == "mine"


def test_nan_rows_refused_at_embed_and_at_index(
    model: vlmtune.Model, scenes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    photos = _photos(scenes, tmp_path / "photos", 4)
    monkeypatch.setattr(model, "batch_size", 2)
    monkeypatch.setattr(vs, "FLUSH_EVERY", 2)
    real = model.embed_images
    calls = {"n": 0}

    def nan_in_second_batch(images, **kw):
        calls["n"] += 1
        e = real(images, **kw)
        if calls["n"] == 2:
            e[1, 3] = float("nan")
        return e

    monkeypatch.setattr(model, "embed_images", nan_in_second_batch)
    out = tmp_path / "emb"
    with pytest.raises(VlmtuneError, match=r"scene_00003.png: the checkpoint's embedding of this image is not finite"):
        vs.embed(model.folder, out, images=photos, progress=False, model=model)
    assert len(_state(out)[1]["images"]) == 2  # the first batch, committed, is kept

    # A stored NaN (a folder written by hand or by an older vlmtune) is refused by index, naming the item.
    legacy = _fake_embed_folder(tmp_path / "legacy")
    t = load_file(str(legacy / "embeddings.safetensors"))
    t["images"][2, 0] = float("inf")
    save_file(t, str(legacy / "embeddings.safetensors"))
    assert main(["index", str(legacy), "--out", str(tmp_path / "idx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'images' row 2 (i2.png) is not finite (NaN or Inf)" in err[0]


def _fake_embed_folder(folder: Path, n_img: int = 3, n_txt: int = 2, width: int = 8) -> Path:
    """An embed folder as the first release wrote it (no manifest)."""
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file(
        {"images": torch.randn(n_img, width, generator=g), "texts": torch.randn(n_txt, width, generator=g)},
        str(folder / "embeddings.safetensors"),
    )
    rows = [{"id": i, "kind": "image", "path": f"i{i}.png"} for i in range(n_img)]
    rows += [{"id": i, "kind": "text", "text": f"t{i}"} for i in range(n_txt)]
    (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "embed.json").write_text(json.dumps({"format": 1, "checkpoint": "c", "fingerprint": "f", "dim": width}))
    return folder


def _journaled(folder: Path) -> Path:
    """The same folder as embed writes it now (embed.json the manifest)."""
    _, mats, items = vs.read_embed_folder(_fake_embed_folder(folder))
    meta = json.loads((folder / "embed.json").read_text())
    sf.commit(folder, mats, items, {**meta, "images": len(mats["images"]), "texts": len(mats["texts"])})
    return folder


def _rewrite_items(f: Path, change) -> None:
    rows = [json.loads(x) for x in (f / "items.jsonl").read_text().splitlines()]
    change(rows)
    (f / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _legacy(spoil):
    return ("legacy", spoil)


@pytest.mark.parametrize(
    "kind, spoil, message",
    [
        ("journaled", lambda f: (f / "items.jsonl").write_text("x"), "items.jsonl: does not match its sha256 in embed.json"),
        ("journaled", lambda f: (f / "embeddings.safetensors").unlink(), "embeddings.safetensors: does not match its sha256"),
        ("journaled", lambda f: (f / "embed.json").write_text('{"format": 2, "files": 3}'), "'format' 2 with 'files' int"),
        ("journaled", lambda f: (f / "embed.json").write_text('{"format": 7}'), "'format' 7"),
        ("legacy", lambda f: _rewrite_items(f, lambda r: r[0].pop("kind")), 'line 1: \'kind\' must be "image" or "text"'),
        ("legacy", lambda f: _rewrite_items(f, lambda r: r[1].update(id="1")), "line 2: 'id' must be an integer"),
        ("legacy", lambda f: _rewrite_items(f, lambda r: r[0].update(path=5)), "line 1: 'path' must be text"),
        ("legacy", lambda f: _rewrite_items(f, lambda r: r[4].update(image=9)), "text 1: 'image' 9 is not an image id"),
        ("legacy", lambda f: _rewrite_items(f, lambda r: r[0].update(path_bytes="zz")), "'path_bytes' must be"),
        ("legacy", lambda f: (f / "items.jsonl").write_text('{"id": NaN, "kind": "image"}\n'), "line 1: not valid JSON"),
        (
            "legacy",
            lambda f: save_file({"images": torch.zeros(3, 8), "texts": torch.zeros(2, 4)}, str(f / "embeddings.safetensors")),
            "'images' and 'texts' have different widths [4, 8]",
        ),
        (
            "legacy",
            lambda f: save_file({"images": torch.zeros(3), "texts": torch.zeros(2, 8)}, str(f / "embeddings.safetensors")),
            "'images' must be a 2-D float matrix",
        ),
        ("legacy", lambda f: save_file({"texts": torch.zeros(2, 8)}, str(f / "embeddings.safetensors")), "no tensor 'images'"),
        ("legacy", lambda f: (f / "embed.json").write_text('{"dim": 16}'), "'dim' is 16 but the embeddings are 8 wide"),
        ("legacy", lambda f: (f / "embed.json").write_text('{"fingerprint": 3}'), "'fingerprint' must be text"),
    ],
)
def test_stored_embed_files_are_checked(tmp_path: Path, capsys, kind, spoil, message) -> None:
    folder = _journaled(tmp_path / "emb") if kind == "journaled" else _fake_embed_folder(tmp_path / "emb")
    spoil(folder)
    assert main(["index", str(folder), "--out", str(tmp_path / "idx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "idx").exists()


def test_a_journaled_folder_reads_from_its_pending_files(tmp_path: Path) -> None:
    """Killed between the commit and the renames: the manifest's files are the pending ones."""
    folder = _journaled(tmp_path / "emb")
    items, t = _state(folder)
    for name in sf.JOURNALED:
        os.replace(folder / name, sf.pending(folder, name))
    (folder / "embeddings.safetensors").write_bytes(b"an older save")
    assert _state(folder)[0] == items
    sf.settle(folder)
    assert sorted(os.listdir(folder)) == CLEAN[1:] and _state(folder)[0] == items


def _index(tmp_path: Path, faiss_kind: str | None = None) -> Path:
    emb = _fake_embed_folder(tmp_path / "emb", n_img=60, n_txt=20)
    idx = tmp_path / "idx"
    assert main(["index", str(emb), "--out", str(idx), *(["--faiss", faiss_kind] if faiss_kind else [])]) == 0
    return idx


def _edit_json(p: Path, change) -> None:
    d = json.loads(p.read_text())
    change(d)
    p.write_text(json.dumps(d))


@pytest.mark.parametrize(
    "faiss_kind, spoil, message",
    [
        (None, lambda f: _edit_json(f / "index.json", lambda d: d.pop("kind")), '\'kind\' must be "images" or "texts"'),
        (None, lambda f: _edit_json(f / "index.json", lambda d: d.update(count=7)), "but index.json says 7 rows of width 8"),
        (None, lambda f: _edit_json(f / "index.json", lambda d: d.update(dim="8")), "'dim' must be a positive integer"),
        (None, lambda f: _edit_json(f / "index.json", lambda d: d.update(complete=False)), "the index was not finished"),
        (None, lambda f: _edit_json(f / "index.json", lambda d: d.update(search="annoy")), "'search' must be exact"),
        (None, lambda f: _rewrite_items(f, lambda r: r[3].update(id=9)), "row 4 must have 'id' 3"),
        (None, lambda f: _rewrite_items(f, lambda r: r[3].update(kind="text")), "line 4: 'text' must be text, got null"),
        (None, lambda f: _rewrite_items(f, lambda r: r.pop()), "items.jsonl has 59 rows, gallery.safetensors 60"),
        (
            None,
            lambda f: save_file({"gallery": torch.full((60, 8), float("nan"))}, str(f / "gallery.safetensors")),
            "row 0 (i0.png) is not finite",
        ),
        (
            None,
            lambda f: save_file({"gallery": torch.ones(60, 8)}, str(f / "gallery.safetensors")),
            "row 0 has length 2.828, not 1",
        ),
        (None, lambda f: (f / "gallery.safetensors").write_bytes(b"\x00" * 20), "gallery.safetensors: cannot read"),
        ("hnsw", lambda f: (f / "faiss.index").write_bytes(b"IHNf" + b"\x00" * 64), "faiss.index: does not match its sha256"),
        ("ivf", lambda f: _edit_json(f / "index.json", lambda d: d["faiss"].pop("sha256")), "'faiss.sha256' is missing"),
        ("ivf", lambda f: _edit_json(f / "index.json", lambda d: d["faiss"].update(type="IndexHNSWFlat")), "'faiss.type'"),
    ],
)
def test_stored_index_files_are_checked(tmp_path: Path, capsys, faiss_kind, spoil, message) -> None:
    if faiss_kind:
        pytest.importorskip("faiss")
    idx = _index(tmp_path, faiss_kind)
    spoil(idx)
    capsys.readouterr()
    assert main(["search", str(idx), "--text", "a red circle"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_faiss_file_tampered_with_a_matching_digest_is_one_line(tmp_path: Path) -> None:
    """A faiss.index replaced by garbage and index.json edited to match: Faiss's refusal
    is one line naming the file, never a raw C++ error."""
    pytest.importorskip("faiss")
    idx = _index(tmp_path, "ivf")
    blob = b"garbage!" * 10
    (idx / "faiss.index").write_bytes(blob)
    _edit_json(idx / "index.json", lambda d: d["faiss"].update(sha256=sf.sha256_bytes(blob)))
    with pytest.raises(VlmtuneError, match=r"faiss.index: Faiss cannot read it \(.*not recognized"):
        vs.Index(idx)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["search", "IDX", "--text", "x", "-k", "0"], "argument -k: must be between 1 and"),
        (["search", "IDX", "--text", "x", "-k", "-1"], "argument -k: must be between 1 and"),
        (["search", "IDX", "--text", "x", "--rerank", "--rerank-k", "0"], "argument --rerank-k: must be between 1"),
        (["search", "IDX", "--text", "x", "--rerank", "--rerank-k", "-3"], "argument --rerank-k: must be between 1"),
        (["search", "IDX", "--text", "x", "--rerank-k", "5"], "--rerank-k: only with --rerank"),
        (["search", "IDX", "--text", "x", "--out", "r.jsonl"], "--out: only with --queries"),
        (["index", "EMB", "--out", "OUT", "--faiss", "ivf", "--nlist", "0"], "argument --nlist: must be between 1"),
        (["index", "EMB", "--out", "OUT", "--faiss", "ivf", "--nprobe", "-5"], "argument --nprobe: must be between 1"),
        (["index", "EMB", "--out", "OUT", "--faiss", "hnsw", "--hnsw-m", "0"], "argument --hnsw-m: must be between 2 and 256"),
        (["index", "EMB", "--out", "OUT", "--faiss", "hnsw", "--hnsw-m", "-1"], "argument --hnsw-m: must be between 2"),
        (["index", "EMB", "--out", "OUT", "--faiss", "hnsw", "--hnsw-m", "1"], "argument --hnsw-m: must be between 2"),
        (["index", "EMB", "--out", "OUT", "--faiss", "hnsw", "--ef-search", "0"], "argument --ef-search: must be between 1"),
        (["index", "EMB", "--out", "OUT", "--faiss", "hnsw", "--nlist", "4"], "--nlist: an option of --faiss ivf"),
        (["index", "EMB", "--out", "OUT", "--ef-search", "40"], "--ef-search: an option of --faiss hnsw"),
        (["index", "EMB", "--out", "OUT", "--faiss", "ivf", "--nlist", "4", "--nprobe", "5"], "--nprobe: must be at most"),
        (["index", "EMB", "--out", "OUT", "--faiss", "ivf", "--nlist", "61"], "--nlist: must lie in 1..60"),
        (["evaluate", "CKPT", "--rankings", "--rankings-k", "0"], "argument --rankings-k: must be between 1"),
        (["evaluate", "CKPT", "--rankings", "--examples", "-1"], "argument --examples: must be between 0"),
    ],
)
def test_out_of_range_flags_are_refused(tmp_path: Path, capsys, argv, message) -> None:
    if "--faiss" in argv and "--nlist" in argv and "61" in argv:
        pytest.importorskip("faiss")
    emb = _fake_embed_folder(tmp_path / "emb", n_img=60)
    names = {"IDX": str(tmp_path / "idx"), "EMB": str(emb), "OUT": str(tmp_path / "out"), "CKPT": str(tmp_path / "ck")}
    assert main([names.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_hnsw_searches_at_least_k_wide(tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    emb = _fake_embed_folder(tmp_path / "emb", n_img=200, n_txt=20)
    assert main(["index", str(emb), "--out", str(tmp_path / "idx"), "--faiss", "hnsw", "--ef-search", "1"]) == 0
    index = vs.Index(tmp_path / "idx")
    q = torch.randn(5, 8)
    _, rows = index.topk(q, 10)
    assert (rows >= 0).all() and rows.shape == (5, 10)  # efSearch 1 would find fewer than 10
    assert index._faiss.hnsw.efSearch == 1


def test_an_interrupted_index_build_can_run_again(tmp_path: Path, capsys) -> None:
    emb = _fake_embed_folder(tmp_path / "emb")
    idx = tmp_path / "idx"
    idx.mkdir()
    (idx / "gallery.safetensors").write_bytes(b"half")
    (idx / "index.json").write_text(json.dumps({"format": 1, "complete": False}))
    (idx / ".index.json.vlmtune-tmp-0123456789ab").write_text("left by a kill")
    assert main(["index", str(emb), "--out", str(idx)]) == 0
    assert sorted(os.listdir(idx)) == [".vlmtune.lock", "gallery.safetensors", "index.json", "items.jsonl"]
    assert vs.Index(idx).info["complete"] is True
    assert main(["index", str(emb), "--out", str(idx)]) == 2  # a finished index is never replaced
    assert "exists and is not empty" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "items.jsonl").write_text("my own file\n")
    assert main(["index", str(emb), "--out", str(mine)]) == 2
    assert (mine / "items.jsonl").read_text() == "my own file\n"


def test_search_out_is_a_new_file_written_atomically(model: vlmtune.Model, scenes: Path, tmp_path: Path, capsys) -> None:
    photos = _photos(scenes, tmp_path / "photos", 3)
    ck = str(model.folder)
    assert main(["embed", ck, "--images", str(photos), "--out", str(tmp_path / "emb"), "--no-progress"]) == 0
    assert main(["index", str(tmp_path / "emb"), "--out", str(tmp_path / "idx")]) == 0
    q = tmp_path / "q.txt"
    q.write_text("a red circle\n")
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    (tmp_path / "link.jsonl").symlink_to(victim)
    capsys.readouterr()
    for out, message in ((victim, "exists; search never replaces a file"), (tmp_path / "link.jsonl", "is a symbolic link")):
        assert main(["search", str(tmp_path / "idx"), "--queries", str(q), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert victim.read_text() == "mine"
    res = tmp_path / "new" / "res.jsonl"
    assert main(["search", str(tmp_path / "idx"), "--queries", str(q), "--out", str(res), "-k", "2"]) == 0
    assert [len(json.loads(x)["results"]) for x in res.read_text().splitlines()] == [2]
    assert sorted(os.listdir(res.parent)) == ["res.jsonl"]


def test_folder_mix_ups_are_named(tmp_path: Path, capsys) -> None:
    idx = _index(tmp_path)
    emb = tmp_path / "emb"
    capsys.readouterr()
    for argv, message in (
        (["index", str(idx), "--out", str(tmp_path / "i2")], "is an index folder, not an embed folder"),
        (["search", str(emb), "--text", "x"], "is an embed folder, not an index"),
        (["search", str(idx / "index.json"), "--text", "x"], "is a file, not an index folder"),
        (["index", str(emb / "embed.json"), "--out", str(tmp_path / "i3")], "is a file, not an embed folder"),
        (["search", str(idx), "--queries", str(tmp_path)], "is a folder, not a file"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_embed_progress_in_a_log_is_plain_lines(
    model: vlmtune.Model, scenes: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """embed's bar and the API's (progress=True) are console.progress: with stderr not a
    terminal, plain lines and no carriage return (a bar redrawn into a log)."""
    from vlmtune import console

    monkeypatch.setattr(console, "LOG_EVERY_S", 0.0)
    monkeypatch.setattr(console, "LONG_S", 0.0)
    photos = _photos(scenes, tmp_path / "photos", 3)
    capsys.readouterr()
    assert main(["embed", str(model.folder), "--images", str(photos), "--out", str(tmp_path / "emb")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and any(ln.startswith("embed images") and "3/3" in ln for ln in err.splitlines()), err
    model.embed_images(sorted(photos.iterdir()), progress=True)
    model.embed_texts(["a red circle", "a blue square"], progress=True)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and any(ln.startswith("images") for ln in lines) and any(ln.startswith("texts") for ln in lines), err


def _variant(ckpt: Path, dest: Path, *, bump_weight: bool = False, text_pooling: str | None = None) -> Path:
    """The checkpoint saved again with one weight changed, or another text pooling."""
    import copy

    from vlmtune.checkpoint import open_checkpoint, save_checkpoint

    c = open_checkpoint(ckpt)
    w, cfg = c.weights(), copy.deepcopy(c.cfg)
    if bump_weight:
        name = next(k for k in w if k.startswith("text_projector"))
        w[name] = w[name] + 0.01
    if text_pooling:
        cfg.backbone.text_pooling = text_pooling
    copy_backbone = lambda folder: shutil.copytree(ckpt / "backbone", folder / "backbone")  # noqa: E731
    save_checkpoint(dest, weights=w, cfg=cfg, state=c.state, trainer_state=None, backbone=None, extra_files=copy_backbone)
    return dest


def test_search_checkpoint_refusal_says_what_differs(model: vlmtune.Model, scenes: Path, tmp_path: Path, capsys) -> None:
    ck = Path(model.folder)
    photos = _photos(scenes, tmp_path / "photos", 2)
    emb, idx = tmp_path / "emb", tmp_path / "idx"
    assert main(["embed", str(ck), "--images", str(photos), "--out", str(emb), "--no-progress"]) == 0
    assert main(["index", str(emb), "--out", str(idx)]) == 0
    pooled = "mean" if model.cfg.backbone.text_pooling == "last" else "last"
    cases = [
        (_variant(ck, tmp_path / "w", bump_weight=True), "differs in: weights (another training run or epoch);"),
        (_variant(ck, tmp_path / "p", text_pooling=pooled), "differs in: pooling (backbone.vision_pooling"),
    ]
    for other, message in cases:
        capsys.readouterr()
        assert main(["search", str(idx), "--text", "a red circle", "--checkpoint", str(other)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is not the model that built" in err[0] and message in err[0], err
    assert "weights" not in err[0].split("differs in:")[1]  # the pooling variant has the same weights

    # The checkpoint that built the index gone: the weights' digest the index records still tells.
    copied = tmp_path / "copied"
    shutil.copytree(ck, copied)
    emb2, idx2 = tmp_path / "emb2", tmp_path / "idx2"
    assert main(["embed", str(copied), "--images", str(photos), "--out", str(emb2), "--no-progress"]) == 0
    assert main(["index", str(emb2), "--out", str(idx2)]) == 0
    shutil.rmtree(copied)
    capsys.readouterr()
    assert main(["search", str(idx2), "--text", "a red circle", "--checkpoint", str(tmp_path / "w")]) == 2
    assert "differs in: weights (another training run or epoch)" in capsys.readouterr().err
