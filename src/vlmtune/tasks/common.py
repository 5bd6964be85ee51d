"""What the task packages share: the loader of a
list of records, the frozen vision tower's cache namespace and rows, and the way an
evaluation splits its records between processes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from vlmtune.backbone import Backbone
from vlmtune.checkpoint import backbone_identity
from vlmtune.data.cache import vision_fingerprint, vision_prefix_fingerprint
from vlmtune.distributed import rank_world
from vlmtune.utils import usable_cores


def records_loader(
    dataset: Dataset,
    n_records: int,
    *,
    batch_size: int,
    train: bool,
    seed: int,
    num_workers: int | None,
    collate_fn: Callable[[list[Any]], Any],
) -> DataLoader:
    """Training loaders shuffle (by a generator seeded with ``seed``, so a resumed run
    draws the same order) and drop the last partial batch; evaluation loaders keep
    the records' order and every record. Workers: :func:`loader_workers`; with workers
    they persist across epochs, and batches go to pinned memory where CUDA is."""
    g = torch.Generator()
    g.manual_seed(seed)
    workers = loader_workers(num_workers)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        generator=g if train else None,
        num_workers=workers,
        drop_last=train and n_records > batch_size,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
    )


def loader_workers(requested: int | None) -> int:
    """``data.num_workers``: as given, or when null chosen by device: on CUDA several
    (the cores this process may use less one for the main process, at most 8: decoding
    and resizing in the main process would leave the GPU waiting), on CPU none (the
    workers compete with the model's own threads for the same cores; measured by the
    bench's loader section)."""
    if requested is not None:
        return requested
    if not torch.cuda.is_available():
        return 0
    cores = usable_cores()
    return max(1, min(8, cores - 1))


def vision_namespace(
    backbone: Backbone, *, kind: str, start: int | None, dtype: str, preprocess: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    """Everything besides the image that decides cached vision rows: ``kind`` (the
    tower's output) or, with ``start``, the hidden state entering block ``start``
    ("vision_hidden"), the backbone, the weights of exactly the modules computing them
    (the whole tower, or the prefix below ``start``), the pixel ``preprocess``ing, the
    storage ``dtype`` and what the task adds (``extra``). The split point ``start`` is
    part of it where there is one."""
    if start is not None:
        n = backbone.info.num_vision_blocks
        if not 0 <= start <= n:
            raise ValueError(f"vision prefix start {start}: the vision tower has {n} blocks")
    weights = vision_fingerprint(backbone) if start is None else vision_prefix_fingerprint(backbone, start)
    split = {} if start is None else {"kind": "vision_hidden", "start": start}
    return {
        "kind": kind,
        "backbone": backbone_identity(backbone),
        "weights": weights,
        "preprocess": preprocess,
        "dtype": dtype,
        **extra,
        **split,
    }


def vision_rows(backbone: Backbone, pixel_values: torch.Tensor, start: int | None) -> Any:
    """The rows a vision cache stores for preprocessed tiles: the tower's output, or
    the hidden state entering block ``start``; float32 numpy."""
    device = next(backbone.parameters()).device
    out = (
        backbone.vision_tokens(pixel_values.to(device))
        if start is None
        else backbone.vision_hidden(pixel_values.to(device), start)
    )
    return out.float().cpu().numpy()


def shard_rows(keys: Sequence[int]) -> list[int]:
    """This process's share of an evaluation: the indices of the records whose key
    (retrieval: the image id, so each image is embedded by one process; counting: the
    record index, spreading the first records, the ones validation answers) is its
    rank modulo the number of processes. With one process, every record."""
    rank, world = rank_world()
    return [i for i, key in enumerate(keys) if key % world == rank]
