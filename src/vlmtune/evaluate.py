"""Evaluate checkpoints: one on its test split or any data file, or several in one table.

Several checkpoints on one data set share what can be shared: a backbone is loaded
once per distinct backbone config, and for tasks that cache frozen features the
images are decoded and run through the backbone once; every checkpoint then
evaluates its own heads from those features. A checkpoint that trained backbone
blocks has other backbone weights, so it gets features of its own (the cache key
holds a fingerprint of the weights).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

from vlmtune.backbone import Backbone, load_backbone
from vlmtune.checkpoint import Checkpoint, open_checkpoint
from vlmtune.config import Config, evaluation_config
from vlmtune.errors import CheckpointError, DataError, VlmtuneError
from vlmtune.examples import write_examples, write_rankings
from vlmtune.restore import default_device, load_model
from vlmtune.runfolder import FIGURES, make_folder, refuse_links, run_artifacts, safe_name, write_file
from vlmtune.tasks import FeatureCache, build_task
from vlmtune.utils import sha256_file


def _splits(ckpt: Checkpoint, data: str | None, cfg: Config | None = None) -> tuple[str, str | None]:
    """(the data to evaluate on, the training split for baselines): --data, else a
    ``data.test=FILE`` override, else the run's own test split."""
    paths = ckpt.state.data_paths
    cfg = cfg or ckpt.cfg
    changed = {k: getattr(cfg.data, k) for k in ("train", "test") if getattr(cfg.data, k) != getattr(ckpt.cfg.data, k)}
    source = data or changed.get("test") or paths.get("test")
    if not source:
        raise CheckpointError(f"{ckpt.folder}: records no test split; pass --data")
    train = changed.get("train") or paths.get("train")
    return str(source), train if train and Path(train).exists() else None


def _records(
    ckpt: Checkpoint, cfg: Config, source: str, train_path: str | None, image_root: str | None
) -> tuple[list[Any], list[Any] | None]:
    """The test split of ``source`` (read with ``image_root`` where given, as --image-root
    asks) and the training split for the baselines (read with the image root it trained
    with, unless a data.train override names another file); both with the evaluation
    overrides in ``cfg`` (data.on_error, ...). A data.image_root override is the
    evaluated data's root, as --image-root is."""

    def with_root(root: str | None) -> Config:
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_root=root))

    root_given = image_root is not None or cfg.data.image_root != ckpt.cfg.data.image_root
    own_train = cfg.data.train == ckpt.cfg.data.train
    source_task = build_task(with_root(image_root) if image_root is not None else cfg)
    train_task = build_task(with_root(ckpt.cfg.data.image_root) if root_given and own_train else cfg)
    records = source_task.read_split(source, "test")
    return records, train_task.read_split(train_path, "train") if train_path else None


# What one evaluation writes in its folder (each through runfolder.write_file: atomic, no link followed).
EVALUATION_WRITES = (
    "metrics.json",
    *FIGURES,
    "examples.html",
    *(f"rankings_{kind}.jsonl" for kind in ("t2i", "i2t", "counting")),
)


def evaluate_checkpoint(
    path: str | Path,
    data: str | None = None,
    output_dir: str | Path | None = None,
    progress: bool = True,
    image_root: str | None = None,
    rankings: bool = False,
    rankings_k: int = 10,
    examples: int = 24,
    trust_remote_code: bool = False,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint on its own test split or on ``data`` (images under
    ``image_root`` where given); writes metrics.json.

    With ``rankings``, also the per-query results of the same pass (``rankings_*.jsonl``,
    see :mod:`vlmtune.examples`) and, unless ``examples`` is 0, ``examples.html`` showing
    ``examples`` queries of each kind. ``trust_remote_code`` is the user's word only,
    never the checkpoint's. ``overrides``: ``key=value`` for the task's evaluation
    sections (data.*, eval.*, ...).
    """
    if rankings_k < 1:
        raise VlmtuneError(f"--rankings-k: must be >= 1, got {rankings_k}")
    if examples < 0:
        raise VlmtuneError(f"--examples: must be >= 0, got {examples}")
    ckpt = open_checkpoint(path)
    dest = Path(output_dir) if output_dir else ckpt.folder / "eval"
    refuse_run_folder(dest)
    refuse_links(dest, EVALUATION_WRITES)  # before the pass, not after it
    cfg = evaluation_config(ckpt.cfg, overrides)
    device = default_device()
    model, task = load_model(ckpt, device, trust_remote_code=trust_remote_code, cfg=cfg)
    source, train_path = _splits(ckpt, data, cfg)
    records, train_records = _records(ckpt, cfg, source, train_path, image_root)
    if rankings:
        # A task without per-query results says so (the Task base class's default).
        metrics, details = task.evaluate_with_rankings(
            model, records, device=device, rankings_k=rankings_k, train_records=train_records, progress=progress
        )
    else:
        metrics = task.evaluate(model, records, device=device, train_records=train_records, progress=progress)
    metrics["eval/data"] = source
    metrics["checkpoint"] = str(ckpt.folder)
    if overrides:
        metrics["eval/overrides"] = " ".join(overrides)
    make_folder(dest)
    write_file(dest / "metrics.json", json.dumps(metrics, indent=2))
    task.write_figures(metrics, dest)
    if rankings:
        write_rankings(dest, details)
        if examples:
            write_examples(
                dest / "examples.html",
                details,
                checkpoint=str(ckpt.folder),
                data=source,
                metrics=metrics,
                model=model,
                cfg=cfg,
                n=examples,
                seed=cfg.seed,
            )
    return metrics


def refuse_run_folder(folder: Path) -> None:
    """Evaluation output never replaces a training run's own metrics.json: a folder with
    any run artifact besides metrics.json (which an earlier evaluation writes too) is refused."""
    if [name for name in run_artifacts(folder) if name != "metrics.json"]:
        raise VlmtuneError(
            f"--output-dir {folder}: holds a training run, whose metrics.json would be replaced; choose another folder"
        )


def evaluate_many(
    paths: list[str | Path],
    labels: list[str] | None,
    data: str | None,
    output_dir: str | Path,
    progress: bool = True,
    image_root: str | None = None,
    trust_remote_code: bool = False,
    overrides: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate several checkpoints on one data set; writes one table and every metrics.json.

    ``output_dir`` receives ``evaluation.md`` (metrics by checkpoint, best marked),
    ``evaluation.json`` and ``LABEL/metrics.json`` for each checkpoint, LABEL made a
    safe folder name (:func:`~vlmtune.runfolder.safe_name`: 'run/best' -> 'run_best').
    """
    labels = labels or [_default_label(Path(p)) for p in paths]
    folders = _label_folders(labels, len(paths))
    ckpts, cfgs = _open_comparable(paths, data, overrides)
    out = Path(output_dir)
    refuse_run_folder(out)
    refuse_links(out, ("cache", "evaluation.json", "evaluation.md", *folders))
    make_folder(out)
    device = default_device()
    first = ckpts[0]
    source, train_path = _splits(first, data, cfgs[0])
    records, train_records = _records(first, cfgs[0], source, train_path, image_root)

    backbones: dict[str, Backbone] = {}
    results: dict[str, dict[str, Any]] = {}
    for label, folder, ckpt, cfg in zip(labels, folders, ckpts, cfgs):
        metrics = _evaluate_shared(
            ckpt, cfg, backbones, records, train_records, device, out / "cache", progress, trust_remote_code
        )
        metrics["eval/data"] = source
        metrics["checkpoint"] = str(ckpt.folder)
        if overrides:
            metrics["eval/overrides"] = " ".join(overrides)
        (out / folder).mkdir(exist_ok=True)
        write_file(out / folder / "metrics.json", json.dumps(metrics, indent=2))
        results[label] = metrics
    write_file(out / "evaluation.json", json.dumps(results, indent=2))
    write_file(out / "evaluation.md", metrics_table(results, f"Evaluation on {source}"))
    return results


def _label_folders(labels: list[str], n_paths: int) -> list[str]:
    """Check the labels (one per checkpoint, distinct) and return the output folder of each."""
    if len(labels) != n_paths:
        raise VlmtuneError(f"--labels: {len(labels)} labels for {n_paths} checkpoints")
    if len(set(labels)) != len(labels):
        raise VlmtuneError(f"--labels: labels must be distinct, got {', '.join(labels)}")
    # A label names a column of the table and a folder of the output: that folder is the
    # label made safe (safe_name), so '../x' or '/abs/path' stay inside output_dir.
    folders = [safe_name(lb) for lb in labels]
    for i, f in enumerate(folders):
        if f in folders[:i]:
            taken = labels[folders.index(f)]
            raise VlmtuneError(
                f"--labels: '{taken[:80]}' and '{labels[i][:80]}' both give the folder name '{f}'; "
                f"choose labels that differ in letters or digits"
            )
    return folders


def _open_comparable(
    paths: list[str | Path], data: str | None, overrides: list[str] | None
) -> tuple[list[Checkpoint], list[Config]]:
    """Open the checkpoints with their evaluation configs; refuse mixed tasks or test splits."""
    ckpts = [open_checkpoint(p) for p in paths]
    cfgs = [evaluation_config(c.cfg, overrides) for c in ckpts]
    tasks = {c.cfg.task for c in ckpts}
    if len(tasks) > 1:
        raise VlmtuneError(f"checkpoints are of different tasks ({', '.join(sorted(tasks))}); evaluate them apart")
    sources = [_splits(c, data, cfg)[0] for c, cfg in zip(ckpts, cfgs)]
    if len(set(sources)) > 1:
        # Another path is not another split: two runs that generated the same synthetic
        # set each in its own folder record the same test split under two names.
        ids = {src: _split_identity(cfg, src) for src, cfg in zip(sources, cfgs)}
        if len(set(ids.values())) > 1:
            a = sources[0]
            b = next(src for src in sources if ids[src] != ids[a])
            raise VlmtuneError(
                f"the checkpoints record different test splits ({a} and {b} differ in their records or "
                f"images); pass --data to evaluate them on one data set"
            )
    return ckpts, cfgs


def _split_identity(cfg: Config, source: str) -> tuple[str, tuple[Any, ...]]:
    """What makes a test split the same split wherever it lies: the sha256 of its
    annotation file and, per record, its fields with each image by its content
    (sha256), so identical files under other folders match and an edited image does not."""
    from vlmtune.data.cache import content_key

    def by_content(path: Path) -> str:
        try:
            return content_key(path)
        except OSError:
            return f"missing:{Path(path).resolve()}"

    def field_value(v: Any) -> Any:
        if isinstance(v, Path):
            return by_content(v)
        if isinstance(v, tuple) and v and all(isinstance(x, Path) for x in v):
            return tuple(by_content(x) for x in v)
        return v

    digest = sha256_file(source, DataError) if Path(source).is_file() else f"not-a-file:{source}"
    records = build_task(cfg).read_split(source, "test")
    rows = tuple(
        tuple(field_value(getattr(r, f.name)) for f in dataclasses.fields(r) if f.name != "source")
        if dataclasses.is_dataclass(r)
        else repr(r)
        for r in records
    )
    return digest, rows


def _evaluate_shared(
    ckpt: Checkpoint,
    cfg: Config,
    backbones: dict[str, Backbone],
    records: list[Any],
    train_records: list[Any] | None,
    device: torch.device,
    cache_dir: Path,
    progress: bool,
    trust_remote_code: bool,
) -> dict[str, Any]:
    """Evaluate one checkpoint on a backbone shared through ``backbones``, left clean for the next."""
    # One backbone object per backbone config and source; a checkpoint's trained
    # blocks are loaded into it and restored afterwards, so the next one starts clean.
    key = json.dumps([ckpt.cfg.backbone.__dict__, ckpt.state.backbone], sort_keys=True, default=str)
    if key not in backbones:
        backbones[key] = load_backbone(
            ckpt.backbone_config(trust_remote_code), device_type=device.type, folder=ckpt.backbone_folder
        )
    backbone = backbones[key]
    pristine = {k: v.clone() for k, v in backbone.state_dict().items()}
    model, task = load_model(ckpt, device, backbone, trust_remote_code=trust_remote_code, cfg=cfg)
    cache = FeatureCache(cache_dir) if task.cacheable else None
    metrics = task.evaluate(model, records, device=device, train_records=train_records, progress=progress, cache=cache)
    if backbone.state_dict().keys() == pristine.keys():
        backbone.load_state_dict(pristine)
    else:
        # Building the model changed the backbone's modules (LoRA adapters injected
        # into the language model): it cannot be restored in place, and a second
        # checkpoint's adapters must not stack on these. The next one loads afresh.
        del backbones[key]
    del model, pristine
    return metrics


def _default_label(path: Path) -> str:
    # runs/NAME/checkpoints/best -> NAME/best
    parts = path.resolve().parts
    return f"{parts[-3]}/{parts[-1]}" if len(parts) >= 3 and parts[-2] == "checkpoints" else path.name


def metrics_table(results: dict[str, dict[str, Any]], title: str) -> str:
    """Markdown: one row per metric, one column per label; the best value in bold,
    chance and baseline rows in italics and never marked."""
    from vlmtune.report import direction, is_reference, order_metrics

    keys = order_metrics(
        sorted({k for m in results.values() for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    )
    labels = list(results)
    heads = [" ".join(lb.split()).replace("|", "\\|") for lb in labels]  # a label cannot break the table
    lines = [f"# {title}", "", "| metric | " + " | ".join(heads) + " |", "|---|" + "---|" * len(labels)]
    for k in keys:
        vals = [results[lb].get(k) for lb in labels]
        nums = [v for v in vals if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))]
        way = None if is_reference(k) else direction(k)
        best = (max(nums) if way == "max" else min(nums)) if way and len(nums) > 1 else None
        cells = []
        for v in vals:
            if v is None:
                cells.append("—")
                continue
            s = f"{v:.2f}" if isinstance(v, float) else str(v)
            cells.append(f"**{s}**" if best is not None and v == best else s)
        name = f"*{k}*" if is_reference(k) else k
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
