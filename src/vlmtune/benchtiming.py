"""How ``vlmtune bench`` times things: variants interleaved in rounds, medians with their spread.

A section that compares variants (A against B) declares them and lets :func:`interleave`
run them in rounds, the order reversed every other round (A B, B A, A B, ...), so load
that changes on a shared machine falls on every variant alike (a steady rise or fall
included); the section then reports medians over the rounds, the spread (min, max)
beside them, CPU time beside wall time, the thread count and the load average, and
judges its targets on :func:`paired_ratio`: the median over rounds of A's time over
B's in the same round (the two ran back to back, under nearly the same load), steadier
on a busy machine than :func:`ratio` of the medians::

    from vlmtune.benchtiming import Variant, interleave, ratio, timing_row

    timings = interleave([Variant("plain", run_plain), Variant("hard", run_hard)], rounds=3)
    r = paired_ratio(timings, "hard", "plain")   # median over rounds of hard / plain (wall)
    r = ratio(timings, "hard", "plain")          # median wall of hard / median wall of plain
    row = timing_row(timings["hard"])            # {"wall_s": median, "wall_min_s", "wall_max_s", "cpu_s", ...}

``run`` is one repetition (fresh state each time: remove its output folder inside it);
whatever dict it returns is kept per round in ``Timing.extra``; ``setup`` (optional)
runs untimed before each repetition. CPU time counts this process's threads and the
children it waited for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import time
from collections.abc import Callable, Iterator
from typing import Any


@dataclasses.dataclass(frozen=True)
class Variant:
    """One thing a section times: ``run`` is one repetition, ``setup`` untimed before it."""

    name: str
    run: Callable[[], dict[str, Any] | None]
    setup: Callable[[], None] | None = None


@dataclasses.dataclass
class Timing:
    """Per-round wall and CPU seconds of one variant, and what its runs returned."""

    wall: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)
    extra: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    load: list[float] = dataclasses.field(default_factory=list)


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def cpu_seconds() -> float:
    """CPU seconds of this process (all threads) and of the children it has waited for."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def interleave(variants: list[Variant], rounds: int) -> dict[str, Timing]:
    """Run the variants in turn, ``rounds`` times, in reverse order every other round
    (A B, B A, A B, ...), timing each run."""
    out = {v.name: Timing() for v in variants}
    for i in range(rounds):
        for v in variants if i % 2 == 0 else variants[::-1]:
            if v.setup is not None:
                v.setup()
            t0, c0 = time.perf_counter(), cpu_seconds()
            extra = v.run()
            out[v.name].wall.append(time.perf_counter() - t0)
            out[v.name].cpu.append(cpu_seconds() - c0)
            out[v.name].extra.append(extra or {})
            out[v.name].load.append(load_average())
    return out


def ratio(timings: dict[str, Timing], num: str, den: str, key: str = "wall") -> float:
    """Median of ``num`` over median of ``den`` (``key`` wall or cpu)."""
    return median(getattr(timings[num], key)) / median(getattr(timings[den], key))


def paired_ratio(timings: dict[str, Timing], num: str, den: str, key: str = "wall") -> float:
    """Median over rounds of ``num``'s time over ``den``'s in the same round (``key``
    wall or cpu): each pair ran back to back, so load that drifts over the section
    moves both of a pair alike."""
    return median(round_ratios(timings, num, den, key))


def round_ratios(timings: dict[str, Timing], num: str, den: str, key: str = "wall") -> list[float]:
    """``num``'s time over ``den``'s, round by round."""
    return [a / b for a, b in zip(getattr(timings[num], key), getattr(timings[den], key))]


def timing_row(t: Timing) -> dict[str, Any]:
    """A variant's figures for bench.json: medians, spread, rounds, the load it ran under."""
    return {
        "wall_s": round(median(t.wall), 4),
        "wall_min_s": round(min(t.wall), 4),
        "wall_max_s": round(max(t.wall), 4),
        "cpu_s": round(median(t.cpu), 4),
        "rounds": len(t.wall),
        "load_average": [round(x, 2) for x in t.load],
    }


def spread(row: dict[str, Any], scale: float = 1.0, fmt: str = ".2f") -> str:
    """``median (min-max)`` of a :func:`timing_row`, for bench.md."""
    return f"{scale * row['wall_s']:{fmt}} ({scale * row['wall_min_s']:{fmt}}-{scale * row['wall_max_s']:{fmt}})"


@contextlib.contextmanager
def bench_threads(n: int | None) -> Iterator[int]:
    """The torch threads the bench runs with: ``n``, or one on CPU (a benchmark on a
    shared CPU with more threads measures the other jobs); restored afterwards."""
    import torch

    before = torch.get_num_threads()
    chosen = n or (before if torch.cuda.is_available() else 1)
    torch.set_num_threads(chosen)
    try:
        yield chosen
    finally:
        torch.set_num_threads(before)
