"""Checks of a whole config, run when it is built: bounds (each field's own, from its
metadata), the engine's combinations, the stage plan, the ``loss`` mapping against the
run's task's registered losses, then the task's own rules (``Task.check_config``).
Every failure is a :class:`~vlmtune.errors.ConfigError` whose message starts with the key.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from vlmtune.config.fields import check_bounds, short
from vlmtune.config.schema import BACKBONE_COMPONENTS, Config, StageConfig
from vlmtune.data.formats.registry import format_names
from vlmtune.errors import ConfigError
from vlmtune.tasks import TASKS, task_spec

if TYPE_CHECKING:
    from vlmtune.tasks import Task


def need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def resolve_and_check(cfg: Config) -> None:
    """Fill in what the run's task decides (loss weights, the early-stopping metric),
    then check everything, naming the first bad key."""
    need(cfg.task in TASKS, "task", f"unknown task {cfg.task!r}; choose from {', '.join(TASKS)}")
    task = task_spec(cfg.task)
    cfg.loss = resolve_losses(task, cfg.loss)
    if cfg.train.early_stopping.metric is None:
        cfg.train.early_stopping.metric = task.default_metric
    check_bounds(cfg)
    _check_engine(cfg)
    for name in TASKS:  # every config holds every task's sections
        task_spec(name).check_sections(cfg)
    _check_stages(cfg, task)
    task.check_config(cfg)


def resolve_losses(task: type[Task], given: dict[str, float]) -> dict[str, float]:
    """``given`` weights over the task's registered defaults; a name the task has not
    registered is an error naming it and the choices."""
    defaults = task.losses.defaults()
    for name in given:
        need(name in defaults, f"loss.{name}", f"not a loss of the {task.name} task; choose from {', '.join(defaults) or 'none'}")
    return {**defaults, **given}


def _check_engine(cfg: Config) -> None:
    need(len(cfg.optim.betas) == 2, "optim.betas", "must be two numbers in [0, 1)")
    need(
        cfg.train.num_threads is None or cfg.train.num_threads >= 0,
        "train.num_threads",
        f"must be >= 1 (or 0 / null: PyTorch's default), got {cfg.train.num_threads}",
    )
    need(
        cfg.train.init_from is None or cfg.train.init_from.strip() != "",
        "train.init_from",
        "must name a checkpoint folder (or be null)",
    )
    need(
        0 < len(cfg.eval.ks) <= 100, "eval.ks", f"must be 1 to 100 integers between 1 and 100000000, got {short(cfg.eval.ks, 60)}"
    )
    bb = cfg.backbone
    need(bb.tiny_image_size % 16 == 0, "backbone.tiny_image_size", f"must be a multiple of 16, got {bb.tiny_image_size}")
    # The tiny preset has hidden/16 attention heads and half as many key-value heads: 16 or a multiple of 32.
    need(
        bb.tiny_hidden_size == 16 or bb.tiny_hidden_size % 32 == 0,
        "backbone.tiny_hidden_size",
        f"must be 16 or a multiple of 32, got {bb.tiny_hidden_size}",
    )
    need(
        cfg.data.format in format_names(),
        "data.format",
        f"{short(cfg.data.format)} is not one of {', '.join(map(repr, format_names()))}",
    )


def _check_stages(cfg: Config, task: type[Task]) -> None:
    """Each stage trains components the task has (the backbone's ones its model reads),
    with positive LR multipliers, and switches on losses the task registered."""
    components = tuple(task.components) + BACKBONE_COMPONENTS
    used, losses = task.backbone_components, tuple(task.losses)
    need(len(cfg.stages) >= 1, "stages", "needs at least one stage")
    stage_starts(cfg.stages, cfg.train.epochs)
    for i, st in enumerate(cfg.stages):
        key = f"stages[{i}]"
        need(len(st.train) > 0, f"{key}.train", "no component trains in this stage")
        for comp, mult in st.train.items():
            need(comp in components, f"{key}.train.{comp}", f"unknown component; choose from {', '.join(components)}")
            # Training a backbone component the task's model never reads would count as
            # trainable and never change (retrieval never runs the projector into the LM).
            need(
                comp in used or comp not in BACKBONE_COMPONENTS,
                f"{key}.train.{comp}",
                f"the {cfg.task} task never uses the backbone's {comp} (it would count as trainable and never change); "
                f"choose from {', '.join(tuple(task.components) + used)}",
            )
            need(mult > 0, f"{key}.train.{comp}", f"LR multiplier must be > 0, got {mult}")
        if "vision_blocks" in st.train:
            need(st.vision_blocks >= 1, f"{key}.vision_blocks", "must be >= 1 when the 'vision_blocks' component trains")
        else:
            need(st.vision_blocks == 0, f"{key}.vision_blocks", "is set but 'vision_blocks' is not in this stage's train list")
        for term in st.losses or []:
            need(term in losses, f"{key}.losses", f"unknown loss '{term}'; choose from {', '.join(losses)}")


def stage_starts(stages: list[StageConfig], epochs: int) -> list[int]:
    """The first epoch of each stage: ``start_epoch`` as given, or ``start`` (a fraction
    of ``epochs``) as ``floor(start * epochs + 0.5)`` (halves round up), raised to the
    previous stage's first epoch + 1 where rounding would make the two meet. Every
    stage must begin before ``epochs``. A bad value is a :class:`ConfigError` naming it."""
    starts: list[int] = []
    for i, st in enumerate(stages):
        key = f"stages[{i}]"
        if st.start_epoch is not None and st.start is not None:
            raise ConfigError(f"{key}: give start_epoch ({st.start_epoch}) or start ({st.start}), not both")
        if i == 0:
            if st.start_epoch not in (None, 0):
                raise ConfigError(f"{key}.start_epoch: the first stage must start at epoch 0")
            if st.start not in (None, 0):
                raise ConfigError(f"{key}.start: the first stage must start at 0")
            starts.append(0)
            continue
        prev, prev_st = starts[-1], stages[i - 1]
        if st.start_epoch is None and st.start is None:
            raise ConfigError(
                f"{key}.start_epoch: missing; give start_epoch (the epochs trained before the stage) or start "
                f"(a fraction of train.epochs, e.g. 0.25)"
            )
        if st.start_epoch is not None:
            if st.start_epoch <= prev:
                where = (
                    f"stages[{i - 1}].start_epoch ({prev})"
                    if prev_st.start is None
                    else f"stages[{i - 1}]'s start_epoch ({prev}, from start={prev_st.start:g})"
                )
                raise ConfigError(f"{key}.start_epoch: must be after {where}")
            if st.start_epoch >= epochs:
                raise ConfigError(f"{key}.start_epoch: {_never_runs(i, st.start_epoch, len(stages), epochs)}")
            starts.append(st.start_epoch)
            continue
        frac = float(st.start)  # type: ignore[arg-type]
        if not 0 < frac < 1:
            raise ConfigError(f"{key}.start: must be a fraction of train.epochs in (0, 1), got {frac:g}")
        if prev_st.start is not None and frac <= prev_st.start:
            raise ConfigError(f"{key}.start: must be above stages[{i - 1}].start ({prev_st.start:g}), got {frac:g}")
        epoch = max(math.floor(frac * epochs + 0.5), prev + 1)
        if epoch >= epochs:
            raise ConfigError(
                f"{key}.start: {frac:g} of train.epochs ({epochs}) gives start_epoch {epoch}, which is not before "
                f"train.epochs; the stage would never run (raise train.epochs to at least {epoch + 1})"
            )
        starts.append(epoch)
    return starts


def _never_runs(i: int, start_epoch: int, n_stages: int, epochs: int) -> str:
    """Why stage ``i``'s ``start_epoch`` cannot be, and the two fixes: a fraction of the
    run (which follows ``train.epochs``; one that fits this run is suggested) or more epochs."""
    head = f"{start_epoch} is not before train.epochs {epochs}, so the stage would never run"
    raise_to = f"raise train.epochs to at least {start_epoch + 1}"
    if n_stages > epochs:  # no fraction fits: every stage needs an epoch of its own
        return f"{head}; {raise_to} (or to {n_stages}, one epoch per stage, with the starts as fractions: stages.{i}.start=F)"
    frac = round(i / n_stages, 2)  # evenly spaced stages: valid at any train.epochs >= n_stages
    return f"{head}: write it as a fraction of the run (start: {frac:g}, or stages.{i}.start={frac:g}: it follows train.epochs) or {raise_to}"
