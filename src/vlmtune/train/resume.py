"""Resume: which checkpoint ``--resume`` continues from, what it restores (weights and
loop state at once, optimizer, schedule and RNG when their stage starts), the repair of
a ``best`` a kill left behind, and the per-process random streams a checkpoint keeps.

A resumed run replays the uninterrupted one bit for bit: the data order is a function of
(seed, epoch) (the seedable sampler), and every process's random stream is saved and
restored as it was.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed
from torch import nn

from vlmtune.backbone import Backbone
from vlmtune.checkpoint import (
    Checkpoint,
    backbone_identity,
    check_identity,
    copy_checkpoint,
    load_weights,
    open_checkpoint,
    rng_state,
)
from vlmtune.config import Config, config_to_dict
from vlmtune.data.integrity import check_data_unchanged
from vlmtune.distributed import all_gather_objects, rank_world
from vlmtune.errors import CheckpointError, ConfigError
from vlmtune.fsdp import load_optimizer_state
from vlmtune.state import TrainState
from vlmtune.utils import derived_seed

log = logging.getLogger("vlmtune")


def open_resume(cfg: Config, ckpt_dir: Path, resume: bool, main: bool) -> Checkpoint | None:
    """The checkpoint to continue from (its config must equal ``cfg``), or None for a
    fresh run, which a folder already holding a run refuses."""
    source = resume_source(ckpt_dir) if resume else None
    if source is None:
        if resume and main:
            log.info("--resume: no checkpoint yet in %s; starting from the beginning", ckpt_dir)
        if not resume and (ckpt_dir / "last").exists():
            raise ConfigError(
                f"{ckpt_dir.parent}: already holds a run; pass --resume to continue it or choose another --output-dir"
            )
        return None
    ckpt = open_checkpoint(source)
    saved, now = config_to_dict(ckpt.cfg), config_to_dict(cfg)
    if saved != now:
        key = _first_difference(saved, now)
        raise ConfigError(f"{key}: differs from the config of the run being resumed ({ckpt.folder})")
    return ckpt


def resume_source(ckpt_dir: Path) -> Path | None:
    """The checkpoint --resume continues from: ``last``, or ``last.old`` when a kill fell
    between the two renames of a save (the complete previous checkpoint); None before
    the first checkpoint, when the run starts over."""
    for name in ("last", "last.old"):
        if (ckpt_dir / name / "state.json").is_file():
            return ckpt_dir / name
    return None


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{prefix}[{i}]")
    return prefix or "config"


def restore_run(
    ckpt: Checkpoint,
    fresh: TrainState,
    model: nn.Module,
    backbone: Backbone,
    paths: dict[str, str],
    out: Path,
    main: bool,
    accept_changed_data: bool = False,
) -> tuple[TrainState, dict[str, Any]]:
    """Weights into ``model`` and the loop state from the checkpoint, returned with the
    trainer state (optimizer, schedule, RNG), which waits for its stage (:func:`restore_stage`).
    The data files must be those the run started with (their sha256), unless
    ``accept_changed_data``. ``fresh``: the state this run built (backbone identity, data
    paths and digests), which the restored state keeps; everything else continues."""
    check_data_unchanged(ckpt.state.data_sha256, fresh.data_sha256, paths, accept=accept_changed_data, run=str(out))
    check_identity(ckpt, backbone_identity(backbone))
    load_weights(model, ckpt.weights(), ckpt.folder)
    state = dataclasses.replace(ckpt.state, backbone=fresh.backbone, data_paths=fresh.data_paths, data_sha256=fresh.data_sha256)
    trainer_state = ckpt.trainer_state()
    check_process_count(trainer_state, ckpt)
    if main:
        log.info(
            "resuming from %s at epoch %d%s",
            ckpt.folder,
            state.epoch + 1,
            f", after its batch {state.epoch_batches}" if state.epoch_batches else "",
        )
        repair_best(ckpt, out / "checkpoints" / "best")
    return state, trainer_state


def restore_stage(
    saved: dict[str, Any], stage_index: int, optimizer: Any, scheduler: Any, seed: int, step: int, where: str, main: bool
) -> dict[str, Any]:
    """The first stage started after a resume takes the saved trainer state; returns
    this process's RNG state, for the loop to set (at once, or once a resumed epoch's
    iterator exists)."""
    # Optimizer and schedule belong to the stage they were saved in; a resume at a
    # stage boundary starts the new stage's fresh ones, as the straight run did.
    if saved["stage"] == stage_index:
        if saved["optimizer"] is None:  # written under DeepSpeed (see launch.trainer_tensors)
            raise CheckpointError(
                "--resume: this checkpoint was written under DeepSpeed, whose ZeRO-partitioned optimizer "
                "state vlmtune does not save; a DeepSpeed run cannot resume inside a stage"
            )
        load_optimizer_state(optimizer, saved["optimizer"])  # whole tensors, cut to the shards under FSDP
        scheduler.load_state_dict(saved["scheduler"])
    return own_rng_state(saved, seed, step, where, main)


def repair_best(last: Checkpoint, best: Path) -> None:
    """``best`` is copied from ``last`` after it is saved; a kill in between leaves
    ``best`` one improvement behind, which ``last``'s state reveals: copy it again."""
    st = last.state
    if st.epoch_batches or st.best_epoch is None or st.best_epoch != st.epoch - 1:
        return
    try:
        best_epoch = open_checkpoint(best).state.epoch if best.exists() else None
    except CheckpointError:
        best_epoch = None
    if best_epoch != st.epoch:
        log.info("copying %s to %s: the run stopped before it was copied", last.folder, best)
        copy_checkpoint(last.folder, best)


# --------------------------------------------------------------------------- random streams


def seed_process_stream(seed: int) -> None:
    """With several processes, each continues on a random stream of its own, seeded by
    (run seed, rank): dropout masks and sampled negatives differ between processes, as
    they would between the rows of one large batch. Called once the model is built, so
    its initialisation stays on the common seed; the data order has its own seed (the
    seedable sampler's ``data_seed``). One process keeps the plain stream of ``seed``."""
    rank, world = rank_world()
    if world > 1:
        set_seed(derived_seed(seed, rank))


def gather_rng_states() -> list[dict[str, Any]]:
    """Every process's RNG state, in rank order; a collective, so every process calls it
    (before the main process saves a checkpoint)."""
    return all_gather_objects(rng_state())


def rng_record(rngs: list[dict[str, Any]]) -> dict[str, Any]:
    """The RNG part of a checkpoint's trainer state: ``rng`` (the main process's, the only
    one a single-process checkpoint has), ``processes`` (how many processes saved it) and,
    with several, ``rng_processes`` (each one's, in rank order)."""
    out: dict[str, Any] = {"rng": rngs[0], "processes": len(rngs)}
    if len(rngs) > 1:
        out["rng_processes"] = list(rngs)
    return out


def check_process_count(saved: dict[str, Any], ckpt: Checkpoint) -> None:
    """A checkpoint saved inside an epoch resumes only with the number of processes that
    saved it: the batches already trained are counted per process, so another count
    would skip the wrong ones."""
    n, world = saved.get("processes"), rank_world()[1]
    if n is not None and n != world and ckpt.state.epoch_batches:
        raise CheckpointError(
            f"{ckpt.folder}: saved inside epoch {ckpt.state.epoch + 1} (after {ckpt.state.epoch_batches} batches per "
            f"process) by {n} process{'es' * (n != 1)}; resume it with {n} process{'es' * (n != 1)}, not {world}: "
            f"the batches already trained are counted per process"
        )


def own_rng_state(saved: dict[str, Any], seed: int, step: int, where: str, main: bool) -> dict[str, Any]:
    """This process's RNG state from a checkpoint's trainer state: its own when the same
    number of processes saved it (exact resume). Saved by another number of processes,
    or a checkpoint of one stream resumed by several (from before per-process streams),
    each process's stream starts afresh from (seed, rank, step), with a warning: the run
    goes on, but not as the uninterrupted run would have."""
    rank, world = rank_world()
    states = saved.get("rng_processes") or [saved["rng"]]
    n = saved.get("processes", len(states))
    if len(states) == world:
        return states[rank]
    if main:
        what = (
            f"saved by {n} process{'es' * (n != 1)}"
            if "processes" in saved
            else "holds one random stream (saved before per-process streams)"
        )
        log.warning(
            "%s %s, resumed by %d: each process's random stream (dropout, sampled negatives) starts afresh "
            "from the seed, rank and step; the run goes on, but does not replay the uninterrupted run exactly",
            where,
            what,
            world,
        )
    set_seed(derived_seed(seed, rank, step))
    return rng_state()
