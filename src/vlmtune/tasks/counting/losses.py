"""The counting task's registered losses, computed from the language model's states of
a batch (:class:`~vlmtune.tasks.counting.model.CountingEncodings`), in registration
order: ``lm`` then ``count`` (declared in :mod:`.spec`'s ``LOSSES``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmtune.tasks.counting.model import CountingEncodings, answer_token_loss, prompt_last


def lm(enc: CountingEncodings) -> dict[str, torch.Tensor]:
    """Mean cross-entropy of the answer tokens over all processes' rows (:func:`answer_token_loss`)."""
    loss, _ = answer_token_loss(enc.hidden, enc.model.backbone.model.lm_head, enc.batch["labels"])
    return {"lm": loss}


def count(enc: CountingEncodings) -> dict[str, torch.Tensor]:
    """Cross-entropy of the count head on the pooled multimodal features."""
    batch = enc.batch
    logits = enc.model.count_logits(enc.hidden, batch["input_ids"], prompt_last(batch["labels"]))
    return {"count": F.cross_entropy(logits, batch["count"])}
