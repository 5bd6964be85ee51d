"""Contrastive batches larger than one forward (``model.contrastive_batch``).

A training batch of ``contrastive_batch`` pairs is cut into chunks of
``train.batch_size`` rows. Each chunk is encoded, and the losses that read one chunk
(matching, box, relation: their pairs, boxes and relations are per row) are computed
on it as on an ordinary batch; their term is the mean over the chunks that have one.
The losses in :data:`WHOLE_BATCH` (the contrastive loss) score the embeddings of the
whole batch: every image against every caption of it, so a step sees
``contrastive_batch`` - 1 negatives per query instead of ``train.batch_size`` - 1.

With ``grad_cache`` the chunks go through :func:`vlmtune.gradcache.grad_cache`: one
chunk's activations are in memory at a time, and the gradient is the one of keeping
every chunk's graph (``grad_cache: never``) to float tolerance (tested).
"""

from __future__ import annotations

from typing import Any

import torch

from vlmtune.gradcache import grad_cache

# Losses computed over the whole contrastive batch; every other one is per chunk.
WHOLE_BATCH: tuple[str, ...] = ("contrastive",)


def slice_batch(batch: dict[str, Any], rows: slice) -> dict[str, Any]:
    """The rows ``rows`` of every per-row tensor of a loader's batch (others as they are)."""
    n = len(batch["input_ids"])
    return {k: v[rows] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n else v for k, v in batch.items()}


def tower_trains(model: Any) -> bool:
    """Whether a tower runs live with a graph: some backbone parameter trains (the last
    vision blocks above the cached prefix, a tower trained end to end). A frozen tower
    run live keeps no activations for backward, so chunking it saves little and would
    run it twice."""
    return any(p.requires_grad for p in model.backbone.parameters())


def use_grad_cache(mode: str, model: Any) -> bool:
    return mode == "always" or (mode == "auto" and tower_trains(model))


def chunked_forward(
    model: Any, batch: dict[str, Any], active: frozenset[str] | set[str], chunk_rows: int, mode: str, encodings: type
) -> dict[str, torch.Tensor]:
    """The named, unweighted loss terms of a contrastive batch cut into chunks (see the
    module): ``model`` a :class:`~.model.RetrievalModel`, ``encodings`` its
    :class:`~.model.RetrievalEncodings` (passed in: this module is imported by the model's)."""
    n = len(batch["input_ids"])
    whole = {name for name in model.losses if name in active and name in WHOLE_BATCH}
    per_chunk = set(active) - whole
    chunks = [slice_batch(batch, slice(s, min(s + chunk_rows, n))) for s in range(0, n, chunk_rows)]

    def run(chunk: dict[str, Any]) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        enc = model.encode(chunk)
        return [enc.image, enc.text], model.losses.terms(enc, per_chunk, model.loss_weights)

    if torch.is_grad_enabled() and use_grad_cache(mode, model):
        (image, text), stacked = grad_cache(run, chunks, list(model.parameters()), device=batch["input_ids"].device)
    else:
        outs = [run(c) for c in chunks]
        image, text = torch.cat([o[0][0] for o in outs]), torch.cat([o[0][1] for o in outs])
        names = list(dict.fromkeys(k for _, sc in outs for k in sc))
        stacked = {}
        for k in names:
            ref = next(sc[k] for _, sc in outs if k in sc)
            vals = torch.stack([sc[k].reshape(()) if k in sc else ref.new_zeros(()) for _, sc in outs])
            stacked[k] = (vals, torch.tensor([k in sc for _, sc in outs], device=vals.device))
    terms: dict[str, torch.Tensor] = {}
    # The whole batch's losses (no patches: those are per chunk), then the chunks' means.
    enc = encodings(model, batch, image, image.new_zeros(0), text, batch["image_id"])
    terms.update(model.losses.terms(enc, whole, model.loss_weights))
    for k, (vals, present) in stacked.items():
        mean = (vals * present.to(vals.dtype)).sum() / present.sum().clamp_min(1)
        terms[k] = mean.detach() if k.startswith("diag/") else mean
    return terms
