"""Regenerate the manual's pictures (docs/*.png) from finished runs.

    python examples/make_pictures.py --demo runs/demo --receipts runs/receipts --compare runs/cmp/report

- docs/examples.png: the demo's examples.html (its best checkpoint, evaluated with
  --rankings into a temporary folder), screenshot by headless Chromium;
- docs/receipts_attention.png: `vlmtune predict --attention-out` on the receipts run's
  best checkpoint and the first image of its test split with two receipts or more;
- docs/compare_val_curve.png and docs/compare_losses.png: copied from a `compare` report.

A run not given is left out; each picture is written only when its command succeeded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from vlmtune.cli import main

DOCS = Path(__file__).resolve().parents[1] / "docs"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def examples_png(demo: Path, tmp: Path) -> None:
    out = tmp / "eval"
    if main(["evaluate", str(demo / "checkpoints" / "best"), "--rankings", "--output-dir", str(out)]) != 0:
        sys.exit("evaluate failed")
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        sys.exit("no chromium: apt-get install -y chromium")
    shot = tmp / "examples.png"
    cmd = [browser, "--headless", "--no-sandbox", "--hide-scrollbars", "--window-size=1440,1400"]
    subprocess.run(
        [*cmd, f"--user-data-dir={tmp / 'profile'}", f"--screenshot={shot}", (out / "examples.html").as_uri()], check=True
    )
    shutil.copy(shot, DOCS / "examples.png")


def attention_png(receipts: Path, tmp: Path) -> None:
    ckpt = receipts / "checkpoints" / "best"
    records = [json.loads(line) for line in (receipts / "data" / "test.jsonl").read_text().splitlines()]
    first = next((r for r in records if r["count"] >= 2), records[0])  # an image with receipts to attend to
    image = receipts / "data" / first["image"]
    shot = tmp / "attention.png"
    args = ["predict", str(ckpt), "--image", str(image), "--question", first["question"], "--attention-out", str(shot)]
    if main(args) != 0:
        sys.exit("predict failed")
    shutil.copy(shot, DOCS / "receipts_attention.png")


def main_(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", type=Path, help="the finished demo run folder")
    p.add_argument("--receipts", type=Path, help="the finished receipts run folder")
    p.add_argument("--compare", type=Path, help="a compare --output-dir")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as t:
        if a.demo:
            examples_png(a.demo, Path(t))
        if a.receipts:
            attention_png(a.receipts, Path(t))
    if a.compare:
        for name in ("compare_val_curve.png", "compare_losses.png"):
            found = sorted(a.compare.glob(f"*{name.removeprefix('compare_')}"))
            if found:
                shutil.copy(found[0], DOCS / name)


if __name__ == "__main__":
    main_()
