"""Training: the loop (``loop``) and the parts it calls, one concern a module.

- ``loop``: ``train()``, the one training loop (prepare, start_stage, train_epoch,
  end_epoch, final_evaluation) and its holders.
- ``launch``: the Accelerator and the launcher's settings, the run folder's lock,
  trackers, FSDP preparation (DeepSpeed refused), the whole tensors a checkpoint saves, threads and memory.
- ``resume``: the checkpoint ``--resume`` continues from, what it restores, and the
  per-process random streams.
- ``warmstart``: ``train.init_from``.
- ``caches``: which cached features a stage reads; filling the caches up front.
- ``checks``, ``stopping``, ``summary``: start-up checks, stop signals and non-finite
  losses, the final metrics about the run.

The names below are the package's public face (``from vlmtune.train import train``).
"""

from __future__ import annotations

from vlmtune.train.caches import cache_record, fill_caches, prefix_cache_starts, stage_cache
from vlmtune.train.checks import check_loss_targets, check_splits
from vlmtune.train.launch import (
    TRACKERS,
    make_accelerator,
    peak_memory_mb,
    prepare_stage,
    refuse_deepspeed,
    resolve_mixed_precision,
    shard_once,
    torch_threads,
)
from vlmtune.train.loop import Run, StageRun, end_epoch, final_evaluation, prepare_run, start_stage, train, train_epoch
from vlmtune.train.resume import check_process_count, gather_rng_states, own_rng_state, rng_record, seed_process_stream
from vlmtune.train.stopping import StopRequest
from vlmtune.train.summary import best_stage_metrics
from vlmtune.train.warmstart import InitSource, load_init_weights, open_init_source

__all__ = [
    "TRACKERS",
    "InitSource",
    "Run",
    "StageRun",
    "StopRequest",
    "best_stage_metrics",
    "cache_record",
    "refuse_deepspeed",
    "check_loss_targets",
    "check_process_count",
    "check_splits",
    "end_epoch",
    "fill_caches",
    "final_evaluation",
    "gather_rng_states",
    "load_init_weights",
    "make_accelerator",
    "open_init_source",
    "own_rng_state",
    "peak_memory_mb",
    "prefix_cache_starts",
    "prepare_run",
    "prepare_stage",
    "resolve_mixed_precision",
    "rng_record",
    "seed_process_stream",
    "shard_once",
    "stage_cache",
    "start_stage",
    "torch_threads",
    "train",
    "train_epoch",
]
