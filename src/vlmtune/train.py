"""The training loop: for stage, for epoch, for step, on Hugging Face Accelerate.

One loop serves every task; tasks differ in their model, data and metrics (see
``vlmtune.tasks``), stages differ in config. At each stage transition the frozen set
and the optimizer's parameter groups are rebuilt. Every epoch ends with a validation
pass, a history line, the ``last`` checkpoint (and ``best`` when the metric improved).
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from vlmtune.backbone import Backbone, load_backbone
from vlmtune.checkpoint import (
    check_identity,
    copy_checkpoint,
    load_weights,
    open_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from vlmtune.config import Config, config_to_dict, save_config
from vlmtune.distributed import all_reduce_sum
from vlmtune.errors import ConfigError, Diverged, Interrupted
from vlmtune.stages import apply_stage, build_plan, count_parameters, stage_summary, trained_anywhere
from vlmtune.tasks import TaskSpec, get_task

log = logging.getLogger("vlmtune")


TRACKERS = ("wandb", "tensorboard")


def make_accelerator(cfg: Config, tracker: str | None = None, project_dir: Path | None = None) -> Accelerator:
    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    # The seedable sampler makes the data order a function of (seed, epoch), so a
    # resumed run sees exactly the batches the uninterrupted run would have seen.
    # find_unused_parameters: a stage may train parameters its active losses do not
    # reach (stage 1 trains the grounding heads before the box loss joins), which DDP
    # otherwise rejects. Its cost, one walk over the autograd graph per step, is small
    # here: the graph covers the trainable parts only, the frozen backbone adds nothing.
    # Launched as several processes (torchrun) on a machine without a GPU: Accelerate
    # runs them on the gloo backend only when told that the device is the CPU.
    cpu_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return Accelerator(
        cpu=cpu_processes,
        mixed_precision=mp,
        gradient_accumulation_steps=cfg.train.grad_accum,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        log_with=tracker,
        project_dir=str(project_dir) if project_dir else None,
    )


def _start_tracker(accelerator: Accelerator, tracker: str, cfg: Config, out: Path) -> None:
    """Accelerate's own tracker; every history record is mirrored to it."""
    if tracker == "wandb" and "WANDB_MODE" not in os.environ and "WANDB_API_KEY" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"
        log.info("wandb: no WANDB_API_KEY, logging offline into %s/wandb (wandb sync uploads it later)", out)
    flat = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in _flatten(config_to_dict(cfg)).items()}
    try:
        accelerator.init_trackers(tracker, config=flat, init_kwargs={"wandb": {"dir": str(out), "name": out.name}})
    except (ImportError, ModuleNotFoundError) as e:
        raise ConfigError(f"--tracker {tracker}: {e}; install it with pip install 'vlmtune[{tracker}]'") from None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


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


class History:
    """history.jsonl: one JSON line per logged step or epoch; truncated on resume to
    the lines the checkpoint had seen, so no line is written twice. Only the main
    process writes it (``enabled``)."""

    def __init__(self, path: Path, keep_lines: int | None, sink: Any = None, enabled: bool = True):
        self.path = path
        self.sink = sink  # e.g. a tracker: sink(record) for every new record
        self.enabled = enabled
        lines = path.read_text().splitlines() if keep_lines and path.exists() else []
        self.lines = lines[:keep_lines] if keep_lines else []
        if enabled:
            path.write_text("".join(ln + "\n" for ln in self.lines))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(record)
        self.lines.append(line)
        with self.path.open("a") as f:
            f.write(line + "\n")
        if self.sink is not None:
            self.sink(record)


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


def train(cfg: Config, output_dir: str | Path, resume: bool = False, tracker: str | None = None) -> dict[str, Any]:
    """Train ``cfg`` into ``output_dir``; returns the final test metrics.

    ``tracker``: also log to "wandb" or "tensorboard" (through Accelerate) besides
    history.jsonl. SIGINT/SIGTERM save a checkpoint after the current step and raise
    :class:`Interrupted`; ``train.max_bad_steps`` non-finite losses in a row save one
    and raise :class:`Diverged`.
    """
    with StopRequest() as stopper:
        return _train(cfg, output_dir, resume, tracker, stopper)


def _train(cfg: Config, output_dir: str | Path, resume: bool, tracker: str | None, stopper: StopRequest) -> dict[str, Any]:
    out = Path(output_dir)
    ckpt_dir = out / "checkpoints"
    accelerator = make_accelerator(cfg, tracker, out)
    main = accelerator.is_main_process
    task: TaskSpec = get_task(cfg.task)

    resume_from = None
    source = _resume_source(ckpt_dir) if resume else None
    if resume and source is None and main:
        log.info("--resume: no checkpoint yet in %s; starting from the beginning", ckpt_dir)
    if source is not None:
        resume_from = open_checkpoint(source)
        saved, now = config_to_dict(resume_from.cfg), config_to_dict(cfg)
        if saved != now:
            key = _first_difference(saved, now)
            raise ConfigError(f"{key}: differs from the config of the run being resumed ({resume_from.folder})")
    elif (ckpt_dir / "last").exists():
        raise ConfigError(f"{out}: already holds a run; pass --resume to continue it or choose another --output-dir")

    if main:  # only the main process writes into the run directory
        out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    device = accelerator.device
    backbone_folder = resume_from.backbone_folder if resume_from else None
    backbone: Backbone = load_backbone(cfg.backbone, device_type=device.type, folder=backbone_folder)
    model = task.build_model(backbone, cfg)

    with accelerator.main_process_first():
        paths = task.resolve_data_paths(cfg, out)
    train_records = task.read_split(paths["train"], cfg)
    val_records = task.read_split(paths["val"], cfg)

    weights = task.loss_weights(cfg)
    plan = build_plan(cfg, weights)
    for st in plan:  # fail before any work when a stage asks for more blocks than exist
        for comp in st.train:
            model.component_modules(comp, st.vision_blocks)
    saved_names = trained_anywhere(model, plan) | set(model.head_state_dict())
    es = cfg.train.early_stopping

    state: dict[str, Any] = {
        "epoch": 0, "step": 0, "best": None, "best_epoch": None, "bad_evals": 0, "wall_s": 0.0,
        "history_lines": 0, "stopped_early": False, "max_trainable": 0, "samples": 0, "train_wall_s": 0.0,
        "backbone": backbone.identity(), "data_paths": paths, "metric": es.metric,
        # Mid-epoch checkpoints (a signal, a run of bad steps): batches of epoch "epoch"
        # already trained, and the running sums of the history line in progress.
        "epoch_batches": 0, "running": {}, "n_running": 0, "bad_steps": 0, "bad_in_row": 0,
    }
    trainer_state = None
    if resume_from is not None:
        check_identity(resume_from, backbone.identity())
        load_weights(model, resume_from.weights(), resume_from.folder)
        state.update({k: v for k, v in resume_from.state.items() if k in state and k not in ("backbone", "data_paths")})
        trainer_state = resume_from.trainer_state()
        if main:
            log.info("resuming from %s at epoch %d%s", resume_from.folder, state["epoch"] + 1,
                     f", after its batch {state['epoch_batches']}" if state["epoch_batches"] else "")
            _repair_best(resume_from, ckpt_dir / "best")
    if main:
        save_config(cfg, out / "config.yaml")
    sink = None
    if tracker and main:
        _start_tracker(accelerator, tracker, cfg, out)
        # Step lines carry loss/*, lr/*, diag/*; epoch lines val/*, wall time, peak
        # memory, samples; stage lines the stage index and trainable count.
        sink = lambda rec: accelerator.log(_numeric(rec), step=rec["step"])  # noqa: E731
    history = History(out / "history.jsonl", state["history_lines"] if resume_from else None, sink, enabled=main)
    model.to(device)
    t_start = time.time() - state["wall_s"]
    last_val: dict[str, Any] = {}
    pmodel: Any = None
    pending_rng = None

    for stage in plan:
        if stage.end_epoch <= state["epoch"] or state["stopped_early"]:
            continue
        groups = apply_stage(model, stage, cfg.optim.lr, cfg.optim.weight_decay)
        backbone.set_gradient_checkpointing(set(stage.train) if cfg.backbone.gradient_checkpointing else set())
        trainable, total = count_parameters(model)
        state["max_trainable"] = max(state["max_trainable"], trainable)
        if main:
            log.info(stage_summary(stage, model))
        optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
        cache = _cache_kwargs(cfg, task, stage, out)
        # The main process fills the feature cache; the others then only read it.
        with accelerator.main_process_first():
            loader = task.make_loader(train_records, backbone, cfg, True, cfg.seed, **cache)
            if cache and accelerator.num_processes > 1:  # validation is sharded: fill its part now
                task.make_loader(val_records, backbone, cfg, False, **cache)
        # The previous stage's wrapper (DDP: its gradient hooks) must be gone before the
        # model is wrapped again with this stage's trainable set.
        pmodel = None
        accelerator.free_memory()
        # Prepared first, so its length is this process's batches (what the loop steps over).
        loader = accelerator.prepare(loader)
        steps_per_epoch = max(1, math.ceil(len(loader) / cfg.train.grad_accum))
        total_steps = steps_per_epoch * (stage.end_epoch - stage.start_epoch)
        # Accelerate steps a prepared scheduler once per process, so count in those units.
        n = accelerator.num_processes
        scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.optim.warmup_ratio * total_steps) * n, total_steps * n)
        pmodel, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        if trainer_state is not None:
            # Optimizer and schedule belong to the stage they were saved in; a resume at
            # a stage boundary starts the new stage's fresh ones, as the straight run did.
            if trainer_state["stage"] == stage.index:
                optimizer.load_state_dict(trainer_state["optimizer"])
                scheduler.load_state_dict(trainer_state["scheduler"])
            if state["epoch_batches"]:
                # Saved after a step inside an epoch: restored once the epoch's iterator
                # exists (creating it may draw from the RNG, as it did in the saved run).
                pending_rng = trainer_state["rng"]
            else:
                set_rng_state(trainer_state["rng"])
            trainer_state = None
        # Resumed inside a stage: its line is already in the (truncated) history.
        if state["epoch"] == stage.start_epoch and not state["epoch_batches"]:
            history.write({"type": "stage", "stage": stage.index, "name": stage.name, "epoch": stage.start_epoch,
                           "step": state["step"], "train": stage.train, "losses": sorted(stage.losses),
                           "trainable": trainable, "total": total,
                           "cache": {k: str(v) if isinstance(v, Path) else v for k, v in cache.items()}})
        params = [p for g in groups for p in g["params"]]
        terms_logged = sorted(stage.losses)

        for epoch in range(max(stage.start_epoch, state["epoch"]), stage.end_epoch):
            loader.set_epoch(epoch)
            # A mid-epoch checkpoint: the seedable sampler gives this epoch's order again;
            # skip the batches already trained.
            skip = state["epoch_batches"]
            epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
            model.train()
            model.backbone.eval()  # the backbone's own dropout stays off; trained blocks still get gradients
            running: dict[str, float] = dict(state["running"]) if skip else {}
            n_running = state["n_running"] if skip else 0
            bad_window = stop = False
            bar = tqdm(epoch_loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs} [{stage.name}]", initial=skip,
                       total=len(loader), disable=not (cfg.train.progress and main), leave=False)
            t_epoch = time.time()
            for batch in bar:
                if pending_rng is not None:
                    set_rng_state(pending_rng)
                    pending_rng = None
                with accelerator.accumulate(pmodel):
                    terms = pmodel(batch, stage.losses)
                    loss = sum(weights[k] * terms[k] for k in stage.losses if k in terms)
                    # Agreed by all processes, so they skip (or stop at) the same step.
                    bad, stop_now, values = _step_values(loss, terms, terms_logged, stopper.signum, device)
                    bad_window, stop = bad_window or bad, stop or stop_now
                    accelerator.backward(loss)  # also when bad: DDP expects every process's backward
                    skip_update = accelerator.sync_gradients and bad_window
                    if accelerator.sync_gradients and cfg.optim.grad_clip > 0 and not skip_update:
                        accelerator.clip_grad_norm_(params, cfg.optim.grad_clip)
                    if not skip_update:
                        optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()  # at the end of a bad window this drops its NaN gradients
                if not bad:
                    for k, v in values.items():
                        running[k] = running.get(k, 0.0) + v
                    n_running += 1
                state["samples"] += len(batch["input_ids"]) * accelerator.num_processes
                state["epoch_batches"] += 1
                if accelerator.sync_gradients:
                    state["step"] += 1
                    if bad_window:
                        state["bad_steps"] += 1
                        state["bad_in_row"] += 1
                        if main:
                            log.warning("step %d: loss is not finite; step skipped (%d in a row)",
                                        state["step"], state["bad_in_row"])
                    else:
                        state["bad_in_row"] = 0
                    bad_window = False
                    bar.set_postfix(loss=f"{values['loss']:.3f}")
                    if state["step"] % cfg.train.log_every == 0:
                        rec = {"type": "step", "epoch": epoch, "step": state["step"], "stage": stage.index}
                        rec.update({k if k.startswith("diag/") or k == "loss" else f"loss/{k}": v / n_running
                                    for k, v in running.items()})
                        rec.update({f"lr/{g['name']}": g["lr"] for g in optimizer.param_groups})
                        if state["bad_steps"]:
                            rec["bad_steps"] = state["bad_steps"]
                        history.write(rec)
                        running, n_running = {}, 0
                    diverged = state["bad_in_row"] >= cfg.train.max_bad_steps
                    if stop or diverged:
                        state.update(running=running, n_running=n_running, history_lines=len(history.lines),
                                     wall_s=time.time() - t_start)
                        state["train_wall_s"] += time.time() - t_epoch
                        if main:
                            _save(ckpt_dir / "last", model, saved_names, cfg, state, backbone, optimizer, scheduler,
                                  stage.index, cfg.train.keep_last)
                        accelerator.wait_for_everyone()
                        where = f"epoch {epoch + 1}, step {state['step']}"
                        if diverged:
                            raise Diverged(
                                f"loss was NaN or infinite for {state['bad_in_row']} steps in a row ({where}; "
                                f"{state['bad_steps']} in all); stopped with a checkpoint in {ckpt_dir / 'last'} holding "
                                f"the weights from before them. Lower optim.lr, set optim.grad_clip, or check the data")
                        raise Interrupted(_interrupted_message(stopper.signum or signal.SIGTERM, where, ckpt_dir, out),
                                          stopper.signum or signal.SIGTERM)
            if pending_rng is not None:  # the checkpoint was taken after the epoch's last batch
                set_rng_state(pending_rng)
                pending_rng = None
            state.update(epoch_batches=0, running={}, n_running=0)

            # Training time alone (no validation), for samples per second.
            state["train_wall_s"] += time.time() - t_epoch
            val = task.validation()(model, val_records, cfg, device, None, False, **cache)
            last_val = val
            value = float(val.get(es.metric, float("nan")))
            if es.metric not in val:
                raise ConfigError(f"train.early_stopping.metric: '{es.metric}' is not among the validation metrics "
                                  f"({', '.join(k for k in sorted(val) if not k.startswith('retrieval/chance'))})")
            improved = _is_better(value, state["best"], es.mode, es.min_delta)
            if improved:
                state.update(best=value, best_epoch=epoch, bad_evals=0)
            else:
                state["bad_evals"] += 1
            state["epoch"] = epoch + 1
            state["wall_s"] = time.time() - t_start
            if main:
                rec = {"type": "epoch", "epoch": epoch, "step": state["step"], "stage": stage.index,
                       "samples": state["samples"], "train_wall_s": round(state["train_wall_s"], 3),
                       "wall_s": round(state["wall_s"], 3), "peak_mem_mb": round(peak_memory_mb(device), 1)}
                rec.update({f"val/{k}": v for k, v in val.items() if not isinstance(v, list)})
                history.write(rec)
                log.info("epoch %d: %s = %.3f%s", epoch + 1, es.metric, value, " (best)" if improved else "")
            stop = es.patience > 0 and state["bad_evals"] >= es.patience
            # A new stage gets a fresh patience: its first epochs often dip before they help.
            if stop and epoch + 1 < stage.end_epoch:
                state["stopped_early"] = True
            state["history_lines"] = len(history.lines)
            if main:
                # A kill between these two leaves `best` behind `last`; a resume repairs it
                # (_repair_best).
                _save(ckpt_dir / "last", model, saved_names, cfg, state, backbone, optimizer, scheduler, stage.index,
                      cfg.train.keep_last)
                if improved:
                    copy_checkpoint(ckpt_dir / "last", ckpt_dir / "best")
            accelerator.wait_for_everyone()
            # A signal during the last steps or the validation: the epoch's checkpoint is it.
            if _step_values(torch.zeros(()), {}, [], stopper.signum, device)[1]:
                raise Interrupted(_interrupted_message(stopper.signum or signal.SIGTERM, f"end of epoch {epoch + 1}",
                                                       ckpt_dir, out), stopper.signum or signal.SIGTERM)
            if state["stopped_early"]:
                if main:
                    log.info("early stopping: no improvement of %s for %d evaluations", es.metric, es.patience)
                break
        state["bad_evals"] = 0

    stopper.restore()  # from here on a signal stops at once; --resume redoes only the final evaluation
    accelerator.wait_for_everyone()
    # Final evaluation on the test split, with the best weights.
    best = ckpt_dir / "best" if (ckpt_dir / "best").exists() else ckpt_dir / "last"
    load_weights(model, open_checkpoint(best).weights(), best)
    test_records = task.read_split(paths["test"], cfg)
    metrics = task.evaluate(model, test_records, cfg, device, train_records, cfg.train.progress and main)
    _, total = count_parameters(model)
    metrics.update({
        "train/epochs": state["epoch"],
        "train/best_epoch": state["best_epoch"],
        "train/best_val": state["best"],
        "train/stopped_early": state["stopped_early"],
        "train/steps": state["step"],
        "train/bad_steps": state["bad_steps"],
        "train/wall_s": round(state["wall_s"], 3),
        "train/train_wall_s": round(state["train_wall_s"], 3),
        "train/samples": state["samples"],
        "train/samples_per_s": round(state["samples"] / max(state["train_wall_s"], 1e-9), 2),
        "train/peak_mem_mb": round(peak_memory_mb(device), 1),
        "params/trainable": state["max_trainable"],
        "params/total": total,
        "checkpoint": str(best),
    })
    if last_val:
        metrics["train/last_val"] = float(last_val.get(es.metric, float("nan")))
    if main:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        if tracker:
            accelerator.log(_numeric(metrics, "test/"), step=state["step"])
            accelerator.end_training()
    return metrics


def _cache_kwargs(cfg: Config, task: TaskSpec, stage: Any, out: Path) -> dict[str, Any]:
    """Where a stage may read frozen features from the cache: the vision tower's while
    no vision component trains, the language model's while it does not train."""
    if not (cfg.cache.enabled and task.cacheable):
        return {}
    vision = not ({"vision_blocks", "vision_tower"} & set(stage.train))
    text = "language_model" not in stage.train
    if not (vision or text):
        return {}
    return {"cache_dir": Path(cfg.cache.dir) if cfg.cache.dir else out / "cache", "cache_vision": vision, "cache_text": text}


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


def _repair_best(last: Any, best: Path) -> None:
    """``best`` is copied from ``last`` after it is saved; a kill in between leaves
    ``best`` one improvement behind, which ``last``'s state reveals: copy it again."""
    st = last.state
    if st.get("epoch_batches") or st.get("best_epoch") is None or st["best_epoch"] != st["epoch"] - 1:
        return
    try:
        best_epoch = json.loads((best / "state.json").read_text()).get("epoch")
    except (OSError, json.JSONDecodeError):
        best_epoch = None
    if best_epoch != st["epoch"]:
        log.info("copying %s to %s: the run stopped before it was copied", last.folder, best)
        copy_checkpoint(last.folder, best)


def _save(folder: Path, model: torch.nn.Module, names: set[str], cfg: Config, state: dict[str, Any],
          backbone: Backbone, optimizer: Any, scheduler: Any, stage_index: int, keep: int = 1) -> None:
    sd = model.state_dict()
    weights = {k: sd[k] for k in sorted(names)}
    trainer_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
                     "stage": stage_index}
    save_checkpoint(folder, weights=weights, cfg=cfg, state=state, trainer_state=trainer_state,
                    backbone=backbone if backbone.source == "tiny" else None, keep=keep)


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
