"""``vlmtune bench --sections negatives``: what more negatives cost, from the cache.

Training steps of the retrieval model's stage 1 (adapters and heads train; contrastive
and matching losses) on batches shaped as the feature cache serves them (the frozen
towers' cached vision tokens and text states; random values of the preset's widths, so
a step is what it is from the cache: adapters, projectors, losses, backward, AdamW; no
loader). Each variant is one contrastive batch size (``model.contrastive_batch``) cut
into chunks of ``train.batch_size``, timed in interleaved rounds
(:mod:`vlmtune.benchtiming`); the section reports each variant's seconds per step and
per pair and its per-pair cost relative to the plain step (``per_pair_ratio``), the
ratio of GradCache to keeping every chunk's graph at the same batch, and the peak
memory of one step of the largest batch, each in a fresh process (CPU: the growth of
the peak resident set, ``ru_maxrss``, over the process's peak before the step; CUDA:
``torch.cuda.max_memory_allocated`` after a reset, over what was allocated before).

The section is a list of :class:`StepVariant`. Mining (:func:`bench_mining`, the
result's ``mining`` key) is timed apart, on whole training runs: one stage from the
cache (built once, untimed), in interleaved rounds, epochs that refresh their mined
negatives against epochs that keep the lists of the first, and against in-batch
negatives only; ratios of the epochs' training seconds (mining included, validation
left out), medians over rounds and epochs, each run's first epoch left out.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class StepVariant:
    """One timed step kind: ``rows`` pairs per contrastive batch, ``grad_cache`` mode."""

    name: str
    rows: int
    grad_cache: str = "never"


def _setup(
    recipe: str, preset: str, rows: int, chunk: int, grad_cache: str, device: torch.device
) -> tuple[Any, dict[str, Any], Any]:
    """(model, a cache-shaped batch of ``rows`` pairs, optimizer) of the two-stage
    ``recipe``'s stage 1."""
    from vlmtune.backbone import load_backbone
    from vlmtune.config import load_config
    from vlmtune.stages import apply_stage, build_plan
    from vlmtune.tasks.retrieval import RetrievalTask

    cfg = load_config(
        recipe,
        [
            f"backbone.name_or_path={preset}",
            f"train.batch_size={chunk}",
            f"model.contrastive_batch={rows if rows > chunk else 0}",
            f"model.grad_cache={grad_cache}",
        ],
    )
    task = RetrievalTask.from_config(cfg)
    torch.manual_seed(0)
    backbone = load_backbone(cfg.backbone, device_type=device.type)
    model = task.build_model(backbone).to(device)
    stage = build_plan(cfg, task.loss_weights())[0]
    groups = apply_stage(model, stage, cfg.optim.lr, cfg.optim.weight_decay)
    model.train()
    model.backbone.eval()
    info = backbone.info
    tokens = 1 + (info.image_size // info.patch_size) ** 2
    t = min(cfg.backbone.max_text_tokens, 16)
    g = torch.Generator().manual_seed(1)
    batch = {
        "index": torch.arange(rows),
        "input_ids": torch.ones(rows, t, dtype=torch.long),
        "attention_mask": torch.ones(rows, t, dtype=torch.long),
        "rel_input_ids": torch.ones(rows, t, dtype=torch.long),
        "rel_attention_mask": torch.ones(rows, t, dtype=torch.long),
        "image_id": torch.arange(rows),
        "box": torch.full((rows, 4), float("nan")),
        "relation": torch.full((rows,), -1),
        "image_wh": torch.ones(rows, 2),
        "vision_tokens": torch.randn(rows, tokens, info.vision_hidden, generator=g),
        "text_hidden": torch.randn(rows, t, info.text_hidden, generator=g),
        "rel_text_hidden": torch.randn(rows, t, info.text_hidden, generator=g),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr)
    return model, batch, (opt, stage.losses, task.loss_weights())


def _step(model: Any, batch: dict[str, Any], extra: Any) -> None:
    opt, losses, weights = extra
    terms = model(batch, losses)
    loss = sum(weights[k] * terms[k] for k in sorted(losses) if k in terms)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_negatives(
    recipe: str | Path,
    preset: str = "tiny",
    chunk: int = 32,
    sizes: tuple[int, ...] = (1024, 4096),
    steps: int = 2,
    rounds: int = 3,
    grad_cache_rows: int = 1024,
    memory_rows: int = 4096,
) -> dict[str, Any]:
    """Steps at ``chunk`` pairs (the plain batch) and at each of ``sizes``, GradCache at
    ``grad_cache_rows`` beside the same batch without it, and the peak memory of a
    ``memory_rows`` step with and without GradCache (see the module)."""
    from vlmtune.benchtiming import Variant, interleave, load_average, median, timing_row

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    variants = [StepVariant(f"batch_{chunk}", chunk)] + [StepVariant(f"batch_{n}", n) for n in sizes]
    if grad_cache_rows:
        variants.append(StepVariant(f"batch_{grad_cache_rows}_gradcache", grad_cache_rows, "always"))
    recipe = str(recipe)
    built = {v.name: _setup(recipe, preset, v.rows, chunk, v.grad_cache, device) for v in variants}

    def run(name: str) -> Any:
        model, batch, extra = built[name]

        def once() -> None:
            for _ in range(steps):
                _step(model, batch, extra)
            _sync(device)

        return once

    for name in built:  # one untimed step each: first-call costs out of the rounds
        model, batch, extra = built[name]
        _step(model, batch, extra)
    timings = interleave([Variant(v.name, run(v.name)) for v in variants], rounds)
    rows: dict[str, dict[str, Any]] = {}
    base = median(timings[variants[0].name].wall) / (steps * chunk)
    base_cpu = median(timings[variants[0].name].cpu) / (steps * chunk)
    for v in variants:
        t = timings[v.name]
        per_step, cpu_step = median(t.wall) / steps, median(t.cpu) / steps
        rows[v.name] = {
            "pairs": v.rows,
            "chunk": chunk,
            "grad_cache": v.grad_cache,
            "step_s": round(per_step, 5),
            "step_cpu_s": round(cpu_step, 5),
            "per_pair_ms": round(1000 * per_step / v.rows, 5),
            "per_pair_ratio": round(per_step / v.rows / base, 4),
            "per_pair_cpu_ratio": round(cpu_step / v.rows / base_cpu, 4) if base_cpu > 0 else None,
            "timing": timing_row(t),
        }
    result: dict[str, Any] = {
        "device": device.type,
        "preset": preset,
        "steps_per_round": steps,
        "losses": sorted(built[variants[0].name][2][1]),
        "variants": rows,
        "load_average": load_average(),
    }
    if grad_cache_rows:
        gc, plain = rows[f"batch_{grad_cache_rows}_gradcache"], rows.get(f"batch_{grad_cache_rows}")
        if plain is not None:
            result["ratio_grad_cache_to_plain"] = round(gc["step_s"] / plain["step_s"], 4)
            if plain["step_cpu_s"] > 0:
                result["cpu_ratio_grad_cache_to_plain"] = round(gc["step_cpu_s"] / plain["step_cpu_s"], 4)
    if memory_rows:
        result["memory"] = {
            mode: _memory_child(recipe, preset, memory_rows, chunk, mode) for mode in ("never", "always")
        }  # fmt: skip
    return result


ONE_STAGE = "stages=[{name: stage1, start_epoch: 0, train: {adapters: 1.0, heads: 1.0}}]"


def bench_mining(
    recipe: str | Path, overrides: list[str], out: Path, *, images: int, batch_size: int, epochs: int = 3, rounds: int = 3
) -> dict[str, Any]:
    """The cost of mined negatives from the cache (see the module), as seconds per epoch
    of whole one-stage runs, each epoch after the first compared: ``refreshed`` (every
    epoch mines again, ``refresh_every=1``) against ``kept`` (the first epoch's lists kept,
    so its later epochs use mined negatives without refreshing them): the refresh's own
    cost, the target (<= 1.3); and ``refreshed`` against ``plain`` (in-batch negatives
    only): what mining and the extra columns it adds cost together. ``overrides``: the
    runs' preset, data set and batch sizes (``images`` and ``batch_size`` name them)."""
    import shutil

    from vlmtune.benchtiming import Variant, interleave, load_average, median
    from vlmtune.config import load_config
    from vlmtune.train import train

    if epochs < 2:
        raise ValueError("bench_mining: epochs must be >= 2 (the first epoch of every variant is left out)")
    cache = out / "cache_mining"
    base = [*overrides, ONE_STAGE, f"cache.dir={cache}", "eval.ks=[1]"]
    mine = ["negatives.mine=true"]
    modes = {
        "plain": [],
        "kept": [*mine, f"negatives.refresh_every={epochs + 1}"],
        "refreshed": [*mine, "negatives.refresh_every=1"],
    }
    train(load_config(str(recipe), [*base, "train.epochs=1"]), out / "run_mining_warmup")  # builds the cache
    shutil.rmtree(out / "run_mining_warmup", ignore_errors=True)

    def variant(name: str) -> Variant:
        def once() -> dict[str, Any]:
            run_dir = out / f"run_mining_{name}"
            shutil.rmtree(run_dir, ignore_errors=True)
            train(load_config(str(recipe), [*base, f"train.epochs={epochs}", *modes[name]]), run_dir)
            lines = [json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines()]
            cum = [x["train_wall_s"] for x in lines if x["type"] == "epoch"]
            metrics = json.loads((run_dir / "metrics.json").read_text())
            shutil.rmtree(run_dir, ignore_errors=True)
            return {
                "epoch_s": [b - a for a, b in zip([0.0, *cum[:-1]], cum)][1:],  # the first epoch left out
                "mining_s": metrics.get("negatives/refresh_wall_s", 0.0),
                "refreshes": metrics.get("negatives/refreshes", 0),
            }

        return Variant(name, once)

    timings = interleave([variant(n) for n in modes], rounds)
    res: dict[str, Any] = {"epochs": epochs, "rounds": rounds, "images": images, "batch_size": batch_size}
    for name, t in timings.items():
        epoch_s = [x for e in t.extra for x in e["epoch_s"]]
        res[name] = {
            "epoch_s": round(median(epoch_s), 4),
            "epoch_min_s": round(min(epoch_s), 4),
            "epoch_max_s": round(max(epoch_s), 4),
            "mining_s_per_run": round(median([e["mining_s"] for e in t.extra]), 4),
            "refreshes_per_run": t.extra[0]["refreshes"],
            "load_average": [round(x, 2) for x in t.load],
        }
    res["ratio_refreshed_to_kept"] = round(res["refreshed"]["epoch_s"] / res["kept"]["epoch_s"], 4)
    res["ratio_refreshed_to_plain"] = round(res["refreshed"]["epoch_s"] / res["plain"]["epoch_s"], 4)
    res["target"] = 1.3
    res["load_average_end"] = load_average()
    return res


def _memory_child(recipe: str, preset: str, rows: int, chunk: int, grad_cache: str) -> dict[str, Any]:
    env = dict(os.environ, VLMTUNE_BENCH_THREADS=str(torch.get_num_threads()))
    cmd = [sys.executable, "-m", "vlmtune.benchnegatives", recipe, preset, str(rows), str(chunk), grad_cache]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_step_memory(recipe: str, preset: str, rows: int, chunk: int, grad_cache: str) -> dict[str, Any]:
    """Peak memory of one training step (in this fresh process), above what it held before."""
    torch.set_num_threads(int(os.environ.get("VLMTUNE_BENCH_THREADS", "1")))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, batch, extra = _setup(recipe, preset, rows, chunk, grad_cache, device)
    _sync(device)
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        allocated = torch.cuda.memory_allocated(device)
        _step(model, batch, extra)
        _sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - allocated) / 2**20
        how = "torch.cuda.max_memory_allocated above the allocation before the step"
    elif _reset_peak_rss():
        before = _status_mb("VmRSS")
        _step(model, batch, extra)
        peak = _status_mb("VmHWM") - before
        how = "peak resident set (VmHWM, reset before the step) above the resident set before it"
    else:  # no /proc: the growth of the process's high-water mark (0 when the step stays below it)
        high = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        _step(model, batch, extra)
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - high) / 1024
        how = "growth of the process's peak resident set (ru_maxrss) during the step"
    return {
        "pairs": rows,
        "chunk": chunk,
        "grad_cache": grad_cache,
        "peak_mb": round(peak, 1),
        "step_s": round(time.perf_counter() - t0, 4),
        "how": how,
    }


def _reset_peak_rss() -> bool:
    """Linux: set the process's peak resident set to its current one (clear_refs 5),
    after returning freed memory to the system; False where that is not possible."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_mb("VmHWM")
    except (OSError, ValueError):
        return False
    return True


def _status_mb(key: str) -> float:
    """A ``kB`` line of /proc/self/status, in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise ValueError(f"/proc/self/status has no {key}")


def render(n: dict[str, Any]) -> list[str]:
    """bench.md's block: one row per variant, then the ratios and the memory."""
    from vlmtune.benchtiming import spread

    lines = [
        f"## Negatives: contrastive batch size from the cache ({n['device']}, losses {', '.join(n['losses'])})",
        "",
        "| variant | pairs | chunk | GradCache | s/step (min-max) | CPU s/step | ms/pair | per-pair vs plain (wall; CPU) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in n["variants"].items():
        steps = n["steps_per_round"]
        cpu_ratio = r.get("per_pair_cpu_ratio")
        lines.append(
            f"| {name} | {r['pairs']} | {r['chunk']} | {r['grad_cache']} | {spread(r['timing'], 1 / steps, '.4f')} "
            f"| {r.get('step_cpu_s', 0):.4f} | {r['per_pair_ms']:.4f} | {r['per_pair_ratio']:.2f}x; "
            + (f"{cpu_ratio:.2f}x |" if cpu_ratio is not None else "- |")
        )
    lines.append("")
    if "ratio_grad_cache_to_plain" in n:
        cpu = n.get("cpu_ratio_grad_cache_to_plain")
        lines += [
            f"GradCache / every chunk's graph kept, same batch: {n['ratio_grad_cache_to_plain']:.2f}x per step"
            + (f" ({cpu:.2f}x in CPU time)." if cpu is not None else "."),
            "",
        ]
    for mode, m in n.get("memory", {}).items():
        lines.append(
            f"Peak memory of one {m['pairs']}-pair step (chunks of {m['chunk']}, GradCache {mode}): "
            f"{m['peak_mb']:.1f} MB ({m['how']})."
        )
    if "mining" in n:
        m = n["mining"]
        met = "met" if m["ratio_refreshed_to_kept"] <= m["target"] else "NOT met"

        def epoch(v: str) -> str:
            return f"{m[v]['epoch_s']:.3f} s ({m[v]['epoch_min_s']:.3f}-{m[v]['epoch_max_s']:.3f})"

        lines += [
            "",
            f"Mined negatives, from the cache ({m['images']} images, batch {m['batch_size']}, {m['epochs']} epochs "
            f"x {m['rounds']} rounds, the first epoch of each run left out): an epoch that refreshes its mined "
            f"negatives {epoch('refreshed')} against one that keeps them {epoch('kept')}: "
            f"{m['ratio_refreshed_to_kept']:.2f}x (target <= {m['target']}: {met}); against in-batch negatives only "
            f"{epoch('plain')}: {m['ratio_refreshed_to_plain']:.2f}x (the refresh and the extra columns together); "
            f"mining {m['refreshed']['mining_s_per_run']:.3f} s per run of {m['refreshed']['refreshes_per_run']} "
            "refreshes.",
        ]
    return lines + [""]


if __name__ == "__main__":  # the memory child: RECIPE PRESET ROWS CHUNK GRAD_CACHE
    print(json.dumps(measure_step_memory(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])))
