"""The whole feature cache, estimated up front (rows x bytes) against the disk: said, and refused when it cannot fit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import TWO_STAGE
from vlmtune.cli import main
from vlmtune.config import load_config

ONE_STAGE = "stages=[{name: all, start_epoch: 0, train: {adapters: 1.0, heads: 1.0}}]"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlmtune.data.scenes import generate_scenes

    folder = tmp_path_factory.mktemp("scenes")
    generate_scenes(folder, n=12, seed=3, image_size=64)
    return folder


def test_estimate_counts_rows_times_bytes() -> None:
    from vlmtune.backbone import BackboneInfo
    from vlmtune.data.formats import PairRecord
    from vlmtune.train.caches import cache_estimate

    info = BackboneInfo(
        vision_hidden=1024, text_hidden=896, image_size=448, patch_size=14, num_vision_blocks=24, tokens_per_tile=256
    )
    recs = [
        PairRecord(Path(f"i{i // 5}.jpg"), f"caption {i}", i // 5, None, None, "x") for i in range(10)
    ]  # 2 images, 10 captions
    cfg = load_config(TWO_STAGE, ["cache.dtype=float32", "backbone.max_text_tokens=48"])
    total, how = cache_estimate(cfg, info, recs, vision_stores=1, text=True)
    assert total == 2 * 1025 * 1024 * 4 + 10 * 48 * 896 * 4  # 4.2 MB an image at InternVL3-1B's shapes
    assert "2 image rows x 4,198,400 bytes" in how and "10 text rows" in how
    # A caption with a relation phrase is cached twice: as written and with the phrase masked (the relation head's).
    related = [PairRecord(Path("i0.jpg"), "a cat to the left of a dog", 0, None, None, "x"), *recs[:1]]
    both, how = cache_estimate(cfg, info, related, vision_stores=1, text=True)
    assert both == 1025 * 1024 * 4 + 3 * 48 * 896 * 4 and "3 text rows" in how
    half, _ = cache_estimate(load_config(TWO_STAGE, ["cache.dtype=float16"]), info, recs, vision_stores=2, text=False)
    assert half == 2 * 2 * 1025 * 1024 * 2
    # Counting tiles its images: up to counting.max_dynamic_patch tiles and the thumbnail, per image.
    receipts = load_config(
        str(Path(TWO_STAGE).parent / "receipts_three_stage.yaml"), ["cache.dtype=float32", "counting.max_dynamic_patch=3"]
    )
    tiled, _ = cache_estimate(receipts, info, recs, vision_stores=1, text=False)
    assert tiled == 2 * 4 * 1025 * 1024 * 4


def test_cache_command_says_the_estimate_and_refuses_a_cache_that_cannot_fit(
    tmp_path: Path, scenes: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import vlmtune.train.caches as caches

    args = ["cache", TWO_STAGE, "--output-dir", str(tmp_path / "run"), f"data.synthetic_dir={scenes}", ONE_STAGE]
    real = shutil.disk_usage
    monkeypatch.setattr(caches.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    assert main(args) != 0
    err = capsys.readouterr().err
    assert f"feature cache {tmp_path / 'run' / 'cache'}: needs about" in err and "only 1000 free" in err, err
    assert "Traceback" not in err and not list((tmp_path / "run").rglob("features*.npy"))  # refused before extraction
    monkeypatch.setattr(caches.shutil, "disk_usage", real)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "feature cache" in out and "GB free on its disk" in out and "image rows x" in out
