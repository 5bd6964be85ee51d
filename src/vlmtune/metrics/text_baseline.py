"""Text-only baselines: the best a model reading only the text scores on a split.

A head whose target can be read off the text (a caption that names its relation, a
question that gives away the count) looks like it learnt from the image when it did
not. These baselines are fitted on the training split's texts alone and scored on the
evaluated split, so a metric is worth something only by its margin over them:

- classification: multinomial logistic regression (L2, L-BFGS from scipy) on binary
  bag-of-words features (lower-cased words and word pairs);
- boxes: ridge regression from the same features to the normalised box.

Both are small, deterministic and fast (a few thousand texts in well under a second).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from vlmtune.metrics.boxes import box_metrics
from vlmtune.metrics.classification import class_scores

__all__ = ["BagOfWords", "fit_logistic", "text_box_baseline", "text_classifier_baseline"]

_WORD = re.compile(r"[a-z0-9]+|\[rel\]")


def _tokens(text: str) -> list[str]:
    words = _WORD.findall(text.lower())
    return words + [f"{a} {b}" for a, b in zip(words, words[1:])]


class BagOfWords:
    """Binary word and word-pair features over the vocabulary of the fitted texts."""

    def __init__(self, texts: Sequence[str]):
        vocab = sorted({tok for t in texts for tok in _tokens(t)})
        self.index = {tok: i for i, tok in enumerate(vocab)}

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        x = np.zeros((len(texts), len(self.index) + 1))  # last column: bias
        x[:, -1] = 1.0
        for row, t in enumerate(texts):
            cols = [self.index[tok] for tok in _tokens(t) if tok in self.index]
            x[row, cols] = 1.0
        return x


def fit_logistic(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float = 1.0) -> np.ndarray:
    """Weights [F, C] of an L2-regularised multinomial logistic regression (bias unpenalised)."""
    from scipy.optimize import minimize
    from scipy.special import log_softmax

    n, f = x.shape
    onehot = np.eye(num_classes)[y]
    penalty = np.ones((f, 1))
    penalty[-1] = 0.0

    def loss(w_flat: np.ndarray) -> tuple[float, np.ndarray]:
        w = w_flat.reshape(f, num_classes)
        logp = log_softmax(x @ w, axis=1)
        value = -(onehot * logp).sum() / n + 0.5 * l2 / n * (penalty * w * w).sum()
        grad = x.T @ (np.exp(logp) - onehot) / n + l2 / n * penalty * w
        return value, grad.ravel()

    res = minimize(loss, np.zeros(f * num_classes), jac=True, method="L-BFGS-B", options={"maxiter": 500})
    return res.x.reshape(f, num_classes)


def text_classifier_baseline(
    train_texts: Sequence[str],
    train_targets: Sequence[int],
    test_texts: Sequence[str],
    test_targets: Tensor,
    num_classes: int,
    prefix: str,
    name: str = "text",
) -> dict[str, float]:
    """Scores of a bag-of-words classifier fitted on the training texts alone.

    Keys: {prefix}/baseline_{name}_{accuracy,macro_precision,macro_recall,macro_f1}.
    """
    if not len(train_texts):
        raise ValueError("text_classifier_baseline needs at least one training text")
    bow = BagOfWords(train_texts)
    y = np.asarray(train_targets, dtype=np.int64)
    w = fit_logistic(bow(train_texts), y, num_classes)
    preds = torch.from_numpy((bow(test_texts) @ w).argmax(axis=1))
    scores = class_scores(preds, test_targets.long().cpu(), num_classes, prefix)
    return {key.replace(f"{prefix}/", f"{prefix}/baseline_{name}_", 1): value for key, value in scores.items()}


def text_box_baseline(
    train_texts: Sequence[str],
    train_boxes_norm_xyxy: Tensor,
    test_texts: Sequence[str],
    target_xyxy: Tensor,
    image_wh: Tensor,
    l2: float = 1.0,
) -> dict[str, float]:
    """Grounding metrics of a ridge regression from the text's bag of words to the
    normalised box, fitted on the training split: where a phrase alone puts the box.

    Keys: grounding/baseline_text_{miou,giou,l1,acc50}.
    """
    bow = BagOfWords(train_texts)
    x, b = bow(train_texts), train_boxes_norm_xyxy.double().numpy()
    reg = l2 * np.eye(x.shape[1])
    reg[-1, -1] = 0.0
    w = np.linalg.solve(x.T @ x + reg, x.T @ b)
    pred = np.clip(bow(test_texts) @ w, 0.0, 1.0)
    # Keep the box well formed (x2 >= x1, y2 >= y1) after clipping.
    pred[:, 2:] = np.maximum(pred[:, 2:], pred[:, :2])
    pred_xyxy = torch.from_numpy(pred) * image_wh.double().cpu().repeat(1, 2)
    metrics = box_metrics(pred_xyxy, target_xyxy.double().cpu(), image_wh.cpu())
    return {key.replace("grounding/", "grounding/baseline_text_"): value for key, value in metrics.items()}
