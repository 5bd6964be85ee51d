"""The frozen-feature cache: stored once, reused, invalidated by content and settings;
training from it gives the same losses as live features."""

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
    from vlmtune.backbone import load_backbone
    from vlmtune.config import load_config
    from vlmtune.data.formats import read_pairs
    from vlmtune.tasks import FeatureCache
    from vlmtune.tasks.retrieval import RetrievalTask

    from conftest import CONFIGS

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
    """Stage 1 (tower frozen) reads the cache, stage 2 (last block trains) switches to
    live features by itself; the run ends where the uncached run ends."""
    import json

    from vlmtune.cli import main

    from conftest import CONFIGS

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
    assert stages[1]["cache"]["cache_vision"] is False and stages[1]["cache"]["cache_text"] is True
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
