"""The default CPU thread count (train.num_threads null): the cores by affinity, one when the load exceeds them."""

from __future__ import annotations

import os

import pytest

from vlmtune.train import launch


def test_default_threads_follow_affinity_and_fall_to_one_under_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    assert launch.default_threads()[0] == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert launch.default_threads()[0] == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (6.5, 1.0, 1.0))
    n, why = launch.default_threads()
    assert n == 1 and "load average 6.5 exceeds the 4 cores" in why
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the environment asked: it wins
    assert launch.default_threads() == (3, "OMP_NUM_THREADS=3")


def test_a_resumed_run_keeps_the_thread_count_it_started_with() -> None:
    import torch

    from vlmtune.state import TrainState

    before = torch.get_num_threads()
    try:
        state = TrainState(num_threads=before + 1)
        launch.keep_threads(state, None, resumed=True)
        assert torch.get_num_threads() == before + 1 == state.num_threads
        launch.keep_threads(state, 1, resumed=True)  # train.num_threads asked: it stays
        assert torch.get_num_threads() == before + 1
        fresh = TrainState(num_threads=7)
        launch.keep_threads(fresh, None, resumed=False)  # a fresh run records what it uses
        assert fresh.num_threads == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_torch_threads_sets_and_restores_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(launch, "default_threads", lambda: (1, "test"))
    before = torch.get_num_threads()
    with launch.torch_threads(None):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
