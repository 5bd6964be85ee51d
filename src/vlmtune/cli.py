"""``vlmtune <command>``. ``main(argv)`` is what tests call, so a whole run is a test."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from vlmtune import __version__
from vlmtune.errors import VlmtuneError

log = logging.getLogger("vlmtune")

KEY_METRICS = (
    "retrieval/i2t_r1", "retrieval/i2t_r5", "retrieval/i2t_r10", "retrieval/t2i_r1", "retrieval/t2i_r5",
    "retrieval/t2i_r10", "retrieval/mean_recall", "retrieval/chance_i2t_r1", "retrieval/chance_t2i_r1",
    "grounding/acc50", "grounding/baseline_acc50", "grounding/miou", "grounding/baseline_miou",
    "spatial/accuracy", "spatial/macro_f1", "spatial/baseline_accuracy",
    "count/accuracy", "count/baseline_accuracy", "count/macro_f1", "count/baseline_macro_f1",
    "answer/count_accuracy", "answer/baseline_count_accuracy", "answer/parse_rate",
    "text/bleu4", "text/rougeL", "text/perplexity",
    "train/epochs", "train/wall_s", "params/trainable", "params/total",
)


def _print_metrics(metrics: dict) -> None:
    shown = [k for k in KEY_METRICS if k in metrics]
    width = max((len(k) for k in shown), default=0)
    for k in shown:
        v = metrics[k]
        print(f"  {k:<{width}}  {v:.2f}" if isinstance(v, float) else f"  {k:<{width}}  {v}")


def cmd_train(args: argparse.Namespace) -> int:
    from vlmtune.config import load_config
    from vlmtune.train import train

    if args.seeds is None:
        cfg = load_config(args.config, args.overrides)
        metrics = train(cfg, args.output_dir, resume=args.resume, tracker=args.tracker)
        print(f"finished: {args.output_dir}/metrics.json")
        _print_metrics(metrics)
        return 0
    # A seed sweep: the same config once per seed, into OUTPUT_DIR/seedS.
    seeds = _parse_seeds(args.seeds)
    cfgs = {s: load_config(args.config, [*args.overrides, f"seed={s}"]) for s in seeds}  # all checked first
    for s, cfg in cfgs.items():
        out = Path(args.output_dir) / f"seed{s}"
        metrics = train(cfg, out, resume=args.resume and (out / "checkpoints" / "last").exists(), tracker=args.tracker)
        print(f"finished seed {s}: {out}/metrics.json")
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmtune", description="Staged fine-tuning of a frozen InternVL with small trainable parts.")
    p.add_argument("--version", action="version", version=f"vlmtune {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    d = sub.add_parser("data", help="generate synthetic data sets")
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
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
