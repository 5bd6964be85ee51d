"""The frozen-feature cache: stored once, reused, invalidated by content and settings;
training from it gives the same losses as live features."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmtune.data.cache import FeatureStore, content_key


def _compute_counter():
    calls: list[list[str]] = []

    def compute(keys: list[str]) -> np.ndarray:
        calls.append(list(keys))
        return np.stack([np.full((3, 2), float(int(k[:6], 16) % 97)) for k in keys])

    return compute, calls


def test_store_computes_each_key_once_and_persists(tmp_path: Path) -> None:
    compute, calls = _compute_counter()
    ns = {"backbone": "x", "size": 64}
    keys = ["aa" * 32, "bb" * 32, "aa" * 32, "cc" * 32]
    store = FeatureStore(tmp_path, ns)
    assert store.ensure(keys, compute, batch_size=2) == 3
    assert sum(len(c) for c in calls) == 3
    again = FeatureStore(tmp_path, ns)  # a later run
    assert again.ensure(keys, compute, batch_size=2) == 0
    assert sum(len(c) for c in calls) == 3
    assert again.ensure(keys + ["dd" * 32], compute, batch_size=2) == 1
    for k in keys + ["dd" * 32]:
        assert np.array_equal(again.get(k), np.full((3, 2), float(int(k[:6], 16) % 97)))
    assert isinstance(FeatureStore(tmp_path, ns).data, np.memmap)


def test_changed_setting_uses_another_folder(tmp_path: Path) -> None:
    compute, calls = _compute_counter()
    FeatureStore(tmp_path, {"size": 64}).ensure(["aa" * 32], compute, 4)
    other = FeatureStore(tmp_path, {"size": 448})
    assert "aa" * 32 not in other
    assert other.ensure(["aa" * 32], compute, 4) == 1


def test_changed_image_changes_its_key(tmp_path: Path) -> None:
    p = tmp_path / "a.png"
    p.write_bytes(b"one")
    k1 = content_key(p)
    p.write_bytes(b"two")
    assert content_key(p) != k1
    (tmp_path / "b.png").write_bytes(b"two")
    assert content_key(tmp_path / "b.png") == content_key(p)


def test_cached_training_gives_the_same_losses_as_live(scenes: Path, tmp_path: Path) -> None:
    from conftest import CONFIGS
    from vlmtune.backbone import load_backbone
    from vlmtune.config import load_config
    from vlmtune.data.formats import read_pairs
    from vlmtune.tasks import FeatureCache
    from vlmtune.tasks.retrieval import RetrievalTask

    cfg = load_config(CONFIGS / "retrieval_two_stage.yaml", ["train.batch_size=8"])
    task = RetrievalTask.from_config(cfg)
    model = task.build_model(load_backbone(cfg.backbone))
    model.eval()  # no dropout, so the two paths see the same network
    records = read_pairs(scenes / "train.json")
    live = task.make_loader(records, model.backbone, train=True, seed=0)
    cached = task.make_loader(records, model.backbone, train=True, seed=0, cache=FeatureCache(tmp_path / "cache"))
    active = frozenset({"contrastive", "matching", "box", "relation"})
    n = 0
    for a, b in zip(live, cached):
        assert "pixel_values" in a and "vision_tokens" in b and "pixel_values" not in b
        assert torch.equal(a["index"], b["index"])
        torch.manual_seed(0)
        ta = model(a, active)
        torch.manual_seed(0)
        tb = model(b, active)
        for k in active:
            assert ta[k].item() == pytest.approx(tb[k].item(), rel=1e-5, abs=1e-6), k
        n += 1
    assert n == len(live) > 1
    # A second loader finds every image already stored.
    store_dir = next((tmp_path / "cache").iterdir())
    mtime = (store_dir / "features.npy").stat().st_mtime_ns
    task.make_loader(records, model.backbone, train=True, seed=0, cache=FeatureCache(tmp_path / "cache"))
    assert (store_dir / "features.npy").stat().st_mtime_ns == mtime


def test_whole_run_with_and_without_cache_agree(tmp_path: Path, fast: list[str]) -> None:
    """Stage 1 (tower frozen) reads the tower's output from the cache, stage 2 (last
    block trains) switches by itself to the cached frozen prefix below that block and
    runs the block live; the run ends where the uncached run ends."""
    import json

    from conftest import CONFIGS
    from vlmtune.cli import main

    cfg = str(CONFIGS / "retrieval_two_stage.yaml")
    args = [*fast, "stages.1.start_epoch=1"]
    assert main(["train", cfg, "--output-dir", str(tmp_path / "on"), *args]) == 0
    assert main(["train", cfg, "--output-dir", str(tmp_path / "off"), *args, "cache.enabled=false"]) == 0
    on, off = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("on", "off"))
    for key in ("retrieval/mean_recall", "retrieval/i2t_r1", "grounding/miou", "spatial/accuracy"):
        assert on[key] == pytest.approx(off[key], abs=1e-6), key
    stages = [json.loads(x) for x in (tmp_path / "on" / "history.jsonl").read_text().splitlines()]
    stages = [x for x in stages if x["type"] == "stage"]
    assert stages[0]["cache"]["cache_vision"] is True and stages[0]["cache"]["cache_text"] is True
    assert stages[1]["cache"]["cache_vision_start"] == 1 and stages[1]["cache"]["cache_text"] is True
    assert "cache_vision_start" not in stages[0]["cache"]
    assert any((tmp_path / "on" / "cache").iterdir()) and not (tmp_path / "off" / "cache").exists()


def test_weight_fingerprint_follows_in_place_updates() -> None:
    """The remembered digest changes exactly when a weight does."""
    from vlmtune.backbone import load_backbone
    from vlmtune.config import BackboneConfig
    from vlmtune.data.cache import _weights_sha256, vision_fingerprint

    b = load_backbone(BackboneConfig())
    first = vision_fingerprint(b)
    assert vision_fingerprint(b) == first == _weights_sha256(b.vision_tower)
    with torch.no_grad():
        b.vision_blocks[-1].mlp.fc1.weight.add_(1.0)  # as an optimizer step would
    changed = vision_fingerprint(b)
    assert changed != first and changed == _weights_sha256(b.vision_tower)


def test_content_key_sees_a_rewritten_file(tmp_path: Path) -> None:
    import os

    p = tmp_path / "a.png"
    p.write_bytes(b"one")
    k1 = content_key(p)
    p.write_bytes(b"two!")
    os.utime(p, ns=(1, 1))  # even with an old timestamp, the size differs
    assert content_key(p) != k1


# --------------------------------------------------------------------------- integrity (issue 10)


def _filled_store(root: Path) -> tuple[FeatureStore, list[str], list[list[str]]]:
    compute, calls = _compute_counter()
    keys = ["aa" * 32, "bb" * 32, "cc" * 32]
    store = FeatureStore(root, {"size": 64})
    store.ensure(keys, compute, batch_size=2)
    return store, keys, calls


def _zero_rows(f: Path) -> None:
    raw = bytearray(f.read_bytes())
    raw[128:] = bytes(len(raw) - 128)  # .npy v1 header is 128 bytes; the rows follow
    f.write_bytes(bytes(raw))


def _damage_index(rows: object) -> "Callable[[Path], None]":
    def fn(folder: Path) -> None:
        import json

        idx = json.loads((folder / "index.json").read_text())
        idx["rows"] = rows
        (folder / "index.json").write_text(json.dumps(idx))

    return fn


CORRUPTIONS = {
    "zeroed": lambda d: _zero_rows(d / "features.npy"),
    "truncated": lambda d: (d / "features.npy").write_bytes((d / "features.npy").read_bytes()[:150]),
    "header-damaged": lambda d: (d / "features.npy").write_bytes(b"\0" * 300),
    "index-not-json": lambda d: (d / "index.json").write_text("{"),
    "index-old-format": lambda d: (d / "index.json").write_text('{"' + "aa" * 32 + '": 0}'),
    "index-row-out-of-range": _damage_index({"aa" * 32: 7}),
    "index-rows-swapped": _damage_index({"aa" * 32: 1, "bb" * 32: 0, "cc" * 32: 2}),
}


@pytest.mark.parametrize("damage", list(CORRUPTIONS), ids=list(CORRUPTIONS))
def test_corrupt_store_is_rebuilt_never_used(damage: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import importlib

    cache_mod = importlib.import_module("vlmtune.data.cache")
    store, keys, _ = _filled_store(tmp_path)
    CORRUPTIONS[damage](store.dir)
    cache_mod._VERIFIED.clear()  # a new process: nothing checked yet
    compute, calls = _compute_counter()
    again = FeatureStore(tmp_path, {"size": 64})
    with caplog.at_level("WARNING", logger="vlmtune"):
        n = again.ensure(keys, compute, batch_size=2)
    assert any("will be rebuilt" in r.getMessage() and str(store.dir) in r.getMessage() for r in caplog.records)
    assert sum(len(c) for c in calls) == len(keys) == n  # rebuilt whole
    for k in keys:
        assert np.array_equal(again.get(k), np.full((3, 2), float(int(k[:6], 16) % 97)))


def test_rows_are_checked_once_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vlmtune.data.cache as cache_mod

    store, keys, _ = _filled_store(tmp_path)
    hashed = []
    real = cache_mod._row_digest
    monkeypatch.setattr(cache_mod, "_row_digest", lambda key, row: hashed.append(1) or real(key, row))
    cache_mod._VERIFIED.clear()
    compute, _ = _compute_counter()
    for _ in range(3):  # three epochs open the store again
        s = FeatureStore(tmp_path, {"size": 64})
        assert s.ensure(keys, compute, batch_size=2) == 0
        for k in keys:
            s.get(k)
    assert len(hashed) == len(keys)


def test_store_changed_while_in_use_is_refused(tmp_path: Path) -> None:
    import vlmtune.data.cache as cache_mod

    store, keys, _ = _filled_store(tmp_path)
    cache_mod._VERIFIED.clear()
    s = FeatureStore(tmp_path, {"size": 64})
    _zero_rows(s.dir / "features.npy")
    with pytest.raises(cache_mod.CacheCorrupt, match="does not match its sha256"):
        s.get(keys[0])


def test_full_disk_is_refused_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import vlmtune.data.cache as cache_mod
    from vlmtune.errors import VlmtuneError

    real = shutil.disk_usage
    monkeypatch.setattr(cache_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=100))
    compute, _ = _compute_counter()
    store = FeatureStore(tmp_path, {"size": 64})
    with pytest.raises(VlmtuneError, match=r"feature cache .*: needs \d+ bytes, only 100 free"):
        store.ensure(["aa" * 32], compute, batch_size=2)
    assert not list(store.dir.glob("features*.npy"))


@pytest.mark.parametrize("orientation", [6, 8])
def test_rotated_jpeg_cached_and_live_boxes_agree(orientation: int, tmp_path: Path) -> None:
    """A phone photo stored 48x32 with EXIF orientation 6/8 loads as 32x48; a box drawn
    on the photo as seen must normalise inside [0, 1] on both paths, identically."""
    import json

    from PIL import Image

    from vlmtune.backbone import load_backbone
    from vlmtune.config import BackboneConfig
    from vlmtune.data.formats import image_size, load_image, read_pairs
    from vlmtune.data.pairs import PairDataset
    from vlmtune.tasks.retrieval import build_vision_cache

    img = Image.new("RGB", (48, 32), (30, 120, 200))
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(tmp_path / "photo.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "photo.jpg").size == image_size(tmp_path / "photo.jpg") == (32, 48)
    box = [4, 30, 24, 16]  # x, y, w, h in the upright 32x48 picture; below y=32 of the stored header
    (tmp_path / "a.json").write_text(json.dumps([{"image": "photo.jpg", "caption": "a blue photo", "bbox": box}]))
    records = read_pairs(tmp_path / "a.json")
    backbone = load_backbone(BackboneConfig())
    store, keys, sizes = build_vision_cache(records, backbone, tmp_path / "cache")
    cached = PairDataset(records, store, keys, sizes)[0]
    live = PairDataset(records)[0]
    assert torch.equal(cached["box"], live["box"]) and torch.equal(cached["image_wh"], live["image_wh"])
    cx, cy, w, h = live["box"].tolist()
    assert 0 <= cx - w / 2 and cx + w / 2 <= 1 and 0 <= cy - h / 2 and cy + h / 2 <= 1
    assert live["image_wh"].tolist() == [32, 48]


def test_weight_fingerprints_read_the_state_dict_names_and_values_without_calling_it() -> None:
    """The cache's weight digests walk the modules (an FSDP2 state_dict() would reshard
    gathered weights) but hash exactly what state_dict() holds, in its order."""
    import hashlib

    from vlmtune.backbone import load_backbone
    from vlmtune.config import BackboneConfig
    from vlmtune.data.cache import _named_weights, _weights_sha256

    tiny = load_backbone(BackboneConfig())

    for module in (tiny.vision_tower, tiny.language_model, tiny.vision_tower.embeddings):
        sd = module.state_dict()
        pairs = list(_named_weights(module))
        assert [n for n, _ in pairs] == list(sd)
        assert all(torch.equal(t, sd[n]) for n, t in pairs)
        h = hashlib.sha256()
        for name, t in sd.items():
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
        assert _weights_sha256(module) == h.hexdigest()


@pytest.mark.slow  # two two-stage runs of 2 epochs: about 8 s quiet, 30 s at load 8 on the shared 2-core CPU
def test_float16_cache_trains_to_the_losses_of_float32(tmp_path: Path, fast: list[str]) -> None:
    """cache.dtype=float16 (the default where CUDA is) halves the cache; a run trained from
    it follows the float32 run's losses step by step (measured here: at most 3e-5 apart,
    relative, over 22 steps of both stages) and ends at the same metrics."""
    import json

    from conftest import CONFIGS
    from vlmtune.cli import main

    cfg = str(CONFIGS / "retrieval_two_stage.yaml")
    args = [*fast, "stages.1.start_epoch=1", "train.log_every=1"]
    for dtype in ("float32", "float16"):
        assert main(["train", cfg, "--output-dir", str(tmp_path / dtype), *args, f"cache.dtype={dtype}"]) == 0

    def steps(d: str) -> list[float]:
        lines = [json.loads(x) for x in (tmp_path / d / "history.jsonl").read_text().splitlines()]
        return [x["loss"] for x in lines if x["type"] == "step"]

    full, half = steps("float32"), steps("float16")
    assert len(full) == len(half) > 10
    assert half != full  # the float16 rows were really read (rounded features, other losses)
    for a, b in zip(full, half):
        assert b == pytest.approx(a, rel=1e-3)
    on, off = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("float16", "float32"))
    assert on["retrieval/mean_recall"] == pytest.approx(off["retrieval/mean_recall"], abs=2.0)
    sizes = {d: sum(f.stat().st_size for f in (tmp_path / d / "cache").rglob("*.npy")) for d in ("float32", "float16")}
    assert sizes["float16"] < 0.6 * sizes["float32"]
