"""The training loop: for stage, for epoch, for step, on Hugging Face Accelerate.

One loop serves every task; tasks differ in their model, data and metrics (see
``vlmtune.tasks``), stages differ in config. At each stage transition the frozen set
and the optimizer's parameter groups are rebuilt. Every epoch ends with a validation
pass, a history line, the ``last`` checkpoint (and ``best`` when the metric improved).

The loop's running values (step, epoch, the history line's sums, bad steps, best value)
live in one place, ``run.state`` (a :class:`TrainState`, the form a checkpoint saves):
a save writes it as it is. What the launcher decides is in ``launch``, resume and the
random streams in ``resume``, warm start in ``warmstart``, the cache choice in ``caches``.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from vlmtune.backbone import Backbone, load_backbone
from vlmtune.checkpoint import backbone_identity, copy_checkpoint, load_weights, open_checkpoint, save_checkpoint, set_rng_state
from vlmtune.config import Config, save_config
from vlmtune.console import bars, progress
from vlmtune.data.integrity import data_digests
from vlmtune.errors import Diverged, Interrupted
from vlmtune.fsdp import full_params, loading, shard_weights
from vlmtune.history import EpochRecord, History, StageRecord, StepRecord
from vlmtune.runfolder import output_folder, write_text
from vlmtune.stages import Plan, Stage, apply_stage, build_plan, count_parameters, stage_schedule, stage_summary, trained_anywhere
from vlmtune.state import TrainState
from vlmtune.tasks import FeatureCache, Task, build_task
from vlmtune.tasks.model import TaskModel
from vlmtune.train import launch
from vlmtune.train.caches import cache_estimate, cache_record, check_cache_space, stage_cache
from vlmtune.train.checks import check_loss_targets, check_plan_fits, check_splits, metric_value
from vlmtune.train.resume import gather_rng_states, open_resume, restore_run, restore_stage, rng_record, seed_process_stream
from vlmtune.train.stopping import StopRequest, any_stop_signal, diverged_message, interrupted_message, step_values
from vlmtune.train.summary import best_stage_metrics, is_better, run_metrics
from vlmtune.train.warmstart import init_metrics, load_init_weights, open_init_source
from vlmtune.utils import frozen_gc

log = logging.getLogger("vlmtune")


@dataclass
class Run:
    """Everything a training run holds, built once by :func:`prepare_run`."""

    cfg: Config
    out: Path
    accelerator: Accelerator
    task: Task
    backbone: Backbone
    model: TaskModel
    plan: Plan
    weights: dict[str, float]  # loss term -> weight
    saved_names: set[str]  # state-dict keys a checkpoint holds
    paths: dict[str, str]  # train/val/test annotation files
    records: dict[str, list[Any]]  # ... and their records
    state: TrainState  # the loop's running values; a checkpoint's state.json
    history: History
    stopper: StopRequest
    tracker: str | None = None
    # From the checkpoint being resumed, until the stage it was saved in has started.
    trainer_state: dict[str, Any] | None = None
    pending_rng: Any = None  # RNG state to set once the resumed epoch's iterator exists
    t_start: float = 0.0  # wall_s counts from here (a resumed run's start moved back by its wall_s)

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


@dataclass(frozen=True)
class EpochEnd:
    """What :func:`end_epoch` found: the validation metrics, whether they improved, whether the run stops early."""

    val: dict[str, Any]
    improved: bool
    stop: bool


def train(
    cfg: Config,
    output_dir: str | Path,
    resume: bool = False,
    tracker: str | None = None,
    overwrite: bool = False,
    accept_changed_data: bool = False,
) -> dict[str, Any]:
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
    sources = {"train.init_from": cfg.train.init_from, **{f"data.{k}": getattr(cfg.data, k) for k in ("train", "val", "test")}}
    with (
        launch.locked_run_folder(out, resume, overwrite, sources),
        StopRequest() as stopper,
        launch.torch_threads(cfg.train.num_threads),
        bars(cfg.train.progress),
    ):
        run = prepare_run(cfg, out, resume, tracker, stopper, accept_changed_data=accept_changed_data)
        launch.keep_threads(run.state, cfg.train.num_threads, resume)
        with frozen_gc():  # the backbone and model built: garbage collection passes skip them
            st: StageRun | None = None
            for stage in run.plan.remaining(run.state):
                st = None  # the previous stage's wrapper (DDP: its gradient hooks) must be gone first
                st = start_stage(run, stage)
                for epoch in stage.epochs_from(run.state):
                    train_epoch(run, st, epoch)
                    if end_epoch(run, st, epoch).stop:
                        break
            stopper.restore()  # from here on a signal stops at once; --resume redoes only the final evaluation
            return final_evaluation(run)


def prepare_run(
    cfg: Config, out: Path, resume: bool, tracker: str | None, stopper: StopRequest, *, accept_changed_data: bool = False
) -> Run:
    """Accelerator, backbone, model, data, stage plan and state (restored on resume)."""
    accelerator = launch.make_accelerator(cfg, tracker, out)
    main = accelerator.is_main_process
    resume_from = open_resume(cfg, out / "checkpoints", resume, main)
    if main:  # only the main process writes into the run directory
        out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    task = build_task(cfg)
    backbone = load_backbone(
        cfg.backbone, device_type=accelerator.device.type, folder=resume_from.backbone_folder if resume_from else None
    )
    model: TaskModel = task.build_model(backbone)
    with accelerator.main_process_first():
        paths = task.data_paths(out)
    records = {split: task.read_split(paths[split], split) for split in ("train", "val", "test")}
    weights = task.loss_weights()
    plan = build_plan(cfg, weights)
    check_plan_fits(model, plan)
    check_splits(task, paths, records, main)
    check_loss_targets(cfg, task, plan, records["train"], paths["train"])
    init = open_init_source(cfg, backbone, model, out, resume_from is not None, main) if cfg.train.init_from else None
    metric = cfg.train.early_stopping.metric
    assert metric is not None  # the task's default fills it when the config is loaded (config.checks)
    state = TrainState(backbone=backbone_identity(backbone), data_paths=paths, data_sha256=data_digests(paths), metric=metric)
    saved_names = trained_anywhere(model, plan) | set(model.head_state_dict())
    if init is not None:
        saved_names |= init.backbone_names  # a block the source trained stays in this run's checkpoints
        if resume_from is None:
            load_init_weights(model, init, saved_names, out, main)
    trainer_state = None
    if resume_from is not None:
        state, trainer_state = restore_run(resume_from, state, model, backbone, paths, out, main, accept_changed_data)
        task.load_train_state(trainer_state.get("task") or {})
    if main:
        save_config(cfg, out / "config.yaml")
    sink = None
    if tracker and main:
        launch.start_tracker(accelerator, tracker, cfg, out)
        sink = launch.tracker_sink(accelerator)
    history = History(out / "history.jsonl", state.history_lines if resume_from else None, sink, enabled=main)
    # FSDP: sharded before the move (a device only ever holds this process's shards) and
    # before any stage's optimizer exists, so every stage's is over the shards.
    launch.shard_once(cfg, model, accelerator)
    seed_process_stream(cfg.seed)
    model.to(accelerator.device)
    return Run(
        cfg,
        out,
        accelerator,
        task,
        backbone,
        model,
        plan,
        weights,
        saved_names,
        paths,
        records,
        state,
        history,
        stopper,
        tracker,
        trainer_state,
        t_start=time.time() - state.wall_s,
    )


def start_stage(run: Run, stage: Stage) -> StageRun:
    """Freeze for the stage, build its parameter groups, optimizer, schedule and loader;
    a resumed run's saved trainer state goes to the first stage it starts."""
    cfg, accelerator, model = run.cfg, run.accelerator, run.model
    groups = apply_stage(model, stage, cfg.optim.lr, cfg.optim.weight_decay)
    run.backbone.set_gradient_checkpointing(set(stage.train) if cfg.backbone.gradient_checkpointing else set())
    trainable, total = count_parameters(model)
    run.state.max_trainable = max(run.state.max_trainable, trainable)
    if run.main:
        log.info(stage_summary(stage, model))
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.betas[0], cfg.optim.betas[1]))  # two: config.checks
    cache = stage_cache(cfg, run.task, stage, run.out, run.backbone.info.num_vision_blocks)
    if cache is not None and run.main:  # the whole cache this stage fills, against the disk, before extraction
        total, how = cache_estimate(
            cfg, run.backbone.info, run.records["train"] + run.records["val"], vision_stores=int(cache.vision), text=cache.text
        )
        check_cache_space(cache.dir, total, how, log.info)
    # The main process fills the feature cache; the others then only read it.
    with full_params(model), accelerator.main_process_first():  # FSDP: the main process alone fills it
        loader = run.task.make_loader(run.records["train"], run.backbone, train=True, seed=cfg.seed, cache=cache)
        if cache and accelerator.num_processes > 1:  # validation is sharded: fill its part now
            run.task.make_loader(run.records["val"], run.backbone, train=False, cache=cache)
    accelerator.free_memory()
    pmodel, optimizer, scheduler, loader = launch.prepare_stage(
        accelerator, model, optimizer, loader, stage_schedule(cfg, stage, optimizer, accelerator.num_processes)
    )
    st = StageRun(stage, pmodel, optimizer, scheduler, loader, [p for g in groups for p in g["params"]], cache)
    if run.trainer_state is not None:
        saved, run.trainer_state = run.trainer_state, None
        rng = restore_stage(
            saved, stage.index, optimizer, scheduler, cfg.seed, run.state.step, f"the checkpoint in {run.ckpt_dir}", run.main
        )
        # Saved after a step inside an epoch: restored once the epoch's iterator exists
        # (creating it may draw from the RNG, as it did in the saved run).
        if run.state.epoch_batches:
            run.pending_rng = rng
        else:
            set_rng_state(rng)
    # Resumed inside a stage: its line is already in the (truncated) history.
    if run.state.epoch == stage.start_epoch and not run.state.epoch_batches:
        # A fresh patience, also when resumed from the save at the previous stage's end (which keeps its count).
        run.state.bad_evals = 0
        run.history.write(
            StageRecord(
                stage=stage.index,
                name=stage.name,
                epoch=stage.start_epoch + 1,  # its first epoch, counted from 1 as everywhere users read
                step=run.state.step,
                train=stage.train,
                losses=sorted(stage.losses),
                trainable=trainable,
                total=total,
                cache=cache_record(cache),
            )
        )
    return st


def train_epoch(run: Run, st: StageRun, epoch: int) -> None:
    """One epoch of steps (the rest of it after a mid-epoch checkpoint). Saves a
    checkpoint and raises on a stop signal or a run of non-finite losses."""
    state, accelerator = run.state, run.accelerator
    st.loader.set_epoch(epoch)
    # A mid-epoch checkpoint: the seedable sampler gives this epoch's order again;
    # skip the batches already trained, and continue the history line it saved.
    skip = state.epoch_batches
    t_epoch = time.time()  # training time counts the task's work before the first step (mining)
    if not skip:  # between epochs, with the model as it is (retrieval: mined negatives)
        with full_params(run.model):
            run.task.start_epoch(
                run.model, run.records["train"], epoch=epoch, backbone=run.backbone, cache=st.cache, device=run.device
            )
    epoch_loader = accelerator.skip_first_batches(st.loader, skip) if skip else st.loader
    if not skip:
        state.running, state.n_running = {}, 0
    run.model.train()
    run.model.backbone.eval()  # the backbone's own dropout stays off; trained blocks still get gradients
    bar = progress(
        epoch_loader,
        desc=f"epoch {epoch + 1}/{run.cfg.train.epochs} [{st.stage.name}]",
        initial=skip,
        total=len(st.loader),
        enabled=run.cfg.train.progress and run.main,
    )
    bad_window = stop = False  # in the accumulation window so far: a non-finite loss, a stop signal
    for batch in bar:
        _set_pending_rng(run)
        values, bad_window, stop_now = train_step(run, st, batch, bad_window)
        stop = stop or stop_now
        state.samples += len(batch["input_ids"]) * accelerator.num_processes
        state.epoch_batches += 1
        if accelerator.sync_gradients:
            end_step(run, st, epoch, bad_window, stop, t_epoch)
            bad_window = False
            bar.set_postfix(loss=f"{values['loss']:.3f}")
    _set_pending_rng(run)  # the checkpoint was taken after the epoch's last batch
    state.epoch_batches, state.running, state.n_running = 0, {}, 0
    # Training time alone (no validation), for samples per second.
    state.train_wall_s += time.time() - t_epoch


def _set_pending_rng(run: Run) -> None:
    if run.pending_rng is not None:
        set_rng_state(run.pending_rng)
        run.pending_rng = None


def train_step(run: Run, st: StageRun, batch: dict[str, Any], bad_window: bool) -> tuple[dict[str, float], bool, bool]:
    """Forward, backward and (at the end of an accumulation window) the update, skipped
    when any process's loss in the window was not finite. Adds the values to log to the
    history line's sums; returns them, whether the window had a non-finite loss so far,
    and whether any process got a stop signal."""
    accelerator, cfg, losses, state = run.accelerator, run.cfg, st.stage.losses, run.state
    with accelerator.accumulate(st.pmodel):
        terms = st.pmodel(batch, losses)
        # In a fixed order: a stage's losses are a set, whose order follows the process's
        # string hashing, and a float sum of 3+ terms depends on its order (a resumed
        # process would otherwise differ from the straight run in the last bit).
        loss = sum(run.weights[k] * terms[k] for k in sorted(losses) if k in terms)
        # Agreed by all processes, so they skip (or stop at) the same step.
        bad, stop_now, values = step_values(loss, terms, sorted(losses), run.stopper.signum, run.device)
        bad_window = bad_window or bad
        accelerator.backward(loss)  # also when bad: DDP expects every process's backward
        skip_update = accelerator.sync_gradients and bad_window
        if accelerator.sync_gradients and cfg.optim.grad_clip > 0 and not skip_update:
            accelerator.clip_grad_norm_(st.params, cfg.optim.grad_clip)
        if not skip_update:
            st.optimizer.step()
        st.scheduler.step()
        st.optimizer.zero_grad()  # at the end of a bad window this drops its NaN gradients
    if not bad:
        for k, v in values.items():
            state.running[k] = state.running.get(k, 0.0) + v
        state.n_running += 1
    return values, bad_window, stop_now


def end_step(run: Run, st: StageRun, epoch: int, bad_window: bool, stop: bool, t_epoch: float) -> None:
    """After an optimizer step: count it, log the history line, stop when asked or diverged."""
    state, cfg = run.state, run.cfg
    state.step += 1
    if bad_window:
        state.bad_steps += 1
        state.bad_in_row += 1
        if run.main:
            log.warning("step %d: loss is not finite; step skipped (%d in a row)", state.step, state.bad_in_row)
    else:
        state.bad_in_row = 0
    if state.step % cfg.train.log_every == 0:
        means = {k: v / state.n_running for k, v in state.running.items()}
        lrs = {g["name"]: g["lr"] for g in st.optimizer.param_groups}
        run.history.write(StepRecord.from_means(epoch + 1, state.step, st.stage.index, means, lrs, state.bad_steps))
        state.running, state.n_running = {}, 0
    diverged = state.bad_in_row >= cfg.train.max_bad_steps
    if not (stop or diverged):
        return
    state.history_lines = len(run.history.lines)
    state.wall_s = time.time() - run.t_start
    state.train_wall_s += time.time() - t_epoch
    save_last(run, st)
    run.accelerator.wait_for_everyone()
    where = f"epoch {epoch + 1}, step {state.step}"
    if diverged:
        raise Diverged(diverged_message(state.bad_in_row, state.bad_steps, where, run.ckpt_dir))
    signum = run.stopper.signum or signal.SIGTERM
    raise Interrupted(interrupted_message(signum, where, run.ckpt_dir, run.out), signum)


def end_epoch(run: Run, st: StageRun, epoch: int) -> EpochEnd:
    """Validate, update the best metric and early stopping, write the history line and
    the checkpoints; ``stop`` when the run stops early."""
    state, es = run.state, run.cfg.train.early_stopping
    with full_params(run.model):  # FSDP: evaluation shards records unevenly; see vlmtune.fsdp
        val = run.task.validate(run.model, run.records["val"], device=run.device, cache=st.cache)
    value = metric_value(es.metric, val)
    state.last_val = value  # in the checkpoint: a resume that only redoes the final evaluation reports it too
    improved = is_better(value, state.best, es.mode, es.min_delta)
    if improved:
        state.best, state.best_epoch, state.bad_evals = value, epoch, 0
    else:
        state.bad_evals += 1
    state.epoch = epoch + 1
    state.wall_s = time.time() - run.t_start
    if run.main:
        run.history.write(
            EpochRecord(
                epoch=epoch + 1,
                step=state.step,
                stage=st.stage.index,
                samples=state.samples,
                train_wall_s=round(state.train_wall_s, 3),
                wall_s=round(state.wall_s, 3),
                peak_mem_mb=round(launch.peak_memory_mb(run.device), 1),
                val={k: v for k, v in val.items() if not isinstance(v, list)},
            )
        )
        log.info("epoch %d: %s = %.3f%s", epoch + 1, es.metric, value, " (best)" if improved else "")
    # A new stage gets a fresh patience: its first epochs often dip before they help.
    if es.patience > 0 and state.bad_evals >= es.patience and epoch + 1 < st.stage.end_epoch:
        state.stopped_early = True
    state.history_lines = len(run.history.lines)
    save_last(run, st)
    if run.main and improved:
        # A kill between the save and this copy leaves `best` behind `last`; a resume repairs it (resume.repair_best).
        copy_checkpoint(run.ckpt_dir / "last", run.ckpt_dir / "best")
    run.accelerator.wait_for_everyone()
    # A signal during the last steps or the validation: the epoch's checkpoint is it.
    if any_stop_signal(run.stopper.signum, run.device):
        signum = run.stopper.signum or signal.SIGTERM
        raise Interrupted(interrupted_message(signum, f"end of epoch {epoch + 1}", run.ckpt_dir, run.out), signum)
    if state.stopped_early and run.main:
        log.info("early stopping: no improvement of %s for %d evaluations", es.metric, es.patience)
    if state.stopped_early or state.epoch == st.stage.end_epoch:
        # The stage is over: the next one starts with a fresh patience (after the save, which keeps the count).
        state.bad_evals = 0
    return EpochEnd(val, improved, state.stopped_early)


def save_last(run: Run, st: StageRun) -> None:
    """The ``last`` checkpoint: trained weights, config, ``run.state`` as it is and the
    trainer state, written by the main process. Every process calls it: each one's RNG
    state is gathered, and under FSDP or DeepSpeed the weights and optimizer state are
    made whole by all processes together (:func:`launch.trainer_tensors`)."""
    rngs = gather_rng_states()
    if not (run.main or launch.saves_collectively(run.accelerator, run.model)):
        return
    weights, optimizer_state = launch.trainer_tensors(
        run.accelerator, run.model, st.pmodel, st.optimizer, sorted(run.saved_names)
    )
    if not run.main:
        return
    sched, index = st.scheduler.state_dict(), st.stage.index
    trainer_state = {"optimizer": optimizer_state, "scheduler": sched, "stage": index, **rng_record(rngs)}
    task_state = run.task.train_state()
    if task_state:  # e.g. retrieval's mined negatives, restored exactly by --resume
        trainer_state["task"] = task_state
    save_checkpoint(
        run.ckpt_dir / "last",
        weights=weights,
        cfg=run.cfg,
        state=run.state,
        trainer_state=trainer_state,
        backbone=run.backbone if run.backbone.source == "tiny" else None,
        keep=run.cfg.train.keep_last,
    )


def final_evaluation(run: Run) -> dict[str, Any]:
    """The test split with the best weights; writes metrics.json."""
    state, cfg, device, es = run.state, run.cfg, run.device, run.cfg.train.early_stopping
    run.accelerator.wait_for_everyone()
    best = run.ckpt_dir / "best" if (run.ckpt_dir / "best").exists() else run.ckpt_dir / "last"
    with loading(run.model):  # DeepSpeed ZeRO-3: gathered, then partitioned again
        load_weights(run.model, shard_weights(run.model, open_checkpoint(best).weights()), best)
    with full_params(run.model):
        test, train = run.records["test"], run.records["train"]
        metrics = run.task.evaluate(run.model, test, device=device, train_records=train, progress=cfg.train.progress and run.main)
    _, total = count_parameters(run.model)
    metrics.update(run_metrics(state, total, launch.peak_memory_mb(device), best))
    if state.last_val is not None:  # the last validation's, also when a resume only redoes this evaluation
        metrics["train/last_val"] = state.last_val
    metrics["train/num_threads"] = torch.get_num_threads()
    metrics["train/device"] = device.type  # efficiency is compared only between runs on the same kind of device
    metrics.update(init_metrics(cfg, run.out))
    metrics.update(run.task.train_metrics(train))
    assert es.metric is not None  # filled when the config is loaded
    metrics.update(best_stage_metrics(run.plan, state, run.history, es.metric, es.mode, run.main))
    if run.main:
        write_text(run.out / "metrics.json", json.dumps(metrics, indent=2))
        run.task.write_figures(metrics, run.out)
        if run.tracker:
            run.accelerator.log(launch.numeric(metrics, "test/"), step=state.step)
            run.accelerator.end_training()
    return metrics
