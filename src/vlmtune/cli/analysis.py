"""``vlmtune compare | bench``: the commands that measure runs and the code's speed,
each beside its flags."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vlmtune.cli.args import non_negative_float, non_negative_int, positive_int
from vlmtune.cli.messages import shorten
from vlmtune.errors import VlmtuneError
from vlmtune.runfolder import output_folder

# --------------------------------------------------------------------------- compare


def add_compare(sub: Any) -> None:
    c = sub.add_parser(
        "compare",
        help="compare runs: tables over seeds, efficiency, plots",
        description="Group runs by config (seed aside) and write report.md, a self-contained report.html, "
        "comparison.json and PNG plots to --output-dir.",
    )
    c.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (with metrics.json, history.jsonl, config.yaml)"
    )
    c.add_argument("--output-dir", required=True, help="where to write the report")
    c.add_argument("--metric", help="validation metric for time-to-target (default: the runs' early-stopping metric)")
    c.add_argument(
        "--tolerance",
        type=non_negative_float,
        default=1.0,
        help="an epoch reaches the target when within this of the run's best value (default 1.0)",
    )
    c.add_argument("--labels", nargs="+", help="names of the groups, in order of first appearance")
    c.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from vlmtune.report import compare

    output_folder(args.output_dir)
    result = compare(args.run_dirs, args.output_dir, target_metric=args.metric, tolerance=args.tolerance, labels=args.labels)
    print(result["verdict"]["text"])
    print(f"wrote {Path(args.output_dir) / 'report.md'}, report.html and comparison.json")
    return 0


# --------------------------------------------------------------------------- bench


def add_bench(sub: Any) -> None:
    b = sub.add_parser(
        "bench",
        help="benchmark: cached vs uncached training, evaluation scaling, loader, GPU",
        description="Measure, in one run, frozen-backbone training with and without the feature cache "
        "(against one feature-extraction pass), the two-stage recipe's steps with and without the cached "
        "frozen prefix and its wall time against the single-stage recipe, the counting recipe's stage-1 epochs "
        "with and without its vision cache, dataloader throughput, retrieval evaluation against a bare "
        "matmul, on a GPU bf16 feature extraction, exact search over stored embeddings, and (fsdp) peak memory per "
        "process under FSDP vs DDP, and (negatives) large contrastive batches from the cache with GradCache and "
        "their peak memory. Writes bench.json and bench.md.",
    )
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument(
        "--preset",
        default="tiny",
        choices=("tiny", "internvl3-1b-shapes"),
        help="backbone preset (internvl3-1b-shapes: the real InternVL3-1B sizes, random weights)",
    )
    b.add_argument(
        "--images", type=positive_int, default=200, help="synthetic images (default 200; training, stages and counting)"
    )
    b.add_argument(
        "--epochs",
        type=positive_int,
        default=5,
        help="training and counting sections: cached epochs; stages section: both recipes' train.epochs (default 5)",
    )
    b.add_argument("--uncached-epochs", type=positive_int, default=None, help="uncached epochs (default: --epochs)")
    b.add_argument(
        "--batch-size",
        type=positive_int,
        default=32,
        help="training and evaluation batch size of the training, stages, counting and loader sections "
        "(fsdp: at most 8; default 32)",
    )
    b.add_argument("--eval-sizes", nargs="+", default=["1000x5000", "5000x25000"], help="galleries NxM")
    b.add_argument(
        "--sections",
        nargs="+",
        choices=("training", "stages", "counting", "loader", "eval", "gpu", "search", "fsdp", "negatives"),
        help="default: all (counting: the counting recipe's stage 1 with and without the vision cache; negatives: "
        "contrastive batches of --negatives-sizes pairs from the cache against --batch-size, GradCache, peak memory)",
    )
    b.add_argument(
        "--stage-steps",
        type=positive_int,
        default=8,
        help="stages section: timed steps per variant and round (two rounds, after 2 warm-up steps; default 8)",
    )
    b.add_argument(
        "--recipes",
        nargs=2,
        metavar=("TWO_STAGE", "SINGLE_STAGE"),
        help="stages section: the recipes compared (default: configs/retrieval_two_stage.yaml and "
        "configs/retrieval_single_stage.yaml of the repository)",
    )
    b.add_argument(
        "--no-recipe-runs", action="store_true", help="stages section: time the stage steps only, not the two recipes' whole runs"
    )
    b.add_argument(
        "--search-size",
        type=int,
        default=100_000,
        help="search section: stored embeddings (random, 256-d) searched one text query at a time (default 100000)",
    )
    b.add_argument(
        "--max-tiles",
        type=positive_int,
        default=4,
        help="counting section: tiles per image, counting.max_dynamic_patch (default 4, the recipe's; 1 keeps "
        "internvl3-1b-shapes runs on a CPU short)",
    )
    add_bench_timing_flags(b)
    add_negatives_flags(b)
    b.add_argument("--progress", action="store_true", help="show training progress bars")
    b.set_defaults(func=cmd_bench)


def add_negatives_flags(b: Any) -> None:
    """The negatives section's contrastive batch sizes."""
    b.add_argument(
        "--negatives-sizes",
        type=positive_int,
        nargs="+",
        default=[1024, 4096],
        help="negatives section: contrastive batch sizes, multiples of --batch-size; GradCache is timed at the first, "
        "peak memory at the last (default 1024 4096)",
    )


def add_bench_timing_flags(b: Any) -> None:
    """How the bench times: interleaved rounds, threads, the loader's worker counts."""
    b.add_argument(
        "--rounds",
        type=positive_int,
        default=3,
        help="interleaved rounds (A B A B ...) of every comparison; the tables give medians and min-max (default 3)",
    )
    b.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: 1 on CPU, said in the table)")
    b.add_argument(
        "--loader-workers",
        type=non_negative_int,
        nargs="+",
        default=[0, 2, 4],
        help="loader section: worker counts (default 0 2 4)",
    )


def cmd_bench(args: argparse.Namespace) -> int:
    from vlmtune.bench import run_bench

    sizes = [_gallery_size(text) for text in args.eval_sizes]
    run_bench(
        args.out,
        preset=args.preset,
        images=args.images,
        epochs=args.epochs,
        uncached_epochs=args.uncached_epochs,
        batch_size=args.batch_size,
        eval_sizes=sizes,
        sections=args.sections,
        progress=args.progress,
        search_size=args.search_size,
        stage_steps=args.stage_steps,
        recipes=args.recipes,
        recipe_runs=not args.no_recipe_runs,
        max_tiles=args.max_tiles,
        rounds=args.rounds,
        threads=args.threads,
        loader_workers=args.loader_workers,
        negatives_sizes=args.negatives_sizes,
    )
    print((Path(args.out) / "bench.md").read_text())
    print(f"wrote {Path(args.out) / 'bench.json'} and bench.md")
    return 0


def _gallery_size(text: str) -> tuple[int, int]:
    """One ``--eval-sizes`` value, ``NxM``: N images and M captions of random embeddings."""
    try:
        n, m = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise VlmtuneError(f"--eval-sizes: expected NxM like 20000x100000, got '{shorten(text, 60)}'") from None
    if not (1 <= n <= 10**8 and 1 <= m <= 10**8):
        raise VlmtuneError(f"--eval-sizes: both sizes must be between 1 and 100000000, got '{shorten(text, 60)}'")
    return n, m
