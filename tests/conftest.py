"""Shared fixtures: a small synthetic scenes set and fast run overrides."""

from __future__ import annotations

import json
import os
import shutil
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
    generate_scenes(folder, n=40, seed=3, image_size=64)
    # Six more images each for val and test (10 in all): eval.ks [1, 5, 10] must fit the
    # retrieval gallery. The training split stays as it was (the fault tests count its steps).
    extra = tmp_path_factory.mktemp("scenes_extra")
    generate_scenes(extra, n=12, seed=4, image_size=64, split_fractions=(0.0, 0.5, 0.5))
    shutil.copytree(extra / "images", folder / "images_extra")
    for split in ("val", "test"):
        more = json.loads((extra / f"{split}.json").read_text())
        for r in more:
            r["image"] = r["image"].replace("images/", "images_extra/", 1)
        recs = json.loads((folder / f"{split}.json").read_text()) + more
        (folder / f"{split}.json").write_text(json.dumps(recs, indent=1) + "\n")
    return folder


@pytest.fixture()
def fast(scenes: Path) -> list[str]:
    """Overrides that make any retrieval config run in seconds on the small set."""
    return [
        f"data.synthetic_dir={scenes}", "data.synthetic.n=40", "train.epochs=2", "train.batch_size=8",
        "train.progress=false", "eval.batch_size=16",
    ]
