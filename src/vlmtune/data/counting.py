"""Dataset and collation for counting with answer generation.

Each item becomes InternVL's chat prompt with the image's tiles in it, followed by the
answer::

    <|im_start|>user\\n<img><IMG_CONTEXT> x (tokens per tile x tiles)</img>\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>

Labels are -100 everywhere but on the answer tokens and the closing ``<|im_end|>``, so
the language model learns to answer (and to stop), never to predict the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vlmtune.backbone import CHAT_END, CHAT_START, IMG_CONTEXT, IMG_END, IMG_START, preprocess_images
from vlmtune.data.cache import FeatureStore
from vlmtune.data.formats import CountRecord, load_image

IGNORE_INDEX = -100


def count_class(count: int, buckets: list[int] | None) -> int:
    """The class of a count: the count itself, or the index of its bucket."""
    if buckets is None:
        return count
    from vlmtune.data.receipts import bucket_count

    return bucket_count(count, buckets)


def tile_key(image_key: str, tile: int) -> str:
    """The feature-cache key of one tile of an image (its content key + the tile's index)."""
    return f"{image_key}/tile{tile}"


@dataclass
class CachedTiles:
    """Where a dataset reads its images' vision states instead of decoding them: a
    :class:`FeatureStore` with one row per tile (``tile_key``), each image's content
    key and tile count (known from its header, without decoding), and what the rows
    hold: the tower's last hidden state (``start`` None) or the hidden state entering
    vision block ``start`` (the frozen prefix of a stage that trains the blocks above)."""

    store: FeatureStore
    keys: dict[Any, str]
    tiles: dict[Any, int]
    start: int | None = None

    def states(self, image: Any) -> torch.Tensor:
        """The cached states of an image's tiles, [tiles, 1 + patches, Dv], float32."""
        key = self.keys[image]
        rows = [self.store.get(tile_key(key, t)) for t in range(self.tiles[image])]
        return torch.from_numpy(np.stack(rows).astype(np.float32, copy=False))


class CountingDataset(Dataset):
    """One item per counting record. Live: the image is decoded here (in the workers).
    Cached: its tiles' vision states are read from the feature cache (no decode, no
    preprocessing, no tower)."""

    def __init__(self, records: list[CountRecord], buckets: list[int] | None = None, cached: CachedTiles | None = None):
        self.records = records
        self.buckets = buckets
        self.cached = cached

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        item = {"index": i, "question": r.question, "answer": r.answer, "label": count_class(r.count, self.buckets)}
        if self.cached is not None:
            item["vision"] = self.cached.states(r.image)
            item["vision_start"] = self.cached.start
        else:
            item["image"] = load_image(r.image, r.source)
        return item


@dataclass
class PromptBuilder:
    """Token ids of the chat prompt and answer, built piece by piece so the boundary
    between prompt and answer is exact whatever the tokenizer merges."""

    tokenizer: Any
    tokens_per_tile: int
    question_max_tokens: int
    answer_max_tokens: int
    # Every item asks for the same chat pieces and a handful of questions and answers:
    # their ids, remembered per text (a tokenizer call costs more than the rest of collation).
    _memo: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False, compare=False)

    def _ids(self, text: str) -> list[int]:
        if text not in self._memo:
            self._memo[text] = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self._memo[text])

    def prompt_ids(self, question: str, num_tiles: int) -> list[int]:
        head = self._ids(f"{CHAT_START}user\n{IMG_START}")
        image = self._ids(IMG_CONTEXT) * (self.tokens_per_tile * num_tiles)
        tail = self._ids(f"{IMG_END}\n")
        q = self._ids(question)[: self.question_max_tokens]
        end = self._ids(f"{CHAT_END}\n{CHAT_START}assistant\n")
        return head + image + tail + q + end

    def answer_ids(self, answer: str) -> list[int]:
        return self._ids(answer)[: self.answer_max_tokens] + self._ids(CHAT_END)

    def example(self, question: str, answer: str, num_tiles: int) -> tuple[list[int], list[int]]:
        """(input ids, labels) of prompt + answer; labels are IGNORE_INDEX on the prompt."""
        p, a = self.prompt_ids(question, num_tiles), self.answer_ids(answer)
        return p + a, [IGNORE_INDEX] * len(p) + a


def tile_grid(processor: Any, width: int, height: int, max_tiles: int) -> tuple[int, int]:
    """(columns, rows) of the tile grid ``processor`` cuts a ``width`` x ``height`` image into.

    Tiles come row-major, then a thumbnail of the whole image when there is more than
    one tile (the processor's own rule, ``get_optimal_tiled_canvas``).
    """
    if max_tiles <= 1:
        return 1, 1
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    size = processor.size
    return get_optimal_tiled_canvas((height, width), (size["height"], size["width"]), 1, max_tiles)


def num_tiles(processor: Any, width: int, height: int, max_tiles: int) -> int:
    """How many tiles :func:`~vlmtune.backbone.preprocess_images` cuts a ``width`` x
    ``height`` image into (grid tiles, plus the thumbnail when there is more than one),
    by the processor's own rule, from the size alone (no pixels)."""
    return int(processor.get_number_of_image_patches(height, width, {"crop_to_patches": max_tiles > 1, "max_patches": max_tiles}))


def pad(rows: list[list[int]], value: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad rows to one length -> (ids [B, L], attention mask [B, L]); left padding for generation."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), value, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(n - len(r), n) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


@dataclass
class CountingCollator:
    """Items -> tensors: tiles of every image, the teacher-forced sequence (right padded)
    with its labels, the prompt alone (left padded, for generation) and the count class."""

    prompts: PromptBuilder
    image_processor: Any
    max_tiles: int
    pad_id: int

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        images = self._images(items)
        tiles = images["num_tiles"]
        full, labels, prompts = [], [], []
        for it, n in zip(items, tiles.tolist()):
            ids, lab = self.prompts.example(it["question"], it["answer"], int(n))
            full.append(ids)
            labels.append(lab)
            prompts.append(self.prompts.prompt_ids(it["question"], int(n)))
        input_ids, attention_mask = pad(full, self.pad_id)
        label_ids, _ = pad(labels, IGNORE_INDEX)
        prompt_ids, prompt_mask = pad(prompts, self.pad_id, left=True)
        return {
            "index": torch.tensor([it["index"] for it in items]),
            **images,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": label_ids,
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "count": torch.tensor([it["label"] for it in items]),
        }

    def _images(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """The batch's images, tiles of all images stacked in order: ``pixel_values``
        (decoded items), or the cached states -- ``vision_tokens`` (the tower's output)
        or ``vision_hidden`` with ``vision_start`` (the state entering that block)."""
        if "vision" not in items[0]:
            pixel_values, tiles = preprocess_images(self.image_processor, [it["image"] for it in items], self.max_tiles)
            return {"pixel_values": pixel_values, "num_tiles": tiles.long()}
        states = torch.cat([it["vision"] for it in items])
        tiles = torch.tensor([len(it["vision"]) for it in items], dtype=torch.long)
        start = items[0]["vision_start"]
        if start is None:
            return {"vision_tokens": states, "num_tiles": tiles}
        # The block it enters: a plain int (not a tensor), read on the host without a device sync.
        return {"vision_hidden": states, "vision_start": start, "num_tiles": tiles}
