"""Shared fixtures: a small synthetic scenes set and fast run overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.fixture(scope="session")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlmtune.data.scenes import generate_scenes

    folder = tmp_path_factory.mktemp("scenes")
    # Val and test of 10 images each: eval.ks [1, 5, 10] must fit the gallery.
    generate_scenes(folder, n=40, seed=3, image_size=64, split_fractions=(0.5, 0.25, 0.25))
    return folder


@pytest.fixture()
def fast(scenes: Path) -> list[str]:
    """Overrides that make any retrieval config run in seconds on the small set."""
    return [
        f"data.synthetic_dir={scenes}", "data.synthetic.n=40", "train.epochs=2", "train.batch_size=8",
        "train.progress=false", "eval.batch_size=16",
    ]
