"""vlmtune bench --sections negatives: large contrastive batches from the cache (no timing asserts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import CONFIGS
from vlmtune.benchnegatives import bench_mining, bench_negatives, measure_step_memory, render
from vlmtune.cli import main

TWO_STAGE = str(CONFIGS / "retrieval_two_stage.yaml")


def test_negatives_section_times_every_batch_and_grad_cache() -> None:
    r = bench_negatives(TWO_STAGE, "tiny", chunk=4, sizes=(8, 16), steps=1, rounds=2, grad_cache_rows=8, memory_rows=0)
    v = r["variants"]
    assert list(v) == ["batch_4", "batch_8", "batch_16", "batch_8_gradcache"]
    assert v["batch_4"]["per_pair_ratio"] == 1.0 and v["batch_16"]["pairs"] == 16
    assert v["batch_8_gradcache"]["grad_cache"] == "always" and v["batch_8"]["grad_cache"] == "never"
    for row in v.values():
        assert row["timing"]["rounds"] == 2 and row["step_s"] > 0 and row["per_pair_ms"] > 0
        assert row["timing"]["wall_min_s"] <= row["step_s"] <= row["timing"]["wall_max_s"]  # one step per round
    assert r["ratio_grad_cache_to_plain"] == pytest.approx(v["batch_8_gradcache"]["step_s"] / v["batch_8"]["step_s"], rel=1e-3)
    assert r["losses"] == ["contrastive", "matching"]
    md = "\n".join(render(r))
    assert all(row["per_pair_cpu_ratio"] is None or row["per_pair_cpu_ratio"] > 0 for row in v.values())
    assert "| batch_16 | 16 | 4 | never |" in md and "GradCache / every chunk's graph kept" in md


@pytest.mark.slow  # four whole runs (a warm-up that builds the cache, then one of each): 15-25 s
def test_mining_is_timed_against_the_same_epochs_without_it(scenes: Path, tmp_path: Path) -> None:
    """Whole one-stage runs from one cache, interleaved: the mined runs refresh every
    epoch (their record says so), the plain ones never; the ratio is of their medians."""
    overrides = [f"data.synthetic_dir={scenes}", "data.synthetic.n=40", "train.batch_size=8", "train.progress=false"]
    m = bench_mining(TWO_STAGE, overrides, tmp_path, images=40, batch_size=8, epochs=2, rounds=1)
    assert m["refreshed"]["refreshes_per_run"] == 2 and m["kept"]["refreshes_per_run"] == 1
    assert m["plain"]["refreshes_per_run"] == 0 and m["plain"]["mining_s_per_run"] == 0
    assert m["refreshed"]["mining_s_per_run"] > 0 and m["kept"]["mining_s_per_run"] > 0
    r = m["refreshed"]["epoch_s"]
    assert m["ratio_refreshed_to_kept"] == pytest.approx(r / m["kept"]["epoch_s"], rel=1e-3)
    assert m["ratio_refreshed_to_plain"] == pytest.approx(r / m["plain"]["epoch_s"], rel=1e-3)
    assert len(m["refreshed"]["load_average"]) == 1 and (tmp_path / "cache_mining").is_dir()
    assert not any(tmp_path.glob("run_mining_*"))  # the timed runs are removed
    md = "\n".join(render({"device": "cpu", "losses": [], "variants": {}, "steps_per_round": 1, "mining": m}))
    assert "Mined negatives, from the cache (40 images, batch 8, 2 epochs x 1 rounds" in md
    assert "an epoch that refreshes its mined negatives" in md


def test_step_memory_is_measured_and_says_how() -> None:
    m = measure_step_memory(TWO_STAGE, "tiny", 16, 4, "always")
    assert m["pairs"] == 16 and m["grad_cache"] == "always" and m["peak_mb"] >= 0
    assert "VmHWM" in m["how"] or "ru_maxrss" in m["how"] or "cuda" in m["how"]


@pytest.mark.slow  # four step variants and two fresh processes for the memory: about 60 s on the loaded 2-core machine
def test_bench_command_negatives_section(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    args = ["bench", "--out", str(out), "--sections", "negatives", "--batch-size", "8", "--negatives-sizes", "16", "32"]
    assert main([*args, "--rounds", "1"]) == 0
    r = json.loads((out / "bench.json").read_text())["negatives"]
    assert set(r["variants"]) == {"batch_8", "batch_16", "batch_32", "batch_16_gradcache"}
    assert set(r["memory"]) == {"never", "always"} and r["memory"]["always"]["pairs"] == 32
    assert "Peak memory of one 32-pair step" in (out / "bench.md").read_text()
    assert r["mining"]["refreshed"]["refreshes_per_run"] == r["mining"]["epochs"]
    assert "Mined negatives, from the cache" in (out / "bench.md").read_text()
