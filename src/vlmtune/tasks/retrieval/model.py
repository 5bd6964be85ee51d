"""The retrieval task's model: pooled vision and text tokens of the frozen backbone go
through adapters and projectors into a joint space (contrastive InfoNCE with a
learnable temperature); heads on the pair predict image-text matching, the referred
object's box and the spatial relation. Its losses are registered in
:mod:`vlmtune.tasks.retrieval.losses`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlmtune.backbone import Backbone, pool_text
from vlmtune.data.formats import RELATIONS
from vlmtune.heads import Adapter, GroundingHead, Projector, RelationHead, mlp, pair_features, patch_centres
from vlmtune.losses import LossRegistry
from vlmtune.tasks.model import TaskModel
from vlmtune.tasks.retrieval.config import ModelConfig


def pool_tokens(tokens: torch.Tensor, mode: str) -> torch.Tensor:
    """Vision tokens [B, 1 + N, D] (CLS first) -> [B, D]."""
    return tokens[:, 0] if mode == "cls" else tokens[:, 1:].mean(dim=1)


@dataclass
class RetrievalEncodings:
    """What every loss of a batch reads: the model, the batch, the joint-space image
    embeddings [B, D] with their adapted patch tokens [B, N, D], the caption embeddings
    [B, D] and the image id of each row."""

    model: RetrievalModel
    batch: dict[str, Any]
    image: torch.Tensor
    patches: torch.Tensor
    text: torch.Tensor
    ids: torch.Tensor
    # The step's negatives beyond the batch (negatives.data / negatives.mine): a
    # vlmtune.tasks.retrieval.negatives.NegativeColumns, or None (in-batch negatives only).
    negatives: Any = None


class RetrievalModel(TaskModel):
    """Backbone + adapters, projectors, temperature and the three pair heads."""

    # Trainable components of this task, each a list of attribute names.
    COMPONENTS = {
        "adapters": ("vision_adapter", "text_adapter", "vision_projector", "text_projector", "log_scale"),
        "heads": ("matching_head", "relation_head", "grounding_head"),
    }

    def __init__(
        self,
        backbone: Backbone,
        cfg: ModelConfig,
        losses: LossRegistry,
        loss_weights: dict[str, float],
        *,
        vision_pooling: str = "mean",
        text_pooling: str = "mean",
        chunk_rows: int = 0,
    ):
        """``losses``: the task's registered losses, which ``forward`` computes;
        ``loss_weights``: every loss's and part's weight (the parts' sub-weights apply here);
        ``chunk_rows``: a training batch with more rows is a contrastive batch of chunks
        of that many (:mod:`.bigbatch`); 0: never."""
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.vision_pooling, self.text_pooling = vision_pooling, text_pooling
        self.losses, self.loss_weights = losses, dict(loss_weights)
        self.chunk_rows = chunk_rows
        d, info = cfg.embed_dim, backbone.info
        self.vision_adapter = Adapter(info.vision_hidden, d, cfg.adapter_dropout)
        self.text_adapter = Adapter(info.text_hidden, d, cfg.adapter_dropout)
        self.vision_projector = Projector(d)
        self.text_projector = Projector(d)
        # Temperature T is learnt as log(1/T), the CLIP parametrisation.
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature_init)))
        self.matching_head = mlp(4 * d, cfg.head_hidden, 2, cfg.adapter_dropout)
        self.relation_head = RelationHead(d, cfg.head_hidden, len(RELATIONS), cfg.adapter_dropout)
        self.grounding_head = GroundingHead(d, cfg.head_hidden, cfg.adapter_dropout)
        grid = info.image_size // info.patch_size
        self.register_buffer("centres", patch_centres(grid), persistent=False)
        # Set by the task when its config asks for negatives beyond the batch
        # (vlmtune.tasks.retrieval.negatives.NegativeBank); None: in-batch negatives only.
        self.negative_bank: Any = None

    # ---- components for the stage plan
    def component_modules(self, name: str, vision_blocks: int = 0) -> Sequence[nn.Module | nn.Parameter]:
        if name in self.COMPONENTS:
            return [getattr(self, attr) for attr in self.COMPONENTS[name]]
        if name == "language_model":  # text states only: the LM head never runs here, so it does not train
            return [self.backbone.language_model]
        return self.backbone.component_modules(name, vision_blocks)

    def logit_scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(1.0 / self.cfg.temperature_max, 1.0 / self.cfg.temperature_min)

    # ---- encoders
    def encode_image(
        self,
        pixel_values: torch.Tensor | None = None,
        vision_tokens: torch.Tensor | None = None,
        *,
        vision_hidden: torch.Tensor | None = None,
        vision_start: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (joint-space embedding [B, D], adapted patch tokens [B, N, D]).

        ``vision_tokens`` are the frozen tower's cached output for the same pixels;
        ``vision_hidden`` the cached state entering block ``vision_start`` (a frozen
        prefix's output), from which the blocks above and the final norm run live, so
        the blocks a stage trains get their gradients.
        """
        if vision_hidden is not None:
            if vision_start is None:
                raise ValueError("vision_hidden needs vision_start, the block it enters")
            vision_tokens = self.backbone.vision_from_hidden(vision_hidden, int(vision_start))
        elif vision_tokens is None:
            assert pixel_values is not None, "encode_image needs pixels or cached vision states"
            vision_tokens = self.backbone.vision_tokens(pixel_values)
        tokens = self.vision_adapter(vision_tokens.float())
        emb = self.vision_projector(pool_tokens(tokens, self.vision_pooling))
        return emb, tokens[:, 1:]

    def encode_batch_images(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode_image` of a loader's batch, whichever image input it carries
        (pixels, cached tower output, or a cached prefix state and its block)."""
        return self.encode_image(
            batch.get("pixel_values"),
            batch.get("vision_tokens"),
            vision_hidden=batch.get("vision_hidden"),
            vision_start=batch.get("vision_start"),
        )

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, text_hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``text_hidden``: the frozen language model's cached states for these tokens."""
        if text_hidden is None:
            text_hidden = self.backbone.text_tokens(input_ids, attention_mask)
        tokens = self.text_adapter(text_hidden.float())
        return self.text_projector(pool_text(tokens, attention_mask, self.text_pooling))

    def match_logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.matching_head(pair_features(image, text))

    def ground(self, text: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.grounding_head(text, patches, self.centres)

    def relation_outputs(
        self, batch: dict[str, torch.Tensor], keep: torch.Tensor, v: torch.Tensor, patches: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(relation logits, subject and reference positions) of the rows ``keep`` of
        ``batch``, from the image and the caption with its relation phrase masked
        (``rel_*`` in the batch): never the phrase itself."""
        hidden = batch.get("rel_text_hidden")
        t = self.encode_text(
            batch["rel_input_ids"][keep], batch["rel_attention_mask"][keep], None if hidden is None else hidden[keep]
        )
        return self.relation_head(v[keep], t, patches[keep], self.centres)

    def relation_logits(
        self, batch: dict[str, torch.Tensor], keep: torch.Tensor, v: torch.Tensor, patches: torch.Tensor
    ) -> torch.Tensor:
        return self.relation_outputs(batch, keep, v, patches)[0]

    # ---- training
    def encode(self, batch: dict[str, Any]) -> RetrievalEncodings:
        """The batch's images and captions encoded once, for every loss."""
        v, patches = self.encode_batch_images(batch)
        t = self.encode_text(batch["input_ids"], batch["attention_mask"], batch.get("text_hidden"))
        negatives = None if self.negative_bank is None else self.negative_bank.columns(self, batch)
        return RetrievalEncodings(self, batch, v, patches, t, batch["image_id"], negatives)

    def forward(self, batch: dict[str, torch.Tensor], active: frozenset[str] | set[str]) -> dict[str, torch.Tensor]:
        """Named, unweighted loss terms of the active registered losses (plus diagnostics under 'diag/')."""
        if self.chunk_rows and len(batch["input_ids"]) > self.chunk_rows:
            from vlmtune.tasks.retrieval.bigbatch import chunked_forward

            terms = chunked_forward(self, batch, active, self.chunk_rows, self.cfg.grad_cache, RetrievalEncodings)
        else:
            terms = self.losses.terms(self.encode(batch), active, self.loss_weights)
        terms["diag/temperature"] = (1.0 / self.logit_scale()).detach()
        return terms
