"""Shared fixtures: a small synthetic scenes set and fast run overrides."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread, here and in the commands tests start as processes: the tiny models
# gain nothing from a second one (measured on 2 cores), and when other work shares the
# cores, OpenMP threads waiting on each other made whole runs 5-10x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# Whole runs of a shipped recipe exactly as the README runs it (`vlmtune train
# configs/NAME.yaml --output-dir DIR`, no override), by config name: the slow docs test
# records the front page's runs here, and the recipe quality tests (tests/
# test_recipes_slow.py, later in the same session) read their metrics instead of
# training the same recipe again.
RECIPE_RUNS: dict[str, Path] = {}


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


def small_set(scenes: Path) -> list[str]:
    """Overrides that make any retrieval config run in seconds on the small set."""
    return [
        f"data.synthetic_dir={scenes}",
        "data.synthetic.n=40",
        "train.batch_size=8",
        "train.progress=false",
        "eval.batch_size=16",
    ]


@pytest.fixture()
def fast(scenes: Path) -> list[str]:
    """small_set, two epochs."""
    return [*small_set(scenes), "train.epochs=2"]


TWO_STAGE = str(CONFIGS / "retrieval_two_stage.yaml")
ONE_STAGE = "stages=[{name: a, start_epoch: 0, train: {adapters: 1.0, heads: 1.0}}]"
# With small_set: 88 training records, batch 8: 11 steps an epoch, stage 2 from epoch 2.
RESUMABLE = ["stages.1.start_epoch=1", "train.epochs=3", "train.log_every=1"]


@pytest.fixture(scope="session")
def straight(tmp_path_factory: pytest.TempPathFactory, scenes: Path) -> Path:
    """The uninterrupted two-stage run (small_set + RESUMABLE) that every interrupted and
    resumed run must end equal to. Shared by several tests: read it, never write into it."""
    from vlmtune.cli import main

    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(["train", TWO_STAGE, "--output-dir", str(out), *small_set(scenes), *RESUMABLE]) == 0
    return out


@pytest.fixture(scope="session")
def one_stage_run(tmp_path_factory: pytest.TempPathFactory, scenes: Path) -> Path:
    """One epoch of the two-stage config's first stage alone (adapters and heads) on the
    small set: a run whose checkpoints tests evaluate or load. Shared by several tests:
    copy a checkpoint before writing into it."""
    from vlmtune.cli import main

    out = tmp_path_factory.mktemp("one_stage") / "run"
    assert main(["train", TWO_STAGE, "--output-dir", str(out), *small_set(scenes), "train.epochs=1", ONE_STAGE]) == 0
    return out


@pytest.fixture(scope="session")
def lora_counting_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A counting checkpoint whose one stage trains LoRA in the LM, the projector, the
    last vision block and the count head (export and per-query results use it)."""
    from vlmtune.cli import main
    from vlmtune.data.receipts import generate_receipts

    root = tmp_path_factory.mktemp("lora_counting")
    generate_receipts(root / "data", n=12, seed=2, max_count=2, image_size=(48, 64))
    args = [
        f"data.synthetic_dir={root / 'data'}",
        "data.synthetic.n=12",
        "counting.max_count=2",
        "train.epochs=1",
        "train.batch_size=4",
        "train.progress=false",
        "eval.batch_size=8",
        "counting.max_dynamic_patch=2",
        "generation.max_new_tokens=4",
        "generation.num_beams=1",
        "generation.val_num_images=1",
        "counting.lm_mode=lora",
        "counting.lora_r=4",
        "counting.lora_target_modules=[q_proj,v_proj]",
        "optim.lr=5e-2",
        "optim.warmup_ratio=0",
        "stages=[{name: all, start_epoch: 0, vision_blocks: 1, train: {count_head: 1.0, language_model: 1.0, "
        "mm_projector: 1.0, vision_blocks: 1.0}}]",
    ]
    assert main(["train", str(CONFIGS / "receipts_three_stage.yaml"), "--output-dir", str(root / "run"), *args]) == 0
    return root / "run" / "checkpoints" / "last"


@pytest.fixture(scope="session")
def retrieval_checkpoint(tmp_path_factory: pytest.TempPathFactory, scenes: Path) -> Path:
    """A retrieval checkpoint (one epoch on ``scenes``) that trained the last vision block too."""
    from vlmtune.cli import main

    root = tmp_path_factory.mktemp("retrieval_ckpt")
    args = [
        f"data.synthetic_dir={scenes}",
        "data.synthetic.n=40",
        "train.epochs=1",
        "train.batch_size=8",
        "train.progress=false",
        "eval.batch_size=16",
        "optim.lr=1e-2",
        "stages=[{name: a, start_epoch: 0, vision_blocks: 1, train: {adapters: 1.0, heads: 1.0, vision_blocks: 1.0}}]",
    ]
    assert main(["train", str(CONFIGS / "retrieval_two_stage.yaml"), "--output-dir", str(root / "run"), *args]) == 0
    return root / "run" / "checkpoints" / "last"


# Overrides that make the counting recipe train and evaluate in seconds (the bad-input and real-format runs).
COUNT_QUICK = [
    "train.epochs=1",
    "train.batch_size=4",
    "train.progress=false",
    "eval.batch_size=8",
    "stages=[{name: a, start_epoch: 0, train: {count_head: 1.0}}]",
    "generation.num_beams=1",
    "generation.val_num_images=0",
    "counting.max_dynamic_patch=1",
    "backbone.tiny_image_size=32",
]
