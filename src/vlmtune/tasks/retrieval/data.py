"""The retrieval task's data: its loader and its frozen-feature caches (the vision
tower's rows of each image, the language model's states of each caption)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from vlmtune.backbone import Backbone, preprocess_images, tokenize
from vlmtune.checkpoint import backbone_identity
from vlmtune.data.cache import FeatureStore, preprocess_signature, text_fingerprint, text_key
from vlmtune.data.formats import PairRecord, image_size, load_image
from vlmtune.data.pairs import PairCollator, PairDataset, image_keys
from vlmtune.data.relations import mask_relation
from vlmtune.tasks import common
from vlmtune.tasks.base import FeatureCache


def make_loader(
    records: list[PairRecord],
    backbone: Backbone,
    *,
    batch_size: int,
    max_text_tokens: int,
    train: bool = False,
    seed: int = 0,
    num_workers: int | None = 0,
    cache: FeatureCache | None = None,
    cache_dtype: str = "float32",
    cache_batch_size: int = 64,
) -> DataLoader:
    """Training loaders shuffle (by a seeded generator) and drop the last partial batch.

    With ``cache`` the frozen vision tower's outputs (``cache.vision``) and the frozen
    language model's (``cache.text``) come from the feature cache in ``cache.dir``,
    built now for any image or caption not yet in it, instead of being recomputed.
    With ``cache.vision_start`` the vision rows are the frozen prefix's output (the
    state entering that block) instead of the tower's: batches carry ``vision_hidden``
    and ``vision_start`` and the model runs the blocks above live.
    """
    dataset = PairDataset(records)
    if cache is not None:
        store, keys, sizes = (
            build_vision_cache(
                records, backbone, cache.dir, dtype=cache_dtype, batch_size=cache_batch_size, start=cache.vision_start
            )
            if cache.vision
            else (None, None, None)
        )
        text_store = (
            build_text_cache(
                records, backbone, cache.dir, max_tokens=max_text_tokens, dtype=cache_dtype, batch_size=cache_batch_size
            )
            if cache.text
            else None
        )
        dataset = PairDataset(records, store, keys, sizes, text_store, vision_start=cache.vision_start if cache.vision else None)
    return common.records_loader(
        dataset,
        len(records),
        batch_size=batch_size,
        train=train,
        seed=seed,
        num_workers=num_workers,
        collate_fn=PairCollator(backbone.tokenizer, backbone.image_processor, max_text_tokens),
    )


@torch.no_grad()
def build_text_cache(
    records: list[PairRecord],
    backbone: Backbone,
    cache_dir: str | Path,
    *,
    max_tokens: int,
    dtype: str = "float32",
    batch_size: int = 64,
) -> FeatureStore:
    """The store holding the language model's token states of every caption, padded to
    ``max_tokens`` (right padding, so real tokens never see the pads)."""
    ns = {
        "kind": "text_tokens",
        "backbone": backbone_identity(backbone),
        "weights": text_fingerprint(backbone),
        "max_tokens": max_tokens,
        "dtype": dtype,
    }
    store = FeatureStore(cache_dir, ns)
    # Captions, and the captions with their relation phrase masked (what the relation head reads).
    by_key = {text_key(t): t for r in records for t in (r.text, mask_relation(r.text))}
    device = next(backbone.parameters()).device

    def compute(batch_keys: list[str]) -> Any:
        enc = tokenize(backbone.tokenizer, [by_key[k] for k in batch_keys], max_tokens)
        hidden = backbone.text_tokens(enc["input_ids"].to(device), enc["attention_mask"].to(device)).float().cpu()
        return torch.nn.functional.pad(hidden, (0, 0, 0, max_tokens - hidden.shape[1])).numpy()

    store.ensure(list(by_key), compute, batch_size=batch_size, dtype=dtype)
    return store


def vision_namespace(backbone: Backbone, dtype: str, start: int | None = None) -> dict[str, Any]:
    """Everything besides the image that determines the cached vision rows: the tower's
    output (``start`` None), or the hidden state entering block ``start``, keyed by the
    split point and the weights of exactly the prefix below it."""
    return common.vision_namespace(
        backbone,
        kind="vision_tokens",
        start=start,
        dtype=dtype,
        preprocess=preprocess_signature(backbone.image_processor),
        max_tiles=1,
    )


@torch.no_grad()
def build_vision_cache(
    records: list[PairRecord],
    backbone: Backbone,
    cache_dir: str | Path,
    *,
    dtype: str = "float32",
    batch_size: int = 64,
    start: int | None = None,
) -> tuple[FeatureStore, dict[Any, str], dict[Any, tuple[int, int]]]:
    """The store holding the vision tokens of every image of ``records`` (with
    ``start``: the hidden state entering block ``start`` instead); the sizes are
    those :func:`load_image` returns (EXIF orientation applied), as live loading uses."""
    store = FeatureStore(cache_dir, vision_namespace(backbone, dtype, start))
    keys = image_keys(records)
    by_key = {k: p for p, k in keys.items()}
    sources = {r.image: r.source for r in records}
    sizes: dict[Any, tuple[int, int]] = {}
    for path in keys:
        sizes[path] = image_size(path, sources[path])  # header only

    def compute(batch_keys: list[str]) -> Any:
        images = [load_image(by_key[k], sources[by_key[k]]) for k in batch_keys]
        pv, _ = preprocess_images(backbone.image_processor, images, max_tiles=1)
        return common.vision_rows(backbone, pv, start)

    store.ensure(list(keys.values()), compute, batch_size=batch_size, dtype=dtype)
    return store, keys, sizes
