"""The base class of a task's model: what the engine calls on it besides ``nn.Module``'s
own members. Its own module (torch, no task code) so that the task base class and the
stage plan can name it without importing a task."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from vlmtune.backbone import Backbone


def head_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights of a task model's own parts (everything but the backbone)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}


class TaskModel(nn.Module):
    """A task's model: the ``backbone`` it wraps, the modules of each trainable component,
    the weights of the task's own parts, and ``forward(batch, active_losses)`` returning
    named, unweighted loss terms (and diagnostics under ``diag/``). A base class rather
    than a protocol because the engine needs both these and the module's own members
    (typing has no intersection of the two)."""

    backbone: Backbone

    def component_modules(self, name: str, vision_blocks: int = 0) -> Sequence[nn.Module | nn.Parameter]:
        """The modules (or bare parameters) a stage that trains component ``name`` unfreezes."""
        raise NotImplementedError

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights of the task's own parts (everything but the backbone)."""
        return head_state_dict(self)
