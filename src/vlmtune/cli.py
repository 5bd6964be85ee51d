"""``vlmtune <command>``. ``main(argv)`` is what tests call, so a whole run is a test."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

from vlmtune import __version__
from vlmtune.errors import Interrupted, VlmtuneError
from vlmtune.runfolder import OVERWRITE_HELP, output_folder, write_text

log = logging.getLogger("vlmtune")

# No message is longer than this: a value quoted from the input is shortened.
MAX_MESSAGE = 500
GENERATOR_OVERWRITE_HELP = ("generate into a folder that is not empty: files of the same names are replaced, the "
                            "files an earlier generation listed in its .vlmtune-generated.json are removed first, "
                            "other files are kept")


# --------------------------------------------------------------------------- flag types


def _int(text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{_shorten(text, 40)}'") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {_shorten(text, 40)}")
    return value


def positive_int(text: str) -> int:
    """A count or a size: 1 .. 10^9."""
    return _int(text, 1, 10**9)


def non_negative_int(text: str) -> int:
    return _int(text, 0, 10**9)


def seed_int(text: str) -> int:
    """What numpy and torch accept as a seed."""
    return _int(text, 0, 2**32 - 1)


def non_negative_float(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{_shorten(text, 40)}'") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {_shorten(text, 40)}")
    return value


class _UsageError(VlmtuneError):
    """A bad command line (argparse's own checks and the flag types above)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one ``error:`` line and exit status 2 from
    :func:`main` (not a usage block and ``SystemExit``)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise _UsageError(f"{message} (see {self.prog} --help)")

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
        cfg = _with_init_from(load_config(args.config, args.overrides), args.init_from)
        metrics = train(cfg, args.output_dir, resume=args.resume, tracker=args.tracker, overwrite=args.overwrite,
                        accept_changed_data=args.accept_changed_data)
        if os.environ.get("RANK", "0") == "0":  # launched as several processes: the main one reports
            print(f"finished: {args.output_dir}/metrics.json")
            _print_best_stage(metrics)
            _print_metrics(metrics)
        return 0
    # A seed sweep: the same config once per seed, into OUTPUT_DIR/seedS.
    seeds = _parse_seeds(args.seeds)
    cfgs = {s: _with_init_from(load_config(args.config, [*args.overrides, f"seed={s}"]), args.init_from)
            for s in seeds}  # all checked first
    output_folder(args.output_dir)
    for s, cfg in cfgs.items():
        out = Path(args.output_dir) / f"seed{s}"
        try:
            # --resume: a seed's run goes on (or starts, when it has no checkpoint yet).
            metrics = train(cfg, out, resume=args.resume, tracker=args.tracker, overwrite=args.overwrite,
                            accept_changed_data=args.accept_changed_data)
        except Interrupted as e:
            # The per-run hint (--resume --output-dir DIR/seedS) would drop seed=S; the
            # sweep's own command with --resume continues this seed and runs the rest.
            where = str(e).split(";", 1)[0]
            raise Interrupted(f"{where} (seed {s} of --seeds {args.seeds}); continue the sweep with: "
                              f"{_sweep_resume_command(args)}", e.exit_code - 128) from None
        print(f"finished seed {s}: {out}/metrics.json")
        _print_best_stage(metrics)
        _print_metrics(metrics)
    print(f"compare with: vlmtune compare {args.output_dir}/seed* --output-dir {args.output_dir}/report")
    return 0


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


def cmd_evaluate(args: argparse.Namespace) -> int:
    from vlmtune.evaluate import evaluate_checkpoint, evaluate_many, refuse_run_folder

    if args.output_dir is not None:
        refuse_run_folder(output_folder(args.output_dir))
    if len(args.checkpoints) == 1 and not args.labels:
        metrics = evaluate_checkpoint(args.checkpoints[0], data=args.data, output_dir=args.output_dir,
                                      image_root=args.image_root, rankings=args.rankings,
                                      rankings_k=args.rankings_k, examples=args.examples,
                                      trust_remote_code=args.trust_remote_code, overrides=args.overrides)
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
    evaluate_many(args.checkpoints, args.labels, args.data, args.output_dir, image_root=args.image_root,
                  trust_remote_code=args.trust_remote_code, overrides=args.overrides)
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
            raise VlmtuneError(f"--eval-sizes: expected NxM like 20000x100000, got '{_shorten(text, 60)}'") from None
        if not (1 <= n <= 10**8 and 1 <= m <= 10**8):
            raise VlmtuneError(f"--eval-sizes: both sizes must be between 1 and 100000000, got '{_shorten(text, 60)}'")
        sizes.append((n, m))
    run_bench(args.out, preset=args.preset, images=args.images, epochs=args.epochs, uncached_epochs=args.uncached_epochs,
              batch_size=args.batch_size, eval_sizes=sizes, sections=args.sections, progress=args.progress,
              search_size=args.search_size, stage_steps=args.stage_steps, recipes=args.recipes,
              recipe_runs=not args.no_recipe_runs, max_tiles=args.max_tiles)
    print((Path(args.out) / "bench.md").read_text())
    print(f"wrote {Path(args.out) / 'bench.json'} and bench.md")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """Fill the feature cache of a config's data up front (otherwise the first epoch does)."""
    from vlmtune.config import load_config
    from vlmtune.train.caches import fill_caches

    fill_caches(load_config(args.config, args.overrides), args.output_dir)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from vlmtune.report import compare

    output_folder(args.output_dir)
    result = compare(args.run_dirs, args.output_dir, target_metric=args.metric, tolerance=args.tolerance, labels=args.labels)
    print(result["verdict"]["text"])
    print(f"wrote {Path(args.output_dir) / 'report.md'}, report.html and comparison.json")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from vlmtune.predict import predict_file

    out = predict_file(args.checkpoint, args.image, args.question, args.attention_out,
                       trust_remote_code=args.trust_remote_code, overrides=args.overrides)
    print(json.dumps(out, indent=2))
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    from vlmtune.predict import attention_inside_receipts

    report = attention_inside_receipts(args.checkpoint, args.data, args.boxes, args.limit, image_root=args.image_root,
                                       trust_remote_code=args.trust_remote_code, overrides=args.overrides)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        write_text(Path(args.output), json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "per_image"}, indent=2))
    return 0


def cmd_data_scenes(args: argparse.Namespace) -> int:
    from vlmtune.data.scenes import generate_scenes

    out = output_folder(args.out, "--out")
    _check_range("--image-size", args.image_size, 48, 4096)
    _check_range("--n", args.n, 1, 10**6)
    try:
        paths = generate_scenes(out, n=args.n, seed=args.seed, image_size=args.image_size, overwrite=args.overwrite)
    except ValueError as e:  # n too small for three splits
        raise VlmtuneError(f"--n {args.n}: {e}") from None
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


def cmd_data_receipts(args: argparse.Namespace) -> int:
    from vlmtune.data.receipts import generate_receipts

    size = (args.width, args.height) if args.height else args.width
    out = output_folder(args.out, "--out")
    _check_range("--width", args.width, 16, 4096)
    _check_range("--height", args.height or args.width, 16, 4096)
    _check_range("--n", args.n, 1, 10**6)
    _check_range("--max-count", args.max_count, 1, 100)
    try:
        paths = generate_receipts(out, n=args.n, seed=args.seed, max_count=args.max_count, image_size=size,
                                  overwrite=args.overwrite)
    except ValueError as e:
        raise VlmtuneError(f"--n {args.n}: {e}") from None
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


def _read_options(args: argparse.Namespace) -> Any:
    """ReadOptions from the data commands' --format, --image-root, --split, ... options."""
    from vlmtune.data.formats import ReadOptions

    return ReadOptions(image_root=args.image_root, format=args.format, split=args.split,
                       box_tolerance_px=args.box_tolerance_px, duplicates=args.duplicates,
                       max_text_chars=getattr(args, "max_text_chars", 1000))


def _check_range(flag: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise VlmtuneError(f"{flag}: must be between {low} and {high}, got {value}")


def cmd_data_validate(args: argparse.Namespace) -> int:
    from vlmtune.data.validate import detect_kind, format_lines, to_json, validate_file

    opts = _read_options(args)
    kind = args.kind or detect_kind(args.annotation_file, opts.format, opts)
    scan = validate_file(args.annotation_file, kind, max_count=args.max_count, opts=opts)
    if args.json:
        print(json.dumps(to_json(scan, kind), indent=2))
    else:
        print("\n".join(format_lines(scan)))
    return 1 if scan.errors else 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from vlmtune.data.validate import format_inspect, inspect_file

    info = inspect_file(args.annotation_file, _read_options(args))
    print(json.dumps(info, indent=2) if args.json else format_inspect(info))
    return 0


def _add_read_options(p: Any) -> None:
    """How data commands read a file: the data.* keys that training takes from the config."""
    from vlmtune.data.sources import FORMATS

    p.add_argument("--format", choices=FORMATS, default="auto", help="annotation format (default: detected from the file)")
    p.add_argument("--image-root", help="folder image paths resolve against (data.image_root; default: the annotation file's folder)")
    p.add_argument("--split", choices=("train", "val", "test"),
                   help="for files holding every split (Karpathy, refer, datasets dicts): read only this one (default: all)")
    p.add_argument("--box-tolerance-px", type=float, default=0.0, help="clip boxes overrunning the image by at most this (default 0)")
    p.add_argument("--duplicates", choices=("error", "keep", "drop"), default="error", help="repeated records (default: error)")


def cmd_config_explain(args: argparse.Namespace) -> int:
    from vlmtune.config import explain, format_explain

    print(format_explain(explain(args.section)))
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from vlmtune.config import config_yaml, load_config

    print(config_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from vlmtune.search import embed

    r = embed(args.checkpoint, args.out, images=args.images, data=args.data, texts=args.texts, progress=not args.no_progress)
    print(f"embedded {r['embedded_images']} images ({r['kept_images']} kept from before, {r['changed_images']} changed, "
          f"{r['removed_images']} removed, {len(r['unreadable'])} unreadable) and {r['embedded_texts']} new texts; "
          f"{r['images']} images and {r['texts']} texts in {Path(args.out) / 'embeddings.safetensors'}")
    for u in r["unreadable"]:
        print(f"unreadable: {u['error']}", file=sys.stderr)
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from vlmtune.search import build_index

    info = build_index(args.embed_dir, args.out, kind=args.kind, faiss_kind=args.faiss, nlist=args.nlist,
                       nprobe=args.nprobe, hnsw_m=args.hnsw_m, ef_search=args.ef_search)
    print(f"indexed {info['count']} {info['kind']} ({info['dim']}-d, {info['search']} search) into {args.out}")
    if "recall_at_10" in info:
        q = info["recall_queries"]
        print(f"recall@10 against exact search: {info['recall_at_10']:.2f}% ({q['count']} queries from {q['from']}; "
              f"{json.dumps(info['faiss'])})")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from vlmtune.search import Index, format_table, open_query_model, read_queries, search

    given = [x is not None for x in (args.text, args.image, args.queries)]
    if sum(given) != 1:
        raise VlmtuneError("search: give exactly one of --text, --image or --queries")
    index = Index(args.index)
    model = open_query_model(index, args.checkpoint)
    if args.queries:
        queries = read_queries(Path(args.queries))
    else:
        queries = [{"text": args.text}] if args.text is not None else [{"image": args.image}]
        if args.text is not None and not args.text.strip():
            raise VlmtuneError("--text: the query is empty")
    results = search(index, model, queries, k=args.k, rerank=args.rerank, rerank_k=args.rerank_k)
    if args.queries:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            write_text(Path(args.out), lines)
            print(f"wrote {len(results)} result lines to {args.out}")
        else:
            print(lines, end="")
    elif args.json:
        print(json.dumps(results[0], indent=2, ensure_ascii=False))
    else:
        print(format_table(results[0]))
    return 0


def _add_use_commands(sub: Any) -> None:
    """Commands that use a trained model on new data: embed, index, search."""
    em = sub.add_parser("embed", help="embed a folder of images or a data set with a retrieval checkpoint",
                        description="Write embeddings.safetensors (images [N, D], texts [M, D], L2-normalised), "
                        "items.jsonl (one line per row) and embed.json to --out. A second run into the same --out "
                        "embeds only new or changed files (keyed by path, size and mtime) and new texts.")
    em.add_argument("checkpoint", help="retrieval checkpoint folder, e.g. runs/r2/checkpoints/best")
    src = em.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images, searched recursively (unreadable files are reported and skipped)")
    src.add_argument("--data", help="annotation file in a documented format: its images and captions")
    em.add_argument("--texts", help="also embed these texts: one per line, or JSONL with a 'text' field")
    em.add_argument("--out", required=True, help="output folder (only this folder is written)")
    em.add_argument("--no-progress", action="store_true", help="no progress bar")
    em.set_defaults(func=cmd_embed)

    ix = sub.add_parser("index", help="build a search index from embed's output",
                        description="Store the normalised gallery matrix for exact search (default), and with --faiss an "
                        "approximate FAISS index whose recall@10 against exact search is measured and reported.")
    ix.add_argument("embed_dir", metavar="EMBED_DIR", help="folder written by vlmtune embed")
    ix.add_argument("--out", required=True, help="new folder for the index")
    ix.add_argument("--kind", choices=("images", "texts"), help="what to search (default: images, or texts when there are none)")
    ix.add_argument("--faiss", choices=("ivf", "hnsw"), help="also build a FAISS IVF or HNSW index (needs faiss-cpu)")
    ix.add_argument("--nlist", type=int, help="IVF: number of lists (default: about 4 sqrt(N))")
    ix.add_argument("--nprobe", type=int, help="IVF: lists probed per query (default: max(16, nlist/8), at most nlist)")
    ix.add_argument("--hnsw-m", type=int, default=32, help="HNSW: neighbours per node (default 32)")
    ix.add_argument("--ef-search", type=int, default=128, help="HNSW: search breadth (default 128)")
    ix.set_defaults(func=cmd_index)

    se = sub.add_parser("search", help="search an index by text or image",
                        description="Embed the query with the checkpoint that built the index (refusing another) and "
                        "print the top k as a table (rank, cosine score, item) or JSON. --queries runs many queries and "
                        "writes one JSONL line per query.")
    se.add_argument("index", metavar="INDEX", help="folder written by vlmtune index")
    se.add_argument("--text", help="a text query")
    se.add_argument("--image", help="an image query (path)")
    se.add_argument("--queries", help="file of queries: text lines, or JSONL with 'text' or 'image' per line")
    se.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    se.add_argument("--rerank", action="store_true", help="re-order the top candidates by the matching head, as evaluation's re-rank")
    se.add_argument("--rerank-k", type=int, help="candidates the matching head re-scores (default: k)")
    se.add_argument("--json", action="store_true", help="print JSON instead of a table")
    se.add_argument("--out", help="with --queries: write the JSONL here instead of to stdout")
    se.add_argument("--checkpoint", help="the checkpoint to embed queries with, if it moved (its fingerprint must match)")
    se.set_defaults(func=cmd_search)


def cmd_export(args: argparse.Namespace) -> int:
    from vlmtune.export import export_checkpoint

    summary = export_checkpoint(args.checkpoint, args.out, args.format)
    print(json.dumps(summary, indent=2))
    return 0


def _add_export_command(sub: Any) -> None:
    """vlmtune export."""
    x = sub.add_parser("export", help="write a checkpoint as a peft adapter, a merged Hugging Face model or a "
                       "self-contained vlmtune checkpoint",
                       description="Export a checkpoint to a new folder. peft: the LoRA of a counting checkpoint "
                       "(counting.lm_mode=lora) as adapter_config.json + adapter_model.safetensors for "
                       "PeftModel.from_pretrained(internvl, OUT), other trained InternVL parts as modules_to_save, the "
                       "heads beside as vlmtune_heads.safetensors. merged: InternVL with trained blocks and merged LoRA "
                       "by save_pretrained (AutoModelForImageTextToText.from_pretrained(OUT)), beside it the heads as a "
                       "vlmtune checkpoint (vlmtune evaluate OUT works). vlmtune: a self-contained checkpoint with the "
                       "backbone in Hugging Face form under backbone/.")
    x.add_argument("checkpoint", help="checkpoint folder, e.g. runs/demo/checkpoints/best")
    x.add_argument("--out", required=True, help="new folder to write (must not exist or be empty)")
    x.add_argument("--format", choices=("peft", "merged", "vlmtune"), default="vlmtune", help="default: %(default)s")
    x.set_defaults(func=cmd_export)


EVAL_OVERRIDES_HELP = ("overrides of the checkpoint's config for this command: data.* and eval.* keys (and generation.* "
                       "for counting), e.g. eval.rerank_k=5 data.on_error=skip; any other key is an error")
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


def _add_run_commands(sub: Any) -> None:
    """Commands that train or use checkpoints: train, evaluate, predict, attention."""
    t = sub.add_parser("train", help="train a recipe", description="Train a recipe from a YAML config. "
                       "Overrides such as train.epochs=3 or backbone.name_or_path=OpenGVLab/InternVL3-1B-hf follow the config.")
    t.add_argument("config", help="YAML config (see configs/)")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. optim.lr=3e-4")
    t.add_argument("--output-dir", required=True, help="run directory to write")
    t.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")
    t.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP + " (a folder holding a run is refused "
                   "without --resume or --overwrite)")
    t.add_argument("--accept-changed-data", action="store_true",
                   help="with --resume: continue although a train/val/test file changed since the run started "
                   "(its sha256 differs; refused without this flag)")
    t.add_argument("--seeds", help="run once per seed (e.g. 0,1,2) into OUTPUT_DIR/seedS, for vlmtune compare")
    t.add_argument("--init-from", metavar="CKPT",
                   help="warm start: begin from the trained weights of another run's checkpoint (same backbone, "
                   "matching shapes), with a fresh schedule and history; recorded as train.init_from")
    t.add_argument("--tracker", choices=("wandb", "tensorboard"),
                   help="also log to Weights & Biases (offline unless WANDB_API_KEY is set) or TensorBoard (OUTPUT_DIR/tensorboard)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="evaluate one or several checkpoints",
                       description="Evaluate a checkpoint on its own test split or on --data. With several checkpoints, "
                       "all are evaluated on one data set (the backbone's features are computed once where it is shared) "
                       "and one table is written.")
    e.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="checkpoint folder(s), e.g. runs/demo/checkpoints/best")
    e.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=EVAL_OVERRIDES_HELP)
    e.add_argument("--data", help="annotation file in a documented format (default: the run's test split)")
    e.add_argument("--image-root", help="folder the --data file's image paths resolve against (data.image_root)")
    e.add_argument("--labels", nargs="+", help="one name per checkpoint for the table")
    e.add_argument("--output-dir", help="where to write metrics.json (default: CHECKPOINT/eval); required with several")
    e.add_argument("--rankings", action="store_true",
                   help="also write per-query results: rankings_t2i.jsonl / rankings_i2t.jsonl (each caption's and each "
                   "image's top-k with scores, ground truth marked, boxes for grounding) or rankings_counting.jsonl, and "
                   "examples.html, a self-contained page of sample queries (worst first)")
    e.add_argument("--rankings-k", type=int, default=10, help="length of each query's list in the rankings (default 10)")
    e.add_argument("--examples", type=int, default=24,
                   help="queries of each kind shown in examples.html, half the worst, half random (default 24; 0: no page)")
    _add_trust_flag(e)
    e.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="answer a question about one image (counting checkpoints)",
                        description="Generate the answer, the count head's class and confidence, and optionally a picture "
                        "of the answer's attention over the image.")
    pr.add_argument("checkpoint", help="counting checkpoint folder, e.g. runs/receipts/checkpoints/best")
    pr.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=EVAL_OVERRIDES_HELP)
    pr.add_argument("--image", required=True, help="image file (any size; grayscale, RGBA, 16-bit and EXIF-rotated work)")
    pr.add_argument("--question", default="How many receipts are in this image?", help="the question (default: %(default)s)")
    pr.add_argument("--attention-out", help="write the attention overlay to this PNG")
    _add_trust_flag(pr)
    pr.set_defaults(func=cmd_predict)

    at = sub.add_parser("attention", help="share of answer attention inside the receipts (synthetic set)",
                        description="Mean share of the answer's attention that falls inside the receipt polygons "
                        "(boxes.json), beside the receipts' share of the image area, over images with a receipt.")
    at.add_argument("checkpoint", help="counting checkpoint folder")
    at.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=EVAL_OVERRIDES_HELP)
    at.add_argument("--data", help="counting JSONL (default: the run's test split)")
    at.add_argument("--boxes", help="boxes.json of the synthetic set (default: next to --data)")
    at.add_argument("--image-root", help="folder the --data file's image paths resolve against (data.image_root)")
    at.add_argument("--limit", type=positive_int, default=None, help="at most this many images")
    at.add_argument("--output", help="also write the report (with per-image figures) to this JSON file")
    _add_trust_flag(at)
    at.set_defaults(func=cmd_attention)


def _add_trust_flag(parser: argparse.ArgumentParser) -> None:
    """Only the user decides that code shipped with a checkpoint may run: a checkpoint
    whose backbone folder asks for it (an auto_map, a .py file) is refused without this,
    and its config.yaml's backbone.trust_remote_code is ignored."""
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow code shipped in the checkpoint's backbone folder (auto_map, *.py) to run; "
                        "off unless you pass it (the checkpoint's own config is never asked)")


def _add_analysis_commands(sub: Any) -> None:
    """Commands that compare runs, measure speed or prepare the cache: compare, bench, cache."""
    c = sub.add_parser("compare", help="compare runs: tables over seeds, efficiency, plots",
                       description="Group runs by config (seed aside) and write report.md, a self-contained report.html, "
                       "comparison.json and PNG plots to --output-dir.")
    c.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (with metrics.json, history.jsonl, config.yaml)")
    c.add_argument("--output-dir", required=True, help="where to write the report")
    c.add_argument("--metric", help="validation metric for time-to-target (default: the runs' early-stopping metric)")
    c.add_argument("--tolerance", type=non_negative_float, default=1.0,
                   help="an epoch reaches the target when within this of the run's best value (default 1.0)")
    c.add_argument("--labels", nargs="+", help="names of the groups, in order of first appearance")
    c.set_defaults(func=cmd_compare)

    b = sub.add_parser("bench", help="benchmark: cached vs uncached training, evaluation scaling, loader, GPU",
                       description="Measure, in one run, frozen-backbone training with and without the feature cache "
                       "(against one feature-extraction pass), the two-stage recipe's steps with and without the cached "
                       "frozen prefix and its wall time against the single-stage recipe, the counting recipe's stage-1 epochs "
                       "with and without its vision cache, dataloader throughput, retrieval evaluation against a bare "
                       "matmul, on a GPU bf16 feature extraction, exact search over stored embeddings, and (fsdp) peak memory per "
                       "process under FSDP vs DDP. Writes bench.json and bench.md.")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--preset", default="tiny", choices=("tiny", "internvl3-1b-shapes"),
                   help="backbone preset (internvl3-1b-shapes: the real InternVL3-1B sizes, random weights)")
    b.add_argument("--images", type=positive_int, default=200, help="synthetic images (default 200; training, stages and counting)")
    b.add_argument("--epochs", type=positive_int, default=5,
                   help="training and counting sections: cached epochs; stages section: both recipes' train.epochs (default 5)")
    b.add_argument("--uncached-epochs", type=positive_int, default=None, help="uncached epochs (default: --epochs)")
    b.add_argument("--batch-size", type=positive_int, default=32)
    b.add_argument("--eval-sizes", nargs="+", default=["1000x5000", "5000x25000"], help="galleries NxM")
    b.add_argument("--sections", nargs="+", choices=("training", "stages", "counting", "loader", "eval", "gpu", "search", "fsdp"),
                   help="default: all (counting: the counting recipe's stage 1 with and without the vision cache)")
    b.add_argument("--stage-steps", type=positive_int, default=8,
                   help="stages section: timed steps per variant and round (two rounds, after 2 warm-up steps; default 8)")
    b.add_argument("--recipes", nargs=2, metavar=("TWO_STAGE", "SINGLE_STAGE"),
                   help="stages section: the recipes compared (default: configs/retrieval_two_stage.yaml and "
                   "configs/retrieval_single_stage.yaml of the repository)")
    b.add_argument("--no-recipe-runs", action="store_true",
                   help="stages section: time the stage steps only, not the two recipes' whole runs")
    b.add_argument("--search-size", type=int, default=100_000,
                   help="search section: stored embeddings (random, 256-d) searched one text query at a time (default 100000)")
    b.add_argument("--max-tiles", type=positive_int, default=4,
                   help="counting section: tiles per image, counting.max_dynamic_patch (default 4, the recipe's; 1 keeps "
                   "internvl3-1b-shapes runs on a CPU short)")
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
    s.add_argument("--out", required=True, help="output folder (refused when not empty, unless --overwrite)")
    s.add_argument("--n", type=positive_int, default=400, help="number of images (default 400)")
    s.add_argument("--seed", type=seed_int, default=0)
    s.add_argument("--image-size", type=positive_int, default=96, help="image side in pixels, 48 to 4096 (default 96)")
    s.add_argument("--overwrite", action="store_true", help=GENERATOR_OVERWRITE_HELP)
    s.set_defaults(func=cmd_data_scenes)
    r = dsub.add_parser("receipts", help="receipt-like papers to count, with questions and answers")
    r.add_argument("--out", required=True, help="output folder (refused when not empty, unless --overwrite)")
    r.add_argument("--n", type=positive_int, default=400, help="number of images (default 400)")
    r.add_argument("--seed", type=seed_int, default=0)
    r.add_argument("--max-count", type=positive_int, default=3, help="largest number of receipts in an image (default 3)")
    r.add_argument("--width", type=positive_int, default=128, help="image width in pixels, 16 to 4096 (default 128)")
    r.add_argument("--height", type=positive_int, default=None, help="image height (default: same as width)")
    r.add_argument("--overwrite", action="store_true", help=GENERATOR_OVERWRITE_HELP)
    r.set_defaults(func=cmd_data_receipts)
    v = dsub.add_parser("validate", help="check an annotation file and its images; list every problem",
                        description="Check an annotation file up front, decoding every image, and print every problem "
                        "as 'FILE: record N: message' (notes, such as images converted to RGB, as 'FILE: record N: note: "
                        "...') and a summary line. Exit status: 0 when there is no error, 1 when there is one.")
    v.add_argument("annotation_file", help="annotation file or folder in any format of README 'Your data' (retrieval, grounding, "
                   "COCO, Karpathy, ALBEF, refer, GeoText, counting JSONL or CSV, datasets)")
    v.add_argument("--kind", choices=("pairs", "counting"), help="file kind (default: .jsonl = counting, else pairs)")
    v.add_argument("--max-count", type=non_negative_int, default=None,
                   help="counting: largest allowed count (default: no upper limit)")
    v.add_argument("--max-text-chars", type=positive_int, default=1000, help="longest caption, question or answer (default 1000)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_read_options(v)
    v.set_defaults(func=cmd_data_validate)
    n = dsub.add_parser("inspect", help="what a data set holds and which losses and metrics it can feed",
                        description="Detect the format and summarise a data set: split sizes, images, captions per image, "
                        "boxes, relations, counts, and which losses and metrics it can feed. Images are checked from their "
                        "headers only (data validate decodes them all).")
    n.add_argument("annotation_file", help="annotation file or folder")
    n.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_read_options(n)
    n.set_defaults(func=cmd_data_inspect)


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
    p = _Parser(prog="vlmtune", description="Staged fine-tuning of a frozen InternVL with small trainable parts.")
    p.add_argument("--version", action="version", version=f"vlmtune {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_run_commands, _add_analysis_commands, _add_data_commands, _add_config_commands,
                _add_use_commands, _add_export_command):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after options (argparse cannot intermix a
    # trailing positional list with a subcommand's options by itself).
    try:
        args, extra = parser.parse_known_args(argv)
        stray = [x for x in extra if x.startswith("-") or "=" not in x or getattr(args, "overrides", None) is None]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
    except _UsageError as e:
        _say(f"error: {e}")
        return 2
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
        if getattr(args, "checkpoints", None) is not None:
            _split_checkpoints(args)
        return func(args)
    except VlmtuneError as e:
        if args.debug:
            raise
        # An interruption's message is ours (where it stopped, the command that resumes
        # it), never the input's: it is printed whole, so the command can be copied.
        _say(f"{getattr(e, 'label', 'error')}: {e}", whole=isinstance(e, Interrupted))
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, never a traceback
        if args.debug:
            raise
        _say(f"error: {describe_error(e)}")
        return 2


def describe_error(e: BaseException) -> str:
    """One line for an error that was not raised as a VlmtuneError: the file and the
    system's reason for an OSError (disk full, read-only disk, name too long, a link
    loop, ...), the cause for the rest; unexpected ones say how to see the traceback."""
    import errno

    from vlmtune.errors import first_line

    if isinstance(e, OSError):
        reason = {errno.ENOSPC: "no space left on the device", errno.EROFS: "the file system is read-only",
                  errno.ENAMETOOLONG: "the name is too long for the file system",
                  errno.ELOOP: "too many levels of symbolic links (a link loop)",
                  errno.EDQUOT: "disk quota exceeded"}.get(e.errno or -1, (e.strerror or first_line(e)).lower())
        names = " -> ".join(_shorten(str(f), 160) for f in (e.filename, e.filename2) if f is not None)
        return f"{names}: {reason}" if names else f"{reason} ({type(e).__name__})"
    if isinstance(e, UnicodeDecodeError):
        return f"a file is not UTF-8 text (byte {e.start}: {e.reason}); check the input files"
    if isinstance(e, RecursionError):
        return "the input is nested too deeply to be read"
    if isinstance(e, MemoryError):
        return "out of memory (an input or a size in the config is too large)"
    text = first_line(e)
    if isinstance(e, RuntimeError) and ("write" in text.lower() or "No space" in text):
        return f"cannot write a file ({text}); is the disk full?"
    if isinstance(e, (ValueError, RuntimeError, OverflowError)):
        return f"{text} ({type(e).__name__}; run with --debug for the traceback)"
    return f"unexpected {type(e).__name__}: {text} (a bug in vlmtune? run with --debug for the traceback)"


def _shorten(text: str, limit: int) -> str:
    """One line of at most ``limit`` characters: newlines and runs of blanks become one
    space; a longer text keeps its start and its end (where the cause usually is)."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    head = (limit - 5) * 2 // 3
    return text[:head] + " ... " + text[len(text) - (limit - 5 - head):]


def _say(message: str, whole: bool = False) -> None:
    """One line on stderr, at most MAX_MESSAGE characters (unless ``whole``); from the
    main process only."""
    if os.environ.get("RANK", "0") == "0":  # one message, not one per process
        print(message if whole else _shorten(message, MAX_MESSAGE), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
