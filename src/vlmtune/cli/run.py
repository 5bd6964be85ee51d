"""``vlmtune train | evaluate | cache``: the commands that run the training and
evaluation engines, each beside its flags."""

from __future__ import annotations

import argparse
import os
import re
import shlex
from pathlib import Path
from typing import Any

from vlmtune.cli.args import EVAL_OVERRIDES_HELP, add_overrides, add_trust_flag, non_negative_int, positive_int
from vlmtune.errors import Interrupted, VlmtuneError
from vlmtune.runfolder import OVERWRITE_HELP, output_folder


def key_metrics() -> tuple[str, ...]:
    """The metrics a command prints: each registered task's key metrics, then the run's."""
    from vlmtune.tasks import RUN_KEY_METRICS, TASKS, task_spec

    return tuple(k for name in TASKS for k in task_spec(name).key_metrics) + RUN_KEY_METRICS


def _print_metrics(metrics: dict) -> None:
    shown = [k for k in key_metrics() if k in metrics]
    width = max((len(k) for k in shown), default=0)
    for k in shown:
        v = metrics[k]
        print(f"  {k:<{width}}  {v:.2f}" if isinstance(v, float) else f"  {k:<{width}}  {v}")


def _print_best_stage(metrics: dict) -> None:
    """The summary line saying where the evaluated (best) checkpoint comes from."""
    if metrics.get("train/best_epoch") is None or metrics.get("train/best_stage") is None:
        return
    line = (
        f"best checkpoint: epoch {metrics['train/best_epoch']}, stage {metrics['train/best_stage']} "
        f"'{metrics['train/best_stage_name']}' (validation {metrics['train/best_val']:.3f})"
    )
    if metrics.get("train/later_stages_improved") is False:
        line += "; the later stages never beat stage 0"
    print(line)


# --------------------------------------------------------------------------- train


def add_train(sub: Any) -> None:
    t = sub.add_parser(
        "train",
        help="train a recipe",
        description="Train a recipe from a YAML config. "
        "Overrides such as train.epochs=3 or backbone.name_or_path=OpenGVLab/InternVL3-1B-hf follow the config; "
        "train.num_threads=N sets the CPU threads PyTorch uses (default: PyTorch's own, or OMP_NUM_THREADS), "
        "train.progress=false turns the progress bars off. vlmtune config explain lists every key.",
    )
    t.add_argument("config", help="YAML config (see configs/)")
    add_overrides(t)
    t.add_argument("--output-dir", required=True, help="run directory to write")
    t.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")
    t.add_argument(
        "--overwrite",
        action="store_true",
        help=OVERWRITE_HELP + " (a folder holding a run is refused without --resume or --overwrite)",
    )
    t.add_argument(
        "--accept-changed-data",
        action="store_true",
        help="with --resume: continue although a train/val/test file changed since the run started "
        "(its sha256 differs; refused without this flag)",
    )
    t.add_argument("--seeds", help="run once per seed (e.g. 0,1,2) into OUTPUT_DIR/seedS, for vlmtune compare")
    t.add_argument(
        "--init-from",
        metavar="CKPT",
        help="warm start: begin from the trained weights of another run's checkpoint (same backbone, "
        "matching shapes), with a fresh schedule and history; recorded as train.init_from",
    )
    t.add_argument(
        "--tracker",
        choices=("wandb", "tensorboard"),
        help="also log to Weights & Biases (offline unless WANDB_API_KEY is set) or TensorBoard (OUTPUT_DIR/tensorboard)",
    )
    t.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from vlmtune.config import load_config

    if args.accept_changed_data and not args.resume:
        raise VlmtuneError(
            "--accept-changed-data: only with --resume (it lets a resumed run go on although a data file "
            "changed); a new run reads the files as they are"
        )
    # The config is checked before the engine (and torch) is imported: a bad key answers at once.
    if args.seeds is None:
        cfg = _with_init_from(load_config(args.config, args.overrides), args.init_from)
        from vlmtune.train import train

        metrics = train(
            cfg,
            args.output_dir,
            resume=args.resume,
            tracker=args.tracker,
            overwrite=args.overwrite,
            accept_changed_data=args.accept_changed_data,
        )
        if os.environ.get("RANK", "0") == "0":  # launched as several processes: the main one reports
            print(f"finished: {args.output_dir}/metrics.json")
            _print_best_stage(metrics)
            _print_metrics(metrics)
        return 0
    # A seed sweep: the same config once per seed, into OUTPUT_DIR/seedS.
    seeds = _parse_seeds(args.seeds)
    cfgs = {
        s: _with_init_from(load_config(args.config, [*args.overrides, f"seed={s}"]), args.init_from) for s in seeds
    }  # all checked first
    output_folder(args.output_dir)
    _share_across_seeds(cfgs, Path(args.output_dir), resume=args.resume)
    from vlmtune.train import train

    for s, cfg in cfgs.items():
        out = Path(args.output_dir) / f"seed{s}"
        try:
            # --resume: a seed's run goes on (or starts, when it has no checkpoint yet).
            metrics = train(
                cfg,
                out,
                resume=args.resume,
                tracker=args.tracker,
                overwrite=args.overwrite,
                accept_changed_data=args.accept_changed_data,
            )
        except Interrupted as e:
            # The per-run hint (--resume --output-dir DIR/seedS) would drop seed=S; the
            # sweep's own command with --resume continues this seed and runs the rest.
            where = str(e).split(";", 1)[0]
            raise Interrupted(
                f"{where} (seed {s} of --seeds {args.seeds}); continue the sweep with: {_sweep_resume_command(args)}",
                e.exit_code - 128,
            ) from None
        print(f"finished seed {s}: {out}/metrics.json")
        _print_best_stage(metrics)
        _print_metrics(metrics)
    print(f"compare with: vlmtune compare {args.output_dir}/seed* --output-dir {args.output_dir}/report")
    return 0


def _share_across_seeds(cfgs: dict[int, Any], out: Path, resume: bool = False) -> None:
    """The seeds of a sweep share one synthetic set and one feature cache under
    OUTPUT_DIR/shared instead of each generating and extracting the same ones: a seed
    does not change either (the synthetic set has its own ``data.synthetic.seed``; the
    frozen backbone does not depend on ``seed``). What proves them the same:

    - the synthetic set's folder is named by the sha256 of the whole config but
      ``seed``, so another config (other data settings, another task or backbone) gets
      another folder and never reads this one;
    - the cache's rows are keyed by content (each image's sha256) inside a folder named
      by the backbone's identity and weights and the preprocessing settings
      (:mod:`vlmtune.data.cache`), so a seed reads only features it would have computed.

    A folder the user named (``data.synthetic_dir``, ``cache.dir``) or data files
    (``data.train``) are left as given. The folders are written into the configs, so
    each seed's config.yaml says where its data and features are. With ``resume``, a
    seed whose run already started keeps the folders its config.yaml names (a sweep
    begun before the seeds shared goes on with its own data/ and cache/)."""
    import dataclasses
    import hashlib
    import json

    import yaml

    def without_seed(cfg: Any) -> str:
        return json.dumps({k: v for k, v in dataclasses.asdict(cfg).items() if k != "seed"}, sort_keys=True, default=str)

    common = {without_seed(c) for c in cfgs.values()}
    if len(common) != 1:  # the seeds' configs differ in more than the seed: nothing is shared
        return
    digest = hashlib.sha256(common.pop().encode()).hexdigest()[:16]
    for s, cfg in cfgs.items():
        started = out / f"seed{s}" / "config.yaml"
        if resume and started.is_file() and not cfg.data.synthetic_dir and not cfg.cache.dir:
            try:
                saved = yaml.safe_load(started.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                saved = None  # resume names the unreadable file itself
            if isinstance(saved, dict):
                data, cache = saved.get("data"), saved.get("cache")
                cfg.data.synthetic_dir = data.get("synthetic_dir") if isinstance(data, dict) else None
                cfg.cache.dir = cache.get("dir") if isinstance(cache, dict) else None
                continue
        if not cfg.data.train and not cfg.data.synthetic_dir:
            cfg.data.synthetic_dir = str(out / "shared" / f"data-{digest}")
        if cfg.cache.enabled and not cfg.cache.dir:
            cfg.cache.dir = str(out / "shared" / "cache")


def _with_init_from(cfg: Any, init_from: str | None) -> Any:
    """``--init-from CKPT`` is ``train.init_from`` (absolute, so a resume from another
    folder names the same checkpoint); it is recorded in the run's config.yaml."""
    if init_from is not None:
        if not init_from.strip():
            raise VlmtuneError("--init-from: needs a checkpoint folder")
        cfg.train.init_from = str(Path(init_from).resolve())
    return cfg


def _sweep_resume_command(args: argparse.Namespace) -> str:
    """The ``vlmtune train ... --seeds ...`` command as given, with --resume."""
    parts = ["vlmtune", "train", args.config, *args.overrides, "--output-dir", args.output_dir, "--seeds", args.seeds]
    if args.init_from:
        parts += ["--init-from", args.init_from]
    if args.tracker:
        parts += ["--tracker", args.tracker]
    return shlex.join([str(p) for p in parts] + ["--resume"])


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise VlmtuneError(f"--seeds: expected comma-separated integers like 0,1,2, got '{text}'") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise VlmtuneError(f"--seeds: expected distinct integers like 0,1,2, got '{text}'")
    return seeds


# --------------------------------------------------------------------------- evaluate


def add_evaluate(sub: Any) -> None:
    e = sub.add_parser(
        "evaluate",
        help="evaluate one or several checkpoints",
        description="Evaluate a checkpoint on its own test split or on --data. With several checkpoints, "
        "all are evaluated on one data set (the backbone's features are computed once where it is shared) "
        "and one table is written.",
    )
    e.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="checkpoint folder(s), e.g. runs/demo/checkpoints/best")
    add_overrides(e, EVAL_OVERRIDES_HELP)
    e.add_argument("--data", help="annotation file in a documented format (default: the run's test split)")
    e.add_argument("--image-root", help="folder the --data file's image paths resolve against (data.image_root)")
    e.add_argument("--labels", nargs="+", help="one name per checkpoint for the table")
    e.add_argument("--output-dir", help="where to write metrics.json (default: CHECKPOINT/eval); required with several")
    e.add_argument(
        "--rankings",
        action="store_true",
        help="also write per-query results: rankings_t2i.jsonl / rankings_i2t.jsonl (each caption's and each "
        "image's top-k with scores, ground truth marked, boxes for grounding) or rankings_counting.jsonl, and "
        "examples.html, a self-contained page of sample queries (worst first)",
    )
    e.add_argument(
        "--rankings-k", type=positive_int, default=10, help="length of each query's list in the rankings, at least 1 (default 10)"
    )
    e.add_argument(
        "--examples",
        type=non_negative_int,
        default=24,
        help="queries of each kind shown in examples.html, half the worst, half random (default 24; 0: no page)",
    )
    add_trust_flag(e)
    e.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from vlmtune.config.loading import precheck_overrides

    _split_checkpoints(args)
    precheck_overrides(args.checkpoints, args.overrides, "evaluate")  # before the engine: a bad key answers at once
    from vlmtune.evaluate import evaluate_checkpoint, evaluate_many, refuse_run_folder

    if args.output_dir is not None:
        refuse_run_folder(output_folder(args.output_dir))
    if len(args.checkpoints) == 1 and not args.labels:
        metrics = evaluate_checkpoint(
            args.checkpoints[0],
            data=args.data,
            output_dir=args.output_dir,
            image_root=args.image_root,
            rankings=args.rankings,
            rankings_k=args.rankings_k,
            examples=args.examples,
            trust_remote_code=args.trust_remote_code,
            overrides=args.overrides,
        )
        dest = Path(args.output_dir) if args.output_dir else Path(args.checkpoints[0]) / "eval"
        print(f"wrote {dest / 'metrics.json'}")
        if args.rankings:
            files = sorted(p.name for p in dest.glob("rankings_*.jsonl"))
            page = " and examples.html" if args.examples else ""
            print(f"wrote {', '.join(files)}{page} to {dest}")
        _print_metrics(metrics)
        return 0
    if args.rankings:
        raise VlmtuneError("--rankings: evaluate one checkpoint at a time")
    if not args.output_dir:
        raise VlmtuneError("--output-dir: needed when evaluating several checkpoints")
    evaluate_many(
        args.checkpoints,
        args.labels,
        args.data,
        args.output_dir,
        image_root=args.image_root,
        trust_remote_code=args.trust_remote_code,
        overrides=args.overrides,
    )
    print((Path(args.output_dir) / "evaluation.md").read_text())
    print(f"wrote {Path(args.output_dir) / 'evaluation.md'} and evaluation.json")
    return 0


# KEY=VALUE with a config-like key: an override, not a checkpoint path (a folder of that name wins).
_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)*=")


def _split_checkpoints(args: argparse.Namespace) -> None:
    """``evaluate A B eval.rerank_k=5``: argparse gives every positional to the
    checkpoint list; move the overrides out of it."""
    paths = [x for x in args.checkpoints if not (_OVERRIDE.match(x) and not Path(x).exists())]
    if len(paths) != len(args.checkpoints):
        args.overrides = [x for x in args.checkpoints if x not in paths] + list(args.overrides)
        args.checkpoints = paths
    if not args.checkpoints:
        raise VlmtuneError("evaluate: give at least one CHECKPOINT folder before the KEY=VALUE overrides")


# --------------------------------------------------------------------------- cache


def add_cache(sub: Any) -> None:
    k = sub.add_parser(
        "cache",
        help="fill the frozen-feature cache of a config's data up front",
        description="Compute the frozen towers' features for the train/val/test splits once, into "
        "cache.dir (default OUTPUT_DIR/cache); training reads them instead of recomputing.",
    )
    k.add_argument("config", help="YAML config")
    add_overrides(k)
    k.add_argument("--output-dir", required=True, help="the run directory the cache belongs to")
    k.set_defaults(func=cmd_cache)


def cmd_cache(args: argparse.Namespace) -> int:
    """Fill the feature cache of a config's data up front (otherwise the first epoch does)."""
    from vlmtune.config import load_config

    cfg = load_config(args.config, args.overrides)  # checked before torch is imported
    from vlmtune.train.caches import fill_caches

    fill_caches(cfg, args.output_dir, say=print)
    return 0
