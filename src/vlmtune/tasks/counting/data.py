"""The counting task's data: prompts, its loader and the frozen vision tower's cache
(the states of every tile of every image)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from vlmtune.backbone import Backbone, preprocess_images
from vlmtune.data.cache import FeatureStore, content_key, preprocess_signature
from vlmtune.data.counting import CachedTiles, CountingCollator, CountingDataset, PromptBuilder, num_tiles, tile_key
from vlmtune.data.formats import CountRecord, image_size, load_image
from vlmtune.errors import VlmtuneError
from vlmtune.tasks import common
from vlmtune.tasks.base import FeatureCache
from vlmtune.tasks.counting.config import CountingConfig


def prompt_builder(backbone: Backbone, c: CountingConfig) -> PromptBuilder:
    return PromptBuilder(backbone.tokenizer, backbone.info.tokens_per_tile, c.question_max_tokens, c.answer_max_tokens)


def make_loader(
    records: list[CountRecord],
    backbone: Backbone,
    c: CountingConfig,
    *,
    batch_size: int,
    train: bool = False,
    seed: int = 0,
    num_workers: int | None = 0,
    cache: FeatureCache | None = None,
    cache_dtype: str = "float32",
    cache_batch_size: int = 32,
) -> DataLoader:
    """Training loaders shuffle (by a seeded generator) and drop the last partial batch.

    With a ``cache`` whose ``vision`` is set, the images' vision states come from the
    feature cache in ``cache.dir`` (built now for any image not yet in it) instead of
    being decoded, tiled and run through the tower: the tower's output, or -- where the
    cache names a ``vision_start`` block -- the state entering it (the frozen prefix of
    a stage that trains the blocks above). ``cache.text`` is ignored: the language
    model reads the image tokens, so its states are never frozen features.
    """
    collate = CountingCollator(
        prompt_builder(backbone, c), backbone.image_processor, c.max_dynamic_patch, backbone.tokenizer.pad_token_id
    )
    cached = None
    if cache is not None and cache.vision:
        cached = build_vision_cache(
            records,
            backbone,
            cache.dir,
            max_tiles=c.max_dynamic_patch,
            start=cache.vision_start,
            dtype=cache_dtype,
            batch_size=cache_batch_size,
        )
    return common.records_loader(
        CountingDataset(records, c.buckets, cached),
        len(records),
        batch_size=batch_size,
        train=train,
        seed=seed,
        num_workers=num_workers,
        collate_fn=collate,
    )


def vision_namespace(backbone: Backbone, *, max_tiles: int, start: int | None, dtype: str) -> dict[str, Any]:
    """Everything besides the image that decides the cached tiles' states: the backbone,
    the weights of the modules that compute them (the whole tower, or the prefix below
    block ``start``), the tiling and pixel preprocessing, the tower's and the storage's
    dtypes."""
    p = backbone.image_processor
    # "start" is in the namespace also when None (as it always was: the cache ids stay).
    return {
        "start": start,
        **common.vision_namespace(
            backbone,
            kind="vision_tiles",
            start=start,
            dtype=dtype,
            preprocess={
                **preprocess_signature(p),
                "min_patches": getattr(p, "min_patches", 1),
                "max_tiles": max_tiles,
                "crop_to_patches": max_tiles > 1,
            },
            tower_dtype=str(next(backbone.vision_tower.parameters()).dtype),
        ),
    }


@torch.no_grad()
def build_vision_cache(
    records: list[CountRecord],
    backbone: Backbone,
    cache_dir: str | Path,
    *,
    max_tiles: int,
    start: int | None = None,
    dtype: str = "float32",
    batch_size: int = 32,
) -> CachedTiles:
    """The store holding the vision states of every tile of every image of ``records``,
    one row per tile, keyed by the image's content and the tile's index.

    Each image's tile count comes from its header size (EXIF orientation applied, as
    :func:`load_image` returns it) by the processor's own tiling rule, so a cached
    epoch decodes nothing; building a row checks that count against the processor's.
    ``start`` None stores the tower's last hidden state (what the projector reads); an
    int the hidden state entering block ``start`` (``Backbone.vision_hidden``).
    """
    store = FeatureStore(cache_dir, vision_namespace(backbone, max_tiles=max_tiles, start=start, dtype=dtype))
    keys = {path: content_key(path) for path in dict.fromkeys(r.image for r in records)}
    sources = {r.image: r.source for r in records}
    tiles = {path: num_tiles(backbone.image_processor, *image_size(path, sources[path]), max_tiles) for path in keys}
    path_of = {k: p for p, k in keys.items()}

    def compute(batch_keys: list[str]) -> Any:
        # Rows are tiles; an image's tiles may straddle two batches (each decodes it).
        wanted = [(k.rsplit("/tile", 1)[0], int(k.rsplit("/tile", 1)[1])) for k in batch_keys]
        images = list(dict.fromkeys(key for key, _ in wanted))
        pv, n = preprocess_images(
            backbone.image_processor, [load_image(path_of[k], sources[path_of[k]]) for k in images], max_tiles
        )
        first = dict(zip(images, torch.cat([n.new_zeros(1), n.cumsum(0)]).tolist()))
        for key, count in zip(images, n.tolist()):
            if count != tiles[path_of[key]]:
                raise VlmtuneError(
                    f"{sources[path_of[key]]}: image {path_of[key]} was cut into {count} tiles, but its "
                    f"header size gives {tiles[path_of[key]]}; set cache.enabled=false to train on it"
                )
        return common.vision_rows(backbone, pv[[first[key] + t for key, t in wanted]], start)

    store.ensure([tile_key(keys[p], t) for p in keys for t in range(tiles[p])], compute, batch_size=batch_size, dtype=dtype)
    return CachedTiles(store, keys, tiles, start)
