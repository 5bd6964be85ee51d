"""vlmtune bench runs end to end and reports what it claims to measure (no timing asserts)."""

import json
from pathlib import Path

import pytest

from vlmtune.cli import main


@pytest.mark.slow  # two small training runs, a worker pool and an evaluation: about 9 s (CI's second step runs it)
def test_bench_command_measures_cached_and_uncached_training(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    assert main(["bench", "--out", str(out), "--images", "20", "--epochs", "2", "--batch-size", "8",
                 "--eval-sizes", "100x300", "--sections", "training", "loader", "eval", "gpu"]) == 0
    r = json.loads((out / "bench.json").read_text())
    t = r["training"]
    assert t["cached"]["cache"]["cache_vision"] is True and t["uncached"]["cache"] == {}
    assert len(t["cached"]["epoch_train_s"]) == 2 and len(t["uncached"]["epoch_train_s"]) == 2
    assert t["extraction_pass_s"] > 0 and t["ratio_cached_total_to_extraction"] > 0
    assert set(r["loader"]) == {"workers_0_items_per_s", "workers_2_items_per_s"}
    (row,) = r["eval"]
    assert (row["images"], row["captions"]) == (100, 300) and row["matmul_s"] > 0 and row["eval_s"] > 0
    assert "skipped" in r["gpu"] or r["gpu"]["images_per_s_bf16"] > 0
    md = (out / "bench.md").read_text()
    assert "cached total / extraction pass" in md and "100 x 300" in md
