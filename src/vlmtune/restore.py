"""A trained model back from its checkpoint: the backbone it names, the task's model and
its trained weights, checked against each other. Every command that uses a checkpoint
(evaluate, predict, embed, export) and the Python API load through here."""

from __future__ import annotations

import torch
from torch import nn

from vlmtune.backbone import Backbone, load_backbone
from vlmtune.checkpoint import Checkpoint, backbone_identity, check_identity, load_weights
from vlmtune.config import Config
from vlmtune.tasks import Task, build_task


def default_device() -> torch.device:
    """The first GPU where CUDA is present, else the CPU (every single-device command)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    ckpt: Checkpoint,
    device: torch.device | None = None,
    backbone: Backbone | None = None,
    trust_remote_code: bool = False,
    cfg: Config | None = None,
) -> tuple[nn.Module, Task]:
    """A checkpoint's model with its trained weights, in eval mode, on ``device``.

    ``trust_remote_code`` is the user's (``--trust-remote-code``); the checkpoint's own
    config.yaml is never asked whether its code may run. ``cfg``: the checkpoint's config
    with evaluation overrides (:func:`~vlmtune.config.evaluation_config`)."""
    device = device or default_device()
    task = build_task(cfg or ckpt.cfg)
    if backbone is None:
        backbone = load_backbone(ckpt.backbone_config(trust_remote_code), device_type=device.type, folder=ckpt.backbone_folder)
    check_identity(ckpt, backbone_identity(backbone))
    model = task.build_model(backbone)
    load_weights(model, ckpt.weights(), ckpt.folder)
    return model.to(device).eval(), task
