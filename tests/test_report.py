"""vlmtune.report.compare on hand-written run directories with known numbers."""

from __future__ import annotations

import html
import json
import re
import statistics
from pathlib import Path

import pytest
import yaml

from vlmtune.errors import DataError, VlmtuneError
from vlmtune.history import EpochRecord, StageRecord, StepRecord
from vlmtune.report import compare, direction, order_metrics

# Validation curves of val/retrieval/mean_recall, one per run, chosen so the epoch that
# first comes within 1.0 of the run's best is known: base -> 3, 4, 2; big -> 1, 4, 5.
CURVES = {
    ("base", 0): [10.0, 30.0, 39.5, 40.2, 40.0],
    ("base", 1): [10.0, 20.0, 30.0, 41.0, 42.0],
    ("base", 2): [35.0, 44.0, 44.5, 44.5, 44.0],
    ("big", 0): [50.0, 50.0, 50.0, 50.0, 50.0],
    ("big", 1): [1.0, 2.0, 3.0, 4.0, 5.0],
    ("big", 2): [0.0, 0.0, 0.0, 0.0, 10.0],
}
EPOCH_WALL = {"base": 10.0, "big": 20.0}  # seconds per epoch


def _config(seed: int, lr: float, synthetic_seed: int = 0) -> dict:
    return {
        "task": "retrieval",
        "seed": seed,
        "data": {"train": None, "synthetic": {"n": 100, "seed": synthetic_seed}},
        "stages": [{"name": "align", "start_epoch": 0}, {"name": "ground", "start_epoch": 2}],
        "optim": {"lr": lr},
        "train": {
            "epochs": 5,
            "batch_size": 8,
            "grad_accum": 2,
            "early_stopping": {"metric": "retrieval/mean_recall", "mode": "max", "patience": 0},
        },
    }


def _metrics(kind: str, seed: int) -> dict:
    """Known test metrics: big wins on recall, base on box L1 and wall time."""
    recall = {"base": [40.0, 42.0, 44.0], "big": [50.0, 53.0, 56.0]}[kind][seed]
    l1 = {"base": [0.20, 0.22, 0.24], "big": [0.30, 0.31, 0.35]}[kind][seed]
    return {
        "retrieval/i2t_r1": recall - 10,
        "retrieval/i2t_r5": recall,
        "retrieval/i2t_r10": recall + 10,
        "retrieval/t2i_r1": recall - 12,
        "retrieval/t2i_r5": recall - 1,
        "retrieval/t2i_r10": recall + 8,
        "retrieval/mean_recall": recall,
        "retrieval/chance_i2t_r1": 99.0,  # absurdly high so that it would win if it were ranked
        "retrieval/n_images": 80,
        "grounding/l1": l1,
        "grounding/baseline_l1": 0.01,
        "spatial/accuracy": 90.0 + seed,
        "spatial/confusion": [[3, 1], [0, 4]],
        "train/epochs": 5,
        "train/stopped_early": False,
        "train/wall_s": 5 * EPOCH_WALL[kind],
        "train/peak_mem_mb": {"base": 500.0, "big": 900.0}[kind] + seed,
        "params/trainable": {"base": 1000, "big": 5000}[kind],
        "params/total": 100000,
        "checkpoint": f"runs/{kind}/checkpoints/best",
    }


def _stage(index: int, name: str, epoch: int, step: int) -> dict:
    return StageRecord(
        stage=index,
        name=name,
        epoch=epoch,
        step=step,
        train={"heads": 1.0},
        losses=["box", "contrastive"],
        trainable=1000,
        total=100000,
        cache={},
    ).to_json()


def _history(kind: str, seed: int) -> list[dict]:
    """25 steps, 5 epochs of 5 steps, a second stage from epoch 2; training time equals
    wall time; base trains 100 samples an epoch, big 80."""
    lines = [_stage(0, "align", 0, 0)]
    for step in range(1, 26):
        if step == 11:
            lines.append(_stage(1, "ground", 2, 10))
        lines.append(
            StepRecord(
                epoch=(step - 1) // 5,
                step=step,
                stage=int(step > 10),
                loss=3.0 / step + seed,
                terms={"contrastive": 2.0 / step, "box": 1.0 / step},
                diag={"box_l1": 0.5},
                lr={"heads": 1e-3},
            ).to_json()
        )
        if step % 5 == 0:
            e = step // 5 - 1
            lines.append(
                EpochRecord(
                    epoch=e,
                    step=step,
                    stage=int(e >= 2),
                    samples={"base": 100, "big": 80}[kind] * (e + 1),
                    train_wall_s=EPOCH_WALL[kind] * (e + 1),
                    wall_s=EPOCH_WALL[kind] * (e + 1),
                    peak_mem_mb=500.0,
                    val={"retrieval/mean_recall": CURVES[(kind, seed)][e], "grounding/l1": 0.5 - 0.01 * e},
                ).to_json()
            )
    return lines


def make_run(folder: Path, config: dict, metrics: dict, history: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (folder / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two configs x three seeds."""
    root = tmp_path_factory.mktemp("runs")
    out = []
    for kind, lr in (("base", 1e-3), ("big", 3e-4)):
        for seed in range(3):
            out.append(make_run(root / f"{kind}_seed{seed}", _config(seed, lr), _metrics(kind, seed), _history(kind, seed)))
    return out


@pytest.fixture(scope="module")
def report(runs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("report")
    return compare(runs, out), out


def _row(md: str, key: str) -> list[str]:
    """Cells of the report.md table row whose first cell is ``key`` (or ``*key (reference)*``)."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if cells and cells[0].strip("*").removesuffix(" (reference)") == key:
            return cells
    raise AssertionError(f"no row {key} in report.md")


def test_groups_ignore_seed_and_take_the_dir_stem(report: tuple[dict, Path], runs: list[Path]) -> None:
    result, _ = report
    assert [g["name"] for g in result["groups"]] == ["base", "big"]
    assert [g["runs"] for g in result["groups"]] == [[str(p) for p in runs[:3]], [str(p) for p in runs[3:]]]
    assert [g["seeds"] for g in result["groups"]] == [[0, 1, 2], [0, 1, 2]]
    assert result["groups"][0]["differs"] == {"optim.lr": 1e-3}


def test_any_other_difference_splits_a_group(tmp_path: Path) -> None:
    a = make_run(tmp_path / "x" / "seed_0", _config(0, 1e-3), _metrics("base", 0), _history("base", 0))
    b = make_run(tmp_path / "x" / "seed_1", _config(1, 1e-3), _metrics("base", 1), _history("base", 1))
    # Same top-level seed and lr, other data seed: a different config, not another seed.
    c = make_run(tmp_path / "y" / "seed_0", _config(0, 1e-3, synthetic_seed=5), _metrics("base", 2), _history("base", 2))
    result = compare([a, b, c], tmp_path / "out")
    assert [g["name"] for g in result["groups"]] == ["x", "y"]  # stem empty after the seed: the parent's name
    assert [g["n"] for g in result["groups"]] == [2, 1]
    assert result["groups"][1]["differs"] == {"data.synthetic.seed": 5}


def test_labels_override_and_must_match_the_groups(runs: list[Path], tmp_path: Path) -> None:
    result = compare(runs, tmp_path / "a", labels=["lr 1e-3", "lr 3e-4"])
    assert [g["name"] for g in result["groups"]] == ["lr 1e-3", "lr 3e-4"]
    assert "| lr 1e-3 (n=3) | lr 3e-4 (n=3) |" in (tmp_path / "a" / "report.md").read_text()
    with pytest.raises(VlmtuneError, match="labels: 1 given for 2 groups"):
        compare(runs, tmp_path / "b", labels=["only one"])


def test_metric_table_numbers_match_the_runs(report: tuple[dict, Path], runs: list[Path]) -> None:
    result, out = report
    saved = json.loads((out / "comparison.json").read_text())
    md = (out / "report.md").read_text()
    assert saved["metrics"] == json.loads(json.dumps(result["metrics"]))
    for key in ("retrieval/mean_recall", "retrieval/i2t_r1", "grounding/l1", "spatial/accuracy"):
        for name, members in (("base", runs[:3]), ("big", runs[3:])):
            values = [json.loads((r / "metrics.json").read_text())[key] for r in members]
            got = saved["metrics"][key]["groups"][name]
            assert got["n"] == 3
            assert got["mean"] == pytest.approx(statistics.mean(values))
            assert got["std"] == pytest.approx(statistics.stdev(values))  # sample std
            d = 2 if abs(statistics.mean(values)) >= 1 else 4
            text = f"{statistics.mean(values):.{d}f} ± {statistics.stdev(values):.{d}f}"
            assert text in " ".join(_row(md, key))
    assert _row(md, "retrieval/mean_recall")[1:] == ["42.00 ± 2.00", "**53.00 ± 3.00**"]
    # Lists (confusion matrices), strings and booleans are not table rows.
    for key in ("spatial/confusion", "checkpoint", "train/stopped_early"):
        assert key not in saved["metrics"]


def test_best_marking_follows_the_direction_rule(report: tuple[dict, Path]) -> None:
    result, out = report
    md = (out / "report.md").read_text()
    m = result["metrics"]
    assert m["retrieval/mean_recall"]["best"] == ["big"]
    assert m["grounding/l1"]["best"] == ["base"]  # lower is better
    # Only the metrics the tasks declare are ranked: run numbers (wall time, memory) are
    # efficiency rows, and counts, settings and parameter counts are never ranked.
    assert m["train/wall_s"]["best"] == [] and m["train/peak_mem_mb"]["best"] == []
    assert m["params/trainable"]["best"] == [] and m["retrieval/n_images"]["best"] == []
    assert _row(md, "grounding/l1")[1].startswith("**") and not _row(md, "grounding/l1")[2].startswith("**")
    assert [direction(k) for k in ("grounding/l1", "text/perplexity", "count/mae", "text/bleu4", "grounding/giou")] == [
        "min",
        "min",
        "min",
        "max",
        "max",
    ]
    never = ("train/num_threads", "train/best_stage", "train/samples", "train/bad_steps", "retrieval/i2t_r1_tie_min")
    assert [direction(k) for k in (*never, "retrieval/i2t_tie_queries", "count/n", "loss/box")] == [None] * (len(never) + 3)


def test_baselines_are_rows_under_their_metric_and_never_marked(report: tuple[dict, Path]) -> None:
    result, out = report
    md = (out / "report.md").read_text()
    keys = list(result["metrics"])
    for ref, target, text in (
        ("retrieval/chance_i2t_r1", "retrieval/i2t_r1", "*99.00 ± 0.00*"),
        ("grounding/baseline_l1", "grounding/l1", "*0.0100 ± 0.0000*"),
    ):
        assert keys.index(ref) == keys.index(target) + 1
        assert result["metrics"][ref]["best"] == [] and result["metrics"][ref]["reference"]
        row = _row(md, ref)
        assert not any("**" in cell for cell in row)
        assert row[1:] == [text, text]


def test_metric_order() -> None:
    keys = [
        "train/wall_s",
        "params/total",
        "text/bleu4",
        "count/accuracy",
        "spatial/accuracy",
        "custom/x",
        "answer/parse_rate",
        "grounding/miou",
        "retrieval/i2t_r1",
        "retrieval/chance_i2t_r1",
    ]
    assert order_metrics(keys) == [
        "retrieval/i2t_r1",
        "retrieval/chance_i2t_r1",
        "grounding/miou",
        "spatial/accuracy",
        "count/accuracy",
        "answer/parse_rate",
        "text/bleu4",
        "custom/x",
        "train/wall_s",
        "params/total",
    ]


def test_efficiency_numbers(report: tuple[dict, Path]) -> None:
    result, out = report
    per_run = result["efficiency_runs"]
    runs = [r for g in result["groups"] for r in g["runs"]]
    assert [per_run[r]["epochs_to_target"] for r in runs] == [3, 4, 2, 1, 4, 5]
    assert [per_run[r]["wall_to_target_s"] for r in runs] == [30.0, 40.0, 20.0, 20.0, 80.0, 100.0]
    assert [per_run[r]["best_val"] for r in runs] == [40.2, 42.0, 44.5, 50.0, 5.0, 10.0]
    eff = result["efficiency"]
    assert eff["epochs_to_target"]["groups"]["base"]["mean"] == pytest.approx(3.0)
    assert eff["epochs_to_target"]["groups"]["base"]["std"] == pytest.approx(1.0)
    assert eff["epochs_to_target"]["groups"]["big"]["mean"] == pytest.approx(10 / 3)
    # 3.00 ± 1.00 against 3.33 ± 2.08 over 3 seeds: within Welch's interval, no difference.
    assert eff["epochs_to_target"]["best"] == []
    # base trains 500 samples in 50 s, big 400 in 100 s.
    assert [per_run[r]["samples_per_s"] for r in runs] == pytest.approx([10.0] * 3 + [4.0] * 3)
    assert eff["samples_per_s"]["best"] == ["base"]
    assert eff["peak_mem_mb"]["groups"]["big"]["mean"] == pytest.approx(901.0)
    assert eff["trainable_params"]["groups"]["big"]["mean"] == 5000
    md = (out / "report.md").read_text()
    assert _row(md, "epochs to target")[1:] == ["3.00 ± 1.00", "3.33 ± 2.08"]
    assert _row(md, "training samples / s")[1:] == ["**10.00 ± 0.00**", "4.00 ± 0.00"]


def test_tolerance_changes_time_to_target(runs: list[Path], tmp_path: Path) -> None:
    result = compare(runs[:1], tmp_path, tolerance=0.0)
    assert result["efficiency_runs"][str(runs[0])]["epochs_to_target"] == 4  # the best epoch itself
    with pytest.raises(VlmtuneError, match="tolerance"):
        compare(runs[:1], tmp_path, tolerance=-1)


def test_verdict_is_whatever_the_data_say(report: tuple[dict, Path], runs: list[Path], tmp_path: Path) -> None:
    result, out = report
    v = result["verdict"]
    assert v["best"] == "big" and v["separated"]
    assert v["comparisons"][0]["difference"] == pytest.approx(11.0)
    assert "big is best" in v["text"] and "the data separate them" in v["text"]
    assert v["text"] in (out / "report.md").read_text()
    # A lower-is-better target: base wins on L1 (0.22 ± 0.02 vs 0.32 ± 0.026): separated.
    low = compare(runs, tmp_path / "l1", target_metric="grounding/l1")["verdict"]
    assert low["best"] == "base" and "lower is better" in low["text"]
    # spatial/accuracy is 90, 91, 92 in both groups: a tie the data cannot separate.
    tie = compare(runs, tmp_path / "tie", target_metric="spatial/accuracy")["verdict"]
    assert not tie["separated"] and "do not separate" in tie["text"]
    # One seed per group: never separated, however large the gap.
    one = compare([runs[0], runs[3]], tmp_path / "one")["verdict"]
    assert one["best"] == "big" and not one["separated"] and "too few seeds to tell" in one["text"]


def _seed_runs(root: Path, means: dict[str, float], spreads: list[float]) -> list[Path]:
    """One run per (group, seed) whose test retrieval/mean_recall is mean + spread[seed]."""
    out = []
    for kind, lr in (("base", 1e-3), ("big", 3e-4)):
        for seed, delta in enumerate(spreads):
            m = _metrics(kind, 0)
            m["retrieval/mean_recall"] = means[kind] + delta
            out.append(make_run(root / f"{kind}_seed{seed}", _config(seed, lr), m, _history(kind, 0)))
    return out


def test_two_seeds_cannot_tell(tmp_path: Path) -> None:
    """n=2 per group: no interval and no winner called, however large the gap."""
    runs = _seed_runs(tmp_path, {"base": 40.0, "big": 60.0}, [-0.5, 0.5])
    v = compare(runs, tmp_path / "out")["verdict"]
    assert v["best"] == "big" and not v["separated"]
    assert v["comparisons"][0]["interval"] is None
    assert "too few seeds to tell" in v["text"] and "n=2 and 2" in v["text"]


def test_five_seeds_give_an_interval_that_excludes_zero(tmp_path: Path) -> None:
    from scipy import stats

    spreads = [-1.0, -0.5, 0.0, 0.7, 0.8]
    runs = _seed_runs(tmp_path, {"base": 40.0, "big": 45.0}, spreads)
    result = compare(runs, tmp_path / "out")
    v = result["verdict"]
    c = v["comparisons"][0]
    assert v["best"] == "big" and v["separated"] and c["difference"] == pytest.approx(5.0)
    # Welch's interval, computed by hand: diff ± t(0.975, df) * se with the
    # Welch-Satterthwaite df (equal variances here, so df = 2 (n - 1)).
    s2 = statistics.variance(spreads)
    se = (2 * s2 / 5) ** 0.5
    half = stats.t.ppf(0.975, 8) * se
    assert c["interval"]["low"] == pytest.approx(5.0 - half)
    assert c["interval"]["high"] == pytest.approx(5.0 + half)
    assert c["interval"]["df"] == pytest.approx(8.0)
    assert 0 < c["interval"]["low"] < c["interval"]["high"]
    assert "95% interval" in v["text"] and "excludes 0" in v["text"]
    assert v["text"] in (tmp_path / "out" / "report.md").read_text()
    assert json.loads((tmp_path / "out" / "comparison.json").read_text())["verdict"]["comparisons"][0]["interval"]


def test_equal_groups_give_an_interval_that_includes_zero(tmp_path: Path) -> None:
    runs = _seed_runs(tmp_path, {"base": 40.0, "big": 40.0}, [-1.0, 2.0, 0.0, -0.5, 1.5])
    v = compare(runs, tmp_path / "out")["verdict"]
    c = v["comparisons"][0]
    assert not v["separated"] and c["interval"]["low"] < 0 < c["interval"]["high"]
    assert "includes 0" in v["text"] and "do not separate" in v["text"]


def test_plots_are_written_and_labelled(report: tuple[dict, Path]) -> None:
    result, out = report
    assert set(result["plots"]) == {"losses", "val_curve", "recall_at_k"}
    for info in result["plots"].values():
        data = (out / info["file"]).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        for ax in info["axes"]:
            assert ax["xlabel"] and ax["ylabel"] and ax["title"]
    losses = result["plots"]["losses"]
    assert [ax["title"] for ax in losses["axes"]] == ["total loss", "loss/contrastive", "loss/box"]
    assert losses["axes"][0]["legend"] == ["base", "big"]
    assert result["plots"]["val_curve"]["axes"][0]["ylabel"] == "validation retrieval/mean_recall"


def test_plots_without_data_are_skipped(tmp_path: Path) -> None:
    metrics = {k: v for k, v in _metrics("base", 0).items() if not k.startswith("retrieval/")}
    history = [h for h in _history("base", 0) if h["type"] != "step"]
    run = make_run(tmp_path / "r", _config(0, 1e-3), metrics, history)
    result = compare([run], tmp_path / "out")
    assert set(result["plots"]) == {"val_curve"}
    assert not (tmp_path / "out" / "losses.png").exists()


def test_html_is_self_contained(report: tuple[dict, Path]) -> None:
    result, out = report
    page = (out / "report.html").read_text()
    links = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", page, flags=re.IGNORECASE)
    assert len(links) == len(result["plots"])
    assert all(link.startswith("data:image/png;base64,") for link in links)
    assert "<link" not in page and "<script" not in page and "@import" not in page and "url(" not in page
    assert "<style>" in page and 'class="best"' in page and 'class="ref"' in page
    assert html.escape(result["verdict"]["text"]) in page


@pytest.mark.parametrize("missing", ["metrics.json", "history.jsonl", "config.yaml"])
def test_missing_file_is_a_one_line_error_naming_it(missing: str, tmp_path: Path) -> None:
    run = make_run(tmp_path / "r", _config(0, 1e-3), _metrics("base", 0), _history("base", 0))
    (run / missing).unlink()
    with pytest.raises(DataError) as e:
        compare([run], tmp_path / "out")
    assert str(run / missing) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out" / "report.md").exists()


def test_other_bad_input(runs: list[Path], tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such run directory"):
        compare([tmp_path / "nope"], tmp_path / "out")
    bad = make_run(tmp_path / "bad", _config(0, 1e-3), _metrics("base", 0), [])
    (bad / "history.jsonl").write_text(json.dumps(_stage(0, "a", 0, 0)) + "\n{not json\n")
    with pytest.raises(DataError, match=r"history.jsonl: line 2: not valid JSON"):
        compare([bad], tmp_path / "out")
    with pytest.raises(VlmtuneError, match="given twice"):
        compare([runs[0], runs[0]], tmp_path / "out")
    with pytest.raises(VlmtuneError, match="'retrieval/nope'"):
        compare(runs, tmp_path / "out", target_metric="retrieval/nope")
    with pytest.raises(VlmtuneError, match="no run directories"):
        compare([], tmp_path / "out")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda h: h.pop("samples"), r"line 7: epoch line: missing key 'samples'"),  # a run from before it was logged
        (lambda h: h.update(wall=h.pop("wall_s")), r"line 7: epoch line: missing key 'wall_s'"),  # a renamed key
        (lambda h: h.update(epochs=1), r"line 7: epoch line: key 'epochs' is not in the schema"),
        (lambda h: h.update(step="5"), r"line 7: epoch line: 'step' must be an integer"),
    ],
)
def test_a_history_line_off_the_schema_is_an_error_naming_file_line_and_key(change, message, tmp_path: Path) -> None:
    history = _history("base", 0)
    assert history[6]["type"] == "epoch"
    change(history[6])
    run = make_run(tmp_path / "r", _config(0, 1e-3), _metrics("base", 0), history)
    with pytest.raises(DataError, match=message) as e:
        compare([run], tmp_path / "out")
    assert str(run / "history.jsonl") in str(e.value)


def test_equal_means_read_no_difference_not_best(tmp_path: Path) -> None:
    """Means of 28.7316 and 28.7285 over 3 seeds each: inside the interval, so no group is best."""
    runs = _seed_runs(tmp_path, {"base": 28.7316, "big": 28.7285}, [-0.4, 0.1, 0.3])
    result = compare(runs, tmp_path / "out")
    v = result["verdict"]
    assert not v["separated"] and "no difference" in v["text"] and "is best" not in v["text"]
    assert result["metrics"]["retrieval/mean_recall"]["best"] == []
    assert not any("**" in c for c in _row((tmp_path / "out" / "report.md").read_text(), "retrieval/mean_recall"))


def test_efficiency_of_runs_with_other_threads_is_not_compared(tmp_path: Path) -> None:
    """Wall time, speed and memory of groups that ran with other thread counts name no winner, and say why."""
    runs = []
    for kind, lr, threads in (("base", 1e-3, 1), ("big", 3e-4, 2)):
        for seed in range(3):
            m = _metrics(kind, seed) | {"train/num_threads": threads, "train/device": "cpu"}
            runs.append(make_run(tmp_path / f"{kind}_seed{seed}", _config(seed, lr), m, _history(kind, seed)))
    result = compare(runs, tmp_path / "out")
    assert result["efficiency_settings"] == {"threads (train/num_threads)": {"base": 1, "big": 2}}
    for key in ("wall_s", "samples_per_s", "peak_mem_mb", "wall_to_target_s"):
        assert result["efficiency"][key]["best"] == [] and not result["efficiency"][key]["comparable"]
    assert result["efficiency"]["epochs_to_target"]["comparable"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert _row(md, "total wall time (s) (not comparable)")
    assert _row(md, "setting: threads (train/num_threads)")[1:] == ["1", "2"]
    assert result["metrics"]["train/num_threads"]["best"] == []


def test_counting_runs_get_a_per_count_table_and_a_reliability_plot(tmp_path: Path) -> None:
    runs = []
    for kind, lr in (("base", 1e-3), ("big", 3e-4)):
        for seed in range(2):
            m = _metrics(kind, seed)
            m["count/per_count"] = [
                {"count": "0", "n": 4, "accuracy": 50.0 + 10 * seed},
                {"count": "1", "n": 3, "accuracy": None},
            ]
            m["count/reliability"] = [{"low": 0.5, "high": 0.6, "n": 2, "confidence": 55.0, "accuracy": 50.0 + 50 * seed}]
            runs.append(make_run(tmp_path / f"{kind}_seed{seed}", _config(seed, lr), m, _history(kind, seed)))
    result = compare(runs, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert _row(md, "0")[1:] == ["55.00 ± 7.07 (n=4)", "55.00 ± 7.07 (n=4)"]  # mean of 50 and 60 per group
    assert "reliability" in result["plots"] and (tmp_path / "out" / "reliability.png").is_file()
    assert "![Count head reliability" in md
