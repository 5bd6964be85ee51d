"""``vlmtune data validate``: check a data set up front and list every problem.

The checks are the readers' own (:func:`~vlmtune.data.formats.scan_pairs`,
:func:`~vlmtune.data.formats.scan_counting`), run with every image fully decoded, so a
file that validates cleanly also reads cleanly in training and evaluation. Errors are
what training would refuse (``data.on_error=raise``) or leave out (``skip``); notes are
what it accepts but changes, such as an image converted to RGB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from vlmtune.data.formats import MAX_TEXT_CHARS, Problem, Scan, scan_counting, scan_pairs

Kind = Literal["pairs", "counting"]


def detect_kind(path: str | Path) -> Kind:
    """Counting sets are JSONL; retrieval, grounding and COCO captions are JSON."""
    return "counting" if Path(path).suffix.lower() == ".jsonl" else "pairs"


def validate_file(path: str | Path, kind: Kind | None = None, max_count: int | None = None,
                  max_text_chars: int = MAX_TEXT_CHARS) -> Scan:
    """Scan an annotation file with full image decoding; the scan holds every problem.

    A file with no records at all gets an error of its own (the readers refuse it).
    """
    path = Path(path)
    kind = kind or detect_kind(path)
    if kind == "counting":
        scan = scan_counting(path, max_count=max_count, deep=True, max_text_chars=max_text_chars)
    else:
        scan = scan_pairs(path, deep=True, max_text_chars=max_text_chars)
    if scan.n_records == 0 and not scan.errors:
        scan.problems.append(Problem(str(path), "no records"))
    return scan


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
        "file": str(scan.path), "kind": kind, "records": scan.n_records, "bad_records": len(scan.bad_sources),
        "errors": [item(p) for p in scan.errors], "notes": [item(p) for p in scan.notes], "summary": summary(scan),
    }
