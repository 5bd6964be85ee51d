"""The counting task's model: InternVL's own language model reads the image tokens and
the chat prompt and answers in words ("There are 3 receipts."), trained with token
cross-entropy on the answer tokens only; a count-classification head sits on pooled
multimodal features. Its losses (``lm``, ``count``: the seed's "MultimodalLoss") are
registered in :mod:`vlmtune.tasks.counting.losses`; also here: answer generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmtune.backbone import CHAT_END, Backbone, lm_states
from vlmtune.data.counting import IGNORE_INDEX
from vlmtune.distributed import global_count, mean_share
from vlmtune.errors import ConfigError
from vlmtune.heads import mlp
from vlmtune.losses import LossRegistry
from vlmtune.tasks.counting.config import CountingConfig
from vlmtune.tasks.model import TaskModel
from vlmtune.tasks.retrieval.config import ModelConfig


def num_classes(c: CountingConfig) -> int:
    return len(c.buckets) if c.buckets is not None else c.max_count + 1


def class_names(c: CountingConfig) -> list[str]:
    """Readable class labels: "0", "1", ... or bucket ranges such as "2+" and "1-2"."""
    if c.buckets is None:
        return [str(i) for i in range(c.max_count + 1)]
    b = c.buckets
    names = []
    for i, lo in enumerate(b):
        hi = b[i + 1] - 1 if i + 1 < len(b) else None
        names.append(f"{lo}+" if hi is None else str(lo) if hi == lo else f"{lo}-{hi}")
    return names


def answer_token_ce(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of each answer token's next-token prediction -> (ce [answer tokens],
    mask [B, L-1] of where they are). Position t predicts token t+1; ``labels`` [B, L] are
    IGNORE_INDEX on the prompt and padding. The LM head runs on the answer positions
    only: the same numbers as on every position, without the [B, L, vocab] logits of
    each prompt and image token (with InternVL's 151k vocabulary the largest tensor of
    a step), and a row's values read nothing of the other rows or the padding."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return F.cross_entropy(lm_head(hidden[:, :-1][keep]).float(), targets[keep], reduction="none"), keep


def answer_token_loss(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy of the answer tokens (:func:`answer_token_ce`) -> (loss, tokens).

    With several processes the mean is over the answer tokens of all processes' rows
    (:func:`~vlmtune.distributed.mean_share`): their number differs between processes,
    so each process's own mean would weigh a token by how many others its process had.
    ``tokens`` is this process's count; a batch without one gives zero, in the graph.
    """
    ce, keep = answer_token_ce(hidden, lm_head, labels)
    total = global_count(keep, hidden.device)  # every process joins, also one without tokens
    if not len(ce):
        return ce.sum() * 0.0, 0
    return mean_share(ce, total), len(ce)


class CountingModel(TaskModel):
    """Backbone (optionally with LoRA adapters in its language model) + a count head."""

    def __init__(
        self,
        backbone: Backbone,
        counting: CountingConfig,
        model: ModelConfig,
        losses: LossRegistry | None = None,
        loss_weights: dict[str, float] | None = None,
    ):
        """``losses``: the task's registered losses, which ``forward`` computes (None: a
        model for prediction only); ``loss_weights``: their parts' sub-weights."""
        super().__init__()
        self.backbone = backbone
        self.losses, self.loss_weights = losses, dict(loss_weights or {})
        self.pooling = counting.pooling
        self.lm_mode = counting.lm_mode
        self.count_head = mlp(backbone.info.text_hidden, model.head_hidden, num_classes(counting), model.adapter_dropout)
        if self.lm_mode == "lora":
            self._inject_lora(counting)

    def _inject_lora(self, c: CountingConfig) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        lora = LoraConfig(
            r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout, target_modules=list(c.lora_target_modules)
        )
        try:
            inject_adapter_in_model(lora, self.backbone.language_model)
        except ValueError as e:
            raise ConfigError(f"counting.lora_target_modules: {str(e).splitlines()[0]}") from None
        for p in self.backbone.model.parameters():
            p.requires_grad_(False)

    def lora_modules(self) -> list[nn.Module]:
        """The LoRA A/B matrices of the language model, found by module type."""
        from peft.tuners.lora import LoraLayer

        out: list[nn.Module] = []
        for m in self.backbone.language_model.modules():
            if isinstance(m, LoraLayer):
                out += [m.lora_A, m.lora_B]
        return out

    # ---- components for the stage plan
    def component_modules(self, name: str, vision_blocks: int = 0) -> Sequence[nn.Module | nn.Parameter]:
        if name == "count_head":
            return [self.count_head]
        if name == "language_model" and self.lm_mode == "lora":
            return self.lora_modules()
        return self.backbone.component_modules(name, vision_blocks)

    # ---- forward
    def hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None, **cached: Any
    ) -> torch.Tensor:
        """Last hidden states of the language model over image tokens + text, [B, L, Dt].

        The images come as the tiles' ``pixel_values`` or as cached vision states
        (``vision_tokens``, or ``vision_hidden`` with ``vision_start``: see :func:`image_inputs`).
        """
        embeds = self.embed(input_ids, pixel_values, **cached)
        return lm_states(self.backbone.language_model, attention_mask, inputs_embeds=embeds).last_hidden_state

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        *,
        vision_tokens: torch.Tensor | None = None,
        vision_hidden: torch.Tensor | None = None,
        vision_start: int | None = None,
    ) -> torch.Tensor:
        """The LM's input embeddings with the image tokens in place. From cached states
        the tower's remaining blocks (``vision_hidden``: those from ``vision_start`` on)
        and the projector run live, so whatever of them a stage trains gets gradients."""
        bb = self.backbone
        if vision_hidden is not None:
            vision_tokens = bb.vision_from_hidden(vision_hidden, int(vision_start))  # type: ignore[arg-type]
        return bb.embed_multimodal(input_ids, pixel_values, vision_tokens=vision_tokens)

    def pool(self, hidden: torch.Tensor, input_ids: torch.Tensor, prompt_last: torch.Tensor) -> torch.Tensor:
        """Pooled multimodal features for the count head.

        "image": the mean of the LM's states at the image-token positions. They hold the
        LM's reading of every tile and come before the answer, so a teacher-forced answer
        ("There are 3 ...") can never leak the label into the head, and the same pooling
        works at prediction time, when there is no answer yet.
        "prompt_last": the state of the last prompt token (the one that starts the
        answer); it has seen the whole image and the question, and nothing of the answer.
        """
        if self.pooling == "prompt_last":
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), prompt_last]
        mask = (input_ids == self.backbone.image_token_id).to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def count_logits(self, hidden: torch.Tensor, input_ids: torch.Tensor, prompt_last: torch.Tensor) -> torch.Tensor:
        return self.count_head(self.pool(hidden, input_ids, prompt_last).float())

    def encode(self, batch: dict[str, Any]) -> CountingEncodings:
        """The language model's states over the batch's image tokens and text, once for every loss."""
        return CountingEncodings(
            self, batch, self.hidden_states(batch["input_ids"], batch["attention_mask"], **image_inputs(batch))
        )

    def forward(self, batch: dict[str, torch.Tensor], active: frozenset[str] | set[str]) -> dict[str, torch.Tensor]:
        """Named, unweighted loss terms of the active registered losses: ``lm`` (answer tokens), ``count`` (head)."""
        if self.losses is None:
            raise ValueError("this CountingModel was built without losses (for prediction); build it with the task's")
        return self.losses.terms(self.encode(batch), active, self.loss_weights)


@dataclass
class CountingEncodings:
    """What every loss of a batch reads: the model, the batch and the language model's
    last hidden states over its image tokens and text [B, L, Dt]."""

    model: CountingModel
    batch: dict[str, Any]
    hidden: torch.Tensor


# Batch keys that carry the images: live pixels or a feature cache's states.
IMAGE_KEYS = ("pixel_values", "vision_tokens", "vision_hidden")


def image_inputs(batch: dict[str, Any], rows: list[int] | None = None) -> dict[str, Any]:
    """The image input of a batch, as keyword arguments of :meth:`CountingModel.hidden_states`
    and :func:`generate_answers`: ``pixel_values`` (live), ``vision_tokens`` (the cached
    tower output) or ``vision_hidden`` + ``vision_start`` (the cached state entering
    that block). With ``rows``, only the tiles of those rows of the batch."""
    key = next(k for k in IMAGE_KEYS if k in batch)
    out = {key: batch[key] if rows is None else tiles_of(batch[key], batch["num_tiles"], rows)}
    if "vision_start" in batch:
        out["vision_start"] = batch["vision_start"]
    return out


def prompt_last(labels: torch.Tensor) -> torch.Tensor:
    """Index of the last prompt token of each row: the position before the first label."""
    labelled = labels != IGNORE_INDEX
    first = labelled.float().argmax(dim=1)  # first labelled position (answers are never empty)
    return (first - 1).clamp_min(0)


def tiles_of(pixel_values: torch.Tensor, num_tiles: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The tiles of the chosen rows of a batch (tiles of all images are stacked in order)."""
    starts = torch.cat([num_tiles.new_zeros(1), num_tiles.cumsum(0)]).tolist()
    return torch.cat([pixel_values[starts[r] : starts[r + 1]] for r in rows])


# --------------------------------------------------------------------------- generation


def stop_token_ids(tokenizer: Any) -> list[int]:
    """``<|im_end|>`` ends an answer; the tokenizer's own EOS stops generation as well."""
    ids = [tokenizer.convert_tokens_to_ids(CHAT_END), tokenizer.eos_token_id]
    unk = tokenizer.unk_token_id
    return list(dict.fromkeys(i for i in ids if i is not None and i != unk))


@torch.no_grad()
def generate_answers(
    model: CountingModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    pixel_values: torch.Tensor | None,
    max_new_tokens: int,
    num_beams: int = 1,
    do_sample: bool = False,
    top_p: float = 1.0,
    temperature: float = 1.0,
    *,
    vision_tokens: torch.Tensor | None = None,
    vision_hidden: torch.Tensor | None = None,
    vision_start: int | None = None,
    **kw: Any,
) -> Any:
    """Answers to left-padded prompts. Returns the generated ids [B, T] (or generate's
    output object when ``return_dict_in_generate`` is passed). The images come as
    ``pixel_values`` or as cached vision states (see :func:`image_inputs`)."""
    bb = model.backbone
    embeds = model.embed(
        prompt_ids, pixel_values, vision_tokens=vision_tokens, vision_hidden=vision_hidden, vision_start=vision_start
    )
    tok = bb.tokenizer
    args: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        do_sample=do_sample,
        eos_token_id=stop_token_ids(tok),
        pad_token_id=tok.pad_token_id,
    )
    if do_sample:
        args.update(top_p=top_p, temperature=temperature)
    else:
        # Unset sampling knobs a hub generation_config may carry, so greedy/beam stays greedy.
        args.update(top_p=None, top_k=None, temperature=None)
    # Positions follow the mask, so left padding does not shift the real tokens.
    position_ids = (prompt_mask.long().cumsum(-1) - 1).clamp_min(0)
    # transformers types generate's self as GenerativePreTrainedModel, which InternVL's class is at run time only.
    generate = bb.model.generate  # type: ignore[misc]
    return generate(inputs_embeds=embeds, attention_mask=prompt_mask, position_ids=position_ids, **args, **kw)


def decode(tokenizer: Any, ids: torch.Tensor) -> list[str]:
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
