"""``vlmtune data validate``: check a data set up front and list every problem.

The checks are the readers' own (:func:`~vlmtune.data.formats.scan_pairs`,
:func:`~vlmtune.data.formats.scan_counting`), run with every image fully decoded, so a
file that validates cleanly also reads cleanly in training and evaluation. Errors are
what training would refuse (``data.on_error=raise``) or leave out (``skip``); notes are
what it accepts but changes, such as an image converted to RGB.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlmtune.data.formats import (
    FORMATS,
    MAX_TEXT_CHARS,
    RELATIONS,
    Bad,
    Checker,
    Format,
    Kind,
    Probe,
    Problem,
    ReadOptions,
    Scan,
    scan_counting,
    scan_pairs,
)
from vlmtune.data.formats.boxes import CONVENTIONS, INTERNAL
from vlmtune.data.formats.registry import detect_by_path, detect_probe


def detect_kind(path: str | Path, fmt: str = "auto", opts: ReadOptions | None = None) -> Kind:
    """The kind of data a file holds: the one kind its format holds (``data.format``, or
    what its path says), or, for a format holding both (a ``datasets`` layout), what the
    format finds in the file. Where that cannot be told, "pairs": the pairs reader then
    reports what is wrong."""
    path = Path(path)
    if fmt != "auto":
        return _kind_in(path, FORMATS[fmt], opts) if fmt in FORMATS else "pairs"
    probe = Probe(path)
    for spec in sorted(FORMATS, key=lambda f: f.detect_rank):
        if spec.kind_of is not None and spec.by_path is not None and spec.by_path(probe):
            return _kind_in(path, spec, opts)
    name = detect_by_path(probe)
    if name is None and not probe.is_dir and any("counting" in f.kinds for f in FORMATS if f.by_json is not None):
        try:  # only then is the file's JSON worth reading here
            name = detect_probe(probe)
        except Bad:
            name = None
    return _kind_in(path, FORMATS[name], opts) if name is not None else "pairs"


def _kind_in(path: Path, spec: Format, opts: ReadOptions | None) -> Kind:
    if spec.kind_of is None or len(spec.kinds) == 1:
        return spec.kinds[0]
    return spec.kind_of(Checker(path, False, MAX_TEXT_CHARS, opts or ReadOptions()), path)


def validate_file(
    path: str | Path,
    kind: Kind | None = None,
    max_count: int | None = None,
    max_text_chars: int = MAX_TEXT_CHARS,
    opts: ReadOptions | None = None,
    deep: bool = True,
) -> Scan:
    """Scan an annotation file with full image decoding; the scan holds every problem.

    A file with no records at all gets an error of its own (the readers refuse it).
    ``opts``: image root, format, split, box tolerance, duplicates (default: as training's defaults).
    """
    path = Path(path)
    opts = opts or ReadOptions(max_text_chars=max_text_chars)
    kind = kind or detect_kind(path, opts.format, opts)
    if kind == "counting":
        scan = scan_counting(path, max_count=max_count, deep=deep, opts=opts)
    else:
        scan = scan_pairs(path, deep=deep, opts=opts)
        shared = shared_captions(scan.records)
        if shared["texts"]:
            scan.problems.append(Problem(str(path), shared_note(shared), "note"))
    if scan.n_records == 0 and not scan.errors:
        scan.problems.append(Problem(str(path), "no records"))
    return scan


def shared_captions(records: list[Any], examples: int = 3) -> dict[str, Any]:
    """Caption texts that stand under more than one image: {"texts": how many, "images":
    the images they stand under, "examples": the ``examples`` most shared, each with its
    image count}. Such a caption has one embedding for several images, so its images
    score it exactly alike and retrieval recall depends on how ties are broken."""
    images: dict[str, set[Any]] = {}
    for r in records:
        images.setdefault(r.text, set()).add(r.image)
    shared = sorted(((t, len(v)) for t, v in images.items() if len(v) > 1), key=lambda x: (-x[1], x[0]))
    return {
        "texts": len(shared),
        "images": len({i for t, _ in shared for i in images[t]}),
        "examples": [{"text": t, "images": k} for t, k in shared[:examples]],
    }


def shared_note(shared: dict[str, Any]) -> str:
    """The one-line note on shared captions (:func:`shared_captions`)."""
    n = shared["texts"]
    eg = "; ".join(f"{e['text'][:60]!r} under {e['images']} images" for e in shared["examples"])
    return (
        f"{n} caption text{'s' * (n != 1)} stand{'s' * (n == 1)} under several images ({shared['images']} images in all; "
        f"e.g. {eg}): each image scores the copies alike, so recall depends on tie order "
        "(metrics.json gives the span, retrieval/*_tie_min|max)"
    )


def summary(scan: Scan) -> str:
    n, e, w = scan.n_records, len(scan.errors), len(scan.notes)
    return f"{n} record{'s' * (n != 1)}, {e} error{'s' * (e != 1)}, {w} note{'s' * (w != 1)}"


def format_lines(scan: Scan) -> list[str]:
    """``FILE: record N: message`` per error, ``FILE: record N: note: message`` per note,
    in file order, then the summary line."""
    lines = [str(p) if p.level == "error" else f"{p.where}: note: {p.message}" for p in scan.problems]
    return [*lines, summary(scan)]


def to_json(scan: Scan, kind: Kind) -> dict[str, Any]:
    def item(p: Problem) -> dict[str, str]:
        return {"where": p.where, "message": p.message, "text": str(p)}

    return {
        "file": str(scan.path),
        "kind": kind,
        "format": scan.format,
        "records": scan.n_records,
        "bad_records": len(scan.bad_sources),
        "errors": [item(p) for p in scan.errors],
        "notes": [item(p) for p in scan.notes],
        "counts": scan.counts,
        "splits": scan.splits,
        "summary": summary(scan),
    }


# --------------------------------------------------------------------------- inspect


def inspect_file(
    path: str | Path,
    opts: ReadOptions | None = None,
    kind: Kind | None = None,
    feeds: Callable[[str, list[Any]], list[str]] | None = None,
) -> dict[str, Any]:
    """What a data set holds and what it can train and evaluate: format, split sizes,
    images, captions per image, boxes, relations, counts, and the losses and metrics it
    can feed. Images are checked from their headers (``data validate`` decodes them all).

    ``feeds(kind, records)``: the losses these records hold targets for, which the tasks
    that read them declare (:func:`vlmtune.tasks.losses_fed`); the data layer knows no loss."""
    path = Path(path)
    opts = opts or ReadOptions()
    kind = kind or detect_kind(path, opts.format, opts)
    scan = validate_file(path, kind, opts=opts, deep=False)
    recs = scan.records
    out: dict[str, Any] = {
        "file": str(path),
        "format": scan.format,
        "kind": kind,
        "records": scan.n_records,
        "usable": len(recs),
        "errors": len(scan.errors),
        "first_error": str(scan.errors[0]) if scan.errors else None,
        "splits": scan.splits,
        "images": len({r.image for r in recs}),
        "counts": scan.counts,
    }
    if kind == "pairs":
        per_image = Counter(r.image for r in recs)
        boxes = sum(r.bbox is not None for r in recs)
        relations = Counter(RELATIONS[r.relation] for r in recs if r.relation is not None)
        sizes = list(per_image.values()) or [0]
        out.update(
            pairs=len(recs),
            captions_per_image={"min": min(sizes), "mean": round(sum(sizes) / len(sizes), 2), "max": max(sizes)},
            shared_captions=shared_captions(recs),
            boxes=boxes,
            box_conventions=_box_conventions(scan),
            box_example=scan.box_example,
            relations=dict(relations),
            negatives={
                "records": sum(bool(r.negatives or r.negative_images) for r in recs),
                "captions": sum(len(r.negatives) for r in recs),
                "images": sum(len(r.negative_images) for r in recs),
            },
        )
        metrics = ["retrieval/i2t_r@k", "retrieval/t2i_r@k", "retrieval/mean_recall"]
        metrics += ["grounding/miou", "grounding/acc50", "grounding/giou", "grounding/l1"] if boxes else []
        metrics += ["spatial/accuracy", "spatial/macro_f1"] if relations else []
    else:
        hist = Counter(r.count for r in recs)
        out.update(count_histogram={str(k): hist[k] for k in sorted(hist)})
        metrics = [
            "count/accuracy",
            "count/macro_f1",
            "answer/count_accuracy",
            "answer/parse_rate",
            "text/bleu1..4",
            "text/rouge1|2|L",
            "text/perplexity",
        ]
    out.update(rules=scan.rules, losses=feeds(kind, recs) if feeds else [], metrics=metrics)
    return out


def _box_conventions(scan: Scan) -> dict[str, Any]:
    """The boxes' conventions: as the file wrote them (count each), and inside vlmtune."""
    return {
        "internal": f"{INTERNAL}: {CONVENTIONS[INTERNAL]}, of the image as loaded (EXIF orientation applied)",
        "source": {c: {"boxes": n, "means": CONVENTIONS[c]} for c, n in scan.box_conventions.items()},
    }


def format_inspect(info: dict[str, Any]) -> str:
    """The inspect report as a short two-column table."""
    rows = [
        ("file", info["file"]),
        ("format", info["format"]),
        ("task data", "image-text pairs" if info["kind"] == "pairs" else "counting"),
        ("records", f"{info['records']} ({info['usable']} usable, {info['errors']} with errors)"),
    ]
    if info["splits"]:
        rows.append(("splits", ", ".join(f"{k} {v}" for k, v in info["splits"].items())))
    rows.append(("images", str(info["images"])))
    if info["kind"] == "pairs":
        c = info["captions_per_image"]
        rows += [
            ("pairs", str(info["pairs"])),
            ("captions per image", f"min {c['min']}, mean {c['mean']}, max {c['max']}"),
            ("shared captions", _shared_row(info["shared_captions"])),
            ("boxes", str(info["boxes"])),
        ]
        if info["boxes"]:
            conv = info["box_conventions"]
            src = "; ".join(f"{c} ({v['means']}): {v['boxes']}" for c, v in conv["source"].items())
            ex = info["box_example"]
            rows += [
                ("boxes as written", src),
                ("boxes in vlmtune", conv["internal"]),
                ("box example", f"{ex['where']}: {ex['source']} ({ex['convention']}) -> {ex['pixels_xywh']} (xywh px)"),
            ]
        rows.append(("relations", ", ".join(f"{k} {v}" for k, v in info["relations"].items()) or "0"))
        neg = info["negatives"]
        if neg["records"]:
            rows.append(
                (
                    "negatives",
                    f"{neg['records']} records carry {neg['captions']} negative captions and {neg['images']} "
                    "negative images (carried in the records)",
                )
            )
    else:
        rows.append(("counts", ", ".join(f"{k}: {v}" for k, v in info["count_histogram"].items()) or "none"))
    rows += [(k, str(v)) for k, v in info["counts"].items()]
    rows += [(f"rule: {k}", v) for k, v in info["rules"].items()]
    rows += [("losses it can feed", ", ".join(info["losses"])), ("metrics", ", ".join(info["metrics"]))]
    if info["first_error"]:
        rows.append(("first error", info["first_error"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _shared_row(shared: dict[str, Any]) -> str:
    if not shared["texts"]:
        return "none (no caption text stands under two images)"
    eg = "; ".join(f"{e['text'][:40]!r} x{e['images']}" for e in shared["examples"])
    return f"{shared['texts']} texts under {shared['images']} images (recall depends on tie order), e.g. {eg}"
