"""Registered losses: what a task's loss terms are, declared once.

A task keeps a :class:`LossRegistry` (``Task.losses``). Each :class:`Loss` declares its
name, default weight, help text, the record fields it needs (a box loss needs
``bbox``) and, where its term is itself a weighted sum, its parts with their default
sub-weights (``box_l1``, ``box_giou``): these declarations are plain data, read by
config loading, ``config explain``, the stage plan and the start-up target check
without building or running any model. The function computing a loss's term runs only
inside the task's model ``forward``, on the encodings of a batch the model computed
once for all of its losses; a declaration may name it as ``"module:function"``, imported
on its first use, so that a task's declarations (``vlmtune/tasks/NAME/spec.py``) load
without torch.

Weighting happens here: a loss with parts returns its parts unweighted and
:meth:`LossRegistry.terms` sums them with their sub-weights into the loss's term; the
training loop then sums the terms with the losses' weights (in sorted order). A loss
without parts returns its term as it is.

This module needs no torch: it only adds and multiplies what the functions return.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

# (encodings of a batch) -> {the loss's name or its parts: unweighted value, "diag/...": value}.
# An empty dict: no term this batch (no row of the global batch has the loss's target).
LossFn = Callable[[Any], dict[str, Any]]


def has_field(record: Any, name: str) -> bool:
    """Whether ``record`` holds a target in field ``name``: present, not None and not
    blank text (a counting record's empty answer has no answer tokens to train on)."""
    value = getattr(record, name, None)
    if isinstance(value, str):
        return bool(value.strip())
    return value is not None


@dataclass(frozen=True)
class Loss:
    """One registered loss: a declaration (name, default weight, help, the record fields
    it needs, its parts' default sub-weights) and the function computing it.

    ``fields``: the record attributes this loss trains on; it has a target in a set of
    records where at least one record holds all of them (:func:`has_field`). A loss
    with no fields trains on every record (contrastive, matching).
    ``parts``: sub-terms the function returns instead of the loss's own name, each with
    its default sub-weight; they live in the same ``loss:`` mapping as the losses
    (``loss.box_l1``). ``part_help`` documents them.
    ``fn``: the function, or where it lives as ``"module:function"`` (imported when the
    loss is first computed: declaring a loss needs no torch)."""

    name: str
    weight: float
    help: str
    fn: LossFn | str
    fields: tuple[str, ...] = ()
    parts: Mapping[str, float] = field(default_factory=dict)
    part_help: Mapping[str, str] = field(default_factory=dict)

    def function(self) -> LossFn:
        """The function computing this loss (``fn``, imported where it names a module)."""
        if not isinstance(self.fn, str):
            return self.fn
        module, _, attr = self.fn.partition(":")
        return getattr(importlib.import_module(module), attr)

    def has_target(self, records: Iterable[Any]) -> bool:
        """Whether any of ``records`` holds every field this loss needs."""
        return any(all(has_field(r, f) for f in self.fields) for r in records)


class LossRegistry:
    """A task's losses in registration order, the order their terms are computed in
    (a loss that draws random numbers, such as the matching head's hard negatives,
    sees the same stream as long as the order holds).

    Iterating it gives the loss names (``"box" in task.losses``, ``tuple(task.losses)``)."""

    def __init__(self, losses: Iterable[Loss] = ()):
        self._losses: dict[str, Loss] = {}
        for loss in losses:
            self.add(loss)

    # ---- declarations
    def __iter__(self) -> Iterator[str]:
        return iter(self._losses)

    def __contains__(self, name: object) -> bool:
        return name in self._losses

    def __len__(self) -> int:
        return len(self._losses)

    def __getitem__(self, name: str) -> Loss:
        return self._losses[name]

    def __repr__(self) -> str:
        return f"LossRegistry({', '.join(self._losses)})"

    def specs(self) -> tuple[Loss, ...]:
        return tuple(self._losses.values())

    def defaults(self) -> dict[str, float]:
        """Every loss and part with its default weight: the ``loss`` section's defaults."""
        out: dict[str, float] = {}
        for loss in self._losses.values():
            out[loss.name] = loss.weight
            out.update(loss.parts)
        return out

    def help(self) -> dict[str, str]:
        """Every loss and part with its help text (``config explain loss``)."""
        out: dict[str, str] = {}
        for loss in self._losses.values():
            out[loss.name] = loss.help
            out.update({p: loss.part_help.get(p, f"Weight of {p} inside the {loss.name} loss.") for p in loss.parts})
        return out

    def weights(self, given: Mapping[str, float]) -> dict[str, float]:
        """The losses' own weights (not their parts'): ``given`` where it has one, else the default."""
        return {name: float(given.get(name, loss.weight)) for name, loss in self._losses.items()}

    def targets(self, records: list[Any]) -> set[str]:
        """The losses for which ``records`` hold a target somewhere."""
        return {name for name, loss in self._losses.items() if loss.has_target(records)}

    # ---- registering
    def add(self, loss: Loss) -> Loss:
        taken = set(self.defaults())
        clash = sorted(({loss.name} | set(loss.parts)) & taken)
        if clash:
            raise ValueError(f"loss {loss.name!r}: the name {clash[0]!r} is already registered")
        self._losses[loss.name] = loss
        return loss

    def remove(self, name: str) -> None:
        del self._losses[name]

    def register(
        self,
        name: str,
        *,
        weight: float,
        help: str,
        fields: tuple[str, ...] = (),
        parts: Mapping[str, float] | None = None,
        part_help: Mapping[str, str] | None = None,
    ) -> Callable[[LossFn], LossFn]:
        """Decorator: register the function as loss ``name`` (see :class:`Loss`)."""

        def wrap(fn: LossFn) -> LossFn:
            self.add(Loss(name, weight, help, fn, tuple(fields), dict(parts or {}), dict(part_help or {})))
            return fn

        return wrap

    @contextmanager
    def extended(self, *losses: Loss) -> Iterator[LossRegistry]:
        """``losses`` registered for the duration of a ``with`` block (tests, experiments)."""
        for loss in losses:
            self.add(loss)
        try:
            yield self
        finally:
            for loss in losses:
                self._losses.pop(loss.name, None)

    # ---- computing
    def terms(self, enc: Any, active: Iterable[str], weights: Mapping[str, float]) -> dict[str, Any]:
        """The named, unweighted terms of the ``active`` losses on a batch's encodings
        ``enc``, in registration order, with their diagnostics ('diag/...'). A loss with
        parts gets the sum of its parts weighted by ``weights`` (the sub-weights)."""
        active = set(active)
        out: dict[str, Any] = {}
        for name, loss in self._losses.items():
            if name in active:
                out.update(_combined(loss, loss.function()(enc), weights))
        return out


def _combined(loss: Loss, values: dict[str, Any], weights: Mapping[str, float]) -> dict[str, Any]:
    """A loss function's output with its parts replaced by their weighted sum (in the
    declared order of the parts), placed after the diagnostics it returned."""
    if not loss.parts:
        return values
    out = {k: v for k, v in values.items() if k not in loss.parts}
    total = None
    for part in loss.parts:
        if part in values:
            term = weights.get(part, loss.parts[part]) * values[part]
            total = term if total is None else total + term
    if total is not None:
        out[loss.name] = total
    return out
