"""Warm start (``train.init_from``): a fresh run whose model starts from another run's
checkpoint, checked to fit before anything trains, and recorded in init_from.json."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlmtune.backbone import Backbone
from vlmtune.checkpoint import Checkpoint, backbone_identity, check_identity, first_misfit, open_checkpoint
from vlmtune.config import Config
from vlmtune.errors import CheckpointError
from vlmtune.runfolder import INIT_RECORD, write_text

log = logging.getLogger("vlmtune")


@dataclass
class InitSource:
    """The checkpoint a warm start (``train.init_from``) loads, checked against the model."""

    ckpt: Checkpoint
    weights: dict[str, torch.Tensor]
    sha256: str
    backbone_names: set[str]  # backbone tensors the source trained (kept in this run's checkpoints)


def open_init_source(cfg: Config, backbone: Backbone, model: nn.Module, out: Path, resuming: bool, main: bool) -> InitSource:
    """Open ``train.init_from`` and check it fits: same task, same backbone (identity),
    every tensor it holds present in this model with the same shape. On ``--resume``
    the source must also be the very file the run started from (init_from.json)."""
    source = Path(cfg.train.init_from)  # type: ignore[arg-type]
    try:
        ckpt = open_checkpoint(source)
    except CheckpointError as e:
        raise CheckpointError(f"train.init_from: {e}") from None
    if ckpt.cfg.task != cfg.task:
        raise CheckpointError(f"train.init_from: {source} is a '{ckpt.cfg.task}' checkpoint; this run's task is '{cfg.task}'")
    try:
        check_identity(ckpt, backbone_identity(backbone))
    except CheckpointError as e:
        raise CheckpointError(f"train.init_from: {e}") from None
    weights = ckpt.weights()
    own = model.state_dict()
    misfit = first_misfit(own, weights)
    if misfit is not None:
        kind, k = misfit
        what = (
            "has no place in this model"
            if kind == "unexpected"
            else f"has shape {tuple(weights[k].shape)}, this model's has {tuple(own[k].shape)}"
        )
        raise CheckpointError(
            f"train.init_from: {source}: tensor '{k}' {what} (another model config: check model.* and counting.*)"
        )
    sha = ckpt.digests.get("weights.safetensors", "")
    record = out / INIT_RECORD
    if resuming and record.is_file():
        before = json.loads(record.read_text()).get("weights_sha256")
        if before != sha:
            raise CheckpointError(
                f"train.init_from: {source}: its weights changed since this run started from them "
                f"(sha256 {str(before)[:12]}... then, {sha[:12]}... now)"
            )
    return InitSource(ckpt, weights, sha, {k for k in weights if k.startswith("backbone.")})


def load_init_weights(model: nn.Module, init: InitSource, saved_names: set[str], out: Path, main: bool) -> None:
    """Copy the source's weights into the fresh model; tensors the source lacks (a part
    only this run trains, e.g. a vision block the first run kept frozen; ``saved_names``
    are those this run's checkpoints hold) keep their initial values and are listed in
    the log and init_from.json."""
    model.load_state_dict(init.weights, strict=False)
    left = sorted(k for k in saved_names if k not in init.weights)
    if main:
        log.info(
            "train.init_from: %d tensors from %s (weights sha256 %s...)", len(init.weights), init.ckpt.folder, init.sha256[:12]
        )
        if left:
            shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
            log.info(
                "train.init_from: %d tensors this run trains are not in the source and keep their initial values: %s",
                len(left),
                shown,
            )
        write_text(
            out / INIT_RECORD,
            json.dumps(
                {
                    "checkpoint": str(init.ckpt.folder),
                    "weights_sha256": init.sha256,
                    "source_epoch": init.ckpt.state.epoch,
                    "loaded": len(init.weights),
                    "left_at_init": left,
                },
                indent=2,
            ),
        )


def init_metrics(cfg: Config, out: Path) -> dict[str, object]:
    """The final metrics' init/* keys: where a warm-started run's weights came from."""
    if not cfg.train.init_from:
        return {}
    record = json.loads((out / INIT_RECORD).read_text()) if (out / INIT_RECORD).is_file() else {}
    return {
        "init/from": cfg.train.init_from,
        "init/weights_sha256": record.get("weights_sha256", ""),
        "init/loaded": record.get("loaded", 0),
        "init/left_at_init": len(record.get("left_at_init", [])),
    }
