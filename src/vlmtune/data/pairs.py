"""Datasets and collation for image-text pairs (retrieval and grounding)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from vlmtune.backbone import preprocess_images, tokenize
from vlmtune.data.formats import PairRecord, load_image


class PairDataset(Dataset):
    """One item per (image, caption) record; images are decoded here, in the workers."""

    def __init__(self, records: list[PairRecord]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        image = load_image(r.image, r.source)
        w, h = image.size
        if r.bbox is not None:
            x, y, bw, bh = r.bbox
            box = torch.tensor([(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h], dtype=torch.float32)
        else:
            box = torch.full((4,), float("nan"))
        return {
            "index": i,
            "image": image,
            "text": r.text,
            "image_id": r.image_id,
            "box": box,
            "relation": -1 if r.relation is None else r.relation,
            "image_wh": torch.tensor([w, h], dtype=torch.float32),
        }


@dataclass
class PairCollator:
    """Turns items into tensors with the backbone's own tokenizer and image processor.

    Images are resized to one square tile, so boxes normalised by the original size stay
    valid for the resized image.
    """

    tokenizer: Any
    image_processor: Any
    max_tokens: int

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pixel_values, _ = preprocess_images(self.image_processor, [it["image"] for it in items], max_tiles=1)
        text = tokenize(self.tokenizer, [it["text"] for it in items], self.max_tokens)
        return {
            "index": torch.tensor([it["index"] for it in items]),
            "pixel_values": pixel_values,
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "image_id": torch.tensor([it["image_id"] for it in items]),
            "box": torch.stack([it["box"] for it in items]),
            "relation": torch.tensor([it["relation"] for it in items]),
            "image_wh": torch.stack([it["image_wh"] for it in items]),
        }
