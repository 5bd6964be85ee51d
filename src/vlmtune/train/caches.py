"""The feature cache a stage reads (which frozen features: the vision tower's output,
the state entering the trained vision blocks, the language model's), and filling the
caches of a config's data up front (``vlmtune cache``) rather than in the first epoch."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vlmtune.backbone import BackboneInfo, load_backbone
from vlmtune.config import Config
from vlmtune.errors import VlmtuneError
from vlmtune.evaluate import default_device
from vlmtune.runfolder import output_folder
from vlmtune.stages import Stage, build_plan
from vlmtune.tasks import FeatureCache, Task, build_task, task_spec


def stage_cache(cfg: Config, task: Task, stage: Stage, out: Path, num_vision_blocks: int = 0) -> FeatureCache | None:
    """Where a stage may read frozen features from the cache: the vision tower's output
    while no vision component trains; while only its last ``stage.vision_blocks`` blocks
    train (not ``vision_tower``), the hidden state entering the first of them (the
    frozen prefix's output, block ``num_vision_blocks - stage.vision_blocks``) for tasks
    that read it ("vision_prefix" in ``cache_kinds``); the language model's while it does not train."""
    if not (cfg.cache.enabled and task.cacheable):
        return None
    kinds = task.cache_kinds  # what the task's loaders can read from a cache
    trains = set(stage.train)
    vision = "vision" in kinds and not ({"vision_blocks", "vision_tower"} & trains)
    vision_start = None
    if (
        "vision_prefix" in kinds
        and "vision_blocks" in trains
        and "vision_tower" not in trains
        and 0 < stage.vision_blocks <= num_vision_blocks
    ):
        vision, vision_start = True, num_vision_blocks - stage.vision_blocks
    text = "text" in kinds and "language_model" not in trains
    if not (vision or text):
        return None
    return FeatureCache(cache_dir(cfg, out), vision=vision, text=text, vision_start=vision_start)


def cache_dir(cfg: Config, out: Path) -> Path:
    """``cache.dir``, by default the run folder's ``cache``."""
    return Path(cfg.cache.dir) if cfg.cache.dir else out / "cache"


def cache_record(cache: FeatureCache | None) -> dict[str, Any]:
    """The stage line's description of the cache it reads."""
    if cache is None:
        return {}
    record = {"cache_dir": str(cache.dir), "cache_vision": cache.vision, "cache_text": cache.text}
    if cache.vision_start is not None:  # the frozen prefix's output, blocks from here on run live
        record["cache_vision_start"] = cache.vision_start
    return record


def cache_estimate(cfg: Config, info: BackboneInfo, records: Sequence[Any], *, vision_stores: int, text: bool) -> tuple[int, str]:
    """An upper bound of the bytes a cache of ``records`` takes, and how it was reckoned:
    every distinct image's rows (the tower's tokens, 1 + patches of ``info.vision_hidden``,
    per tile) in ``vision_stores`` stores (the tower's output, each frozen prefix), and
    with ``text`` the text rows the task caches for them (``Task.cached_texts``: retrieval
    stores each caption and its relation-masked copy) at ``backbone.max_text_tokens``
    tokens; rows already stored are counted too."""
    from vlmtune.data.cache import resolve_cache_dtype

    itemsize = 2 if resolve_cache_dtype(cfg.cache.dtype) == "float16" else 4
    tiles = task_spec(cfg.task).cached_tiles(cfg)
    tokens = 1 + (info.image_size // info.patch_size) ** 2
    image_bytes = tiles * tokens * info.vision_hidden * itemsize
    text_bytes = cfg.backbone.max_text_tokens * info.text_hidden * itemsize if text else 0
    images = len({r.image for r in records}) * vision_stores
    texts = task_spec(cfg.task).cached_texts(list(records)) if text else 0
    total = images * image_bytes + texts * text_bytes
    how = f"{images:,} image rows x {image_bytes:,} bytes" + (f" + {texts:,} text rows x {text_bytes:,} bytes" if text else "")
    return total, how


def check_cache_space(folder: Path, total: int, how: str, say: Callable[[str], None]) -> None:
    """Say the whole cache's estimate against the free space of ``folder``'s disk, and
    refuse before any extraction when it cannot fit."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    say(f"feature cache {folder}: about {total / 1e9:.2f} GB ({how}), {free / 1e9:.2f} GB free on its disk")
    if total > free:
        raise VlmtuneError(
            f"feature cache {folder}: needs about {total} bytes ({how}), only {free} free on its disk; "
            f"free space, point cache.dir elsewhere, set cache.dtype=float16 or cache.enabled=false"
        )


def prefix_cache_starts(cfg: Config, task: Task, out: Path, num_vision_blocks: int) -> list[int]:
    """The vision blocks whose entering state the config's stages read from the cache
    (stages that train only the last N blocks). Filled with the backbone's weights as
    loaded: what such a stage sees unless an earlier stage trains the prefix (then its
    store is keyed by other weights and the stage builds its own)."""
    starts = set()
    for stage in build_plan(cfg, task.loss_weights()):
        cache = stage_cache(cfg, task, stage, out, num_vision_blocks)
        if cache is not None and cache.vision and cache.vision_start is not None:
            starts.add(cache.vision_start)
    return sorted(starts)


def fill_caches(cfg: Config, out: str | Path, say: Callable[[str], None] = print) -> Path:
    """Fill the feature cache of ``cfg``'s data (every split, and the frozen prefixes
    the stages read) into its cache folder, which is returned; one line per split
    through ``say``. ``out`` is the run folder (checked as ``--output-dir``), whose
    ``cache`` is the default folder. A task without a feature cache is an error."""
    output_folder(out)
    task = build_task(cfg)
    if not task.cacheable:
        raise VlmtuneError(f"task '{cfg.task}': has no feature cache")
    out = Path(out)
    folder = cache_dir(cfg, out)
    device = default_device()
    backbone = load_backbone(cfg.backbone, device_type=device.type).to(device)
    paths = task.data_paths(out)
    prefixes = prefix_cache_starts(cfg, task, out, backbone.info.num_vision_blocks)
    splits = {split: task.read_split(paths[split], split) for split in ("train", "val", "test")}
    every = [r for records in splits.values() for r in records]
    total, how = cache_estimate(cfg, backbone.info, every, vision_stores=1 + len(prefixes), text="text" in task.cache_kinds)
    check_cache_space(folder, total, how, say)
    for split, records in splits.items():
        task.make_loader(records, backbone, train=False, cache=FeatureCache(folder))
        if split != "test":  # the stages' training and validation read the prefix; the final evaluation does not
            for start in prefixes:
                task.make_loader(records, backbone, train=False, cache=FeatureCache(folder, text=False, vision_start=start))
        prefix = prefixes and split != "test"
        say(
            f"{split}: {len(records)} records cached"
            + (f" (and the frozen prefix entering vision block {', '.join(map(str, prefixes))})" if prefix else "")
        )
    say(f"cache: {folder}")
    return folder
