"""Many processes: FSDP2 (sharded by transformer block, on 2 gloo processes), the
preparation order for DeepSpeed / FSDP / DDP, and the launcher's mixed precision."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

from conftest import CONFIGS, ROOT
from test_distributed import _steps, _torchrun
from vlmtune.cli import main
from vlmtune.config import load_config
from vlmtune.errors import ConfigError
from vlmtune.fsdp import FsdpSettings, fsdp_settings
from vlmtune.train import make_accelerator, prepare_stage, refuse_deepspeed, resolve_mixed_precision

TWO_STAGE = str(CONFIGS / "retrieval_two_stage.yaml")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


@pytest.mark.slow  # a torchrun launch (about 6 s): the second CI step runs it
def test_fsdp_pieces_on_two_gloo_processes() -> None:
    """vlmtune.fsdp on a small model in 2 gloo processes (tests/fsdp_worker.py): blocks
    sharded, a 0-d parameter kept whole, steps where one process leaves a head unused
    equal one process over both batches, uneven forwards under full_params, whole
    weights and optimizer state gathered and cut back into shards."""
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(ROOT / "tests" / "fsdp_worker.py"),
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


@pytest.mark.slow
def test_fsdp_run_matches_ddp_evaluates_on_one_process_and_resumes(tmp_path: Path, scenes: Path) -> None:
    """The two-stage recipe (stage 2 unfreezes a vision block of the sharded tower) on 2
    gloo processes, FSDP against DDP: per-step losses within 1e-5; the FSDP run's
    checkpoint evaluated by one process gives its metrics; a resume from its epoch-2
    checkpoint (inside stage 2: its optimizer state re-sharded) gives the same steps."""
    common = [
        TWO_STAGE,
        f"data.synthetic_dir={scenes}",
        "data.synthetic.n=40",
        "train.epochs=3",
        "stages.1.start_epoch=1",
        "train.progress=false",
        "eval.batch_size=16",
        "model.adapter_dropout=0",
        "loss.matching=0",
        "train.log_every=1",
        "loss.relation=0.1",
        "train.batch_size=8",
        "train.keep_last=2",
    ]
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    res = _torchrun(["train", *common, "--output-dir", str(ddp)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    res = _torchrun(["train", *common, "train.fsdp.enabled=true", "--output-dir", str(fsdp)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "FSDP2 (train.fsdp): 4 units of InternVLVisionLayer, Qwen2DecoderLayer" in res.stderr

    a, b = _steps(ddp), _steps(fsdp)
    assert [x["step"] for x in a] == [x["step"] for x in b] == list(range(1, 16))
    for x, y in zip(a, b):
        for k in [k for k in x if k == "loss" or k.startswith("loss/")]:
            assert y[k] == pytest.approx(x[k], abs=1e-5), (x["step"], k)
    assert "loss/box" in b[-1]

    # One process evaluates the FSDP checkpoint to the metrics the 2 processes reported.
    m2 = json.loads((fsdp / "metrics.json").read_text())
    assert main(["evaluate", str(fsdp / "checkpoints/best"), "--output-dir", str(tmp_path / "ev")]) == 0
    m1 = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    keys = [k for k in m1 if k.startswith(("retrieval/", "grounding/", "spatial/")) and isinstance(m1[k], (int, float))]
    assert "grounding/miou" in keys
    for k in keys:
        assert m2[k] == pytest.approx(m1[k], abs=1e-4), k

    # Resume under FSDP from the checkpoint after epoch 2 (stage 2 under way).
    again = tmp_path / "again"
    shutil.copytree(fsdp, again)
    for name in ("last", "best"):
        shutil.rmtree(again / "checkpoints" / name)
    (again / "metrics.json").unlink()
    (again / "checkpoints" / "last-1").rename(again / "checkpoints" / "last")
    assert json.loads((again / "checkpoints/last/state.json").read_text())["epoch"] == 2
    res = _torchrun(["train", *common, "train.fsdp.enabled=true", "--resume", "--output-dir", str(again)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    c = _steps(again)
    assert [x["step"] for x in c] == list(range(1, 16))
    for x, y in zip(b[10:], c[10:]):
        for k in [k for k in x if k == "loss" or k.startswith("loss/")]:
            assert y[k] == pytest.approx(x[k], abs=1e-6), (x["step"], k)


# --------------------------------------------------------------------------- preparation order


class RecordingAccelerator:
    """Stands in for Accelerator: records each prepare call's argument types."""

    def __init__(self, distributed_type: DistributedType, num_processes: int = 2) -> None:
        self.distributed_type, self.num_processes, self.calls = distributed_type, num_processes, []

    def prepare(self, *objs):
        self.calls.append([type(o).__name__ for o in objs])
        return objs[0] if len(objs) == 1 else objs


def _parts(n_batches: int = 5, drop_last: bool = False):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    loader = torch.utils.data.DataLoader(list(range(n_batches * 4)), batch_size=4, drop_last=drop_last)
    seen = []

    def make_scheduler(batches: int):
        seen.append(batches)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    return model, opt, loader, make_scheduler, seen


def test_ddp_prepares_the_loader_first_and_fsdp_does_not_wrap_the_sharded_model(monkeypatch) -> None:
    model, opt, loader, make_scheduler, seen = _parts(5)
    acc = RecordingAccelerator(DistributedType.MULTI_CPU)
    prepare_stage(acc, model, opt, loader, make_scheduler)
    assert acc.calls == [["DataLoader"], ["Linear", "AdamW", "LambdaLR"]] and seen == [5]

    import vlmtune.train.launch as train_mod

    monkeypatch.setattr(train_mod, "is_sharded", lambda m: True)
    acc = RecordingAccelerator(DistributedType.MULTI_CPU)
    pmodel, *_ = prepare_stage(acc, model, opt, loader, make_scheduler)
    assert acc.calls == [["DataLoader"], ["AdamW", "LambdaLR"]] and pmodel is model


def test_deepspeed_is_refused_until_a_run_backs_it() -> None:
    with pytest.raises(ConfigError, match="DeepSpeed is not supported"):
        refuse_deepspeed()
    assert not list((CONFIGS / "accelerate").glob("deepspeed*"))


# --------------------------------------------------------------------------- launcher settings


@pytest.fixture()
def fresh_accelerate():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_mixed_precision_auto_defers_to_the_launcher(monkeypatch, fresh_accelerate, caplog) -> None:
    cfg = load_config(TWO_STAGE)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what accelerate launch --mixed_precision bf16 exports
    assert resolve_mixed_precision("auto") is None
    assert make_accelerator(cfg).mixed_precision == "bf16"
    AcceleratorState._reset_state(True)
    # An explicit value in the vlmtune config wins, and says so.
    with caplog.at_level("INFO", logger="vlmtune"):
        assert make_accelerator(load_config(TWO_STAGE, ['train.mixed_precision="no"'])).mixed_precision == "no"
    assert "train.mixed_precision=no overrides the launcher's mixed_precision bf16" in caplog.text
    AcceleratorState._reset_state(True)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    expected = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    assert resolve_mixed_precision("auto") == expected
    assert make_accelerator(cfg).mixed_precision == expected


def test_fsdp_settings_from_an_accelerate_config(monkeypatch, fresh_accelerate) -> None:
    """accelerate launch with configs/accelerate/fsdp.yaml exports these variables."""
    cfg = load_config(TWO_STAGE)
    assert fsdp_settings(cfg) is None
    for k, v in {
        "ACCELERATE_USE_FSDP": "true",
        "FSDP_VERSION": "2",
        "FSDP_RESHARD_AFTER_FORWARD": "false",
        "FSDP_OFFLOAD_PARAMS": "true",
        "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        "FSDP_TRANSFORMER_CLS_TO_WRAP": "Qwen2DecoderLayer",
    }.items():
        monkeypatch.setenv(k, v)
    s = fsdp_settings(cfg)
    assert s == FsdpSettings(
        reshard_after_forward=False, cpu_offload=True, wrap=("Qwen2DecoderLayer",), source="accelerate config (fsdp_config)"
    )
    # train.fsdp wins when enabled.
    own = fsdp_settings(load_config(TWO_STAGE, ["train.fsdp.enabled=true"]))
    assert own == FsdpSettings()
    # vlmtune shards itself: Accelerate is not told to (its prepare would want every optimizer with the model).
    acc = make_accelerator(cfg)
    assert acc.distributed_type != DistributedType.FSDP and os.environ["ACCELERATE_USE_FSDP"] == "true"
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="fsdp_version 1: vlmtune shards with FSDP2"):
        fsdp_settings(cfg)


def test_fsdp_wrap_names_a_class_the_model_lacks() -> None:
    from vlmtune.fsdp import shard_model

    with pytest.raises(ConfigError, match=r"^train.fsdp.wrap: no module of class NoSuchLayer"):
        shard_model(torch.nn.Linear(2, 2), FsdpSettings(wrap=("NoSuchLayer",)))


def test_shipped_accelerate_configs_parse() -> None:
    folder = CONFIGS / "accelerate"
    files = {p.name: yaml.safe_load(p.read_text()) for p in folder.glob("*.yaml")}
    assert set(files) >= {"ddp.yaml", "fsdp.yaml"}
    fsdp = files["fsdp.yaml"]
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_version"] == 2
    assert fsdp["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert files["ddp.yaml"]["distributed_type"] == "MULTI_GPU"


@pytest.mark.slow  # two torchrun launches of a short training run: about 45 s on 2 CPU cores
def test_bench_fsdp_section_reports_memory_per_process(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    assert main(["bench", "--out", str(out), "--sections", "fsdp", "--images", "24", "--batch-size", "8"]) == 0
    f = json.loads((out / "bench.json").read_text())["fsdp"]
    assert f["processes"] == 2 and f["device"] in ("cuda", "cpu (gloo)")
    for mode in ("ddp", "fsdp"):
        assert len(f[mode]["peak_mb"]) == 2 and all(v > 0 for v in f[mode]["peak_mb"] + f[mode]["end_mb"]), f[mode]
    assert f["ratio_fsdp_to_ddp_peak"] > 0
    assert "Memory per process: FSDP vs DDP" in (out / "bench.md").read_text()
