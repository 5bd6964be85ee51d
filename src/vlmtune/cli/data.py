"""``vlmtune data scenes | receipts | validate | inspect | convert``: generate synthetic data
sets, check one, or write one in another tool's format, each command beside its flags."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from vlmtune.cli.args import add_overrides, non_negative_int, positive_int, seed_int
from vlmtune.cli.messages import shorten
from vlmtune.config import Config, key_bounds
from vlmtune.errors import ConfigError, DataError, VlmtuneError
from vlmtune.runfolder import output_folder

GENERATOR_OVERWRITE_HELP = (
    "generate into a folder that is not empty: files of the same names are replaced, the "
    "files an earlier generation listed in its .vlmtune-generated.json are removed first, "
    "other files are kept"
)
SEED_HELP = "random seed: the same seed and settings give the same files (default 0)"


def add_data(sub: Any) -> None:
    d = sub.add_parser(
        "data",
        help="generate synthetic data sets, check one, or convert one to another format",
        description="Generate a synthetic data set (scenes, receipts), check an annotation file (validate, inspect) "
        "or convert one to another tool's format (convert).",
    )
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    for add in (add_scenes, add_receipts, add_validate, add_inspect, add_convert):
        add(dsub)


def _check_range(flag: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise VlmtuneError(f"{flag}: must be between {low} and {high}, got {value}")


# --------------------------------------------------------------------------- scenes, receipts


def _image_size_bounds() -> tuple[int, int]:
    """--image-size mirrors data.synthetic.image_size: its bounds are the config field's."""
    bounds = key_bounds(Config, "data.synthetic.image_size")
    assert bounds is not None and bounds.low is not None and bounds.high is not None
    return int(bounds.low), int(bounds.high)


def add_scenes(dsub: Any) -> None:
    s = dsub.add_parser("scenes", help="coloured shapes with captions, boxes and spatial relations (retrieval + grounding)")
    s.add_argument("--out", required=True, help="output folder (refused when not empty, unless --overwrite)")
    s.add_argument("--n", type=positive_int, default=400, help="number of images (default 400)")
    s.add_argument("--seed", type=seed_int, default=0, help=SEED_HELP)
    low, high = _image_size_bounds()
    s.add_argument(
        "--image-size",
        type=positive_int,
        default=96,
        help=f"image side in pixels, {low} to {high} (default 96; data.synthetic.image_size in a config)",
    )
    s.add_argument("--overwrite", action="store_true", help=GENERATOR_OVERWRITE_HELP)
    s.set_defaults(func=cmd_data_scenes)


def cmd_data_scenes(args: argparse.Namespace) -> int:
    from vlmtune.data.scenes import generate_scenes

    out = output_folder(args.out, "--out")
    _check_range("--image-size", args.image_size, *_image_size_bounds())
    _check_range("--n", args.n, 1, 10**6)
    try:
        paths = generate_scenes(out, n=args.n, seed=args.seed, image_size=args.image_size, overwrite=args.overwrite)
    except ValueError as e:  # n too small for three splits
        raise VlmtuneError(f"--n {args.n}: {e}") from None
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


def add_receipts(dsub: Any) -> None:
    r = dsub.add_parser("receipts", help="receipt-like papers to count, with questions and answers")
    r.add_argument("--out", required=True, help="output folder (refused when not empty, unless --overwrite)")
    r.add_argument("--n", type=positive_int, default=400, help="number of images (default 400)")
    r.add_argument("--seed", type=seed_int, default=0, help=SEED_HELP)
    r.add_argument("--max-count", type=positive_int, default=3, help="largest number of receipts in an image (default 3)")
    r.add_argument("--width", type=positive_int, default=128, help="image width in pixels, 16 to 4096 (default 128)")
    r.add_argument("--height", type=positive_int, default=None, help="image height (default: same as width)")
    r.add_argument("--overwrite", action="store_true", help=GENERATOR_OVERWRITE_HELP)
    r.set_defaults(func=cmd_data_receipts)


def cmd_data_receipts(args: argparse.Namespace) -> int:
    from vlmtune.data.receipts import generate_receipts

    size = (args.width, args.height) if args.height else args.width
    out = output_folder(args.out, "--out")
    _check_range("--width", args.width, 16, 4096)
    _check_range("--height", args.height or args.width, 16, 4096)
    _check_range("--n", args.n, 1, 10**6)
    _check_range("--max-count", args.max_count, 1, 100)
    try:
        paths = generate_receipts(
            out, n=args.n, seed=args.seed, max_count=args.max_count, image_size=size, overwrite=args.overwrite
        )
    except ValueError as e:
        raise VlmtuneError(f"--n {args.n}: {e}") from None
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


# --------------------------------------------------------------------------- validate, inspect


READ_OVERRIDES_HELP = (
    "data.* and counting.* settings as train and evaluate take them (e.g. data.box_tolerance_px=2 "
    "data.duplicates=keep data.on_error=skip counting.max_count=5); they apply over --config"
)


def _add_read_options(p: Any) -> None:
    """How data commands read a file: the data.* (and counting.*) settings train and
    evaluate read it with, from --config and KEY=VALUE overrides, and the short flags."""
    from vlmtune.data.formats.registry import format_names

    add_overrides(p, READ_OVERRIDES_HELP)
    p.add_argument(
        "--config",
        help="a recipe YAML or a run's config.yaml: read the file with its data.* and counting.* settings "
        "(default: the defaults train uses)",
    )
    p.add_argument("--format", choices=format_names(), default=None, help="annotation format (data.format; default: detected)")
    p.add_argument(
        "--image-root", help="folder image paths resolve against (data.image_root; default: the annotation file's folder)"
    )
    p.add_argument(
        "--split",
        choices=("train", "val", "test"),
        help="for files holding every split (Karpathy, refer, datasets dicts): read only this one (default: all)",
    )
    p.add_argument(
        "--box-tolerance-px",
        type=float,
        default=None,
        help="data.box_tolerance_px: clip boxes overrunning the image by at most this (default 0; "
        "overruns under a pixel are always clipped)",
    )
    p.add_argument("--duplicates", choices=("error", "keep", "drop"), default=None, help="data.duplicates (default: error)")


def read_config(args: argparse.Namespace) -> Any:
    """The config a data command reads with: --config (or the defaults) with the
    KEY=VALUE overrides (data.* and counting.* only) and the short flags applied."""
    from vlmtune.config import load_config
    from vlmtune.config.loading import with_overrides

    cfg = load_config(args.config)
    flags = {
        "data.format": args.format,
        "data.box_tolerance_px": args.box_tolerance_px,
        "data.duplicates": args.duplicates,
        "data.max_text_chars": getattr(args, "max_text_chars", None),
    }
    given = [f"{k}={v}" for k, v in flags.items() if v is not None]
    for ov in args.overrides:
        key = ov.split("=", 1)[0].strip()
        if "=" not in ov or key.split(".", 1)[0] not in ("data", "counting") or "." not in key:
            raise ConfigError(
                f"{shorten(ov, 60)}: data {args.data_command} takes data.* and counting.* settings as KEY=VALUE "
                "(they decide how a file is read); other keys do not apply"
            )
    return with_overrides(cfg, [*args.overrides, *given], ("data", "counting"), f"data {args.data_command}")


def _read_options(args: argparse.Namespace, cfg: Any) -> Any:
    """ReadOptions from the config's data (and counting) sections and --image-root, --split."""
    from vlmtune.data.formats import options_from_config

    return options_from_config(cfg.data, cfg.section("counting"), split=args.split, image_root=args.image_root)


def add_validate(dsub: Any) -> None:
    v = dsub.add_parser(
        "validate",
        help="check an annotation file and its images; list every problem",
        description="Check an annotation file up front, decoding every image, and print every problem "
        "as 'FILE: record N: message' (notes, such as images converted to RGB, as 'FILE: record N: note: "
        "...') and a summary line. It reads the file with the data.* and counting.* settings train and "
        "evaluate take (--config, KEY=VALUE): exit status 0 when they would read it, 1 when they would "
        "refuse it (with data.on_error=skip, bad records are listed and skipped, as training skips them).",
    )
    v.add_argument(
        "annotation_file",
        help="annotation file, folder or shard pattern in any format of docs/data.md 'Your data' (retrieval, "
        "grounding, COCO, Karpathy, ALBEF, refer, GeoText, counting JSONL or CSV, datasets, InternVL, LLaVA, "
        "ms-swift, ShareGPT, webdataset, Flickr30k)",
    )
    v.add_argument("--kind", choices=("pairs", "counting"), help="file kind (default: what the format and the file say)")
    v.add_argument(
        "--max-count",
        type=non_negative_int,
        default=None,
        help="counting: largest allowed count (default: counting.max_count, 3 unless --config or an override says)",
    )
    v.add_argument("--max-text-chars", type=positive_int, default=None, help="longest caption, question or answer (default 1000)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_read_options(v)
    v.set_defaults(func=cmd_data_validate)


def cmd_data_validate(args: argparse.Namespace) -> int:
    from vlmtune.data.formats.reader import refusal
    from vlmtune.data.validate import detect_kind, format_lines, to_json, validate_file

    cfg = read_config(args)
    opts = _read_options(args, cfg)
    path = Path(args.annotation_file)
    if not path.exists() and not ("{" in path.name and "}" in path.name):  # a brace pattern (shards) names no one file
        # Nothing to report on: one line and exit 2, as data inspect (a report is for a file that exists).
        raise DataError(f"{path}: annotation file not found")
    kind = args.kind or detect_kind(args.annotation_file, opts.format, opts)
    max_count = args.max_count if args.max_count is not None else cfg.section("counting").max_count
    scan = validate_file(args.annotation_file, kind, max_count=max_count, opts=opts)
    refused = refusal(scan, cfg.data.on_error)
    if args.json:
        print(json.dumps({**to_json(scan, kind), "on_error": cfg.data.on_error, "refused": refused}, indent=2))
    else:
        lines = format_lines(scan)
        if scan.errors and refused is None:
            lines[-1] += f"; the {len(scan.bad_sources)} bad records are skipped (data.on_error=skip)"
        print("\n".join(lines))
    return 1 if refused is not None else 0


def add_inspect(dsub: Any) -> None:
    n = dsub.add_parser(
        "inspect",
        help="what a data set holds and which losses and metrics it can feed",
        description="Detect the format and summarise a data set: split sizes, images, captions per image, "
        "boxes, relations, counts, and which losses and metrics it can feed. Images are checked from their "
        "headers only (data validate decodes them all).",
    )
    n.add_argument("annotation_file", help="annotation file or folder")
    n.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_read_options(n)
    n.set_defaults(func=cmd_data_inspect)


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from vlmtune.data.validate import format_inspect, inspect_file
    from vlmtune.tasks import losses_fed

    info = inspect_file(args.annotation_file, _read_options(args, read_config(args)), feeds=losses_fed)
    if info["records"] == 0 and info["errors"]:  # nothing could be read (a missing file, a folder of no format)
        raise DataError(str(info["first_error"]))
    print(json.dumps(info, indent=2) if args.json else format_inspect(info))
    return 0


def add_convert(dsub: Any) -> None:
    c = dsub.add_parser(
        "convert",
        help="write a data set in InternVL's, ms-swift's or vlmtune's own format",
        description="Read an annotation file in any format (with the data.* settings train takes) and write "
        "the same records in another tool's format into --out: internvl (meta.json + a conversation JSONL, "
        "boxes in 0-1000), swift (ms-swift messages JSONL, boxes as objects in pixels), vlmtune (the "
        "documented JSON / JSONL). Images are not copied: the output names them where they are. Nothing "
        "is written outside --out, no file there is replaced and no link is followed. It prints what it "
        "wrote and the command that reads it back.",
    )
    c.add_argument("annotation_file", help="annotation file, folder or shard pattern in any format of the 'Your data' table")
    c.add_argument("--to", required=True, choices=("internvl", "swift", "vlmtune"), help="the format to write")
    c.add_argument("--out", required=True, help="output folder (created; files already there are never replaced)")
    c.add_argument("--kind", choices=("pairs", "counting"), help="file kind (default: what the format and the file say)")
    _add_read_options(c)
    c.set_defaults(func=cmd_data_convert)


def cmd_data_convert(args: argparse.Namespace) -> int:
    import re

    from vlmtune.data.convert import convert
    from vlmtune.data.formats import read_counting, read_pairs
    from vlmtune.data.validate import detect_kind
    from vlmtune.runfolder import make_folder

    out = output_folder(args.out, "--out")
    if out.is_symlink():
        raise VlmtuneError(f"--out {out}: is a symbolic link; name a real folder (data convert does not write through links)")
    cfg = read_config(args)
    opts = _read_options(args, cfg)
    kind = args.kind or detect_kind(args.annotation_file, opts.format, opts)
    if kind == "counting":
        max_count = cfg.section("counting").max_count
        records: list[Any] = read_counting(args.annotation_file, max_count, on_error=cfg.data.on_error, opts=opts)
    else:
        records = read_pairs(args.annotation_file, on_error=cfg.data.on_error, opts=opts)
    stem = Path(args.annotation_file).name.split(".")[0] or "data"
    name = re.sub(r"[^A-Za-z0-9_+=@-]+", "_", stem).strip("_") or "data"
    make_folder(out, "--out")
    print(json.dumps(convert(records, kind, args.to, out, name), indent=2))
    return 0
