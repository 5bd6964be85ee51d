"""The default CPU thread count (train.num_threads null): the cores by affinity, one when the load exceeds them."""

from __future__ import annotations

import os

import pytest

from vlmtune.train import launch


def test_default_threads_follow_affinity_and_fall_to_one_under_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    assert launch.default_threads()[0] == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert launch.default_threads()[0] == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (6.5, 1.0, 1.0))
    n, why = launch.default_threads()
    assert n == 1 and "load average 6.5 exceeds the 4 cores" in why


def test_torch_threads_sets_and_restores_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(launch, "default_threads", lambda: (1, "test"))
    before = torch.get_num_threads()
    with launch.torch_threads(None):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
