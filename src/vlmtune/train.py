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
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
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
from vlmtune.errors import ConfigError
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
    return Accelerator(
        mixed_precision=mp,
        gradient_accumulation_steps=cfg.train.grad_accum,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
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
    the lines the checkpoint had seen, so no line is written twice."""

    def __init__(self, path: Path, keep_lines: int | None, sink: Any = None):
        self.path = path
        self.sink = sink  # e.g. a tracker: sink(record) for every new record
        lines = path.read_text().splitlines() if keep_lines and path.exists() else []
        self.lines = lines[:keep_lines] if keep_lines else []
        path.write_text("".join(ln + "\n" for ln in self.lines))

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record)
        self.lines.append(line)
        with self.path.open("a") as f:
            f.write(line + "\n")
        if self.sink is not None:
            self.sink(record)


def train(cfg: Config, output_dir: str | Path, resume: bool = False, tracker: str | None = None) -> dict[str, Any]:
    """Train ``cfg`` into ``output_dir``; returns the final test metrics.

    ``tracker``: also log to "wandb" or "tensorboard" (through Accelerate) besides
    history.jsonl.
    """
    out = Path(output_dir)
    ckpt_dir = out / "checkpoints"
    accelerator = make_accelerator(cfg, tracker, out)
    main = accelerator.is_main_process
    task: TaskSpec = get_task(cfg.task)

    resume_from = None
    if resume:
        resume_from = open_checkpoint(ckpt_dir / "last")
        saved, now = config_to_dict(resume_from.cfg), config_to_dict(cfg)
        if saved != now:
            key = _first_difference(saved, now)
            raise ConfigError(f"{key}: differs from the config of the run being resumed ({resume_from.folder})")
    elif (ckpt_dir / "last").exists():
        raise ConfigError(f"{out}: already holds a run; pass --resume to continue it or choose another --output-dir")

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
    }
    trainer_state = None
    if resume_from is not None:
        check_identity(resume_from, backbone.identity())
        load_weights(model, resume_from.weights(), resume_from.folder)
        state.update({k: v for k, v in resume_from.state.items() if k in state and k not in ("backbone", "data_paths")})
        trainer_state = resume_from.trainer_state()
        log.info("resuming from %s at epoch %d", resume_from.folder, state["epoch"])
    if main:
        save_config(cfg, out / "config.yaml")
    sink = None
    if tracker and main:
        _start_tracker(accelerator, tracker, cfg, out)
        # Step lines carry loss/*, lr/*, diag/*; epoch lines val/*, wall time, peak
        # memory, samples; stage lines the stage index and trainable count.
        sink = lambda rec: accelerator.log(_numeric(rec), step=rec["step"])  # noqa: E731
    history = History(out / "history.jsonl", state["history_lines"] if resume_from else None, sink)
    model.to(device)
    t_start = time.time() - state["wall_s"]
    last_val: dict[str, Any] = {}

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
        loader = task.make_loader(train_records, backbone, cfg, True, cfg.seed, **cache)
        steps_per_epoch = max(1, math.ceil(len(loader) / (cfg.train.grad_accum * accelerator.num_processes)))
        total_steps = steps_per_epoch * (stage.end_epoch - stage.start_epoch)
        # Accelerate steps a prepared scheduler once per process, so count in those units.
        n = accelerator.num_processes
        scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.optim.warmup_ratio * total_steps) * n, total_steps * n)
        accelerator.free_memory()
        pmodel, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
        if trainer_state is not None:
            # Optimizer and schedule belong to the stage they were saved in; a resume at
            # a stage boundary starts the new stage's fresh ones, as the straight run did.
            if trainer_state["stage"] == stage.index:
                optimizer.load_state_dict(trainer_state["optimizer"])
                scheduler.load_state_dict(trainer_state["scheduler"])
            set_rng_state(trainer_state["rng"])
            trainer_state = None
        history.write({"type": "stage", "stage": stage.index, "name": stage.name, "epoch": max(stage.start_epoch, state["epoch"]),
                       "step": state["step"], "train": stage.train, "losses": sorted(stage.losses),
                       "trainable": trainable, "total": total,
                       "cache": {k: str(v) if isinstance(v, Path) else v for k, v in cache.items()}})
        params = [p for g in groups for p in g["params"]]

        for epoch in range(max(stage.start_epoch, state["epoch"]), stage.end_epoch):
            loader.set_epoch(epoch)
            model.train()
            running: dict[str, float] = {}
            n_running = 0
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs} [{stage.name}]",
                       disable=not (cfg.train.progress and main), leave=False)
            t_epoch = time.time()
            for batch in bar:
                with accelerator.accumulate(pmodel):
                    terms = pmodel(batch, stage.losses)
                    loss = sum(weights[k] * terms[k] for k in stage.losses if k in terms)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.optim.grad_clip > 0:
                        accelerator.clip_grad_norm_(params, cfg.optim.grad_clip)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                for k, v in terms.items():
                    running[k] = running.get(k, 0.0) + float(v.detach())
                running["loss"] = running.get("loss", 0.0) + float(loss.detach())
                state["samples"] += len(batch["input_ids"]) * accelerator.num_processes
                n_running += 1
                if accelerator.sync_gradients:
                    state["step"] += 1
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
                    if state["step"] % cfg.train.log_every == 0 and main:
                        rec = {"type": "step", "epoch": epoch, "step": state["step"], "stage": stage.index}
                        rec.update({k if k.startswith("diag/") or k == "loss" else f"loss/{k}": v / n_running for k, v in running.items()})
                        rec.update({f"lr/{g['name']}": g["lr"] for g in optimizer.param_groups})
                        history.write(rec)
                        running, n_running = {}, 0

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
                _save(ckpt_dir / "last", model, saved_names, cfg, state, backbone, optimizer, scheduler, stage.index)
                if improved:
                    copy_checkpoint(ckpt_dir / "last", ckpt_dir / "best")
            accelerator.wait_for_everyone()
            if state["stopped_early"]:
                if main:
                    log.info("early stopping: no improvement of %s for %d evaluations", es.metric, es.patience)
                break
        state["bad_evals"] = 0

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


def _save(folder: Path, model: torch.nn.Module, names: set[str], cfg: Config, state: dict[str, Any],
          backbone: Backbone, optimizer: Any, scheduler: Any, stage_index: int) -> None:
    sd = model.state_dict()
    weights = {k: sd[k] for k in sorted(names)}
    trainer_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
                     "stage": stage_index}
    save_checkpoint(folder, weights=weights, cfg=cfg, state=state, trainer_state=trainer_state,
                    backbone=backbone if backbone.source == "tiny" else None)


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
