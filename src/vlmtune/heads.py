"""Adapters, projectors and task heads: the small trainable parts on top of the backbone."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Adapter(nn.Sequential):
    """Linear to the adapter width, ReLU, dropout; applied to every token."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float):
        super().__init__(nn.Linear(in_dim, out_dim), nn.ReLU(), nn.Dropout(dropout))


class Projector(nn.Module):
    """Linear, then L2 normalisation onto the unit sphere of the joint space."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x), dim=-1)


def pair_features(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """[v, t, v*t, |v-t|] for a paired image and text embedding.

    The seed's heads saw only the concatenation [v, t]; a linear layer on that is a sum
    f(v) + g(t) and cannot tell whether the two agree. The product and difference give
    the head the interaction directly (the usual recipe for sentence-pair classifiers).
    """
    return torch.cat([v, t, v * t, (v - t).abs()], dim=-1)


def mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))


class GroundingHead(nn.Module):
    """Box regression for the object a caption refers to.

    The text embedding queries the adapted vision tokens; the box centre is the
    attention-weighted mean of the patch centres (a soft arg-max, refined by a small
    offset) and the size comes from the attended features. A box read off one pooled
    vector has to encode every object's position in 256 numbers; attention over the
    patch grid keeps "where" explicit. Output: (cx, cy, w, h) normalised to [0, 1].
    """

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.out = mlp(2 * dim, hidden, 4, dropout)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, text: torch.Tensor, tokens: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """text [B, D], patch tokens [B, N, D], patch centres [N, 2] -> (box [B, 4], attention [B, N])."""
        logits = torch.einsum("bd,bnd->bn", self.query(text), self.key(tokens)) * self.scale
        attn = logits.softmax(dim=-1)
        context = torch.einsum("bn,bnd->bd", attn, tokens)
        centre = attn @ centres.to(attn.dtype)
        raw = self.out(torch.cat([context, text], dim=-1))
        # Offset of at most a quarter of the image from the soft arg-max.
        cxcy = (centre + 0.25 * torch.tanh(raw[:, :2])).clamp(0.0, 1.0)
        wh = torch.sigmoid(raw[:, 2:])
        return torch.cat([cxcy, wh], dim=-1), attn


def patch_centres(grid: int, device: torch.device | None = None) -> torch.Tensor:
    """Centres (x, y) in [0, 1] of a row-major grid x grid patch layout, [grid*grid, 2]."""
    c = (torch.arange(grid, device=device, dtype=torch.float32) + 0.5) / grid
    y, x = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1)


class RelationHead(nn.Module):
    """Spatial relation of the two objects a caption names, read from the image.

    The caption it gets has its relation phrase masked, so the answer has to come from
    where the objects are. Two queries from the text (one for the subject, one for the
    reference) attend over the adapted patch tokens; the head classifies the pair
    features [v, t, v*t, |v-t|] together with what each query found (its attended
    features and soft arg-max position) and the offset between the two positions.
    The positions are returned too: training pulls the subject's towards the centre of
    the record's box (the subject's), which teaches the queries to find the objects.
    """

    def __init__(self, dim: int, hidden: int, num_classes: int, dropout: float):
        super().__init__()
        self.query = nn.Linear(dim, 2 * dim)
        self.key = nn.Linear(dim, dim)
        self.out = mlp(4 * dim + 2 * dim + 6, hidden, num_classes, dropout)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(
        self, image: torch.Tensor, text: torch.Tensor, tokens: torch.Tensor, centres: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image [B, D], masked text [B, D], patch tokens [B, N, D], centres [N, 2] ->
        (logits [B, C], positions [B, 2, 2]: (x, y) in [0, 1] of the subject and the reference)."""
        b, d = text.shape
        queries = self.query(text).view(b, 2, d)
        attn = (torch.einsum("bqd,bnd->bqn", queries, self.key(tokens)) * self.scale).softmax(dim=-1)
        context = torch.einsum("bqn,bnd->bqd", attn, tokens)
        where = attn @ centres.to(attn.dtype)  # [B, 2, 2]: subject and reference positions
        feats = [pair_features(image, text), context.flatten(1), where.flatten(1), where[:, 0] - where[:, 1]]
        return self.out(torch.cat(feats, dim=-1)), where
