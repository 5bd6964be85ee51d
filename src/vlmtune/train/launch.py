"""What the launcher and the hardware decide: the Accelerator and its settings, the run
folder's lock (held by the main process for all), the trackers, FSDP sharding (and
the refusal of DeepSpeed, which no run here has backed), how a stage's parts are prepared, the whole tensors a checkpoint
saves, PyTorch's thread count and peak memory.

Every function here takes plain values (config, accelerator, model), never the loop's
holders, so the loop (``vlmtune.train.loop``) reads as a list of calls into it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import resource
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, DistributedType
from torch import nn

from vlmtune.config import Config, config_to_dict
from vlmtune.errors import ConfigError
from vlmtune.fsdp import (
    FsdpSettings,
    fsdp_settings,
    full_optimizer_state,
    full_tensors,
    is_sharded,
    launcher_wants_fsdp,
    shard_model,
)
from vlmtune.runfolder import LOCK_NAME, RunLock, make_folder, prepare_run_folder
from vlmtune.state import TrainState
from vlmtune.utils import flatten, usable_cores

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
        refuse_deepspeed()
    return accelerator


def _make_accelerator(
    cfg: Config, tracker: str | None, project_dir: Path | None, mp: str | None, cpu_processes: bool
) -> Accelerator:
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


# --------------------------------------------------------------------------- the run folder


@contextlib.contextmanager
def locked_run_folder(
    out: Path, resume: bool, overwrite: bool, sources: dict[str, str | Path | None] | None = None
) -> Iterator[None]:
    """The run folder checked (a folder holding a run needs ``resume`` or ``overwrite``;
    --overwrite never removes one of ``sources``, what the run reads) and locked for the
    whole run, by the main process of a distributed run (RANK 0, before the Accelerator
    exists) for all."""
    lock = None
    try:
        if os.environ.get("RANK", "0") == "0":
            lock_file = out / LOCK_NAME
            if lock_file.exists() or lock_file.is_symlink():  # a run was here: is it still running?
                lock = RunLock(out).acquire()
            if out.is_dir():  # a refused folder is left as it is: checked before a lock file is made
                prepare_run_folder(out, resume=resume, overwrite=overwrite, check_only=True, sources=sources)
            make_folder(out)
            lock = lock or RunLock(out).acquire()
            # Again, under the lock: another process may have written meanwhile.
            prepare_run_folder(out, resume=resume, overwrite=overwrite, sources=sources)
        yield
    finally:
        if lock is not None:
            lock.release()


# --------------------------------------------------------------------------- trackers


def start_tracker(accelerator: Accelerator, tracker: str, cfg: Config, out: Path) -> None:
    """Accelerate's own tracker; every history record is mirrored to it."""
    if tracker == "wandb" and "WANDB_MODE" not in os.environ and "WANDB_API_KEY" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"
        log.info("wandb: no WANDB_API_KEY, logging offline into %s/wandb (wandb sync uploads it later)", out)
    flat = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in flatten(config_to_dict(cfg)).items()}
    try:
        accelerator.init_trackers(tracker, config=flat, init_kwargs={"wandb": {"dir": str(out), "name": out.name}})
    except (ImportError, ModuleNotFoundError) as e:
        raise ConfigError(f"--tracker {tracker}: {e}; install it with pip install 'vlmtune[{tracker}]'") from None


def numeric(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a history record or of the final metrics, as a tracker logs them."""
    return {
        prefix + k: float(v)
        for k, v in record.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "type")
    }


def tracker_sink(accelerator: Accelerator) -> Callable[[dict[str, Any]], None]:
    """History's mirror to the tracker. Step lines carry loss/*, lr/*, diag/*; epoch lines
    val/*, wall time, peak memory, samples; stage lines the stage index and trainable count."""
    return lambda rec: accelerator.log(numeric(rec), step=rec["step"])


# --------------------------------------------------------------------------- many processes: FSDP


def shard_once(cfg: Config, model: nn.Module, accelerator: Accelerator) -> None:
    """FSDP (train.fsdp.enabled or an Accelerate config with FSDP): shard the model by
    transformer block, once; later stages reuse the sharding. With one process there is
    nothing to shard and the run trains the plain model (logged)."""
    settings = fsdp_settings(cfg)
    if settings is None or is_sharded(model):
        return
    if accelerator.num_processes == 1 or not torch.distributed.is_initialized():
        if accelerator.is_main_process:
            log.info("FSDP (%s): one process, nothing to shard; the model trains whole", settings.source)
        return
    shard_model(model, dataclasses.replace(settings, mixed_precision=accelerator.mixed_precision))


def refuse_deepspeed() -> None:
    """DeepSpeed is not supported: no run of it has succeeded in this project's tests
    (ZeRO-2/3 against DDP per step), so a launch under it stops before any work."""
    raise ConfigError(
        "accelerate config: DeepSpeed is not supported by vlmtune (no tested run backs it); launch with DDP "
        "(configs/accelerate/ddp.yaml) or FSDP (configs/accelerate/fsdp.yaml, train.fsdp.enabled=true)"
    )


def prepare_stage(
    accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any, make_scheduler: Any
) -> tuple[Any, Any, Any, Any]:
    """(model, optimizer, scheduler, loader) prepared for this stage, in the order the
    accelerator's distributed type needs. ``make_scheduler(batches)`` builds the stage's
    schedule from this process's batches per epoch.

    - FSDP (the model already sharded by :func:`shard_once`): the loader, then optimizer
      and scheduler; the model is not wrapped again.
    - DDP and one process: the loader first (its prepared length is this process's
      batches), then model, optimizer and scheduler.
    """
    loader = accelerator.prepare(loader)
    scheduler = make_scheduler(len(loader))
    if is_sharded(model):
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
        return model, optimizer, scheduler, loader
    pmodel, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return pmodel, optimizer, scheduler, loader


def saves_collectively(accelerator: Accelerator, model: nn.Module) -> bool:
    """Whether making a checkpoint's tensors whole needs every process (FSDP)."""
    return is_sharded(model)


def trainer_tensors(
    accelerator: Accelerator, model: nn.Module, pmodel: Any, optimizer: Any, names: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The checkpoint's trained tensors (``names``) and optimizer state, whole (a
    one-process run's format whatever the launch). FSDP: gathered from the shards
    (collective)."""
    if is_sharded(model):
        return full_tensors(model, names), full_optimizer_state(optimizer.state_dict())
    sd = model.state_dict()
    return {k: sd[k] for k in names}, optimizer.state_dict()


# --------------------------------------------------------------------------- threads and memory


def default_threads() -> tuple[int, str]:
    """The CPU threads a run uses when ``train.num_threads`` is null or 0, and why:
    ``OMP_NUM_THREADS`` when the environment sets it, else the cores this process may run on (``os.sched_getaffinity``), or one thread when the
    1-minute load average already exceeds them (more threads on a shared CPU spin and
    wait for each other: a run then takes many times longer, not less)."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:  # the environment asked
        return int(omp), f"OMP_NUM_THREADS={omp}"
    cores = usable_cores()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > cores:
        return 1, f"load average {load:.1f} exceeds the {cores} cores this process may use"
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))  # processes sharing this machine's cores
    if local > 1:
        return max(1, cores // local), f"the {cores} cores this process may use, shared by {local} processes"
    return cores, f"the {cores} cores this process may use"


def keep_threads(state: TrainState, asked: int | None, resumed: bool) -> None:
    """A resumed run computes with the thread count it started with (the order of a
    float sum depends on it, so a resume is bit-identical only then): without
    ``train.num_threads``, the count saved in the checkpoint, said in one line."""
    saved = state.num_threads
    if resumed and not asked and saved and saved != torch.get_num_threads():
        log.info("train.num_threads: %d CPU thread%s, as the run used before it was resumed", saved, "s" * (saved != 1))
        torch.set_num_threads(saved)
    state.num_threads = torch.get_num_threads()


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads`` for the run, the previous count restored afterwards:
    ``n`` (``train.num_threads``), or when None or 0 the shared-machine default of
    :func:`default_threads`, said in one line."""
    before = torch.get_num_threads()
    if n:
        log.info("train.num_threads: PyTorch uses %d CPU thread%s (default here: %d)", n, "s" * (n != 1), before)
    else:
        n, why = default_threads()
        log.info("train.num_threads: %d CPU thread%s (%s; set train.num_threads to choose)", n, "s" * (n != 1), why)
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
