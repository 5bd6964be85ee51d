"""``vlmtune predict | attention | embed | index | search | export``: the commands that
use a trained checkpoint on new data, each beside its flags. Each is a thin layer over
one library function (predict, search, export)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vlmtune.cli.args import COUNTING_OVERRIDES_HELP, add_overrides, add_trust_flag, int_between, positive_int
from vlmtune.errors import VlmtuneError
from vlmtune.runfolder import make_folder, write_atomic, write_text
from vlmtune.searchfiles import EF_SEARCH_RANGE, HNSW_M_RANGE, json_line, printable

# --------------------------------------------------------------------------- predict, attention


def add_predict(sub: Any) -> None:
    pr = sub.add_parser(
        "predict",
        help="answer a question about one image (counting checkpoints)",
        description="Generate the answer, the count head's class and confidence, and optionally a picture "
        "of the answer's attention over the image.",
    )
    pr.add_argument("checkpoint", help="counting checkpoint folder, e.g. runs/receipts/checkpoints/best")
    add_overrides(pr, COUNTING_OVERRIDES_HELP)
    pr.add_argument("--image", required=True, help="image file (any size; grayscale, RGBA, 16-bit and EXIF-rotated work)")
    pr.add_argument("--question", default="How many receipts are in this image?", help="the question (default: %(default)s)")
    pr.add_argument("--attention-out", help="write the attention overlay to this PNG")
    add_trust_flag(pr)
    pr.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from vlmtune.config.loading import precheck_overrides

    precheck_overrides([args.checkpoint], args.overrides, "predict")  # before the engine: a bad key answers at once
    from vlmtune.predict import predict_file

    out = predict_file(
        args.checkpoint,
        args.image,
        args.question,
        args.attention_out,
        trust_remote_code=args.trust_remote_code,
        overrides=args.overrides,
    )
    print(json.dumps(out, indent=2))
    if out.get("disagreement"):
        print(f"note: {out['disagreement']}", file=sys.stderr)
    return 0


def add_attention(sub: Any) -> None:
    at = sub.add_parser(
        "attention",
        help="share of answer attention inside the receipts (synthetic set)",
        description="Mean share of the answer's attention that falls inside the receipt polygons "
        "(boxes.json), beside the receipts' share of the image area, over images with a receipt.",
    )
    at.add_argument("checkpoint", help="counting checkpoint folder")
    add_overrides(at, COUNTING_OVERRIDES_HELP)
    at.add_argument("--data", help="counting JSONL (default: the run's test split)")
    at.add_argument("--boxes", help="boxes.json of the synthetic set (default: next to --data)")
    at.add_argument("--image-root", help="folder the --data file's image paths resolve against (data.image_root)")
    at.add_argument("--limit", type=positive_int, default=None, help="at most this many images")
    at.add_argument("--output", help="also write the report (with per-image figures) to this JSON file")
    add_trust_flag(at)
    at.set_defaults(func=cmd_attention)


def cmd_attention(args: argparse.Namespace) -> int:
    from vlmtune.predict import attention_inside_receipts
    from vlmtune.utils import path_mistake

    why = path_mistake(args.output, "file", "a JSON file") if args.output else None
    if why is not None:  # before the measurement, not after it
        raise VlmtuneError(f"--output {why}")
    report = attention_inside_receipts(
        args.checkpoint,
        args.data,
        args.boxes,
        args.limit,
        image_root=args.image_root,
        trust_remote_code=args.trust_remote_code,
        overrides=args.overrides,
    )
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        write_text(Path(args.output), json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "per_image"}, indent=2))
    return 0


# --------------------------------------------------------------------------- embed, index, search


def add_embed(sub: Any) -> None:
    em = sub.add_parser(
        "embed",
        help="embed a folder of images or a data set with a retrieval checkpoint",
        description="Write embeddings.safetensors (images [N, D], texts [M, D], L2-normalised), "
        "items.jsonl (one line per row) and embed.json to --out. A second run into the same --out "
        "embeds only new or changed files (keyed by path, size and mtime) and new texts.",
    )
    em.add_argument("checkpoint", help="retrieval checkpoint folder, e.g. runs/r2/checkpoints/best")
    src = em.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images, searched recursively (unreadable files are reported and skipped)")
    src.add_argument("--data", help="annotation file in a documented format: its images and captions")
    em.add_argument("--texts", help="also embed these texts: one per line, or JSONL with a 'text' field")
    em.add_argument("--out", required=True, help="output folder (only this folder is written)")
    em.add_argument("--no-progress", action="store_true", help="no progress bar")
    em.add_argument(
        "--dim",
        type=int,
        help="embed at this width: one the checkpoint trained (model.mrl_dims, Matryoshka), the first DIM "
        "coordinates renormalised (default: the full model.embed_dim)",
    )
    em.set_defaults(func=cmd_embed)


def cmd_embed(args: argparse.Namespace) -> int:
    from vlmtune.search import embed

    r = embed(
        args.checkpoint,
        args.out,
        images=args.images,
        data=args.data,
        texts=args.texts,
        progress=not args.no_progress,
        dim=args.dim,
    )
    print(
        f"embedded {r['embedded_images']} images ({r['kept_images']} kept from before, {r['changed_images']} changed, "
        f"{r['removed_images']} removed, {len(r['unreadable'])} unreadable) and {r['embedded_texts']} new texts; "
        f"{r['images']} images and {r['texts']} texts in {printable(str(Path(args.out) / 'embeddings.safetensors'))}"
    )
    for u in r["unreadable"]:
        print(f"unreadable: {printable(u['error'])}", file=sys.stderr)
    return 0


def add_index(sub: Any) -> None:
    ix = sub.add_parser(
        "index",
        help="build a search index from embed's output",
        description="Store the normalised gallery matrix for exact search (default), and with --faiss an "
        "approximate FAISS index whose recall@10 against exact search is measured and reported.",
    )
    ix.add_argument("embed_dir", metavar="EMBED_DIR", help="folder written by vlmtune embed")
    ix.add_argument("--out", required=True, help="new folder for the index")
    ix.add_argument("--kind", choices=("images", "texts"), help="what to search (default: images, or texts when there are none)")
    ix.add_argument("--faiss", choices=("ivf", "hnsw"), help="also build a FAISS IVF or HNSW index (needs faiss-cpu)")
    ix.add_argument("--nlist", type=positive_int, help="IVF: number of lists, 1..N (default: about 4 sqrt(N))")
    ix.add_argument(
        "--nprobe", type=positive_int, help="IVF: lists probed per query, 1..nlist (default: max(16, nlist/8), at most nlist)"
    )
    ix.add_argument(
        "--hnsw-m",
        type=int_between(*HNSW_M_RANGE),
        help=f"HNSW: neighbours per node, {HNSW_M_RANGE[0]}..{HNSW_M_RANGE[1]} (default 32)",
    )
    ix.add_argument(
        "--ef-search",
        type=int_between(*EF_SEARCH_RANGE),
        help=f"HNSW: search breadth, {EF_SEARCH_RANGE[0]}..{EF_SEARCH_RANGE[1]}, at least k when searching (default 128)",
    )
    ix.add_argument(
        "--dim",
        type=positive_int,
        help="index at this width: one the checkpoint trained (Matryoshka), at most the embed folder's "
        "(default: the folder's width)",
    )
    ix.set_defaults(func=cmd_index)


def cmd_index(args: argparse.Namespace) -> int:
    from vlmtune.search import build_index

    info = build_index(
        args.embed_dir,
        args.out,
        kind=args.kind,
        faiss_kind=args.faiss,
        nlist=args.nlist,
        nprobe=args.nprobe,
        hnsw_m=args.hnsw_m,
        ef_search=args.ef_search,
        dim=args.dim,
    )
    print(f"indexed {info['count']} {info['kind']} ({info['dim']}-d, {info['search']} search) into {args.out}")
    if "recall_at_10" in info:
        q = info["recall_queries"]
        print(
            f"recall@10 against exact search: {info['recall_at_10']:.2f}% ({q['count']} queries from {q['from']}; "
            f"{json.dumps(info['faiss'])})"
        )
    return 0


def add_search(sub: Any) -> None:
    se = sub.add_parser(
        "search",
        help="search an index by text or image",
        description="Embed the query with the checkpoint that built the index (refusing another) and "
        "print the top k as a table (rank, cosine score, item) or JSON. --queries runs many queries and "
        "writes one JSONL line per query.",
    )
    se.add_argument("index", metavar="INDEX", help="folder written by vlmtune index")
    se.add_argument("--text", help="a text query")
    se.add_argument("--image", help="an image query (path)")
    se.add_argument("--queries", help="file of queries: text lines, or JSONL with 'text' or 'image' per line")
    se.add_argument("-k", type=positive_int, default=10, help="results per query, at least 1 (default 10)")
    se.add_argument(
        "--rerank", action="store_true", help="re-order the top candidates by the matching head, as evaluation's re-rank"
    )
    se.add_argument(
        "--rerank-k", type=positive_int, help="with --rerank: candidates the matching head re-scores, at least 1 (default: k)"
    )
    se.add_argument("--json", action="store_true", help="print JSON instead of a table")
    se.add_argument("--out", help="with --queries: write the JSONL to this new file instead of to stdout (never replaces a file)")
    se.add_argument("--checkpoint", help="the checkpoint to embed queries with, if it moved (its fingerprint must match)")
    se.add_argument(
        "--dim", type=positive_int, help="the width to query at; must be the index's (default: the index's, from index.json)"
    )
    se.set_defaults(func=cmd_search)


def cmd_search(args: argparse.Namespace) -> int:
    from vlmtune.search import Index, format_table, open_query_model, read_queries, search

    given = [x is not None for x in (args.text, args.image, args.queries)]
    if sum(given) != 1:
        raise VlmtuneError("search: give exactly one of --text, --image or --queries")
    if args.rerank_k is not None and not args.rerank:
        raise VlmtuneError("--rerank-k: only with --rerank (it sets how many candidates the matching head re-scores)")
    if args.out is not None and not args.queries:
        raise VlmtuneError("--out: only with --queries (one query prints its table or --json)")
    out = _new_file(args.out) if args.out is not None else None
    index = Index(args.index)
    if args.queries:
        queries = read_queries(Path(args.queries))
    else:
        queries = [{"text": args.text}] if args.text is not None else [{"image": args.image}]
        if args.text is not None and not args.text.strip():
            raise VlmtuneError("--text: the query is empty")
    model = open_query_model(index, args.checkpoint)
    results = search(index, model, queries, k=args.k, rerank=args.rerank, rerank_k=args.rerank_k, dim=args.dim)
    if args.queries:
        lines = "".join(json_line(r) + "\n" for r in results)
        if out is not None:
            make_folder(out.parent, "--out")
            _new_file(args.out)  # still new, now that the queries are answered
            data = lines.encode("utf-8")
            write_atomic(out, lambda p: p.write_bytes(data))
            print(f"wrote {len(results)} result lines to {printable(args.out)}")
        else:
            print(lines, end="")
    elif args.json:
        print(json_line(results[0], indent=2))
    else:
        print(format_table(results[0]))
    return 0


def _new_file(path: str) -> Path:
    """``search --out``: a new file's name (an existing file, folder or link is refused:
    nothing of yours is replaced)."""
    if not path.strip() or "\x00" in path:
        raise VlmtuneError("--out: name a new file for the results, e.g. results.jsonl")
    p = Path(path)
    if p.is_symlink():
        raise VlmtuneError(f"--out {printable(path)}: is a symbolic link; vlmtune does not write through links")
    if p.is_dir():
        raise VlmtuneError(f"--out {printable(path)}: is a folder; name a new file inside it")
    if p.exists():
        raise VlmtuneError(f"--out {printable(path)}: exists; search never replaces a file: choose a new name or remove it")
    return p


# --------------------------------------------------------------------------- export


def add_export(sub: Any) -> None:
    x = sub.add_parser(
        "export",
        help="write a checkpoint as a peft adapter, a merged Hugging Face model or a self-contained vlmtune checkpoint",
        description="Export a checkpoint to a new folder. peft: the LoRA of a counting checkpoint "
        "(counting.lm_mode=lora) as adapter_config.json + adapter_model.safetensors for "
        "PeftModel.from_pretrained(internvl, OUT), other trained InternVL parts as modules_to_save, the "
        "heads beside as vlmtune_heads.safetensors. merged: InternVL with trained blocks and merged LoRA "
        "by save_pretrained (AutoModelForImageTextToText.from_pretrained(OUT)), beside it the heads as a "
        "vlmtune checkpoint (vlmtune evaluate OUT works). vlmtune: a self-contained checkpoint with the "
        "backbone in Hugging Face form under backbone/.",
    )
    x.add_argument("checkpoint", help="checkpoint folder, e.g. runs/demo/checkpoints/best")
    x.add_argument("--out", required=True, help="new folder to write (must not exist or be empty)")
    x.add_argument("--format", choices=("peft", "merged", "vlmtune"), default="vlmtune", help="default: %(default)s")
    x.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from vlmtune.export import export_checkpoint

    summary = export_checkpoint(args.checkpoint, args.out, args.format)
    print(json.dumps(summary, indent=2))
    return 0
