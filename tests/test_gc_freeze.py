"""utils.frozen_gc: a run's long-lived objects are left out of garbage-collection passes
while it trains, and everything is handed back to the collector when the run ends."""

from __future__ import annotations

import gc

from vlmtune.utils import frozen_gc


def test_frozen_gc_freezes_for_the_block_and_nests() -> None:
    assert gc.get_freeze_count() == 0
    alive = [object() for _ in range(10)]
    with frozen_gc():
        frozen = gc.get_freeze_count()
        assert frozen > len(alive)
        with frozen_gc():  # a run inside a run (the bench): the inner end unfreezes nothing
            pass
        assert gc.get_freeze_count() >= frozen
    assert gc.get_freeze_count() == 0


def test_frozen_gc_unfreezes_on_error() -> None:
    try:
        with frozen_gc():
            raise RuntimeError("stop")
    except RuntimeError:
        pass
    assert gc.get_freeze_count() == 0
