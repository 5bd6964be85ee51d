"""``vlmtune bench``: where users wait, measured side by side in one run.

Sections (each writes into ``bench.json`` and a row block of ``bench.md``):

training   frozen-backbone training of the retrieval recipe on the chosen preset, the
           same data and config with the feature cache and without it: the time of one
           feature-extraction pass over the training set (the physical floor of any
           epoch that needs the towers), the time of each epoch, and the ratios
           ``cached total / extraction pass`` and ``uncached epoch / cached epoch``.
loader     dataloader throughput (decode + preprocess + tokenize), items/s.
eval       retrieval evaluation of N images x M captions (random unit vectors) against
           one bare matrix product of the same sizes, time and peak memory, each in a
           fresh subprocess so the peak is clean.
gpu        where CUDA is present: images/s of bf16 feature extraction and the fraction
           of the device's measured peak bf16 matmul throughput it reaches.
stages     the two-stage retrieval recipe's steps, side by side on one model: (a) a
           stage-1 step from the frozen-feature cache, with the stage's own losses and
           with stage 2's four (the fair baseline), (b) a stage-2 step (the last N
           vision blocks train) from the cached frozen prefix, (c) the same stage-2 step
           with the vision tower run live (no vision cache, as before the prefix cache);
           medians over several steps after a warm-up, ratios b/a and c/b. Then (d) the
           two-stage recipe's wall time against the single-stage one's
           (retrieval_two_stage.yaml vs retrieval_single_stage.yaml at --images and
           --epochs, early stopping as the recipes set it), and the ratio.
fsdp       peak memory per process of a short training run (last vision block, adapters
           and heads train) under DDP and under FSDP, 2 processes by torchrun: on GPUs
           (torch.cuda.max_memory_allocated) when 2 are present, otherwise CPU processes
           on gloo (ru_maxrss, plus the resident memory held at the end).
counting   the counting recipe's stage 1 (vision tower frozen) on synthetic receipts
           with the vision cache and without it: the first epoch (which builds the
           cache) and the later epochs apart, and ``cached / uncached`` of the later ones.
search     ``vlmtune search``'s exact search over N stored embeddings (random unit
           vectors, D=256, saved and opened as an index folder): milliseconds per
           single text query (its embedding given), median and 95th percentile, and
           the index's load time.
negatives  stage-1 training steps from the cache at the plain batch (--batch-size) and
           at contrastive batches of 1,024 and 4,096 pairs (model.contrastive_batch,
           in chunks of --batch-size): seconds per step and per pair, the per-pair cost
           against the plain step, GradCache against keeping every chunk's graph at
           1,024 pairs, and the peak memory of one 4,096-pair step with and without
           GradCache, each in a fresh process; and whole one-stage runs from the
           cache: epochs that refresh their mined negatives against epochs that keep
           the first epoch's lists (target <= 1.3) and against in-batch negatives
           only (vlmtune.benchnegatives).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vlmtune.benchtiming import spread


def _machine() -> dict[str, Any]:
    import os

    info = {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# --------------------------------------------------------------------------- training


def _bench_data(out: Path, images: int, name: str = "data", image_size: int | None = None) -> Path:
    """The synthetic scenes set of ``images`` images the sections train on (96 px, or
    ``image_size`` in ``out/name_SIZE``), generated once (and reused while it is
    vlmtune's complete generation)."""
    from vlmtune.data.scenes import generate_scenes
    from vlmtune.runfolder import check_synthetic_dir

    data = out / (f"{name}_{image_size}" if image_size else name)
    if check_synthetic_dir(data, ("train.json", "val.json", "test.json")):
        generate_scenes(data, n=images, seed=0, image_size=image_size or 96, overwrite=True)
    return data


def _run_overrides(preset: str, data: Path, images: int, batch_size: int, progress: bool) -> list[str]:
    """The overrides every timed run of a section shares: preset, data set, batch sizes, quiet logging."""
    return [
        f"backbone.name_or_path={preset}",
        f"data.synthetic_dir={data}",
        f"data.synthetic.n={max(images, 10)}",
        f"train.batch_size={batch_size}",
        f"eval.batch_size={batch_size}",
        f"train.progress={str(progress).lower()}",
        "train.log_every=1000000",
        f"train.num_threads={torch.get_num_threads()}",  # the bench's threads (run_bench sets them)
    ]


def _ks_that_fit(data: Path) -> list[int]:
    """Recall@K for the Ks of 1, 5, 10 that fit the smaller of the val and test galleries
    (eval.ks beyond a gallery is an error; a small benchmark set has few images)."""
    from vlmtune.data.formats import read_pairs

    gallery = min(
        min(len({r.image_id for r in recs}), len(recs))
        for recs in (read_pairs(data / "val.json"), read_pairs(data / "test.json"))
    )
    return [k for k in (1, 5, 10) if k <= gallery] or [1]


def bench_training(
    preset: str,
    images: int,
    epochs: int,
    uncached_epochs: int,
    batch_size: int,
    out: Path,
    progress: bool = False,
    rounds: int = 3,
) -> dict[str, Any]:
    """Frozen-backbone training with and without the cache, same data, same config,
    the two runs interleaved in ``rounds``."""
    from vlmtune.benchtiming import Variant, interleave, timing_row
    from vlmtune.config import load_config
    from vlmtune.data.formats import read_pairs
    from vlmtune.train import train

    data = _bench_data(out, images)
    base = [
        *_run_overrides(preset, data, images, batch_size, progress),
        "stages=[{name: frozen, start_epoch: 0, train: {adapters: 1.0, heads: 1.0}}]",
        f"eval.ks={_ks_that_fit(data)}",
    ]
    res: dict[str, Any] = {"preset": preset, "images": images, "captions": len(read_pairs(data / "train.json"))}
    res["extraction_pass_s"] = _extraction_pass(base, epochs, data, out)

    # Warm-up (first backward, allocator, threads) so neither timed run pays it.
    shutil.rmtree(out / "run_warmup", ignore_errors=True)
    train(load_config(None, [*base, "train.epochs=1", "cache.enabled=false"]), out / "run_warmup")
    runs = {"cached": (epochs, True), "uncached": (uncached_epochs, False)}

    def variant(name: str, n_epochs: int, cached: bool) -> Variant:
        return Variant(name, lambda: _timed_training_run(base, name, n_epochs, cached, out))

    timings = interleave([variant(name, n, c) for name, (n, c) in runs.items()], rounds)
    for name, t in timings.items():  # the round of median run time, and the spread over rounds
        mid = sorted(t.extra, key=lambda x: x["run_total_s"])[(len(t.extra) - 1) // 2]
        res[name] = mid | {"run": timing_row(t)}
    # The cached run's cache is built at its stage start, outside the epoch timer: the
    # same work as the extraction pass measured above, so it is charged at that price.
    cached_epochs = res["cached"]["epoch_train_s"]
    res["cached_total_s"] = res["extraction_pass_s"] + sum(cached_epochs)
    res["ratio_cached_total_to_extraction"] = res["cached_total_s"] / res["extraction_pass_s"]
    later = cached_epochs[1:] or cached_epochs
    res["ratio_uncached_epoch_to_cached_epoch"] = (sum(res["uncached"]["epoch_train_s"]) / uncached_epochs) / (
        sum(later) / len(later)
    )
    return res


def _extraction_pass(base: list[str], epochs: int, data: Path, out: Path) -> float:
    """Seconds of one feature-extraction pass: exactly the work the cache does once (both
    frozen towers over every training image and caption), timed on its own."""
    from vlmtune.backbone import load_backbone
    from vlmtune.config import load_config
    from vlmtune.data.cache import resolve_cache_dtype
    from vlmtune.data.formats import read_pairs
    from vlmtune.evaluate import default_device
    from vlmtune.tasks.retrieval import build_text_cache, build_vision_cache

    cfg = load_config(None, [*base, f"train.epochs={epochs}"])
    device = default_device()
    backbone = load_backbone(cfg.backbone, device_type=device.type).to(device)
    records = read_pairs(data / "train.json")
    shutil.rmtree(out / "extraction_cache", ignore_errors=True)
    t0 = time.perf_counter()
    build_vision_cache(
        records, backbone, out / "extraction_cache", dtype=resolve_cache_dtype(cfg.cache.dtype), batch_size=cfg.eval.batch_size
    )
    build_text_cache(
        records,
        backbone,
        out / "extraction_cache",
        max_tokens=cfg.backbone.max_text_tokens,
        dtype=resolve_cache_dtype(cfg.cache.dtype),
        batch_size=cfg.eval.batch_size,
    )
    return time.perf_counter() - t0


def _timed_training_run(base: list[str], name: str, n_epochs: int, cached: bool, out: Path) -> dict[str, Any]:
    """One timed training run ``out/run_NAME``, with the cache or without it: its epochs'
    training seconds, its total, its samples/s and its stage's cache record."""
    from vlmtune.config import load_config
    from vlmtune.train import train

    run_dir = out / f"run_{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(out / f"cache_{name}", ignore_errors=True)
    cfg = load_config(
        None,
        [*base, f"train.epochs={n_epochs}", f"cache.enabled={str(cached).lower()}", f"cache.dir={out / f'cache_{name}'}"],
    )
    t0 = time.perf_counter()
    train(cfg, run_dir)
    total = time.perf_counter() - t0
    lines = [json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines()]
    cum = [x["train_wall_s"] for x in lines if x["type"] == "epoch"]
    per_epoch = [b - a for a, b in zip([0.0] + cum[:-1], cum)]
    stage = next(x for x in lines if x["type"] == "stage")
    return {
        "epochs": n_epochs,
        "epoch_train_s": [round(x, 3) for x in per_epoch],
        "run_total_s": round(total, 3),
        "samples_per_s": json.loads((run_dir / "metrics.json").read_text())["train/samples_per_s"],
        "cache": stage.get("cache", {}),
    }


# --------------------------------------------------------------------------- stages

RECIPES = ("retrieval_two_stage.yaml", "retrieval_single_stage.yaml")


def recipe_paths(given: list[str] | None = None) -> tuple[Path, Path]:
    """The two-stage and single-stage recipe files: ``given``, or the repository's
    ``configs/`` (beside the source tree, or in the working directory)."""
    from vlmtune.errors import ConfigError

    if given:
        paths = tuple(Path(p) for p in given)
    else:
        folders = [Path(__file__).resolve().parents[2] / "configs", Path.cwd() / "configs"]
        folder = next((f for f in folders if all((f / name).is_file() for name in RECIPES)), folders[-1])
        paths = tuple(folder / name for name in RECIPES)
    for p in paths:
        if not p.is_file():
            raise ConfigError(
                f"--recipes: {p} is not a file (the stages section needs the two-stage and the "
                f"single-stage recipe; pass them as --recipes TWO_STAGE.yaml SINGLE_STAGE.yaml)"
            )
    return paths[0], paths[1]


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def _time_steps(
    model: Any,
    stage: Any,
    loader: Any,
    losses: frozenset[str],
    weights: dict[str, float],
    cfg: Any,
    device: torch.device,
    steps: int,
    warmup: int,
) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds (this process, all its threads) of ``steps`` training steps
    after ``warmup`` (each: next batch from the loader, to the device, forward, weighted
    loss, backward, clip, AdamW step), with the stage's components trainable as the
    training loop sets them. On a CPU shared with other work the CPU time is the
    steadier measure of the step's own cost."""
    from vlmtune.stages import apply_stage

    groups = apply_stage(model, stage, cfg.optim.lr, cfg.optim.weight_decay)
    model.train()
    model.backbone.set_gradient_checkpointing(set(stage.train) if cfg.backbone.gradient_checkpointing else set())
    model.backbone.eval()
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr)
    params = [p for g in groups for p in g["params"]]
    mp = cfg.train.mixed_precision
    bf16 = device.type == "cuda" and mp in ("auto", "bf16") and torch.cuda.is_bf16_supported()
    it, times, cpu = iter(loader), [], []

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(warmup + steps):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            terms = model(batch, losses)
        loss = sum(weights[k] * terms[k].float() for k in sorted(losses) if k in terms)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return times, cpu


def bench_stages(
    preset: str,
    images: int,
    epochs: int,
    batch_size: int,
    out: Path,
    steps: int = 8,
    warmup: int = 2,
    recipes: list[str] | None = None,
    progress: bool = False,
    recipe_runs: bool = True,
    rounds: int = 3,
) -> dict[str, Any]:
    """The two-stage recipe's stage steps (cached, prefix-cached, live) and, with
    ``recipe_runs``, both recipes' wall time."""
    from vlmtune.config import load_config

    two, single = recipe_paths(recipes)
    data = _bench_data(out, images)
    base = [
        *_run_overrides(preset, data, images, batch_size, progress),
        f"eval.ks={_ks_that_fit(data)}",
        f"train.epochs={epochs}",
    ]
    # The model, the backbone and the loaders live in the helper's frame only: they are
    # freed before the recipe runs start.
    res: dict[str, Any] = {"preset": preset, "images": images} | _stage_steps(
        load_config(two, base), two, data, out, batch_size, steps, warmup
    )
    if not recipe_runs:
        return res

    return res | bench_recipe_runs(two, single, base, out, rounds)


def _stage_steps(cfg: Any, two: Path, data: Path, out: Path, batch_size: int, steps: int, warmup: int) -> dict[str, Any]:
    """(a), (b) and (c): the two-stage recipe ``two``'s stage steps on one model, their
    medians and ratios, from ``captions`` on in the stages section's keys."""
    from vlmtune.backbone import load_backbone
    from vlmtune.data.formats import read_pairs
    from vlmtune.evaluate import default_device
    from vlmtune.stages import build_plan
    from vlmtune.tasks.retrieval import RetrievalTask

    task = RetrievalTask.from_config(cfg)
    plan = build_plan(cfg, task.loss_weights())
    (s1, s2), weights = plan[:2], task.loss_weights()
    if "vision_blocks" not in s2.train or "vision_tower" in s2.train:
        raise ValueError(f"{two}: its second stage does not train the last vision blocks alone")
    device = default_device()
    backbone = load_backbone(cfg.backbone, device_type=device.type).to(device)
    model = task.build_model(backbone).to(device)
    records = read_pairs(data / "train.json")
    n_blocks = backbone.info.num_vision_blocks
    start = n_blocks - s2.vision_blocks
    frozen, prefix, live, frozen_build_s, prefix_build_s = _stage_loaders(task, records, backbone, out / "stages_cache", start)
    variants = {
        "a_stage1_cached": (s1, frozen, s1.losses),
        "a_stage1_cached_stage2_losses": (s1, frozen, s2.losses),
        "b_stage2_prefix_cached": (s2, prefix, s2.losses),
        "c_stage2_live": (s2, live, s2.losses),
    }
    # Two rounds, each variant in turn: a machine whose load drifts biases none of them.
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(2):
        for name, (stage, loader, losses) in variants.items():
            wall, c = _time_steps(model, stage, loader, losses, weights, cfg, device, steps, warmup)
            times[name] += wall
            cpu[name] += c
    res: dict[str, Any] = {
        "captions": len(records),
        "batch_size": batch_size,
        "device": str(device),
        "vision_blocks": n_blocks,
        "trained_blocks": s2.vision_blocks,
        "prefix_start": start,
        "stage1_losses": sorted(s1.losses),
        "stage2_losses": sorted(s2.losses),
        "steps": 2 * steps,
        "warmup": warmup,
        "frozen_cache_build_s": frozen_build_s,
        "prefix_cache_build_s": prefix_build_s,
        "step_s": {k: _median(v) for k, v in times.items()},
        "step_cpu_s": {k: _median(v) for k, v in cpu.items()},
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
    }
    return res | _step_ratios(res["step_s"], res["step_cpu_s"])


def _stage_loaders(
    task: Any, records: list[Any], backbone: Any, cache_dir: Path, start: int
) -> tuple[Any, Any, Any, float, float]:
    """The training loaders from the frozen towers' cache, from the prefix cache (the state
    entering vision block ``start``) and with the vision tower live, in a fresh
    ``cache_dir``, and the seconds the two caches took to build."""
    from vlmtune.tasks import FeatureCache

    shutil.rmtree(cache_dir, ignore_errors=True)
    t0 = time.perf_counter()
    frozen = task.make_loader(records, backbone, train=True, seed=0, cache=FeatureCache(cache_dir))
    frozen_build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    prefix = task.make_loader(records, backbone, train=True, seed=0, cache=FeatureCache(cache_dir, vision_start=start))
    prefix_build_s = time.perf_counter() - t0
    live = task.make_loader(records, backbone, train=True, seed=0, cache=FeatureCache(cache_dir, vision=False))
    return frozen, prefix, live, frozen_build_s, prefix_build_s


def _step_ratios(st: dict[str, float], sc: dict[str, float]) -> dict[str, float]:
    """The ratios b/a, b/a' (same losses) and c/b of the median step times, wall then CPU."""
    return {
        "ratio_b_to_a": st["b_stage2_prefix_cached"] / st["a_stage1_cached"],
        "ratio_b_to_a_same_losses": st["b_stage2_prefix_cached"] / st["a_stage1_cached_stage2_losses"],
        "ratio_c_to_b": st["c_stage2_live"] / st["b_stage2_prefix_cached"],
        "cpu_ratio_b_to_a": sc["b_stage2_prefix_cached"] / sc["a_stage1_cached"],
        "cpu_ratio_b_to_a_same_losses": sc["b_stage2_prefix_cached"] / sc["a_stage1_cached_stage2_losses"],
        "cpu_ratio_c_to_b": sc["c_stage2_live"] / sc["b_stage2_prefix_cached"],
    }


# --------------------------------------------------------------------------- counting

# Stage 1 of configs/receipts_three_stage.yaml (the vision tower frozen; projector,
# language model and count head train) with the recipe's settings, as overrides: the
# config files are not part of the installed package. tests/test_bench.py checks they
# still say what the recipe says.
COUNTING_STAGE1 = [
    "task=counting",
    "model.head_hidden=128",
    "model.adapter_dropout=0.1",
    "counting.max_count=3",
    "counting.buckets=null",
    "counting.max_dynamic_patch=4",
    "counting.pooling=image",
    "counting.lm_mode=full",
    "counting.question_max_tokens=32",
    "counting.answer_max_tokens=24",
    "loss.lm=1.0",
    "loss.count=1.0",
    "generation.max_new_tokens=12",
    "generation.num_beams=3",
    "generation.val_num_images=8",
    "generation.val_do_sample=true",
    "generation.val_top_p=0.9",
    "generation.val_temperature=0.7",
    "stages=[{name: frozen_vision, start_epoch: 0, train: {count_head: 1.0, mm_projector: 1.0, language_model: 1.0}}]",
    "optim.lr=2.0e-3",
    "optim.weight_decay=0.01",
    "optim.warmup_ratio=0.1",
    "optim.grad_clip=1.0",
    "train.early_stopping.metric=count/accuracy",
    "train.early_stopping.mode=max",
    "train.early_stopping.patience=0",
]


def bench_recipe_runs(two: Path, single: Path, base: list[str], out: Path, rounds: int = 3) -> dict[str, Any]:
    """(d) The recipes as shipped, at this size, interleaved in ``rounds`` (two single,
    single two, ...): the cache of each built inside its run (the prefix cache of the
    two-stage recipe's second stage included: work the recipe does); medians and spread,
    and the ratio judged on the rounds' pairs (:func:`~vlmtune.benchtiming.paired_ratio`)."""
    from vlmtune.benchtiming import Variant, interleave, paired_ratio, ratio, round_ratios, timing_row
    from vlmtune.config import load_config
    from vlmtune.train import train

    def variant(name: str, path: Path) -> Variant:
        def run() -> dict[str, Any]:
            run_dir = out / f"run_{name}"
            shutil.rmtree(run_dir, ignore_errors=True)
            train(load_config(path, base), run_dir)
            metrics = json.loads((run_dir / "metrics.json").read_text())
            lines = [json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines()]
            return {
                "epochs": metrics["train/epochs"],
                "train_wall_s": metrics["train/train_wall_s"],
                "mean_recall": metrics.get("retrieval/mean_recall"),
                "stages": [x.get("cache", {}) for x in lines if x["type"] == "stage"],
            }

        return Variant(name, run)

    timings = interleave([variant("two_stage", two), variant("single_stage", single)], rounds)
    recipes_res = {
        name: {"config": str(path), **timing_row(timings[name]), **timings[name].extra[-1]}
        for name, path in (("two_stage", two), ("single_stage", single))
    }
    return {
        "recipes": recipes_res,
        "ratio_two_stage_to_single_stage": paired_ratio(timings, "two_stage", "single_stage"),
        "cpu_ratio_two_stage_to_single_stage": paired_ratio(timings, "two_stage", "single_stage", "cpu"),
        "round_ratios_two_stage_to_single_stage": [round(x, 3) for x in round_ratios(timings, "two_stage", "single_stage")],
        "round_cpu_ratios_two_stage_to_single_stage": [
            round(x, 3) for x in round_ratios(timings, "two_stage", "single_stage", "cpu")
        ],
        "ratio_of_medians_two_stage_to_single_stage": ratio(timings, "two_stage", "single_stage"),
    }


def _epoch_times(run_dir: Path) -> tuple[list[float], list[float]]:
    """Per-epoch wall seconds (training + validation; the first includes the stage's
    start, where the cache is built) and training seconds, from history.jsonl."""
    lines = [json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines()]
    epochs = [x for x in lines if x["type"] == "epoch"]
    wall = [x["wall_s"] for x in epochs]
    train = [x["train_wall_s"] for x in epochs]
    return (
        [round(b - a, 3) for a, b in zip([0.0] + wall[:-1], wall)],
        [round(b - a, 3) for a, b in zip([0.0] + train[:-1], train)],
    )


def _later(times: list[float]) -> float:
    """Mean of the epochs after the first (the first alone when there is only one)."""
    rest = times[1:] or times
    return sum(rest) / len(rest)


def bench_counting(
    preset: str,
    images: int,
    epochs: int,
    uncached_epochs: int,
    batch_size: int,
    out: Path,
    progress: bool = False,
    max_tiles: int = 4,
    rounds: int = 3,
) -> dict[str, Any]:
    """The counting recipe's stage 1 (vision tower frozen) on the synthetic receipts,
    with the vision cache and without it, same data, same config: the first epoch
    (which builds the cache) and the later ones apart, and their ratio."""
    from vlmtune.benchtiming import interleave, median, timing_row
    from vlmtune.config import load_config
    from vlmtune.data.receipts import generate_receipts
    from vlmtune.runfolder import check_synthetic_dir
    from vlmtune.train import train

    data = out / "counting_data"
    if check_synthetic_dir(data, ("train.jsonl", "val.jsonl", "test.jsonl")):
        generate_receipts(data, n=max(images, 10), seed=0, max_count=3, image_size=128, overwrite=True)
    base = [
        *COUNTING_STAGE1,
        *_run_overrides(preset, data, images, batch_size, progress),
        f"counting.max_dynamic_patch={max_tiles}",
    ]
    res: dict[str, Any] = {"preset": preset, "images": max(images, 10), "max_tiles": max_tiles, "rounds": rounds}
    # Warm-up (first backward, allocator, threads) so neither timed run pays it.
    shutil.rmtree(out / "counting_run_warmup", ignore_errors=True)
    train(load_config(None, [*base, "train.epochs=1", "cache.enabled=false"]), out / "counting_run_warmup")
    variants = [
        _counting_variant(base, out, name, n_epochs, cached)
        for name, n_epochs, cached in (("cached", epochs, True), ("uncached", uncached_epochs, False))
    ]
    timings = interleave(variants, rounds)
    for name in ("cached", "uncached"):
        runs = timings[name].extra
        last = dict(runs[-1])
        for key in ("first_epoch_wall_s", "later_epoch_wall_s", "later_epoch_train_s"):
            last[key] = round(median([r[key] for r in runs]), 3)
            last[key + "_spread"] = [min(r[key] for r in runs), max(r[key] for r in runs)]
        res[name] = last | {"run": timing_row(timings[name])}
    res["cache_mb"] = res["cached"].pop("cache_mb")
    c, u = res["cached"], res["uncached"]
    # Judged on the rounds' pairs (each cached run beside the uncached one of its round).
    cr, ur = timings["cached"].extra, timings["uncached"].extra
    for key, name in (("later_epoch_wall_s", "later_epoch_wall"), ("later_epoch_train_s", "later_epoch_train")):
        pairs = [a[key] / b[key] for a, b in zip(cr, ur)]
        res["ratio_" + name] = median(pairs)
        res["round_ratios_" + name] = [round(x, 3) for x in pairs]
    res["ratio_first_epoch_wall"] = c["first_epoch_wall_s"] / u["first_epoch_wall_s"]
    return res


def _counting_variant(base: list[str], out: Path, name: str, n_epochs: int, cached: bool) -> Any:
    """One counting run (``cached`` or not) as an interleaved variant: its epoch times."""
    from vlmtune.benchtiming import Variant
    from vlmtune.config import load_config
    from vlmtune.train import train

    run_dir, cache_dir = out / f"counting_run_{name}", out / f"counting_cache_{name}"
    cfg = load_config(None, [*base, f"train.epochs={n_epochs}", f"cache.enabled={str(cached).lower()}", f"cache.dir={cache_dir}"])

    def setup() -> None:
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(cache_dir, ignore_errors=True)

    def run() -> dict[str, Any]:
        train(cfg, run_dir)
        wall, train_s = _epoch_times(run_dir)
        stage = next(json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines() if '"stage"' in x)
        rec = {
            "epochs": n_epochs,
            "epoch_wall_s": wall,
            "epoch_train_s": train_s,
            "first_epoch_wall_s": wall[0],
            "later_epoch_wall_s": round(_later(wall), 3),
            "later_epoch_train_s": round(_later(train_s), 3),
            "cache": stage.get("cache", {}),
        }
        if cached:
            rec["cache_mb"] = round(sum(f.stat().st_size for f in cache_dir.rglob("*.npy")) / 2**20, 1)
        return rec

    return Variant(name, run, setup)


# --------------------------------------------------------------------------- loader


def bench_loader(data: Path, preset: str, batch_size: int, workers: list[int], rounds: int = 1) -> dict[str, Any]:
    """Items/s of the retrieval training data's loader (decode, resize to the preset's
    tile, normalise, tokenize) with each worker count, interleaved in ``rounds``. A preset
    needs only its tokenizer and image processor, so its model is not built
    (``internvl3-1b-shapes``: 448 px tiles, no 1B-parameter random model to wait for)."""
    from types import SimpleNamespace

    from vlmtune.backbone import PRESETS, load_backbone, preset_preprocessing
    from vlmtune.benchtiming import Variant, interleave, median
    from vlmtune.config import load_config
    from vlmtune.data.formats import read_pairs
    from vlmtune.tasks.retrieval import make_loader

    cfg = load_config(None, [f"backbone.name_or_path={preset}", f"eval.batch_size={batch_size}"])
    if preset in PRESETS:
        tokenizer, processor = preset_preprocessing(preset, cfg.backbone)
        backbone: Any = SimpleNamespace(tokenizer=tokenizer, image_processor=processor)  # all a live loader reads
    else:
        backbone = load_backbone(cfg.backbone)
    records = read_pairs(data / "train.json")

    def variant(w: int) -> Variant:
        def run() -> dict[str, Any]:
            loader = make_loader(
                records, backbone, batch_size=cfg.eval.batch_size, max_text_tokens=cfg.backbone.max_text_tokens, num_workers=w
            )
            t0 = time.perf_counter()
            n = sum(len(b["input_ids"]) for b in loader)  # worker start-up included: an epoch's cost
            return {"items_per_s": n / (time.perf_counter() - t0), "items": n}

        return Variant(f"workers_{w}", run)

    timings = interleave([variant(w) for w in workers], rounds)
    out: dict[str, Any] = {
        f"workers_{w}_items_per_s": median([x["items_per_s"] for x in timings[f"workers_{w}"].extra]) for w in workers
    }
    side = getattr(processor, "size", {}) if preset in PRESETS else {}
    return out | {
        "preset": preset,
        "images": len({r.image for r in records}),
        "items": timings[f"workers_{workers[0]}"].extra[0]["items"],
        "tile_px": side.get("height"),
        "rounds": rounds,
        "load_average": [round(x, 2) for w in workers for x in timings[f"workers_{w}"].load],
    }


# --------------------------------------------------------------------------- eval


def _eval_child(kind: str, n: int, m: int, dim: int, chunk: int) -> dict[str, float]:
    """One timed evaluation (or bare matmul) in this fresh process; ``chunk`` 0: chosen from the sizes."""
    from vlmtune.metrics.retrieval import auto_chunk_size, retrieval_metrics

    torch.set_num_threads(int(os.environ.get("VLMTUNE_BENCH_THREADS", "1")))
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(m, dim, generator=g), dim=-1)
    t2i = torch.arange(m) % n
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0, c0 = time.perf_counter(), time.process_time()
    if kind == "matmul":
        img @ txt.T
    else:
        retrieval_metrics(img, txt, t2i, chunk_size=chunk or None)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "chunk": chunk or auto_chunk_size(n, m),
        "peak_above_embeddings_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024,
    }


def bench_eval(sizes: list[tuple[int, int]], dim: int = 256, chunk: int = 0, rounds: int = 3) -> list[dict[str, Any]]:
    """Evaluation against a bare matmul of the same sizes, each in a fresh subprocess,
    interleaved in ``rounds`` (matmul, eval, matmul, ...): medians and spread."""
    from vlmtune.benchtiming import Variant, interleave, median, ratio, timing_row

    env = dict(os.environ, VLMTUNE_BENCH_THREADS=str(torch.get_num_threads()))
    rows = []
    for n, m in sizes:

        def child(kind: str, n: int = n, m: int = m) -> Variant:
            cmd = [sys.executable, "-m", "vlmtune.bench", kind, str(n), str(m), str(dim), str(chunk)]
            return Variant(
                kind, lambda: json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)
            )

        timings = interleave([child("matmul"), child("retrieval_metrics")], rounds)
        # Inside each child: the work alone, not the interpreter's start (the interleaving's own figures).
        for t in timings.values():
            t.wall, t.cpu = [x["wall_s"] for x in t.extra], [x["cpu_s"] for x in t.extra]
        mm, ev = timings["matmul"], timings["retrieval_metrics"]
        rows.append(
            {
                "images": n,
                "captions": m,
                "dim": dim,
                "chunk": ev.extra[0]["chunk"],
                "matmul": timing_row(mm),
                "eval": timing_row(ev),
                "matmul_s": median(mm.wall),
                "eval_s": median(ev.wall),
                "ratio": ratio(timings, "retrieval_metrics", "matmul"),
                "cpu_ratio": ratio(timings, "retrieval_metrics", "matmul", "cpu"),
                "matmul_peak_mb": max(x["peak_above_embeddings_mb"] for x in mm.extra),
                "eval_peak_mb": max(x["peak_above_embeddings_mb"] for x in ev.extra),
            }
        )
    return rows


# --------------------------------------------------------------------------- gpu


def bench_gpu(preset: str, batch_size: int = 32, steps: int = 10) -> dict[str, Any]:
    """bf16 feature extraction images/s and its share of the measured peak bf16 matmul rate."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    from torch.utils.flop_counter import FlopCounterMode

    from vlmtune.backbone import load_backbone
    from vlmtune.config import BackboneConfig

    dev = torch.device("cuda")
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ a
    torch.cuda.synchronize()
    peak = 20 * 2 * 8192**3 / (time.perf_counter() - t0)
    bb = load_backbone(BackboneConfig(name_or_path=preset, dtype="bfloat16"), device_type="cuda").to(dev)
    size = bb.info.image_size
    pv = torch.randn(batch_size, 3, size, size, device=dev, dtype=torch.bfloat16)
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            bb.vision_tokens(pv[:1])
        flops_per_image = fc.get_total_flops()
        for _ in range(3):
            bb.vision_tokens(pv)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            bb.vision_tokens(pv)
        torch.cuda.synchronize()
    ips = steps * batch_size / (time.perf_counter() - t0)
    return {
        "images_per_s_bf16": ips,
        "flops_per_image": flops_per_image,
        "peak_bf16_matmul_flops": peak,
        "fraction_of_peak": ips * flops_per_image / peak,
        "batch_size": batch_size,
        "attn_implementation": bb.model.config._attn_implementation,
    }


# --------------------------------------------------------------------------- search


def bench_search(n: int = 100_000, dim: int = 256, k: int = 10, queries: int = 200, out: Path | None = None) -> dict[str, Any]:
    """Exact search as ``vlmtune search`` runs it, one query at a time, over ``n``
    stored unit vectors; the index is written and opened from disk like a real one."""
    import tempfile

    from safetensors.torch import save_file

    from vlmtune.search import INDEX_FORMAT, Index

    g = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
    q = torch.nn.functional.normalize(torch.randn(queries, dim, generator=g), dim=-1)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        folder = Path(tmp)
        save_file({"gallery": gallery}, str(folder / "gallery.safetensors"))
        (folder / "items.jsonl").write_text(
            "".join(json.dumps({"id": i, "kind": "image", "path": f"img{i}.jpg"}) + "\n" for i in range(n))
        )
        (folder / "index.json").write_text(
            json.dumps({"format": INDEX_FORMAT, "kind": "images", "count": n, "dim": dim, "search": "exact"})
        )
        t0 = time.perf_counter()
        index = Index(folder)
        load_s = time.perf_counter() - t0
    for i in range(5):  # warm-up: threads, allocator
        index.topk(q[i : i + 1], k)
    import os

    times = []
    c0 = time.process_time()
    for i in range(queries):
        t0 = time.perf_counter()
        index.topk(q[i : i + 1], k)
        times.append(1000 * (time.perf_counter() - t0))
    cpu_ms = 1000 * (time.process_time() - c0) / queries
    times.sort()
    # Wall time depends on what else runs on the machine: the CPU time per query (all
    # threads together) and the load average say how much of it was waiting.
    return {
        "n": n,
        "dim": dim,
        "k": k,
        "queries": queries,
        "threads": torch.get_num_threads(),
        "median_ms": times[len(times) // 2],
        "p95_ms": times[min(len(times) - 1, int(0.95 * len(times)))],
        "cpu_ms_per_query": cpu_ms,
        "load_average": os.getloadavg()[0],
        "index_load_s": load_s,
    }


# --------------------------------------------------------------------------- fsdp


def _fsdp_child(mode: str, preset: str, images: int, batch_size: int, data: str, out: str) -> None:
    """One process of a short training run under torchrun (``mode`` ddp or fsdp); writes
    this process's memory figures to ``out/mem_<rank>.json``."""
    import os

    from vlmtune.config import load_config
    from vlmtune.train import peak_memory_mb, train

    cfg = load_config(
        None,
        [
            f"backbone.name_or_path={preset}",
            f"data.synthetic_dir={data}",
            f"data.synthetic.n={images}",
            "stages=[{name: last_block, start_epoch: 0, vision_blocks: 1, "
            "train: {adapters: 1.0, heads: 1.0, vision_blocks: 0.1}}]",
            "train.epochs=1",
            f"train.batch_size={batch_size}",
            f"eval.batch_size={batch_size}",
            "train.progress=false",
            "cache.enabled=false",
            "eval.ks=[1]",
            "loss.matching=0",
            f"train.fsdp.enabled={str(mode == 'fsdp').lower()}",
        ],
    )
    run_dir = Path(out) / f"run_{mode}"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else torch.device("cpu")
    train(cfg, run_dir, overwrite=True)
    rec: dict[str, Any] = {
        "rank": int(os.environ.get("RANK", "0")),
        "device": device.type,
        "peak_mb": round(peak_memory_mb(device), 1),
    }
    if device.type == "cuda":
        rec["measure"] = "torch.cuda.max_memory_allocated"
        rec["end_mb"] = round(torch.cuda.memory_allocated(device) / 2**20, 1)
    else:
        rec["measure"] = "ru_maxrss (peak resident set of the process)"
        with open("/proc/self/statm") as f:  # resident pages now: what the process holds after training
            rec["end_mb"] = round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    from vlmtune.runfolder import write_text

    write_text(Path(out) / f"mem_{mode}_{rec['rank']}.json", json.dumps(rec))


def bench_fsdp(preset: str, images: int, batch_size: int, out: Path, processes: int = 2) -> dict[str, Any]:
    """Peak memory per process of a short training run (the last vision block, the
    adapters and the heads train; features live, no cache) under DDP and under FSDP,
    each launched with torchrun: on ``processes`` GPUs when that many are present,
    otherwise on as many CPU processes over gloo."""
    import os

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    on_gpu = gpus >= processes
    data = _bench_data(out, images, "data_fsdp")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TOKENIZERS_PARALLELISM="false")
    if not on_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    res: dict[str, Any] = {
        "preset": preset,
        "processes": processes,
        "images": images,
        "batch_size": batch_size,
        "device": "cuda" if on_gpu else "cpu (gloo)",
    }
    if not on_gpu and gpus:
        res["note"] = f"{gpus} CUDA device(s), fewer than {processes}: measured on CPU processes"
    for mode in ("ddp", "fsdp"):
        t0 = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(processes),
                "-m",
                "vlmtune.bench",
                "fsdp-child",
                mode,
                preset,
                str(images),
                str(batch_size),
                str(data),
                str(out),
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            res[mode] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
            continue
        recs = sorted((json.loads((out / f"mem_{mode}_{r}.json").read_text()) for r in range(processes)), key=lambda x: x["rank"])
        res[mode] = {
            "peak_mb": [x["peak_mb"] for x in recs],
            "end_mb": [x["end_mb"] for x in recs],
            "measure": recs[0]["measure"],
            "wall_s": round(time.perf_counter() - t0, 2),
        }
    if "peak_mb" in res.get("ddp", {}) and "peak_mb" in res.get("fsdp", {}):
        res["ratio_fsdp_to_ddp_peak"] = max(res["fsdp"]["peak_mb"]) / max(res["ddp"]["peak_mb"])
        res["ratio_fsdp_to_ddp_end"] = max(res["fsdp"]["end_mb"]) / max(res["ddp"]["end_mb"])
    return res


# --------------------------------------------------------------------------- report


def run_bench(
    out: str | Path,
    preset: str = "tiny",
    images: int = 200,
    epochs: int = 5,
    uncached_epochs: int | None = None,
    batch_size: int = 32,
    eval_sizes: list[tuple[int, int]] | None = None,
    sections: list[str] | None = None,
    progress: bool = False,
    search_size: int = 100_000,
    stage_steps: int = 8,
    recipes: list[str] | None = None,
    recipe_runs: bool = True,
    max_tiles: int = 4,
    rounds: int = 3,
    threads: int | None = None,
    loader_workers: list[int] | None = None,
    negatives_sizes: list[int] | None = None,
) -> dict[str, Any]:
    """Every section asked for, ``rounds`` interleaved rounds where a section compares
    variants, on ``threads`` torch threads (default: one on CPU, see benchtiming)."""
    from vlmtune.benchtiming import bench_threads, load_average
    from vlmtune.runfolder import make_folder, output_folder, write_text

    out = output_folder(out, "--out")
    make_folder(out, "--out")
    sections = sections or ["training", "stages", "counting", "loader", "eval", "gpu", "search", "fsdp", "negatives"]
    with bench_threads(threads) as n_threads:
        result: dict[str, Any] = {"machine": _machine() | {"load_average_start": load_average()}, "preset": preset}
        result["machine"]["bench_threads"] = n_threads
        result["rounds"] = rounds
        _run_sections(result, sections, out, locals())
        result["machine"]["load_average_end"] = load_average()
    write_text(out / "bench.json", json.dumps(result, indent=2))
    write_text(out / "bench.md", render(result))
    return result


def _run_sections(result: dict[str, Any], sections: list[str], out: Path, a: dict[str, Any]) -> None:
    """Each section of ``sections`` into ``result``, with run_bench's arguments ``a``."""
    preset, images, epochs, batch_size, progress, rounds = (
        a["preset"], a["images"], a["epochs"], a["batch_size"], a["progress"], a["rounds"]
    )  # fmt: skip
    uncached = a["uncached_epochs"] or epochs
    if "training" in sections:
        result["training"] = bench_training(preset, images, epochs, uncached, batch_size, out, progress, rounds)
    if "stages" in sections:
        result["stages"] = bench_stages(
            preset,
            images,
            epochs,
            batch_size,
            out,
            steps=a["stage_steps"],
            recipes=a["recipes"],
            progress=progress,
            recipe_runs=a["recipe_runs"],
            rounds=rounds,
        )
    if "counting" in sections:
        result["counting"] = bench_counting(preset, images, epochs, uncached, batch_size, out, progress, a["max_tiles"], rounds)
    if "loader" in sections:
        result["loader"] = bench_loader(
            _bench_data(out, images, "data_loader", image_size=448),
            preset,
            batch_size,
            a["loader_workers"] or [0, 2, 4],
            a["rounds"],
        )
    if "eval" in sections:
        result["eval"] = bench_eval(a["eval_sizes"] or [(1000, 5000), (5000, 25000)], rounds=rounds)
    if "gpu" in sections:
        result["gpu"] = bench_gpu(preset)
    if "search" in sections:
        result["search"] = bench_search(a["search_size"], out=out)
    if "fsdp" in sections:
        result["fsdp"] = bench_fsdp(preset, min(images, 32), min(batch_size, 8), out)
    if "negatives" in sections:
        from vlmtune.benchnegatives import bench_negatives

        sizes = a["negatives_sizes"] or [1024, 4096]
        result["negatives"] = bench_negatives(
            recipe_paths(a["recipes"])[0],
            preset,
            chunk=batch_size,
            sizes=tuple(sizes),
            rounds=rounds,
            grad_cache_rows=sizes[0],
            memory_rows=sizes[-1],
        )
        from vlmtune.benchnegatives import bench_mining

        overrides = _run_overrides(preset, _bench_data(out, images), images, batch_size, progress)
        result["negatives"]["mining"] = bench_mining(
            recipe_paths(a["recipes"])[0], overrides, out, images=images, batch_size=batch_size, rounds=rounds
        )


def render(r: dict[str, Any]) -> str:
    """``bench.md``: the machine, then one block per section the result holds."""
    m = r["machine"]
    lines = [
        f"# vlmtune bench ({r['preset']})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}"
        + (f", GPU {m['gpu']}" if "gpu" in m else ", no GPU")
        + f". Bench: {m.get('bench_threads', m['torch_threads'])} torch thread(s), {r.get('rounds', 1)} interleaved "
        f"round(s) per comparison (medians, min-max in brackets); load average {m.get('load_average_start', 0):.1f} "
        f"at the start, {m.get('load_average_end', 0):.1f} at the end.",
        "",
    ]
    if "training" in r:
        lines += _render_training(r["training"])
    if "stages" in r:
        lines += render_stages(r["stages"])
    if "counting" in r:
        lines += _render_counting(r["counting"])
    if "loader" in r:
        lo = r["loader"]
        what = f"{lo.get('items', '?')} items of {lo.get('images', '?')} images, {lo.get('preset', '?')}"
        what += f", {lo['tile_px']} px tiles" if lo.get("tile_px") else ""
        lines += [
            f"## Dataloader (decode + resize + normalise + tokenize): {what}",
            "",
            f"Median of {lo.get('rounds', 1)} interleaved round(s); load average "
            f"{', '.join(f'{x:.1f}' for x in lo.get('load_average', []))} after each run.",
            "",
            "| workers | items/s |",
            "|---|---|",
        ]
        lines += [f"| {k.split('_')[1]} | {v:.0f} |" for k, v in lo.items() if k.endswith("_items_per_s")] + [""]
    if "eval" in r:
        lines += _render_eval(r["eval"])
    if "gpu" in r:
        lines += _render_gpu(r["gpu"])
    if "search" in r:
        lines += _render_search(r["search"])
    if "fsdp" in r:
        lines += _render_fsdp(r["fsdp"])
    if "negatives" in r:
        from vlmtune.benchnegatives import render as render_negatives

        lines += render_negatives(r["negatives"])
    return "\n".join(lines)


def _render_training(t: dict[str, Any]) -> list[str]:
    """The training section's table: the extraction pass, the epochs, the two ratios."""
    c, u = t["cached"], t["uncached"]
    return [
        f"## Frozen-backbone training: {t['images']} images, {t['captions']} captions",
        "",
        "| | seconds |",
        "|---|---|",
        f"| one feature-extraction pass (floor) | {t['extraction_pass_s']:.2f} |",
        f"| cached: {c['epochs']} epochs, extraction included | {t['cached_total_s']:.2f} |",
        f"| cached epochs | {', '.join(f'{x:.2f}' for x in c['epoch_train_s'])} |",
        f"| uncached epochs | {', '.join(f'{x:.2f}' for x in u['epoch_train_s'])} |",
        f"| **cached total / extraction pass** | **{t['ratio_cached_total_to_extraction']:.2f}** (target <= 1.3 where the towers dominate an epoch, as at real shapes) |",
        f"| **uncached epoch / cached epoch** | **{t['ratio_uncached_epoch_to_cached_epoch']:.1f}x** |",
        f"| samples/s cached / uncached | {c['samples_per_s']:.3g} / {u['samples_per_s']:.3g} |",
        "",
    ]


def _render_eval(rows: list[dict[str, Any]]) -> list[str]:
    """The eval section's table: one row per size, evaluation against the bare matmul."""
    return [
        "## Retrieval evaluation vs one bare matmul",
        "",
        "Median (min-max) of interleaved rounds, each in a fresh process; CPU: the ratio of CPU seconds.",
        "",
        "| images x captions | chunk | matmul s | eval s | ratio (target <= 2) | CPU ratio | matmul peak MB | eval peak MB |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {e['images']} x {e['captions']} | {e['chunk']} | {spread(e['matmul'])} | {spread(e['eval'])} | "
            f"**{e['ratio']:.2f}** | {e['cpu_ratio']:.2f} | {e['matmul_peak_mb']:.0f} | {e['eval_peak_mb']:.0f} |"
            for e in rows
        ),
        "",
    ]


def _render_gpu(g: dict[str, Any]) -> list[str]:
    """The gpu section: the extraction rate and its fraction of peak, or why it was skipped."""
    if "skipped" in g:
        return [f"GPU section skipped: {g['skipped']}.", ""]
    return [
        "## GPU feature extraction (bf16)",
        "",
        f"{g['images_per_s_bf16']:.1f} images/s, "
        f"{100 * g['fraction_of_peak']:.1f}% of the measured peak bf16 matmul rate "
        f"({g['peak_bf16_matmul_flops'] / 1e12:.0f} TFLOP/s), {g['attn_implementation']}",
        "",
    ]


def _render_search(sr: dict[str, Any]) -> list[str]:
    """The search section's one-row table: query latency and the index's load time."""
    return [
        "## Exact search (vlmtune search), one text query at a time",
        "",
        "| stored embeddings | dim | k | median ms | p95 ms | CPU ms / query | torch threads | load average | index load s |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {sr['n']:,} | {sr['dim']} | {sr['k']} | {sr['median_ms']:.2f} | {sr['p95_ms']:.2f} | "
        f"{sr['cpu_ms_per_query']:.2f} | {sr['threads']} | {sr['load_average']:.1f} | {sr['index_load_s']:.2f} |",
        "",
    ]


def _render_fsdp(f: dict[str, Any]) -> list[str]:
    """The fsdp section's table: peak and end memory per process under DDP and FSDP."""
    lines = [f"## Memory per process: FSDP vs DDP ({f['processes']} processes, {f['device']}, {f['preset']})", ""]
    if "note" in f:
        lines += [f["note"] + ".", ""]
    rows = [(m, f[m]) for m in ("ddp", "fsdp")]
    measure = next((x["measure"] for _, x in rows if "measure" in x), "")
    lines += [
        f"Peak: {measure}; end: held after the run.",
        "",
        "| | peak MB per process | end MB per process | wall s |",
        "|---|---|---|---|",
    ]
    for m, x in rows:
        lines.append(
            f"| {m} | error: {x['error']} | | |"
            if "error" in x
            else f"| {m} | {', '.join(f'{v:.0f}' for v in x['peak_mb'])} | {', '.join(f'{v:.0f}' for v in x['end_mb'])} "
            f"| {x['wall_s']:.1f} |"
        )
    if "ratio_fsdp_to_ddp_peak" in f:
        lines += [f"| **FSDP / DDP** | **{f['ratio_fsdp_to_ddp_peak']:.2f}** | **{f['ratio_fsdp_to_ddp_end']:.2f}** | |"]
    lines.append("")
    return lines


def render_stages(s: dict[str, Any]) -> list[str]:
    st, sc, n = s["step_s"], s["step_cpu_s"], s["trained_blocks"]
    lines = [
        f"## Two-stage recipe: stage steps and wall time ({s['images']} images, {s['captions']} captions, "
        f"batch {s['batch_size']}, {s['device']})",
        "",
        f"Median of {s['steps']} steps after {s['warmup']} warm-up steps (loading the batch included). Stage 2 "
        f"trains the last {n} of {s['vision_blocks']} vision blocks; its prefix cache holds the state entering "
        f"block {s['prefix_start']}. {s['threads']} torch threads, load average {s['load_average']:.1f} at the end "
        f"(CPU ms: this process's CPU time, the steadier figure on a shared CPU).",
        "",
        "| step | losses | wall ms | CPU ms |",
        "|---|---|---|---|",
    ]
    names = {
        "a_stage1_cached": ("(a) stage 1, from the cache", s["stage1_losses"]),
        "a_stage1_cached_stage2_losses": ("(a') stage 1, from the cache, stage 2's losses", s["stage2_losses"]),
        "b_stage2_prefix_cached": ("(b) stage 2, from the prefix cache", s["stage2_losses"]),
        "c_stage2_live": ("(c) stage 2, vision tower live (no vision cache)", s["stage2_losses"]),
    }
    lines += [
        f"| {label} | {', '.join(losses)} | {1000 * st[k]:.1f} | {1000 * sc[k]:.1f} |" for k, (label, losses) in names.items()
    ]
    lines += [
        f"| **b / a** (target <= 1.5 on a GPU at real shapes) | | **{s['ratio_b_to_a']:.2f}** | **{s['cpu_ratio_b_to_a']:.2f}** |",
        f"| b / a' (same losses) | | {s['ratio_b_to_a_same_losses']:.2f} | {s['cpu_ratio_b_to_a_same_losses']:.2f} |",
        f"| **c / b** (what the prefix cache saves) | | **{s['ratio_c_to_b']:.2f}x** | **{s['cpu_ratio_c_to_b']:.2f}x** |",
        "",
        f"Cache builds (once): the tower's output {s['frozen_cache_build_s']:.2f} s, the prefix "
        f"{s['prefix_cache_build_s']:.2f} s.",
        "",
    ]
    if "recipes" not in s:
        return lines
    two, one = s["recipes"]["two_stage"], s["recipes"]["single_stage"]
    pairs = s.get("round_ratios_two_stage_to_single_stage", [])
    cpu_pairs = s.get("round_cpu_ratios_two_stage_to_single_stage", [])
    span = f" ({min(pairs):.2f}-{max(pairs):.2f})" if pairs else ""
    cpu_span = f" ({min(cpu_pairs):.2f}-{max(cpu_pairs):.2f})" if cpu_pairs else ""
    return lines + [
        f"Whole runs (each builds its caches), {two.get('rounds', 1)} interleaved rounds (two single, single two, "
        "...): median wall s (min-max), median CPU s; the ratio is the median of the rounds' ratios (each pair "
        "ran back to back), their range in brackets.",
        "",
        "| recipe | epochs | wall s | CPU s |",
        "|---|---|---|---|",
        f"| two-stage ({Path(two['config']).name}) | {two['epochs']} | {spread(two)} | {two['cpu_s']:.2f} |",
        f"| single-stage ({Path(one['config']).name}) | {one['epochs']} | {spread(one)} | {one['cpu_s']:.2f} |",
        f"| **two-stage / single-stage** (target <= 1.15) | | **{s['ratio_two_stage_to_single_stage']:.2f}**{span} | "
        f"**{s['cpu_ratio_two_stage_to_single_stage']:.2f}**{cpu_span} |",
        "",
        *_oversubscribed_note(two.get("load_average", []) + one.get("load_average", []), pairs, cpu_pairs),
    ]


def _oversubscribed_note(loads: list[float], pairs: list[float], cpu_pairs: list[float]) -> list[str]:
    """A line saying so when the load average exceeded the cores during the runs: then a
    run's wall time measures the share of the cores the scheduler gave it as much as the
    run, and the CPU ratio (its spread beside) is the steadier figure."""
    cores = os.cpu_count() or 1
    if not loads or max(loads) <= cores or not pairs or not cpu_pairs:
        return []
    return [
        f"The load average ({min(loads):.1f}-{max(loads):.1f}) exceeded the {cores} cores during these runs: "
        f"their wall times measure the scheduler's share as much as the recipes (rounds' wall ratios "
        f"{min(pairs):.2f}-{max(pairs):.2f}, CPU ratios {min(cpu_pairs):.2f}-{max(cpu_pairs):.2f}).",
        "",
    ]


def _range(xs: list[float] | None) -> str:
    return f"{min(xs):.2f}-{max(xs):.2f}" if xs else "one round"


def _span(x: dict[str, Any], key: str) -> str:
    lo, hi = x.get(key + "_spread", [x[key], x[key]])
    return f"{lo:.2f}-{hi:.2f}"


def _render_counting(t: dict[str, Any]) -> list[str]:
    c, u = t["cached"], t["uncached"]
    later = "epochs after the first" if u["epochs"] > 1 else "epoch (only one uncached)"

    def row(x: dict[str, Any], key: str) -> str:
        return ", ".join(f"{v:.2f}" for v in x[key])

    tiles = "one tile each" if t["max_tiles"] == 1 else f"up to {t['max_tiles']} tiles + thumbnail"
    return [
        f"## Counting recipe, stage 1 (vision tower frozen): {t['images']} images, {tiles} ({t['preset']})",
        "",
        "| | cached (vision cache) | uncached |",
        "|---|---|---|",
        f"| epoch wall s (training + validation) | {row(c, 'epoch_wall_s')} | {row(u, 'epoch_wall_s')} |",
        f"| epoch training s | {row(c, 'epoch_train_s')} | {row(u, 'epoch_train_s')} |",
        f"| first epoch wall s (cached: builds the cache) | {c['first_epoch_wall_s']:.2f} | {u['first_epoch_wall_s']:.2f} |",
        f"| later epochs, mean wall s (median of {t.get('rounds', 1)} interleaved runs, min-max) | "
        f"{c['later_epoch_wall_s']:.2f} ({_span(c, 'later_epoch_wall_s')}) | "
        f"{u['later_epoch_wall_s']:.2f} ({_span(u, 'later_epoch_wall_s')}) |",
        f"| **cached / uncached, later {later}, wall** (median of the rounds' ratios, range) | "
        f"**{t['ratio_later_epoch_wall']:.2f}** ({_range(t.get('round_ratios_later_epoch_wall'))}) (target <= 0.5) | |",
        f"| cached / uncached, later {later}, training only | {t['ratio_later_epoch_train']:.2f} | |",
        f"| cached / uncached, first epoch | {t['ratio_first_epoch_wall']:.2f} | |",
        f"| cache size | {t['cache_mb']:.1f} MB | |",
        "",
    ]


if __name__ == "__main__" and sys.argv[1:2] == ["fsdp-child"]:  # the fsdp section's torchrun processes
    _fsdp_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], sys.argv[7])
elif __name__ == "__main__":  # the eval section's subprocess: python -m vlmtune.bench KIND N M DIM CHUNK
    kind, n, m, dim, chunk = sys.argv[1:6]
    print(json.dumps(_eval_child(kind, int(n), int(m), int(dim), int(chunk))))
