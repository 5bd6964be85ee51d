"""The history.jsonl schema: records round-trip, the writer writes exactly the schema's
keys in the loop's order, and a line off the schema is an error naming file, line, key."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from vlmtune.errors import DataError, first_line
from vlmtune.history import EpochRecord, History, StageRecord, StepRecord, parse_record, read_history
from vlmtune.utils import flatten

STAGE = StageRecord(
    stage=1,
    name="ground",
    epoch=2,
    step=10,
    train={"heads": 1.0, "vision_blocks": 0.1},
    losses=["box", "contrastive"],
    trainable=1234,
    total=99999,
    cache={"cache_dir": "/tmp/c", "cache_vision": True, "cache_text": False},
)
STEP = StepRecord(
    epoch=2,
    step=12,
    stage=1,
    loss=1.5,
    terms={"contrastive": 1.0, "box": 0.5},
    diag={"box_l1": 0.25, "temperature": 0.07},
    lr={"heads": 1e-3, "vision_blocks": 1e-4},
    bad_steps=3,
)
EPOCH = EpochRecord(
    epoch=2,
    step=15,
    stage=1,
    samples=480,
    train_wall_s=12.345,
    wall_s=20.5,
    peak_mem_mb=812.3,
    val={"retrieval/mean_recall": 41.5, "retrieval/n_images": 20, "answer/sample": "3 items"},
)
RECORDS = [STAGE, STEP, EPOCH]


# The dicts train.py built by hand before the schema (copied from it), as references
# for the records' key order and values.
def _stage_line_before(r: StageRecord) -> dict:
    return {
        "type": "stage",
        "stage": r.stage,
        "name": r.name,
        "epoch": r.epoch,
        "step": r.step,
        "train": r.train,
        "losses": r.losses,
        "trainable": r.trainable,
        "total": r.total,
        "cache": r.cache,
    }


def _step_line_before(
    epoch: int, step: int, stage: int, running: dict, n_running: int, groups: list[dict], bad_steps: int
) -> dict:
    rec = {"type": "step", "epoch": epoch, "step": step, "stage": stage}
    rec.update({k if k.startswith("diag/") or k == "loss" else f"loss/{k}": v / n_running for k, v in running.items()})
    rec.update({f"lr/{g['name']}": g["lr"] for g in groups})
    if bad_steps:
        rec["bad_steps"] = bad_steps
    return rec


def _epoch_line_before(r: EpochRecord, val: dict) -> dict:
    rec = {
        "type": "epoch",
        "epoch": r.epoch,
        "step": r.step,
        "stage": r.stage,
        "samples": r.samples,
        "train_wall_s": r.train_wall_s,
        "wall_s": r.wall_s,
        "peak_mem_mb": r.peak_mem_mb,
    }
    rec.update({f"val/{k}": v for k, v in val.items() if not isinstance(v, list)})
    return rec


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.TYPE)
def test_each_record_round_trips_through_its_line(record) -> None:
    line = json.dumps(record.to_json())
    back = parse_record(json.loads(line), "here")
    assert back == record and type(back) is type(record)
    assert json.dumps(back.to_json()) == line


def test_lines_are_the_ones_the_loop_wrote_before_the_schema() -> None:
    assert json.dumps(STAGE.to_json()) == json.dumps(_stage_line_before(STAGE))
    val = {
        "retrieval/mean_recall": 41.5,
        "retrieval/n_images": 20,
        "answer/sample": "3 items",
        "answer/examples": [{"reference": "a", "generated": "b"}],
    }
    scalars = {k: v for k, v in val.items() if not isinstance(v, list)}
    assert json.dumps(EPOCH.to_json()) == json.dumps(_epoch_line_before(EPOCH, val))
    assert EPOCH.val == scalars
    groups = [{"name": "heads", "lr": 1e-3}, {"name": "vision_blocks", "lr": 1e-4}]
    lr = {g["name"]: g["lr"] for g in groups}
    # The loop's running sums: "loss", the terms by name, diagnostics as "diag/<name>".
    running = {"loss": 6.0, "contrastive": 4.0, "box": 2.0, "diag/box_l1": 1.0, "diag/temperature": 0.28}
    for bad_steps in (0, 3):
        means = {k: v / 4 for k, v in running.items()}
        got = StepRecord.from_means(2, 12, 1, means, lr, bad_steps).to_json()
        assert json.dumps(got) == json.dumps(_step_line_before(2, 12, 1, running, 4, groups, bad_steps))
    # A window whose every step was skipped (non-finite loss) has no loss keys at all.
    empty = StepRecord.from_means(2, 12, 1, {}, lr, 5)
    assert empty.loss is None
    assert json.dumps(empty.to_json()) == json.dumps(_step_line_before(2, 12, 1, {}, 0, groups, 5))
    assert parse_record(empty.to_json(), "here") == empty


def _schema_keys(record) -> set[str]:
    """The keys the schema declares for this record's type, families by their members here."""
    keys = {"type"}
    for f in fields(record):
        prefix = f.metadata.get("prefix")
        keys |= {prefix + k for k in getattr(record, f.name)} if prefix else {f.name}
    return keys


def test_the_writer_writes_the_schemas_keys_and_truncates_on_resume(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    seen = []
    history = History(path, None, sink=seen.append)
    for r in RECORDS:
        history.write(r)
    lines = path.read_text().splitlines()
    assert history.lines == lines and len(lines) == 3
    assert [set(json.loads(x)) for x in lines] == [_schema_keys(r) for r in RECORDS]
    assert seen == [r.to_json() for r in RECORDS]  # the tracker gets each record's object
    assert read_history(path) == RECORDS
    # Optional keys are left out when unset, and are then not expected back.
    bare = StepRecord(epoch=0, step=1, stage=0)
    assert set(bare.to_json()) == {"type", "epoch", "step", "stage"}

    # Resuming from a checkpoint that had seen 2 lines: the third goes, the next follows.
    resumed = History(path, 2)
    assert resumed.lines == lines[:2] and path.read_text().splitlines() == lines[:2]
    resumed.write(EPOCH)
    assert path.read_text().splitlines() == lines
    # A fresh start (keep_lines None) empties the file; a process other than the main one writes nothing.
    History(path, None)
    assert path.read_text() == ""
    other = History(tmp_path / "other.jsonl", None, enabled=False)
    other.write(STAGE)
    assert not (tmp_path / "other.jsonl").exists() and other.lines == []


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.TYPE)
def test_every_missing_key_is_an_error_naming_it(record) -> None:
    line = record.to_json()
    required = [f.name for f in fields(record) if "prefix" not in f.metadata and not str(f.type).endswith("| None")]
    assert required
    for key in required:
        broken = {k: v for k, v in line.items() if k != key}
        with pytest.raises(DataError, match=rf"^run/history.jsonl: line 4: {record.TYPE} line: missing key '{key}'$"):
            parse_record(broken, "run/history.jsonl: line 4")


@pytest.mark.parametrize(
    "line, message",
    [
        ({"epoch": 0}, r"no 'type'"),
        ({"type": "epochs"}, r'type "epochs"; a history line\'s type is one of: stage, step, epoch'),
        ({**STEP.to_json(), "los": 1.0}, r"step line: key 'los' is not in the schema"),
        ({**STEP.to_json(), "step": 1.5}, r"step line: 'step' must be an integer, got 1.5"),
        ({**STEP.to_json(), "step": True}, r"step line: 'step' must be an integer, got true"),
        ({**STEP.to_json(), "loss/box": "0.5"}, r"step line: 'loss/box' must be a number"),
        ({**STEP.to_json(), "bad_steps": "3"}, r"step line: 'bad_steps' must be an integer"),
        ({**STEP.to_json(), "bad_steps": None}, r"step line: 'bad_steps' must be an integer, got null"),
        ({**STAGE.to_json(), "losses": "box"}, r"stage line: 'losses' must be a list of strings"),
        ({**STAGE.to_json(), "train": {"heads": "x"}}, r"stage line: 'train' must be an object of numbers"),
        ({**EPOCH.to_json(), "val/confusion": [[1, 0], [0, 1]]}, r"epoch line: 'val/confusion' must be a number, string"),
    ],
)
def test_ill_typed_or_unknown_keys_are_errors(line: dict, message: str) -> None:
    with pytest.raises(DataError, match=message) as e:
        parse_record(line, "h.jsonl: line 9")
    assert str(e.value).startswith("h.jsonl: line 9: ")


def test_read_history_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    good = json.dumps(STAGE.to_json())
    path.write_text(f"{good}\n\n{good}\n[1]\n")
    with pytest.raises(DataError, match=rf"^{path}: line 4: not a JSON object$"):
        read_history(path)
    path.write_text(f"{good}\n{{\n")
    with pytest.raises(DataError, match=rf"^{path}: line 2: not valid JSON"):
        read_history(path)
    no_step = {k: v for k, v in STEP.to_json().items() if k != "stage"}
    path.write_text(f"{good}\n{json.dumps(no_step)}\n")
    with pytest.raises(DataError, match=rf"^{path}: line 2: step line: missing key 'stage'$"):
        read_history(path)


def test_flatten_and_first_line() -> None:
    cfg = {
        "seed": 0,
        "optim": {"lr": 1e-3, "betas": [0.9, 0.999]},
        "stages": [{"name": "a", "train": {"heads": 1.0}}],
        "empty": {},
    }
    assert flatten(cfg) == {
        "seed": 0,
        "optim.lr": 1e-3,
        "optim.betas": [0.9, 0.999],
        "stages.0.name": "a",
        "stages.0.train.heads": 1.0,
    }
    assert first_line(ValueError("  first\nsecond")) == "first"
    assert first_line(KeyboardInterrupt()) == "KeyboardInterrupt"
