import math

import torch
import torch.nn.functional as F

from vlmtune.losses import box_loss_rows, contrastive_loss, sample_hard_negatives


def _reference_infonce(img, txt, ids, scale):
    """Slow, obvious multi-positive InfoNCE: loop over rows."""
    logits = scale * img @ txt.T
    total_i2t, total_t2i = 0.0, 0.0
    n = len(ids)
    for i in range(n):
        pos = [j for j in range(n) if ids[j] == ids[i]]
        logp = F.log_softmax(logits[i], 0)
        total_i2t += -sum(logp[j] for j in pos) / len(pos)
        logp_t = F.log_softmax(logits[:, i], 0)
        total_t2i += -sum(logp_t[j] for j in pos) / len(pos)
    return (total_i2t / n + total_t2i / n) / 2


def test_contrastive_matches_reference_with_repeated_images() -> None:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(7, 16, generator=g), dim=-1)
    txt = F.normalize(torch.randn(7, 16, generator=g), dim=-1)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    scale = torch.tensor(1 / 0.07)
    assert torch.allclose(contrastive_loss(img, txt, ids, scale), _reference_infonce(img, txt, ids, scale), atol=1e-5)


def test_contrastive_reduces_to_clip_when_ids_are_unique() -> None:
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    logits = 10 * img @ txt.T
    labels = torch.arange(5)
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(contrastive_loss(img, txt, labels, torch.tensor(10.0)), clip, atol=1e-6)


def test_hard_negatives_are_never_positives_and_follow_similarity() -> None:
    torch.manual_seed(0)
    ids = torch.tensor([0, 0, 1, 2])
    pos = ids[:, None] == ids[None, :]
    sim = torch.tensor([[5.0, 5.0, 4.0, -9.0], [5.0, 5.0, -9.0, 4.0], [0.0, 0.0, 5.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    counts = torch.zeros(4, 4)
    for _ in range(200):
        idx, valid = sample_hard_negatives(sim, pos)
        assert valid.all()
        assert not pos[torch.arange(4), idx].any()
        counts[torch.arange(4), idx] += 1
    # Row 0's most similar negative (column 2) is drawn far more often than column 3.
    assert counts[0, 2] > 150 and counts[1, 3] > 150


def test_rows_without_negatives_are_invalid() -> None:
    ids = torch.tensor([0, 0])
    idx, valid = sample_hard_negatives(torch.zeros(2, 2), ids[:, None] == ids[None, :])
    assert not valid.any()


def test_box_losses_zero_for_identical_boxes_and_positive_otherwise() -> None:
    a = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    l1, giou = (x.mean() for x in box_loss_rows(a, a))
    assert l1.item() == 0 and abs(giou.item()) < 1e-6
    b = torch.tensor([[0.1, 0.1, 0.1, 0.1]], requires_grad=True)
    l1, giou = (x.mean() for x in box_loss_rows(b, a))
    assert l1.item() > 0 and 1 < giou.item() <= 2  # disjoint boxes: GIoU < 0
    (l1 + giou).backward()
    assert torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0
    assert not math.isnan(giou.item())
