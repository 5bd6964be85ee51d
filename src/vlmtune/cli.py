"""``vlmtune <command>``. ``main(argv)`` is what tests call, so a whole run is a test."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

from vlmtune import __version__
from vlmtune.errors import VlmtuneError

log = logging.getLogger("vlmtune")

def key_metrics() -> tuple[str, ...]:
    """The metrics a command prints: each registered task's key metrics, then the run's."""
    from vlmtune.tasks import RUN_KEY_METRICS, TASKS, task_class

    return tuple(k for name in TASKS for k in task_class(name).key_metrics) + RUN_KEY_METRICS


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
    line = (f"best checkpoint: epoch {metrics['train/best_epoch'] + 1}, stage {metrics['train/best_stage']} "
            f"'{metrics['train/best_stage_name']}' (validation {metrics['train/best_val']:.3f})")
    if metrics.get("train/later_stages_improved") is False:
        line += "; the later stages never beat stage 0"
    print(line)


def cmd_train(args: argparse.Namespace) -> int:
    from vlmtune.config import load_config
    from vlmtune.train import train

    if args.seeds is None:
        cfg = load_config(args.config, args.overrides)
        metrics = train(cfg, args.output_dir, resume=args.resume, tracker=args.tracker)
        if os.environ.get("RANK", "0") == "0":  # launched as several processes: the main one reports
            print(f"finished: {args.output_dir}/metrics.json")
            _print_best_stage(metrics)
            _print_metrics(metrics)
        return 0
    # A seed sweep: the same config once per seed, into OUTPUT_DIR/seedS.
    seeds = _parse_seeds(args.seeds)
    cfgs = {s: load_config(args.config, [*args.overrides, f"seed={s}"]) for s in seeds}  # all checked first
    for s, cfg in cfgs.items():
        out = Path(args.output_dir) / f"seed{s}"
        metrics = train(cfg, out, resume=args.resume and (out / "checkpoints" / "last").exists(), tracker=args.tracker)
        print(f"finished seed {s}: {out}/metrics.json")
        _print_best_stage(metrics)
        _print_metrics(metrics)
    print(f"compare with: vlmtune compare {args.output_dir}/seed* --output-dir {args.output_dir}/report")
    return 0


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise VlmtuneError(f"--seeds: expected comma-separated integers like 0,1,2, got '{text}'") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise VlmtuneError(f"--seeds: expected distinct integers like 0,1,2, got '{text}'")
    return seeds


def cmd_evaluate(args: argparse.Namespace) -> int:
    from vlmtune.evaluate import evaluate_checkpoint, evaluate_many

    if len(args.checkpoints) == 1 and not args.labels:
        metrics = evaluate_checkpoint(args.checkpoints[0], data=args.data, output_dir=args.output_dir)
        dest = Path(args.output_dir) if args.output_dir else Path(args.checkpoints[0]) / "eval"
        print(f"wrote {dest / 'metrics.json'}")
        _print_metrics(metrics)
        return 0
    if not args.output_dir:
        raise VlmtuneError("--output-dir: needed when evaluating several checkpoints")
    evaluate_many(args.checkpoints, args.labels, args.data, args.output_dir)
    print((Path(args.output_dir) / "evaluation.md").read_text())
    print(f"wrote {Path(args.output_dir) / 'evaluation.md'} and evaluation.json")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from vlmtune.bench import run_bench

    sizes = []
    for text in args.eval_sizes:
        try:
            n, m = (int(x) for x in text.lower().split("x"))
        except ValueError:
            raise VlmtuneError(f"--eval-sizes: expected NxM like 20000x100000, got '{text}'") from None
        sizes.append((n, m))
    run_bench(args.out, preset=args.preset, images=args.images, epochs=args.epochs, uncached_epochs=args.uncached_epochs,
              batch_size=args.batch_size, eval_sizes=sizes, sections=args.sections, progress=args.progress)
    print((Path(args.out) / "bench.md").read_text())
    print(f"wrote {Path(args.out) / 'bench.json'} and bench.md")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """Fill the feature cache of a config's data up front (otherwise the first epoch does)."""
    from vlmtune.backbone import load_backbone
    from vlmtune.config import load_config
    from vlmtune.evaluate import default_device
    from vlmtune.tasks import FeatureCache, build_task

    cfg = load_config(args.config, args.overrides)
    task = build_task(cfg)
    if not task.cacheable:
        raise VlmtuneError(f"task '{cfg.task}': has no feature cache")
    out = Path(args.output_dir)
    cache_dir = Path(cfg.cache.dir) if cfg.cache.dir else out / "cache"
    device = default_device()
    backbone = load_backbone(cfg.backbone, device_type=device.type).to(device)
    paths = task.data_paths(out)
    for split in ("train", "val", "test"):
        records = task.read_split(paths[split])
        task.make_loader(records, backbone, train=False, cache=FeatureCache(cache_dir))
        print(f"{split}: {len(records)} records cached")
    print(f"cache: {cache_dir}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from vlmtune.report import compare

    result = compare(args.run_dirs, args.output_dir, target_metric=args.metric, tolerance=args.tolerance, labels=args.labels)
    print(result["verdict"]["text"])
    print(f"wrote {Path(args.output_dir) / 'report.md'}, report.html and comparison.json")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from vlmtune.predict import predict_file

    out = predict_file(args.checkpoint, args.image, args.question, args.attention_out)
    print(json.dumps(out, indent=2))
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    from vlmtune.predict import attention_inside_receipts

    report = attention_inside_receipts(args.checkpoint, args.data, args.boxes, args.limit)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "per_image"}, indent=2))
    return 0


def cmd_data_scenes(args: argparse.Namespace) -> int:
    from vlmtune.data.scenes import generate_scenes

    paths = generate_scenes(args.out, n=args.n, seed=args.seed, image_size=args.image_size)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


def cmd_data_receipts(args: argparse.Namespace) -> int:
    from vlmtune.data.receipts import generate_receipts

    size = (args.width, args.height) if args.height else args.width
    paths = generate_receipts(args.out, n=args.n, seed=args.seed, max_count=args.max_count, image_size=size)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


def cmd_data_validate(args: argparse.Namespace) -> int:
    from vlmtune.data.validate import detect_kind, format_lines, to_json, validate_file

    kind = args.kind or detect_kind(args.annotation_file)
    scan = validate_file(args.annotation_file, kind, max_count=args.max_count, max_text_chars=args.max_text_chars)
    if args.json:
        print(json.dumps(to_json(scan, kind), indent=2))
    else:
        print("\n".join(format_lines(scan)))
    return 1 if scan.errors else 0


def cmd_config_explain(args: argparse.Namespace) -> int:
    from vlmtune.config import explain, format_explain

    print(format_explain(explain(args.section)))
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from vlmtune.config import config_yaml, load_config

    print(config_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def _add_run_commands(sub: Any) -> None:
    """Commands that train or use checkpoints: train, evaluate, predict, attention."""
    t = sub.add_parser("train", help="train a recipe", description="Train a recipe from a YAML config. "
                       "Overrides such as train.epochs=3 or backbone.name_or_path=OpenGVLab/InternVL3-1B-hf follow the config.")
    t.add_argument("config", help="YAML config (see configs/)")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. optim.lr=3e-4")
    t.add_argument("--output-dir", required=True, help="run directory to write")
    t.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")
    t.add_argument("--seeds", help="run once per seed (e.g. 0,1,2) into OUTPUT_DIR/seedS, for vlmtune compare")
    t.add_argument("--tracker", choices=("wandb", "tensorboard"),
                   help="also log to Weights & Biases (offline unless WANDB_API_KEY is set) or TensorBoard (OUTPUT_DIR/tensorboard)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="evaluate one or several checkpoints",
                       description="Evaluate a checkpoint on its own test split or on --data. With several checkpoints, "
                       "all are evaluated on one data set (the backbone's features are computed once where it is shared) "
                       "and one table is written.")
    e.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="checkpoint folder(s), e.g. runs/demo/checkpoints/best")
    e.add_argument("--data", help="annotation file in a documented format (default: the run's test split)")
    e.add_argument("--labels", nargs="+", help="one name per checkpoint for the table")
    e.add_argument("--output-dir", help="where to write metrics.json (default: CHECKPOINT/eval); required with several")
    e.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="answer a question about one image (counting checkpoints)",
                        description="Generate the answer, the count head's class and confidence, and optionally a picture "
                        "of the answer's attention over the image.")
    pr.add_argument("checkpoint", help="counting checkpoint folder, e.g. runs/receipts/checkpoints/best")
    pr.add_argument("--image", required=True, help="image file (any size; grayscale, RGBA, 16-bit and EXIF-rotated work)")
    pr.add_argument("--question", default="How many receipts are in this image?", help="the question (default: %(default)s)")
    pr.add_argument("--attention-out", help="write the attention overlay to this PNG")
    pr.set_defaults(func=cmd_predict)

    at = sub.add_parser("attention", help="share of answer attention inside the receipts (synthetic set)",
                        description="Mean share of the answer's attention that falls inside the receipt polygons "
                        "(boxes.json), beside the receipts' share of the image area, over images with a receipt.")
    at.add_argument("checkpoint", help="counting checkpoint folder")
    at.add_argument("--data", help="counting JSONL (default: the run's test split)")
    at.add_argument("--boxes", help="boxes.json of the synthetic set (default: next to --data)")
    at.add_argument("--limit", type=int, default=None, help="at most this many images")
    at.add_argument("--output", help="also write the report (with per-image figures) to this JSON file")
    at.set_defaults(func=cmd_attention)


def _add_analysis_commands(sub: Any) -> None:
    """Commands that compare runs, measure speed or prepare the cache: compare, bench, cache."""
    c = sub.add_parser("compare", help="compare runs: tables over seeds, efficiency, plots",
                       description="Group runs by config (seed aside) and write report.md, a self-contained report.html, "
                       "comparison.json and PNG plots to --output-dir.")
    c.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (with metrics.json, history.jsonl, config.yaml)")
    c.add_argument("--output-dir", required=True, help="where to write the report")
    c.add_argument("--metric", help="validation metric for time-to-target (default: the runs' early-stopping metric)")
    c.add_argument("--tolerance", type=float, default=1.0,
                   help="an epoch reaches the target when within this of the run's best value (default 1.0)")
    c.add_argument("--labels", nargs="+", help="names of the groups, in order of first appearance")
    c.set_defaults(func=cmd_compare)

    b = sub.add_parser("bench", help="benchmark: cached vs uncached training, evaluation scaling, loader, GPU",
                       description="Measure, in one run, frozen-backbone training with and without the feature cache "
                       "(against one feature-extraction pass), dataloader throughput, retrieval evaluation against a bare "
                       "matmul, and on a GPU bf16 feature extraction. Writes bench.json and bench.md.")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--preset", default="tiny", choices=("tiny", "internvl3-1b-shapes"),
                   help="backbone preset (internvl3-1b-shapes: the real InternVL3-1B sizes, random weights)")
    b.add_argument("--images", type=int, default=200, help="synthetic images (default 200)")
    b.add_argument("--epochs", type=int, default=5, help="cached epochs (default 5)")
    b.add_argument("--uncached-epochs", type=int, default=None, help="uncached epochs (default: --epochs)")
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--eval-sizes", nargs="+", default=["1000x5000", "5000x25000"], help="galleries NxM")
    b.add_argument("--sections", nargs="+", choices=("training", "loader", "eval", "gpu"), help="default: all")
    b.add_argument("--progress", action="store_true", help="show training progress bars")
    b.set_defaults(func=cmd_bench)

    k = sub.add_parser("cache", help="fill the frozen-feature cache of a config's data up front",
                       description="Compute the frozen towers' features for the train/val/test splits once, into "
                       "cache.dir (default OUTPUT_DIR/cache); training reads them instead of recomputing.")
    k.add_argument("config", help="YAML config")
    k.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    k.add_argument("--output-dir", required=True, help="the run directory the cache belongs to")
    k.set_defaults(func=cmd_cache)


def _add_data_commands(sub: Any) -> None:
    """vlmtune data scenes | receipts | validate."""
    d = sub.add_parser("data", help="generate synthetic data sets or check one")
    dsub = d.add_subparsers(dest="generator", required=True, metavar="GENERATOR")
    s = dsub.add_parser("scenes", help="coloured shapes with captions, boxes and spatial relations (retrieval + grounding)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--n", type=int, default=400, help="number of images (default 400)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=96, help="image side in pixels (default 96)")
    s.set_defaults(func=cmd_data_scenes)
    r = dsub.add_parser("receipts", help="receipt-like papers to count, with questions and answers")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--n", type=int, default=400, help="number of images (default 400)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--max-count", type=int, default=3, help="largest number of receipts in an image (default 3)")
    r.add_argument("--width", type=int, default=128, help="image width in pixels (default 128)")
    r.add_argument("--height", type=int, default=None, help="image height (default: same as width)")
    r.set_defaults(func=cmd_data_receipts)
    v = dsub.add_parser("validate", help="check an annotation file and its images; list every problem",
                        description="Check an annotation file up front, decoding every image, and print every problem "
                        "as 'FILE: record N: message' (notes, such as images converted to RGB, as 'FILE: record N: note: "
                        "...') and a summary line. Exit status: 0 when there is no error, 1 when there is one.")
    v.add_argument("annotation_file", help="retrieval/grounding/COCO JSON or counting JSONL")
    v.add_argument("--kind", choices=("pairs", "counting"), help="file kind (default: .jsonl = counting, else pairs)")
    v.add_argument("--max-count", type=int, default=None, help="counting: largest allowed count (default: no upper limit)")
    v.add_argument("--max-text-chars", type=int, default=1000, help="longest caption, question or answer (default 1000)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(func=cmd_data_validate)


def _add_config_commands(sub: Any) -> None:
    """vlmtune config explain | show."""
    g = sub.add_parser("config", help="explain the config keys or show a resolved config")
    gsub = g.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    x = gsub.add_parser("explain", help="every config key with its type, default and help",
                        description="List the config keys in declaration order, each with its type, default and help. "
                        "SECTION narrows the list: optim, train.early_stopping, stages, or one key such as optim.lr.")
    x.add_argument("section", nargs="?", metavar="SECTION", help="dotted section or key (default: all)")
    x.set_defaults(func=cmd_config_explain)
    w = gsub.add_parser("show", help="print a config with its defaults and overrides applied, as YAML",
                        description="Load and check a config as train would, then print every key as YAML.")
    w.add_argument("config", help="YAML config")
    w.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. optim.lr=3e-4")
    w.set_defaults(func=cmd_config_show)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmtune", description="Staged fine-tuning of a frozen InternVL with small trainable parts.")
    p.add_argument("--version", action="version", version=f"vlmtune {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_run_commands, _add_analysis_commands, _add_data_commands, _add_config_commands):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after options (argparse cannot intermix a
    # trailing positional list with a subcommand's options by itself).
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x or getattr(args, "overrides", None) is None]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s", force=True)
    if not args.debug:
        # transformers and accelerate are chatty at INFO; keep their warnings only.
        for name in ("transformers", "accelerate", "urllib3", "huggingface_hub", "PIL", "matplotlib"):
            logging.getLogger(name).setLevel(logging.WARNING)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover
            pass
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except VlmtuneError as e:
        if args.debug:
            raise
        if os.environ.get("RANK", "0") == "0":  # one message, not one per process
            print(f"{getattr(e, 'label', 'error')}: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
