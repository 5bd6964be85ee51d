"""Box format conversions and paired IoU / GIoU on torch tensors.

Everything here is differentiable (losses use it with autograd) and works on any
leading shape: boxes live in the last dimension, which must have size 4.

Formats:
    xyxy    -- (x1, y1, x2, y2), top-left and bottom-right corners
    xywh    -- (x1, y1, w, h), top-left corner plus size (COCO)
    cxcywh  -- (cx, cy, w, h), centre plus size (DETR-style regression targets)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "xywh_to_xyxy",
    "xyxy_to_xywh",
    "cxcywh_to_xyxy",
    "xyxy_to_cxcywh",
    "box_area",
    "paired_box_iou",
    "paired_generalized_box_iou",
]

# Denominators are clamped to at least this, so zero-area boxes give finite values
# (and finite gradients) instead of NaN.
_EPS = 1e-7


def _check_last_dim(boxes: Tensor) -> None:
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have last dimension 4, got shape {tuple(boxes.shape)}")


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(x, y, w, h) -> (x1, y1, x2, y2)."""
    _check_last_dim(boxes)
    x, y, w, h = boxes.unbind(-1)
    return torch.stack((x, y, x + w, y + h), dim=-1)


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """(x1, y1, x2, y2) -> (x, y, w, h)."""
    _check_last_dim(boxes)
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((x1, y1, x2 - x1, y2 - y1), dim=-1)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(cx, cy, w, h) -> (x1, y1, x2, y2)."""
    _check_last_dim(boxes)
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(x1, y1, x2, y2) -> (cx, cy, w, h)."""
    _check_last_dim(boxes)
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) * 0.5, (y1 + y2) * 0.5, x2 - x1, y2 - y1), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of xyxy boxes; inverted boxes (x2 < x1 or y2 < y1) count as zero area."""
    _check_last_dim(boxes)
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _paired_iou_and_union(a: Tensor, b: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    _check_last_dim(a)
    _check_last_dim(b)
    if a.shape != b.shape:
        raise ValueError(f"paired boxes need equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - inter
    return inter / union.clamp(min=eps), union


def paired_box_iou(a: Tensor, b: Tensor, eps: float = _EPS) -> Tensor:
    """IoU of a[i] with b[i] (xyxy, same shape [..., 4]) -> [...].

    Elementwise, not the N x M pairwise matrix. Two zero-area boxes give IoU 0.
    """
    return _paired_iou_and_union(a, b, eps)[0]


def paired_generalized_box_iou(a: Tensor, b: Tensor, eps: float = _EPS) -> Tensor:
    """Generalized IoU (Rezatofighi et al. 2019) of a[i] with b[i] -> [...], in [-1, 1].

    GIoU = IoU - (|C| - |A u B|) / |C| with C the smallest enclosing box; unlike IoU it
    still has a gradient when the boxes do not overlap.
    """
    iou, union = _paired_iou_and_union(a, b, eps)
    lt = torch.minimum(a[..., :2], b[..., :2])
    rb = torch.maximum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing.clamp(min=eps)
