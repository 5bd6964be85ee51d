"""The training loop: for stage, for epoch, for step, on Hugging Face Accelerate.

One loop serves every task; tasks differ in their model, data and metrics (see
``vlmtune.tasks``), stages differ in config. At each stage transition the frozen set
and the optimizer's parameter groups are rebuilt. Every epoch ends with a validation
pass, a history line, the ``last`` checkpoint (and ``best`` when the metric improved).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import resource
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, DistributedType, set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from vlmtune.backbone import Backbone, load_backbone
from vlmtune.checkpoint import (
    Checkpoint,
    backbone_identity,
    check_identity,
    first_misfit,
    copy_checkpoint,
    load_weights,
    open_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from vlmtune.config import Config, config_to_dict, save_config
from vlmtune.data.integrity import check_data_unchanged, data_digests, warn_overlaps
from vlmtune.distributed import all_gather_objects, all_reduce_sum, rank_world
from vlmtune.errors import CheckpointError, ConfigError, Diverged, Interrupted
from vlmtune.fsdp import (
    FsdpSettings,
    fsdp_settings,
    full_optimizer_state,
    full_params,
    full_tensors,
    is_sharded,
    launcher_wants_fsdp,
    load_optimizer_state,
    loading,
    shard_model,
    shard_weights,
)
from vlmtune.history import EpochRecord, History, StageRecord, StepRecord, parse_record
from vlmtune.runfolder import INIT_RECORD, LOCK_NAME, RunLock, make_folder, output_folder, prepare_run_folder, write_text
from vlmtune.stages import Stage, apply_stage, build_plan, count_parameters, stage_summary, trained_anywhere
from vlmtune.state import TrainState
from vlmtune.tasks import FeatureCache, Task, build_task
from vlmtune.utils import derived_seed, flatten

log = logging.getLogger("vlmtune")


TRACKERS = ("wandb", "tensorboard")


def resolve_mixed_precision(value: str) -> str | None:
    """What ``train.mixed_precision`` passes to Accelerator. ``auto`` defers to the
    launcher when it set one (``accelerate launch --mixed_precision`` or a config file's
    ``mixed_precision``, exported to every process as ACCELERATE_MIXED_PRECISION): None,
    so Accelerate reads it; without a launcher's setting, bf16 on a GPU that has it and
    no (float32) otherwise. An explicit value wins over the launcher's (logged)."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if value == "auto":
        if launcher:
            return None
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if launcher and launcher != value:
        log.info("train.mixed_precision=%s overrides the launcher's mixed_precision %s", value, launcher)
    return value


@contextlib.contextmanager
def _accelerate_fsdp_off(fsdp: FsdpSettings | None) -> Iterator[None]:
    """Accelerator built without Accelerate's own FSDP (vlmtune shards the model itself,
    see vlmtune.fsdp): an Accelerate launcher's ACCELERATE_USE_FSDP hidden meanwhile."""
    hide = fsdp is not None and launcher_wants_fsdp()
    if hide:
        os.environ["ACCELERATE_USE_FSDP"] = "false"
    try:
        yield
    finally:
        if hide:
            os.environ["ACCELERATE_USE_FSDP"] = "true"


def make_accelerator(cfg: Config, tracker: str | None = None, project_dir: Path | None = None) -> Accelerator:
    mp = resolve_mixed_precision(cfg.train.mixed_precision)
    fsdp = fsdp_settings(cfg)
    # The seedable sampler makes the data order a function of (seed, epoch), so a
    # resumed run sees exactly the batches the uninterrupted run would have seen.
    # find_unused_parameters: a stage may train parameters its active losses do not
    # reach (stage 1 trains the grounding heads before the box loss joins), which DDP
    # otherwise rejects. Its cost, one walk over the autograd graph per step, is small
    # here: the graph covers the trainable parts only, the frozen backbone adds nothing.
    # Launched as several processes (torchrun) on a machine without a GPU: Accelerate
    # runs them on the gloo backend only when told that the device is the CPU.
    cpu_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    with _accelerate_fsdp_off(fsdp):
        accelerator = _make_accelerator(cfg, tracker, project_dir, mp, cpu_processes)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        check_deepspeed_plan(cfg, fsdp)
    return accelerator


def _make_accelerator(cfg: Config, tracker: str | None, project_dir: Path | None, mp: str | None,
                      cpu_processes: bool) -> Accelerator:
    return Accelerator(
        cpu=cpu_processes,
        mixed_precision=mp,
        gradient_accumulation_steps=cfg.train.grad_accum,
        # data_seed: the order is the run's, never a process's own random stream (seed_process_stream).
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        log_with=tracker,
        project_dir=str(project_dir) if project_dir else None,
    )


def _start_tracker(accelerator: Accelerator, tracker: str, cfg: Config, out: Path) -> None:
    """Accelerate's own tracker; every history record is mirrored to it."""
    if tracker == "wandb" and "WANDB_MODE" not in os.environ and "WANDB_API_KEY" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"
        log.info("wandb: no WANDB_API_KEY, logging offline into %s/wandb (wandb sync uploads it later)", out)
    flat = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in flatten(config_to_dict(cfg)).items()}
    try:
        accelerator.init_trackers(tracker, config=flat, init_kwargs={"wandb": {"dir": str(out), "name": out.name}})
    except (ImportError, ModuleNotFoundError) as e:
        raise ConfigError(f"--tracker {tracker}: {e}; install it with pip install 'vlmtune[{tracker}]'") from None


def _numeric(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    return {prefix + k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "type")}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _is_better(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best + min_delta if mode == "max" else value < best - min_delta


class StopRequest:
    """SIGINT/SIGTERM while training: remember the first signal; the loop finishes the
    current step, saves a checkpoint and raises :class:`Interrupted`. Later signals are
    only noted (torchrun forwards a terminal's Ctrl-C to the workers a second time);
    SIGKILL still stops at once, and ``--resume`` continues from the last checkpoint."""

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.signum:
            self.signum = signum
            log.warning("%s: finishing this step, then saving a checkpoint", signal.Signals(signum).name)

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}

    def __exit__(self, *exc: Any) -> None:
        self.restore()


# --------------------------------------------------------------------------- the run


@dataclass
class Run:
    """Everything a training run holds, built once by :func:`prepare_run`."""

    cfg: Config
    out: Path
    accelerator: Accelerator
    task: Task
    backbone: Backbone
    model: nn.Module
    plan: list[Stage]
    weights: dict[str, float]       # loss term -> weight
    saved_names: set[str]           # state-dict keys a checkpoint holds
    paths: dict[str, str]           # train/val/test annotation files
    train_records: list[Any]
    val_records: list[Any]
    test_records: list[Any]
    state: TrainState
    history: History
    stopper: StopRequest
    tracker: str | None = None
    # From the checkpoint being resumed, until the stage it was saved in has started.
    trainer_state: dict[str, Any] | None = None
    pending_rng: Any = None         # RNG state to set once the resumed epoch's iterator exists
    last_val: dict[str, Any] = field(default_factory=dict)
    t_start: float = 0.0

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"


@dataclass
class StageRun:
    """One stage's prepared parts: the wrapped model, optimizer, schedule and loader."""

    stage: Stage
    pmodel: Any
    optimizer: Any
    scheduler: Any
    loader: Any
    params: list[nn.Parameter]
    cache: FeatureCache | None


@dataclass
class EpochProgress:
    """The history line in progress and the bad-step window of the current epoch."""

    running: dict[str, float]
    n_running: int
    bad_window: bool = False
    stop: bool = False


def train(cfg: Config, output_dir: str | Path, resume: bool = False, tracker: str | None = None,
          overwrite: bool = False, accept_changed_data: bool = False) -> dict[str, Any]:
    """Train ``cfg`` into ``output_dir``; returns the final test metrics.

    ``tracker``: also log to "wandb" or "tensorboard" (through Accelerate) besides
    history.jsonl. SIGINT/SIGTERM save a checkpoint after the current step and raise
    :class:`Interrupted`; ``train.max_bad_steps`` non-finite losses in a row save one
    and raise :class:`Diverged`. A folder that already holds a run needs ``resume``
    or ``overwrite``; one process at a time may write into a folder (a lock held for
    the whole run by the main process). ``accept_changed_data``: a resume goes on
    although a data file changed since the run started (warned); otherwise that is refused.
    """
    out = output_folder(output_dir)
    lock = None
    try:
        if os.environ.get("RANK", "0") == "0":  # the main process of a distributed run holds the lock for all
            lock_file = out / LOCK_NAME
            if lock_file.exists() or lock_file.is_symlink():  # a run was here: is it still running?
                lock = RunLock(out).acquire()
            if out.is_dir():  # a refused folder is left as it is: checked before a lock file is made
                prepare_run_folder(out, resume=resume, overwrite=overwrite, check_only=True)
            make_folder(out)
            lock = lock or RunLock(out).acquire()
            # Again, under the lock: another process may have written meanwhile.
            prepare_run_folder(out, resume=resume, overwrite=overwrite)
        return _train(cfg, out, resume, tracker, accept_changed_data)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: Config, out: Path, resume: bool, tracker: str | None, accept_changed_data: bool) -> dict[str, Any]:
    with StopRequest() as stopper, torch_threads(cfg.train.num_threads):
        run = prepare_run(cfg, out, resume, tracker, stopper, accept_changed_data=accept_changed_data)
        st: StageRun | None = None
        for stage in remaining_stages(run):
            st = None  # the previous stage's wrapper (DDP: its gradient hooks) must be gone first
            st = start_stage(run, stage)
            for epoch in range(max(stage.start_epoch, run.state.epoch), stage.end_epoch):
                train_epoch(run, st, epoch)
                if end_epoch(run, st, epoch):
                    break
            run.state.bad_evals = 0
        stopper.restore()  # from here on a signal stops at once; --resume redoes only the final evaluation
        return final_evaluation(run)


def prepare_run(cfg: Config, out: Path, resume: bool, tracker: str | None, stopper: StopRequest, *,
                accept_changed_data: bool = False) -> Run:
    """Accelerator, backbone, model, data, stage plan and state (restored on resume)."""
    accelerator = make_accelerator(cfg, tracker, out)
    main = accelerator.is_main_process
    resume_from = _open_resume(cfg, out / "checkpoints", resume, main)
    if main:  # only the main process writes into the run directory
        out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    task = build_task(cfg)
    backbone = load_backbone(cfg.backbone, device_type=accelerator.device.type,
                             folder=resume_from.backbone_folder if resume_from else None)
    model = task.build_model(backbone)
    with accelerator.main_process_first():
        paths = task.data_paths(out)
    train_records, val_records = task.read_split(paths["train"], "train"), task.read_split(paths["val"], "val")
    test_records = task.read_split(paths["test"], "test")
    weights = task.loss_weights()
    plan = build_plan(cfg, weights)
    for st in plan:  # fail before any work when a stage asks for more blocks than exist
        for comp in st.train:
            model.component_modules(comp, st.vision_blocks)
    _check_splits(task, paths, {"train": train_records, "val": val_records, "test": test_records}, main)
    check_loss_targets(cfg, task, plan, train_records, paths["train"])
    init = open_init_source(cfg, backbone, model, out, resume_from is not None, main) if cfg.train.init_from else None
    state = TrainState(backbone=backbone_identity(backbone), data_paths=paths, data_sha256=data_digests(paths),
                       metric=cfg.train.early_stopping.metric)
    run = Run(cfg, out, accelerator, task, backbone, model, plan, weights,
              trained_anywhere(model, plan) | set(model.head_state_dict()), paths, train_records, val_records,
              test_records, state,
              history=None, stopper=stopper, tracker=tracker)  # type: ignore[arg-type]
    if init is not None:
        run.saved_names |= init.backbone_names  # a block the source trained stays in this run's checkpoints
        if resume_from is None:
            load_init_weights(run, init)
    if resume_from is not None:
        _restore_run(run, resume_from, accept_changed_data=accept_changed_data)
    if main:
        save_config(cfg, out / "config.yaml")
    sink = None
    if tracker and main:
        _start_tracker(accelerator, tracker, cfg, out)
        # Step lines carry loss/*, lr/*, diag/*; epoch lines val/*, wall time, peak
        # memory, samples; stage lines the stage index and trainable count.
        sink = lambda rec: accelerator.log(_numeric(rec), step=rec["step"])  # noqa: E731
    run.history = History(out / "history.jsonl", run.state.history_lines if resume_from else None, sink, enabled=main)
    # FSDP: sharded before the move (a device only ever holds this process's shards) and
    # before any stage's optimizer exists, so every stage's is over the shards.
    shard_once(run)
    seed_process_stream(cfg.seed)
    model.to(run.device)
    run.t_start = time.time() - run.state.wall_s
    return run


def _check_splits(task: Task, paths: dict[str, str], records: dict[str, list[Any]], main: bool) -> None:
    """Before any work: the evaluation settings fit the val and test splits (a task's
    ``check_eval_records``, e.g. eval.ks within the gallery), and splits that share
    images or records are reported (a warning, not an error)."""
    check = getattr(task, "check_eval_records", None)
    if check is not None:
        check(records["val"], paths["val"])
        check(records["test"], paths["test"])
    if main:
        warn_overlaps(records, paths)


def remaining_stages(run: Run) -> Iterator[Stage]:
    """The stages still to train: not finished before a resume, none after an early stop."""
    for stage in run.plan:
        if stage.end_epoch > run.state.epoch and not run.state.stopped_early:
            yield stage


def start_stage(run: Run, stage: Stage) -> StageRun:
    """Freeze for the stage, build its parameter groups, optimizer, schedule and loader."""
    cfg, accelerator, model = run.cfg, run.accelerator, run.model
    groups = apply_stage(model, stage, cfg.optim.lr, cfg.optim.weight_decay)
    run.backbone.set_gradient_checkpointing(set(stage.train) if cfg.backbone.gradient_checkpointing else set())
    trainable, total = count_parameters(model)
    run.state.max_trainable = max(run.state.max_trainable, trainable)
    if run.main:
        log.info(stage_summary(stage, model))
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    cache = _stage_cache(cfg, run.task, stage, run.out, run.backbone.info.num_vision_blocks)
    # The main process fills the feature cache; the others then only read it.
    with full_params(model), accelerator.main_process_first():  # FSDP: the main process alone fills it
        loader = run.task.make_loader(run.train_records, run.backbone, train=True, seed=cfg.seed, cache=cache)
        if cache and accelerator.num_processes > 1:  # validation is sharded: fill its part now
            run.task.make_loader(run.val_records, run.backbone, train=False, cache=cache)
    accelerator.free_memory()

    def make_scheduler(batches: int) -> Any:
        steps_per_epoch = max(1, math.ceil(batches / cfg.train.grad_accum))
        total_steps = steps_per_epoch * (stage.end_epoch - stage.start_epoch)
        # Accelerate steps a prepared scheduler once per process, so count in those units.
        n = accelerator.num_processes
        return get_linear_schedule_with_warmup(optimizer, int(cfg.optim.warmup_ratio * total_steps) * n, total_steps * n)

    pmodel, optimizer, scheduler, loader = prepare_stage(accelerator, model, optimizer, loader, make_scheduler)
    st = StageRun(stage, pmodel, optimizer, scheduler, loader, [p for g in groups for p in g["params"]], cache)
    if run.trainer_state is not None:
        _restore_stage(run, st)
    # Resumed inside a stage: its line is already in the (truncated) history.
    if run.state.epoch == stage.start_epoch and not run.state.epoch_batches:
        run.history.write(StageRecord(stage=stage.index, name=stage.name, epoch=stage.start_epoch, step=run.state.step,
                                      train=stage.train, losses=sorted(stage.losses), trainable=trainable, total=total,
                                      cache=_cache_record(cache)))
    return st


def train_epoch(run: Run, st: StageRun, epoch: int) -> None:
    """One epoch of steps (the rest of it after a mid-epoch checkpoint). Saves a
    checkpoint and raises on a stop signal or a run of non-finite losses."""
    state, accelerator = run.state, run.accelerator
    st.loader.set_epoch(epoch)
    # A mid-epoch checkpoint: the seedable sampler gives this epoch's order again;
    # skip the batches already trained.
    skip = state.epoch_batches
    epoch_loader = accelerator.skip_first_batches(st.loader, skip) if skip else st.loader
    run.model.train()
    run.model.backbone.eval()  # the backbone's own dropout stays off; trained blocks still get gradients
    progress = EpochProgress(dict(state.running) if skip else {}, state.n_running if skip else 0)
    bar = tqdm(epoch_loader, desc=f"epoch {epoch + 1}/{run.cfg.train.epochs} [{st.stage.name}]", initial=skip,
               total=len(st.loader), disable=not (run.cfg.train.progress and run.main), leave=False)
    t_epoch = time.time()
    for batch in bar:
        if run.pending_rng is not None:
            set_rng_state(run.pending_rng)
            run.pending_rng = None
        values = _train_step(run, st, batch, progress)
        state.samples += len(batch["input_ids"]) * accelerator.num_processes
        state.epoch_batches += 1
        if accelerator.sync_gradients:
            _end_step(run, st, epoch, progress, values, t_epoch)
            bar.set_postfix(loss=f"{values['loss']:.3f}")
    if run.pending_rng is not None:  # the checkpoint was taken after the epoch's last batch
        set_rng_state(run.pending_rng)
        run.pending_rng = None
    state.epoch_batches, state.running, state.n_running = 0, {}, 0
    # Training time alone (no validation), for samples per second.
    state.train_wall_s += time.time() - t_epoch


def _train_step(run: Run, st: StageRun, batch: dict[str, Any], progress: EpochProgress) -> dict[str, float]:
    """Forward, backward and (at the end of an accumulation window) the update, skipped
    when any process's loss in the window was not finite. Returns the values to log."""
    accelerator, cfg, losses = run.accelerator, run.cfg, st.stage.losses
    with accelerator.accumulate(st.pmodel):
        terms = st.pmodel(batch, losses)
        # In a fixed order: a stage's losses are a set, whose order follows the process's
        # string hashing, and a float sum of 3+ terms depends on its order (a resumed
        # process would otherwise differ from the straight run in the last bit).
        loss = sum(run.weights[k] * terms[k] for k in sorted(losses) if k in terms)
        # Agreed by all processes, so they skip (or stop at) the same step.
        bad, stop_now, values = _step_values(loss, terms, sorted(losses), run.stopper.signum, run.device)
        progress.bad_window, progress.stop = progress.bad_window or bad, progress.stop or stop_now
        accelerator.backward(loss)  # also when bad: DDP expects every process's backward
        skip_update = accelerator.sync_gradients and progress.bad_window
        if accelerator.sync_gradients and cfg.optim.grad_clip > 0 and not skip_update:
            accelerator.clip_grad_norm_(st.params, cfg.optim.grad_clip)
        if not skip_update:
            st.optimizer.step()
        st.scheduler.step()
        st.optimizer.zero_grad()  # at the end of a bad window this drops its NaN gradients
    if not bad:
        for k, v in values.items():
            progress.running[k] = progress.running.get(k, 0.0) + v
        progress.n_running += 1
    return values


def _end_step(run: Run, st: StageRun, epoch: int, progress: EpochProgress, values: dict[str, float],
              t_epoch: float) -> None:
    """After an optimizer step: count it, log the history line, stop when asked or diverged."""
    state, cfg = run.state, run.cfg
    state.step += 1
    if progress.bad_window:
        state.bad_steps += 1
        state.bad_in_row += 1
        if run.main:
            log.warning("step %d: loss is not finite; step skipped (%d in a row)", state.step, state.bad_in_row)
    else:
        state.bad_in_row = 0
    progress.bad_window = False
    if state.step % cfg.train.log_every == 0:
        means = {k: v / progress.n_running for k, v in progress.running.items()}
        lrs = {g["name"]: g["lr"] for g in st.optimizer.param_groups}
        run.history.write(StepRecord.from_means(epoch, state.step, st.stage.index, means, lrs, state.bad_steps))
        progress.running, progress.n_running = {}, 0
    diverged = state.bad_in_row >= cfg.train.max_bad_steps
    if not (progress.stop or diverged):
        return
    state.running, state.n_running = progress.running, progress.n_running
    state.history_lines = len(run.history.lines)
    state.wall_s = time.time() - run.t_start
    state.train_wall_s += time.time() - t_epoch
    _save(run, st)
    run.accelerator.wait_for_everyone()
    where = f"epoch {epoch + 1}, step {state.step}"
    if diverged:
        raise Diverged(
            f"loss was NaN or infinite for {state.bad_in_row} steps in a row ({where}; "
            f"{state.bad_steps} in all); stopped with a checkpoint in {run.ckpt_dir / 'last'} holding "
            f"the weights from before them. Lower optim.lr, set optim.grad_clip, or check the data")
    signum = run.stopper.signum or signal.SIGTERM
    raise Interrupted(_interrupted_message(signum, where, run.ckpt_dir, run.out), signum)


def end_epoch(run: Run, st: StageRun, epoch: int) -> bool:
    """Validate, update the best metric and early stopping, write the history line and
    the checkpoints. Returns True when the run stops early."""
    state, es = run.state, run.cfg.train.early_stopping
    with full_params(run.model):  # FSDP: evaluation shards records unevenly; see vlmtune.fsdp
        val = run.task.validate(run.model, run.val_records, device=run.device, cache=st.cache)
    run.last_val = val
    if es.metric not in val:
        raise ConfigError(f"train.early_stopping.metric: '{es.metric}' is not among the validation metrics "
                          f"({', '.join(k for k in sorted(val) if not k.startswith('retrieval/chance'))})")
    value = float(val[es.metric])
    state.last_val = value  # in the checkpoint: a resume that only redoes the final evaluation reports it too
    improved = _is_better(value, state.best, es.mode, es.min_delta)
    if improved:
        state.best, state.best_epoch, state.bad_evals = value, epoch, 0
    else:
        state.bad_evals += 1
    state.epoch = epoch + 1
    state.wall_s = time.time() - run.t_start
    if run.main:
        run.history.write(EpochRecord(epoch=epoch, step=state.step, stage=st.stage.index, samples=state.samples,
                                      train_wall_s=round(state.train_wall_s, 3), wall_s=round(state.wall_s, 3),
                                      peak_mem_mb=round(peak_memory_mb(run.device), 1),
                                      val={k: v for k, v in val.items() if not isinstance(v, list)}))
        log.info("epoch %d: %s = %.3f%s", epoch + 1, es.metric, value, " (best)" if improved else "")
    # A new stage gets a fresh patience: its first epochs often dip before they help.
    if es.patience > 0 and state.bad_evals >= es.patience and epoch + 1 < st.stage.end_epoch:
        state.stopped_early = True
    state.history_lines = len(run.history.lines)
    _save(run, st)
    if run.main and improved:
        # A kill between the save and this copy leaves `best` behind `last`; a resume repairs it (_repair_best).
        copy_checkpoint(run.ckpt_dir / "last", run.ckpt_dir / "best")
    run.accelerator.wait_for_everyone()
    # A signal during the last steps or the validation: the epoch's checkpoint is it.
    if _step_values(torch.zeros(()), {}, [], run.stopper.signum, run.device)[1]:
        signum = run.stopper.signum or signal.SIGTERM
        raise Interrupted(_interrupted_message(signum, f"end of epoch {epoch + 1}", run.ckpt_dir, run.out), signum)
    if state.stopped_early and run.main:
        log.info("early stopping: no improvement of %s for %d evaluations", es.metric, es.patience)
    return state.stopped_early


def final_evaluation(run: Run) -> dict[str, Any]:
    """The test split with the best weights; writes metrics.json."""
    state, cfg, device = run.state, run.cfg, run.device
    run.accelerator.wait_for_everyone()
    best = run.ckpt_dir / "best" if (run.ckpt_dir / "best").exists() else run.ckpt_dir / "last"
    with loading(run.model):  # DeepSpeed ZeRO-3: gathered, then partitioned again
        load_weights(run.model, shard_weights(run.model, open_checkpoint(best).weights()), best)
    with full_params(run.model):
        metrics = run.task.evaluate(run.model, run.test_records, device=device, train_records=run.train_records,
                                    progress=cfg.train.progress and run.main)
    _, total = count_parameters(run.model)
    metrics.update({
        "train/epochs": state.epoch,
        "train/best_epoch": state.best_epoch,
        "train/best_val": state.best,
        "train/stopped_early": state.stopped_early,
        "train/steps": state.step,
        "train/bad_steps": state.bad_steps,
        "train/wall_s": round(state.wall_s, 3),
        "train/train_wall_s": round(state.train_wall_s, 3),
        "train/samples": state.samples,
        "train/samples_per_s": round(state.samples / max(state.train_wall_s, 1e-9), 2),
        "train/peak_mem_mb": round(peak_memory_mb(device), 1),
        "params/trainable": state.max_trainable,
        "params/total": total,
        "checkpoint": str(best),
    })
    if run.last_val:
        metrics["train/last_val"] = float(run.last_val.get(cfg.train.early_stopping.metric, float("nan")))
    elif state.last_val is not None:  # resumed after the last epoch: the value its checkpoint kept
        metrics["train/last_val"] = state.last_val
    metrics["train/num_threads"] = torch.get_num_threads()
    if cfg.train.init_from:
        record = json.loads((run.out / INIT_RECORD).read_text()) if (run.out / INIT_RECORD).is_file() else {}
        metrics["init/from"] = cfg.train.init_from
        metrics["init/weights_sha256"] = record.get("weights_sha256", "")
        metrics["init/loaded"] = record.get("loaded", 0)
        metrics["init/left_at_init"] = len(record.get("left_at_init", []))
    metrics.update(best_stage_metrics(run))
    if run.main:
        write_text(run.out / "metrics.json", json.dumps(metrics, indent=2))
        if run.tracker:
            run.accelerator.log(_numeric(metrics, "test/"), step=state.step)
            run.accelerator.end_training()
    return metrics


def best_stage_metrics(run: Run) -> dict[str, Any]:
    """Which stage the best checkpoint (the one evaluated) comes from, each stage's best
    validation value, and whether the stages after the first ever beat it.

    train/best_stage, train/best_stage_name: the stage of train/best_epoch (0-based, as
    in history.jsonl); train/stage_best_val: per stage of the plan, its best validation
    value of the early-stopping metric (null for a stage that never ran);
    train/later_stages_improved: false when stages after the first ran and none beat the
    first stage's best, so the evaluated weights come from the first stage alone (also
    logged as a warning). Stage values come from history.jsonl, which the main process keeps.
    """
    state, es = run.state, run.cfg.train.early_stopping
    out: dict[str, Any] = {}
    if state.best_epoch is not None:
        stage = next((s for s in run.plan if s.start_epoch <= state.best_epoch < s.end_epoch), None)
        if stage is not None:
            out["train/best_stage"], out["train/best_stage_name"] = stage.index, stage.name
    if not run.main:
        return out
    per_stage: list[float | None] = [None] * len(run.plan)
    for i, line in enumerate(run.history.lines, 1):
        rec = parse_record(json.loads(line), f"{run.history.path}: line {i}")
        value = rec.val.get(es.metric) if isinstance(rec, EpochRecord) else None
        if not isinstance(value, (int, float)) or not 0 <= rec.stage < len(per_stage) or math.isnan(value):
            continue
        best = per_stage[rec.stage]
        if best is None or _is_better(float(value), best, es.mode, 0.0):
            per_stage[rec.stage] = float(value)
    out["train/stage_best_val"] = per_stage
    later_ran = [s for s, v in zip(run.plan[1:], per_stage[1:]) if v is not None]
    if later_ran and out.get("train/best_stage") is not None:
        improved = out["train/best_stage"] > 0
        out["train/later_stages_improved"] = improved
        if not improved:
            first = run.plan[0]
            log.warning("stages after the first (%s) never beat stage 0 '%s' on validation %s (best %.3f at epoch %d): "
                        "the evaluated checkpoint is stage 0's, so nothing those stages trained is in it",
                        ", ".join(f"'{s.name}'" for s in later_ran), first.name, es.metric, state.best,
                        (state.best_epoch or 0) + 1)
    return out


# --------------------------------------------------------------------------- resume


def _open_resume(cfg: Config, ckpt_dir: Path, resume: bool, main: bool) -> Checkpoint | None:
    """The checkpoint to continue from (its config must equal ``cfg``), or None for a
    fresh run, which a folder already holding a run refuses."""
    source = _resume_source(ckpt_dir) if resume else None
    if source is None:
        if resume and main:
            log.info("--resume: no checkpoint yet in %s; starting from the beginning", ckpt_dir)
        if not resume and (ckpt_dir / "last").exists():
            raise ConfigError(f"{ckpt_dir.parent}: already holds a run; pass --resume to continue it or choose another "
                              f"--output-dir")
        return None
    ckpt = open_checkpoint(source)
    saved, now = config_to_dict(ckpt.cfg), config_to_dict(cfg)
    if saved != now:
        key = _first_difference(saved, now)
        raise ConfigError(f"{key}: differs from the config of the run being resumed ({ckpt.folder})")
    return ckpt


def _restore_run(run: Run, ckpt: Checkpoint, accept_changed_data: bool = False) -> None:
    """Weights and loop state from the checkpoint; its optimizer, schedule and RNG wait
    for their stage (:func:`_restore_stage`). The data files must be those the run
    started with (their sha256), unless ``accept_changed_data``."""
    check_data_unchanged(ckpt.state.data_sha256, run.state.data_sha256, run.paths, accept=accept_changed_data,
                         run=str(run.out))
    check_identity(ckpt, backbone_identity(run.backbone))
    load_weights(run.model, ckpt.weights(), ckpt.folder)
    # This run's backbone identity and data paths (and digests); everything else continues.
    run.state = dataclasses.replace(ckpt.state, backbone=run.state.backbone, data_paths=run.state.data_paths,
                                    data_sha256=run.state.data_sha256)
    run.trainer_state = ckpt.trainer_state()
    check_process_count(run.trainer_state, ckpt)
    if run.main:
        log.info("resuming from %s at epoch %d%s", ckpt.folder, run.state.epoch + 1,
                 f", after its batch {run.state.epoch_batches}" if run.state.epoch_batches else "")
        _repair_best(ckpt, run.ckpt_dir / "best")


def _restore_stage(run: Run, st: StageRun) -> None:
    """The first stage started after a resume takes the saved trainer state."""
    saved, run.trainer_state = run.trainer_state, None
    assert saved is not None
    # Optimizer and schedule belong to the stage they were saved in; a resume at a
    # stage boundary starts the new stage's fresh ones, as the straight run did.
    if saved["stage"] == st.stage.index:
        if saved["optimizer"] is None:  # written under DeepSpeed (see _trainer_tensors)
            raise CheckpointError("--resume: this checkpoint was written under DeepSpeed, whose ZeRO-partitioned optimizer "
                                  "state vlmtune does not save; a DeepSpeed run cannot resume inside a stage")
        load_optimizer_state(st.optimizer, saved["optimizer"])  # whole tensors, cut to the shards under FSDP
        st.scheduler.load_state_dict(saved["scheduler"])
    rng = own_rng_state(saved, run.cfg.seed, run.state.step, f"the checkpoint in {run.ckpt_dir}", run.main)
    if run.state.epoch_batches:
        # Saved after a step inside an epoch: restored once the epoch's iterator exists
        # (creating it may draw from the RNG, as it did in the saved run).
        run.pending_rng = rng
    else:
        set_rng_state(rng)


def _stage_cache(cfg: Config, task: Task, stage: Stage, out: Path, num_vision_blocks: int = 0) -> FeatureCache | None:
    """Where a stage may read frozen features from the cache: the vision tower's output
    while no vision component trains; while only its last ``stage.vision_blocks`` blocks
    train (not ``vision_tower``), the hidden state entering the first of them (the
    frozen prefix's output, block ``num_vision_blocks - stage.vision_blocks``) for tasks
    that read it ("vision_prefix" in ``cache_kinds``); the language model's while it does not train."""
    if not (cfg.cache.enabled and task.cacheable):
        return None
    kinds = getattr(task, "cache_kinds", ("vision", "text"))  # what the task's loaders can read from a cache
    trains = set(stage.train)
    vision = "vision" in kinds and not ({"vision_blocks", "vision_tower"} & trains)
    vision_start = None
    if ("vision_prefix" in kinds and "vision_blocks" in trains and "vision_tower" not in trains
            and 0 < stage.vision_blocks <= num_vision_blocks):
        vision, vision_start = True, num_vision_blocks - stage.vision_blocks
    text = "text" in kinds and "language_model" not in trains
    if not (vision or text):
        return None
    return FeatureCache(Path(cfg.cache.dir) if cfg.cache.dir else out / "cache", vision=vision, text=text,
                        vision_start=vision_start)


def _cache_record(cache: FeatureCache | None) -> dict[str, Any]:
    """The stage line's description of the cache it reads."""
    if cache is None:
        return {}
    record = {"cache_dir": str(cache.dir), "cache_vision": cache.vision, "cache_text": cache.text}
    if cache.vision_start is not None:  # the frozen prefix's output, blocks from here on run live
        record["cache_vision_start"] = cache.vision_start
    return record


def _step_values(loss: torch.Tensor, terms: dict[str, torch.Tensor], keys: list[str], signum: int,
                 device: torch.device) -> tuple[bool, bool, dict[str, float]]:
    """(any process's loss is not finite, any process got a stop signal, the values to
    log): ``loss`` and the ``keys`` terms averaged over the processes that have them,
    diagnostics ('diag/...') from this process. One small all_reduce with several
    processes; with one, the local values as they are."""
    one, zero = torch.ones((), device=device), torch.zeros((), device=device)
    loss = loss.detach().float().reshape(()).to(device)
    row = [(~torch.isfinite(loss)).float(), one if signum else zero, torch.nan_to_num(loss), one]
    for k in keys:
        row += [terms[k].detach().float().reshape(()), one] if k in terms else [zero, zero]
    total = all_reduce_sum(torch.stack(row)).tolist()
    values = {"loss": total[2] / total[3]}
    for i, k in enumerate(keys):
        if total[5 + 2 * i]:
            values[k] = total[4 + 2 * i] / total[5 + 2 * i]
    values.update({k: float(v.detach()) for k, v in terms.items() if k.startswith("diag/")})
    return total[0] > 0, total[1] > 0, values


def _interrupted_message(signum: int, where: str, ckpt_dir: Path, out: Path) -> str:
    return (f"{signal.Signals(signum).name} at {where}: checkpoint saved in {ckpt_dir / 'last'}; "
            f"continue with the same command and --resume (--output-dir {out})")


def _resume_source(ckpt_dir: Path) -> Path | None:
    """The checkpoint --resume continues from: ``last``, or ``last.old`` when a kill fell
    between the two renames of a save (the complete previous checkpoint); None before
    the first checkpoint, when the run starts over."""
    for name in ("last", "last.old"):
        if (ckpt_dir / name / "state.json").is_file():
            return ckpt_dir / name
    return None


def _repair_best(last: Checkpoint, best: Path) -> None:
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


def _save(run: Run, st: StageRun) -> None:
    """The ``last`` checkpoint: trained weights, config, state and trainer state, written
    by the main process. Every process calls it: each one's RNG state is gathered
    (:func:`gather_rng_states`), and under FSDP or DeepSpeed the weights and optimizer
    state are made whole by all processes together (:func:`_trainer_tensors`)."""
    rngs = gather_rng_states()
    collective = is_sharded(run.model) or run.accelerator.distributed_type == DistributedType.DEEPSPEED
    if not (run.main or collective):
        return
    weights, optimizer_state = _trainer_tensors(run, st)
    if not run.main:
        return
    trainer_state = {"optimizer": optimizer_state, "scheduler": st.scheduler.state_dict(),
                     "stage": st.stage.index, **rng_record(rngs)}
    save_checkpoint(run.ckpt_dir / "last", weights=weights, cfg=run.cfg, state=run.state, trainer_state=trainer_state,
                    backbone=run.backbone if run.backbone.source == "tiny" else None, keep=run.cfg.train.keep_last)


# --------------------------------------------------------------------------- many processes: FSDP, DeepSpeed


def shard_once(run: Run) -> None:
    """FSDP (train.fsdp.enabled or an Accelerate config with FSDP): shard the model by
    transformer block, once; later stages reuse the sharding. With one process there is
    nothing to shard and the run trains the plain model (logged)."""
    settings = fsdp_settings(run.cfg)
    if settings is None or is_sharded(run.model):
        return
    if run.accelerator.num_processes == 1 or not torch.distributed.is_initialized():
        if run.main:
            log.info("FSDP (%s): one process, nothing to shard; the model trains whole", settings.source)
        return
    shard_model(run.model, dataclasses.replace(settings, mixed_precision=run.accelerator.mixed_precision))


def check_deepspeed_plan(cfg: Config, fsdp: FsdpSettings | None) -> None:
    """What vlmtune cannot do under DeepSpeed, refused before any work. A DeepSpeed
    engine (model, optimizer, schedule) is built once, by one ``accelerator.prepare``;
    Accelerate cannot prepare a second optimizer for the same model (one model per
    Accelerator under DeepSpeed, and the engine is not re-preparable), while every
    stage boundary needs a new optimizer over a new trainable set."""
    if fsdp is not None:
        raise ConfigError(f"{fsdp.source}: FSDP and DeepSpeed together; launch with one of them")
    if len(cfg.stages) > 1:
        raise ConfigError(f"stages: {len(cfg.stages)} stages under DeepSpeed, which builds its engine (model, optimizer, "
                          f"schedule) once and cannot take a new optimizer at a stage boundary; use FSDP "
                          f"(configs/accelerate/fsdp.yaml) or DDP for a multi-stage plan, or a one-stage plan")


def prepare_stage(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any,
                  make_scheduler: Any) -> tuple[Any, Any, Any, Any]:
    """(model, optimizer, scheduler, loader) prepared for this stage, in the order the
    accelerator's distributed type needs. ``make_scheduler(batches)`` builds the stage's
    schedule from this process's batches per epoch.

    - DeepSpeed: all four in one ``prepare`` call (its ``auto`` micro-batch size comes from
      the loader, and the engine is built from model, optimizer and scheduler together);
      the per-process batch count is worked out before, as Accelerate will shard it.
    - FSDP (the model already sharded by :func:`shard_once`): the loader, then optimizer
      and scheduler; the model is not wrapped again.
    - DDP and one process: the loader first (its prepared length is this process's
      batches), then model, optimizer and scheduler.
    """
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        n, total = accelerator.num_processes, len(loader)
        drop_last = bool(getattr(getattr(loader, "batch_sampler", None), "drop_last", False))
        scheduler = make_scheduler(total // n if drop_last else math.ceil(total / n))
        loader, pmodel, optimizer, scheduler = accelerator.prepare(loader, model, optimizer, scheduler)
        return pmodel, optimizer, scheduler, loader
    loader = accelerator.prepare(loader)
    scheduler = make_scheduler(len(loader))
    if is_sharded(model):
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
        return model, optimizer, scheduler, loader
    pmodel, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return pmodel, optimizer, scheduler, loader


def _trainer_tensors(run: Run, st: StageRun) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The checkpoint's trained tensors and optimizer state, whole (a one-process run's
    format whatever the launch). FSDP: gathered from the shards; DeepSpeed: weights
    through ``accelerator.get_state_dict`` (ZeRO-3 gathers them), no optimizer state
    (ZeRO partitions it in its own format). Collective in both cases."""
    names = sorted(run.saved_names)
    if run.accelerator.distributed_type == DistributedType.DEEPSPEED:
        sd = run.accelerator.get_state_dict(st.pmodel)
        return {k: sd[k] for k in names if k in sd}, None
    if is_sharded(run.model):
        return full_tensors(run.model, names), full_optimizer_state(st.optimizer.state_dict())
    sd = run.model.state_dict()
    return {k: sd[k] for k in names}, st.optimizer.state_dict()


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


# --------------------------------------------------------------------------- threads


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the run (``train.num_threads``), the previous
    count restored afterwards; None or 0 leaves PyTorch's default."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
        log.info("train.num_threads: PyTorch uses %d CPU thread%s (default here: %d)", n, "s" * (n != 1), before)
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(before)


# --------------------------------------------------------------------------- loss targets


def check_loss_targets(cfg: Config, task: Task, plan: list[Stage], records: list[Any], path: str) -> None:
    """A stage whose active loss has no target anywhere in the training data (a box loss
    and no record with a box) is an error naming the stage and the loss, not a loss
    that silently never trains. Tasks say which targets records hold (``loss_targets``)."""
    targets_of = getattr(task, "loss_targets", None)
    if targets_of is None:
        return
    targets = targets_of(records)
    for stage in plan:
        missing = sorted(stage.losses - targets)
        if not missing:
            continue
        loss = missing[0]
        how = (f"remove it from stages[{stage.index}].losses" if cfg.stages[stage.index].losses is not None
               else f"set loss.{loss}=0 or list this stage's losses in stages[{stage.index}].losses")
        raise ConfigError(f"stages[{stage.index}] '{stage.name}': the '{loss}' loss is active but no training record "
                          f"({path}, {len(records)} records) has a target for it; use data that has one, or {how}")


# --------------------------------------------------------------------------- warm start



@dataclass
class InitSource:
    """The checkpoint a warm start (``train.init_from``) loads, checked against the model."""

    ckpt: Checkpoint
    weights: dict[str, torch.Tensor]
    sha256: str
    backbone_names: set[str]   # backbone tensors the source trained (kept in this run's checkpoints)


def open_init_source(cfg: Config, backbone: Backbone, model: nn.Module, out: Path, resuming: bool,
                     main: bool) -> InitSource:
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
        what = ("has no place in this model" if kind == "unexpected"
                else f"has shape {tuple(weights[k].shape)}, this model's has {tuple(own[k].shape)}")
        raise CheckpointError(f"train.init_from: {source}: tensor '{k}' {what} "
                              f"(another model config: check model.* and counting.*)")
    sha = ckpt.digests.get("weights.safetensors", "")
    record = out / INIT_RECORD
    if resuming and record.is_file():
        before = json.loads(record.read_text()).get("weights_sha256")
        if before != sha:
            raise CheckpointError(f"train.init_from: {source}: its weights changed since this run started from them "
                                  f"(sha256 {str(before)[:12]}... then, {sha[:12]}... now)")
    return InitSource(ckpt, weights, sha, {k for k in weights if k.startswith("backbone.")})


def load_init_weights(run: Run, init: InitSource) -> None:
    """Copy the source's weights into the fresh model; tensors the source lacks (a part
    only this run trains, e.g. a vision block the first run kept frozen) keep their
    initial values and are listed in the log and init_from.json."""
    run.model.load_state_dict(init.weights, strict=False)
    left = sorted(k for k in run.saved_names if k not in init.weights)
    if run.main:
        log.info("train.init_from: %d tensors from %s (weights sha256 %s...)", len(init.weights), init.ckpt.folder,
                 init.sha256[:12])
        if left:
            shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
            log.info("train.init_from: %d tensors this run trains are not in the source and keep their initial "
                     "values: %s", len(left), shown)
        write_text(run.out / INIT_RECORD, json.dumps({
            "checkpoint": str(init.ckpt.folder), "weights_sha256": init.sha256, "source_epoch": init.ckpt.state.epoch,
            "loaded": len(init.weights), "left_at_init": left}, indent=2))


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
            f"the batches already trained are counted per process")


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
        what = (f"saved by {n} process{'es' * (n != 1)}" if "processes" in saved
                else "holds one random stream (saved before per-process streams)")
        log.warning("%s %s, resumed by %d: each process's random stream (dropout, sampled negatives) starts afresh "
                    "from the seed, rank and step; the run goes on, but does not replay the uninterrupted run exactly",
                    where, what, world)
    set_seed(derived_seed(seed, rank, step))
    return rng_state()
