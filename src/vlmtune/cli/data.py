"""``vlmtune data scenes | receipts | validate | inspect``: generate synthetic data sets
or check one, each command beside its flags."""

from __future__ import annotations

import argparse
import json
from typing import Any

from vlmtune.cli.args import non_negative_int, positive_int, seed_int
from vlmtune.config import Config, key_bounds
from vlmtune.errors import VlmtuneError
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
        help="generate synthetic data sets or check one",
        description="Generate a synthetic data set (scenes, receipts) or check an annotation file (validate, inspect).",
    )
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    for add in (add_scenes, add_receipts, add_validate, add_inspect):
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


def _add_read_options(p: Any) -> None:
    """How data commands read a file: the data.* keys that training takes from the config."""
    from vlmtune.data.formats.registry import format_names

    p.add_argument("--format", choices=format_names(), default="auto", help="annotation format (default: detected from the file)")
    p.add_argument(
        "--image-root", help="folder image paths resolve against (data.image_root; default: the annotation file's folder)"
    )
    p.add_argument(
        "--split",
        choices=("train", "val", "test"),
        help="for files holding every split (Karpathy, refer, datasets dicts): read only this one (default: all)",
    )
    p.add_argument(
        "--box-tolerance-px", type=float, default=0.0, help="clip boxes overrunning the image by at most this (default 0)"
    )
    p.add_argument("--duplicates", choices=("error", "keep", "drop"), default="error", help="repeated records (default: error)")


def _read_options(args: argparse.Namespace) -> Any:
    """ReadOptions from the data commands' --format, --image-root, --split, ... options."""
    from vlmtune.data.formats import ReadOptions

    return ReadOptions(
        image_root=args.image_root,
        format=args.format,
        split=args.split,
        box_tolerance_px=args.box_tolerance_px,
        duplicates=args.duplicates,
        max_text_chars=getattr(args, "max_text_chars", 1000),
    )


def add_validate(dsub: Any) -> None:
    v = dsub.add_parser(
        "validate",
        help="check an annotation file and its images; list every problem",
        description="Check an annotation file up front, decoding every image, and print every problem "
        "as 'FILE: record N: message' (notes, such as images converted to RGB, as 'FILE: record N: note: "
        "...') and a summary line. Exit status: 0 when there is no error, 1 when there is one.",
    )
    v.add_argument(
        "annotation_file",
        help="annotation file or folder in any format of README 'Your data' (retrieval, grounding, "
        "COCO, Karpathy, ALBEF, refer, GeoText, counting JSONL or CSV, datasets)",
    )
    v.add_argument("--kind", choices=("pairs", "counting"), help="file kind (default: .jsonl = counting, else pairs)")
    v.add_argument(
        "--max-count", type=non_negative_int, default=None, help="counting: largest allowed count (default: no upper limit)"
    )
    v.add_argument("--max-text-chars", type=positive_int, default=1000, help="longest caption, question or answer (default 1000)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_read_options(v)
    v.set_defaults(func=cmd_data_validate)


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

    info = inspect_file(args.annotation_file, _read_options(args), feeds=losses_fed)
    print(json.dumps(info, indent=2) if args.json else format_inspect(info))
    return 0
