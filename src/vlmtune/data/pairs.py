"""Datasets and collation for image-text pairs (retrieval and grounding)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from vlmtune.backbone import preprocess_images, tokenize
from vlmtune.data.cache import FeatureStore, content_key, text_key
from vlmtune.data.formats import PairRecord, load_image
from vlmtune.data.relations import mask_relation


class PairDataset(Dataset):
    """One item per (image, caption) record.

    Live: the image is decoded here, in the workers. Cached: the frozen vision tower's
    output for the image is read from a :class:`FeatureStore` (no decode, no tower),
    and likewise the frozen language model's token states for the caption. With
    ``vision_start`` the store holds a frozen prefix's output instead (the state
    entering that block): items carry it as ``vision_hidden``.
    """

    def __init__(
        self,
        records: list[PairRecord],
        store: FeatureStore | None = None,
        keys: dict[Any, str] | None = None,
        sizes: dict[Any, tuple[int, int]] | None = None,
        text_store: FeatureStore | None = None,
        vision_start: int | None = None,
    ):
        if vision_start is not None and store is None:
            raise ValueError("vision_start needs the store of that prefix")
        self.records = records
        self.store = store
        self.vision_start = vision_start
        self.keys = keys or {}
        self.sizes = sizes or {}
        self.text_store = text_store

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        # The relation head reads the caption with its relation phrase masked.
        item: dict[str, Any] = {
            "index": i,
            "text": r.text,
            "rel_text": mask_relation(r.text),
            "image_id": r.image_id,
            "relation": -1 if r.relation is None else r.relation,
        }
        if self.store is not None:
            row = torch.from_numpy(self.store.get(self.keys[r.image]).astype("float32"))
            if self.vision_start is None:
                item["vision_tokens"] = row
            else:
                item["vision_hidden"], item["vision_start"] = row, self.vision_start
            w, h = self.sizes[r.image]
        else:
            image = load_image(r.image, r.source)
            item["image"] = image
            w, h = image.size
        if self.text_store is not None:
            item["text_hidden"] = torch.from_numpy(self.text_store.get(text_key(r.text)).astype("float32"))
            item["rel_text_hidden"] = torch.from_numpy(self.text_store.get(text_key(item["rel_text"])).astype("float32"))
        if r.bbox is not None:
            x, y, bw, bh = r.bbox
            item["box"] = torch.tensor([(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h], dtype=torch.float32)
        else:
            item["box"] = torch.full((4,), float("nan"))
        item["image_wh"] = torch.tensor([w, h], dtype=torch.float32)
        return item


@dataclass
class PairCollator:
    """Turns items into tensors with the backbone's own tokenizer and image processor.

    Images are resized to one square tile, so boxes normalised by the original size stay
    valid for the resized image.
    """

    tokenizer: Any
    image_processor: Any
    max_tokens: int

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        text = tokenize(self.tokenizer, [it["text"] for it in items], self.max_tokens)
        rel_text = tokenize(self.tokenizer, [it["rel_text"] for it in items], self.max_tokens)
        batch = {
            "index": torch.tensor([it["index"] for it in items]),
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "rel_input_ids": rel_text["input_ids"],
            "rel_attention_mask": rel_text["attention_mask"],
            "image_id": torch.tensor([it["image_id"] for it in items]),
            "box": torch.stack([it["box"] for it in items]),
            "relation": torch.tensor([it["relation"] for it in items]),
            "image_wh": torch.stack([it["image_wh"] for it in items]),
        }
        if "text_hidden" in items[0]:
            # Stored padded to max_tokens; the batch is padded to its longest caption.
            t = text["input_ids"].shape[1]
            batch["text_hidden"] = torch.stack([it["text_hidden"][:t] for it in items])
            t = rel_text["input_ids"].shape[1]
            batch["rel_text_hidden"] = torch.stack([it["rel_text_hidden"][:t] for it in items])
        if "vision_tokens" in items[0]:
            batch["vision_tokens"] = torch.stack([it["vision_tokens"] for it in items])
        elif "vision_hidden" in items[0]:
            # A frozen prefix's output; the block it enters (a plain int, not a tensor:
            # read on the host without a device sync) tells the model where to go on.
            batch["vision_hidden"] = torch.stack([it["vision_hidden"] for it in items])
            batch["vision_start"] = items[0]["vision_start"]
        else:
            batch["pixel_values"], _ = preprocess_images(self.image_processor, [it["image"] for it in items], max_tiles=1)
        return batch


def image_keys(records: list[PairRecord]) -> dict[Any, str]:
    """Content key of every distinct image file of ``records``."""
    return {path: content_key(path) for path in dict.fromkeys(r.image for r in records)}
