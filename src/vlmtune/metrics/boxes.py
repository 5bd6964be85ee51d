"""Visual grounding metrics for one predicted box per item, plus a constant-box baseline."""

from __future__ import annotations

import torch
from torch import Tensor

from vlmtune.boxes import paired_box_iou, paired_generalized_box_iou

__all__ = ["box_metrics", "constant_box_baseline"]


def _check(pred_xyxy: Tensor, target_xyxy: Tensor, image_wh: Tensor) -> None:
    n = target_xyxy.shape[0]
    if pred_xyxy.shape != (n, 4) or target_xyxy.shape != (n, 4) or image_wh.shape != (n, 2):
        raise ValueError(
            "need pred_xyxy [N, 4], target_xyxy [N, 4], image_wh [N, 2]; got "
            f"{tuple(pred_xyxy.shape)}, {tuple(target_xyxy.shape)}, {tuple(image_wh.shape)}"
        )


@torch.no_grad()
def box_metrics(pred_xyxy: Tensor, target_xyxy: Tensor, image_wh: Tensor) -> dict[str, float]:
    """Grounding metrics on pixel xyxy boxes.

    grounding/miou   mean IoU, percent (0-100)
    grounding/giou   mean GIoU, raw value in [-1, 1]
    grounding/l1     mean |pred - target| over the 4 xyxy coordinates after dividing x by
                     image width and y by image height (a fraction, not a percent)
    grounding/acc50  percent of items with IoU >= 0.5
    An empty set gives NaN everywhere.
    """
    _check(pred_xyxy, target_xyxy, image_wh)
    # float64 so large-N means are not skewed by float32 accumulation.
    pred, target, wh = pred_xyxy.double(), target_xyxy.double(), image_wh.double()
    iou = paired_box_iou(pred, target)
    giou = paired_generalized_box_iou(pred, target)
    scale = wh.repeat(1, 2)  # (w, h, w, h) matches (x1, y1, x2, y2)
    l1 = ((pred - target).abs() / scale).mean(dim=1)
    return {
        "grounding/miou": 100.0 * iou.mean().item(),
        "grounding/giou": giou.mean().item(),
        "grounding/l1": l1.mean().item(),
        "grounding/acc50": 100.0 * (iou >= 0.5).double().mean().item(),
    }


@torch.no_grad()
def constant_box_baseline(train_boxes_norm_xyxy: Tensor, target_xyxy: Tensor, image_wh: Tensor) -> dict[str, float]:
    """Metrics of predicting the mean normalised training box (scaled to each image) for
    every item: what a model scores without looking at the image or the phrase.

    Keys: grounding/baseline_{miou,giou,l1,acc50}.
    """
    if train_boxes_norm_xyxy.ndim != 2 or train_boxes_norm_xyxy.shape[1] != 4 or not len(train_boxes_norm_xyxy):
        raise ValueError(f"need train_boxes_norm_xyxy [K>0, 4], got {tuple(train_boxes_norm_xyxy.shape)}")
    mean_box = train_boxes_norm_xyxy.double().mean(dim=0)  # [4], in [0, 1] image units
    pred = mean_box.to(image_wh.device) * image_wh.double().repeat(1, 2)
    metrics = box_metrics(pred, target_xyxy, image_wh)
    return {key.replace("grounding/", "grounding/baseline_"): value for key, value in metrics.items()}
