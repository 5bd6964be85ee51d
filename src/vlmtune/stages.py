"""The stage plan: which components train, at which LR multiplier, from which epoch.

Freezing is decided by module (a component is a list of modules or parameters the
task names), never by matching parameter names. Each stage gets fresh optimizer
parameter groups, one per component, and every trainable parameter is checked to be
in exactly one group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from vlmtune.config import Config, stage_starts
from vlmtune.state import TrainState
from vlmtune.tasks.model import TaskModel


@dataclass(frozen=True)
class Stage:
    index: int
    name: str
    start_epoch: int
    end_epoch: int  # exclusive
    train: dict[str, float]
    vision_blocks: int
    losses: frozenset[str]

    def epochs_from(self, state: TrainState) -> range:
        """The stage's epochs still to train: a resumed run continues from ``state.epoch``."""
        return range(max(self.start_epoch, state.epoch), self.end_epoch)


class Plan(list[Stage]):
    """The stages in order (a list, so it indexes and slices as one)."""

    def remaining(self, state: TrainState) -> Iterator[Stage]:
        """The stages still to train: not finished before a resume, none after an early
        stop (read as the loop goes, so an early stop in one stage ends the plan)."""
        for stage in self:
            if stage.end_epoch > state.epoch and not state.stopped_early:
                yield stage


def build_plan(cfg: Config, weights: dict[str, float]) -> Plan:
    """Stages with their epoch ranges; a stage's losses default to all with weight > 0."""
    stages = Plan()
    starts = stage_starts(cfg.stages, cfg.train.epochs) + [cfg.train.epochs]
    for i, st in enumerate(cfg.stages):
        end = starts[i + 1]
        losses = frozenset(st.losses) if st.losses is not None else frozenset(k for k, w in weights.items() if w > 0)
        losses = frozenset(k for k in losses if weights.get(k, 0) > 0)
        stages.append(Stage(i, st.name, starts[i], end, dict(st.train), st.vision_blocks, losses))
    return stages


def _params(items: Sequence[nn.Module | nn.Parameter]) -> list[nn.Parameter]:
    out: list[nn.Parameter] = []
    for it in items:
        out.extend([it] if isinstance(it, nn.Parameter) else list(it.parameters()))
    return out


# Norms, biases, scalars (the temperature) get no weight decay.
def _decays(p: nn.Parameter) -> bool:
    return p.ndim >= 2


def apply_stage(model: TaskModel, stage: Stage, base_lr: float, weight_decay: float) -> list[dict]:
    """Freeze everything, unfreeze the stage's components, return AdamW parameter groups.

    ``model.component_modules(name, vision_blocks)`` names the modules of a component.
    Groups are per component and per decay/no-decay, each with its ``lr``.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    groups: list[dict] = []
    seen: dict[int, str] = {}
    for comp, mult in stage.train.items():
        params = _params(model.component_modules(comp, stage.vision_blocks))
        params = [p for p in params if id(p) not in seen or seen[id(p)] == comp]
        uniq = list({id(p): p for p in params}.values())
        for p in uniq:
            seen[id(p)] = comp
            p.requires_grad_(True)
        decay = [p for p in uniq if _decays(p)]
        no_decay = [p for p in uniq if not _decays(p)]
        for suffix, ps, wd in (("", decay, weight_decay), ("/no_decay", no_decay, 0.0)):
            if ps:
                groups.append({"params": ps, "lr": base_lr * mult, "weight_decay": wd, "name": comp + suffix})
    check_groups(model, groups)
    return groups


def check_groups(model: nn.Module, groups: list[dict]) -> None:
    """Every trainable parameter sits in exactly one group, and nothing frozen does."""
    counts: dict[int, int] = {}
    for g in groups:
        for p in g["params"]:
            counts[id(p)] = counts.get(id(p), 0) + 1
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    dup = [k for k, c in counts.items() if c > 1]
    if dup or set(counts) != trainable:
        raise RuntimeError(
            f"parameter groups do not cover the trainable parameters exactly once "
            f"({len(dup)} duplicated, {len(trainable - set(counts))} missing, {len(set(counts) - trainable)} frozen in a group)"
        )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def trained_anywhere(model: TaskModel, plan: list[Stage]) -> set[str]:
    """Names of parameters (and buffers of their modules) that any stage of the plan trains.

    A checkpoint saves exactly these plus the task's own parts, so the frozen backbone
    is never copied but an unfrozen block is.
    """
    ids: set[int] = set()
    for st in plan:
        for comp in st.train:
            for p in _params(model.component_modules(comp, st.vision_blocks)):
                ids.add(id(p))
    return {name for name, p in model.named_parameters() if id(p) in ids}


def stage_summary(stage: Stage, model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    comps = ", ".join(f"{k} x{v:g}" for k, v in stage.train.items())
    # Epochs counted from 1, as the epoch lines, metrics.json and history.jsonl count them.
    first, last = stage.start_epoch + 1, stage.end_epoch
    epochs = f"epoch {first}" if first == last else f"epochs {first}-{last}"
    return (
        f"stage {stage.index} '{stage.name}' ({epochs}): {comps}; "
        f"losses {', '.join(sorted(stage.losses))}; trainable {trainable:,} / {total:,}"
    )


def stage_schedule(cfg: Config, stage: Stage, optimizer: torch.optim.Optimizer, processes: int) -> Callable[[int], Any]:
    """The stage's linear warmup-and-decay schedule, from this process's batches per epoch."""

    def make_scheduler(batches: int) -> Any:
        steps_per_epoch = max(1, math.ceil(batches / cfg.train.grad_accum))
        total_steps = steps_per_epoch * (stage.end_epoch - stage.start_epoch)
        # Accelerate steps a prepared scheduler once per process, so count in those units.
        return get_linear_schedule_with_warmup(
            optimizer, int(cfg.optim.warmup_ratio * total_steps) * processes, total_steps * processes
        )

    return make_scheduler
