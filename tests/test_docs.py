"""The README and the manual (docs/*.md): their links lead somewhere, and their commands run.

Every fenced ``bash`` or ``python`` block of README.md and docs/*.md is one of:

- unmarked: run by the fast test, in a fresh folder holding a copy of ``examples/`` and
  small stand-ins for ``runs/demo`` and ``runs/receipts`` (the conftest checkpoints);
- ``<!-- docs-test: slow [KEY=VALUE ...] -->`` on the line above: needs a whole training
  run; the slow test runs the page from an empty folder (after the front page's demo
  and receipts runs), the KEY=VALUE overrides added to its ``train`` commands;
- ``<!-- docs-test: skip REASON -->``: needs data, hardware or time the tests do not have.

A ``bash`` block holds ``vlmtune`` commands only (an environment prefix such as
``OMP_NUM_THREADS=1`` aside), each run through ``vlmtune.cli.main`` and expected to
exit 0; ``python`` blocks are executed.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import RECIPE_RUNS
from vlmtune.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?:<!-- docs-test: (skip|slow)\b(.*?)-->\n)?```(bash|python)\n(.*?)^```$", re.M | re.S)
# The front page's set-up line: what may stand before its `vlmtune train` (not run here).
SETUP = ("python3 -m venv .venv", ". .venv/bin/activate", 'pip install -c constraints.txt -e ".[dev]"')


@dataclass(frozen=True)
class Block:
    page: Path
    mode: str  # "fast", "slow" or "skip"
    extra: tuple[str, ...]  # overrides added to train commands (slow) or the reason (skip)
    lang: str
    code: str


def blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    found = []
    for m in FENCE.finditer(text):
        mode = m.group(1) or "fast"
        extra = tuple(m.group(2).split()) if mode == "slow" else (m.group(2).strip(),) if mode == "skip" else ()
        found.append(Block(page, mode, extra, m.group(3), m.group(4)))
    return found


def commands(block: Block) -> list[list[str]]:
    """The argv of each ``vlmtune`` command of a bash block (continuation lines joined,
    comments dropped; globs are expanded when the command runs)."""
    out = []
    for line in block.code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if "&&" in words:  # the front page's set-up line: venv, activate, pip, then the command
            *setup, line = line.split(" && ")
            assert tuple(setup) == SETUP, setup
            words = shlex.split(line)
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
            words = words[1:]
        assert words and words[0] == "vlmtune", f"{block.page.name}: not a vlmtune command: {line}"
        out.append(words[1:])
    return out


def run_block(block: Block, done: frozenset[tuple[str, ...]] = frozenset()) -> None:
    """Run a block in the current folder; a command in ``done`` (already run, its output
    copied here) is not run again."""
    if block.lang == "python":
        exec(compile(block.code, str(block.page), "exec"), {})
        return
    for words in commands(block):
        if tuple(words) in done:
            continue
        argv = [a for w in words for a in (sorted(glob.glob(w)) or [w] if "*" in w else [w])]
        if argv[0] == "train" and block.mode == "slow":
            argv = [*argv, *block.extra]
        assert main(argv) == 0, f"{block.page.name}: vlmtune {shlex.join(argv)}"
        if len(argv) == 4 and argv[0] == "train" and argv[1].startswith("configs/") and argv[2] == "--output-dir":
            RECIPE_RUNS.setdefault(Path(argv[1]).name, Path(argv[3]).resolve())


ALL = [b for page in PAGES for b in blocks(page)]


def test_every_block_is_marked_and_every_command_is_vlmtune() -> None:
    assert len(ALL) > 20
    for b in ALL:
        if b.mode == "skip":
            assert b.extra[0], f"{b.page.name}: a skipped block says why"
        elif b.lang == "bash":
            assert commands(b), f"{b.page.name}: an empty bash block"
    text = "\n".join(p.read_text() for p in PAGES)
    for gone in ("photos/a.png", " captions.txt", "photo.jpg", "left of a star", "exports/", "att.png", "/tmp/"):
        assert gone not in text, gone


def test_readme_is_a_front_page() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300
    assert "chromium" in (ROOT / "README.md").read_text()


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_lead_to_files(page: Path) -> None:
    """mkdocs build --strict checks the site's links (CI); this checks the same for the
    README, whose links into docs/ the site does not see, and for every page."""
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to {target}"
        if anchor and dest.suffix == ".md":
            heads = [_slug(h) for h in re.findall(r"^#+ (.*)$", dest.read_text(), re.M)]
            assert anchor in heads, f"{page.name}: no heading for #{anchor} in {dest.name}"


def _slug(heading: str) -> str:
    # Python-Markdown's toc slug (what mkdocs uses): drop what is not a word, space or hyphen.
    s = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
    return re.sub(r"[-\s]+", "-", s)


def _workspace(tmp: Path, demo: Path | None, receipts: Path | None, data: Path | None) -> Path:
    shutil.copytree(ROOT / "examples", tmp / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "configs", tmp / "configs")
    for name, ckpt in (("demo", demo), ("receipts", receipts), ("receipts-lora", receipts)):
        if ckpt is not None:
            shutil.copytree(ckpt, tmp / "runs" / name / "checkpoints" / "best")
    if data is not None:
        shutil.copytree(data, tmp / "runs" / "demo" / "data")
    return tmp


def test_documented_commands_run(
    retrieval_checkpoint: Path, lora_counting_checkpoint: Path, scenes: Path, tmp_path: Path, monkeypatch
) -> None:
    """Every unmarked block of every page, in page order, on stand-ins for the demo and
    receipts runs (one epoch on the small set: the conftest checkpoints)."""
    ran = 0
    for page in PAGES:
        fast = [b for b in blocks(page) if b.mode == "fast"]
        if not fast:
            continue
        work = _workspace(tmp_path / page.stem, retrieval_checkpoint, lora_counting_checkpoint, scenes)
        monkeypatch.chdir(work)
        for b in fast:
            run_block(b)
            ran += 1
    assert ran >= 7


RUN_FILES = {"config.yaml", "metrics.json", "history.jsonl", "data", "cache", "checkpoints"}


def _only_the_run(folder: str, names: list[str]) -> list[str]:
    """copytree's ignore: a run folder's own files, not what the front page's later
    commands wrote beside them (eval/, emb/, index/)."""
    top = Path(folder).name in ("demo", "receipts") and Path(folder).parent.name == "runs"
    return [n for n in names if top and n not in RUN_FILES]


@pytest.mark.slow
def test_documented_commands_run_after_whole_runs(tmp_path: Path, monkeypatch) -> None:
    """The front page as written (the demo and receipts trainings included), then every
    page's fast and slow blocks on those runs."""
    front = tmp_path / "README"
    _workspace(front, None, None, None)
    monkeypatch.chdir(front)
    readme = [b for b in blocks(ROOT / "README.md") if b.mode != "skip"]
    for b in readme:
        run_block(b)
    # The front page's trainings; a page that repeats one word for word gets a copy of its run.
    done = frozenset(tuple(a) for b in readme if b.lang == "bash" and not b.extra for a in commands(b) if a[0] == "train")
    for page in PAGES[1:]:
        todo = [b for b in blocks(page) if b.mode != "skip"]
        if not todo:
            continue
        work = _workspace(tmp_path / page.stem, None, None, None)
        trained = {
            a[a.index("--output-dir") + 1]
            for b in todo
            if b.lang == "bash"
            for a in commands(b)
            if a[0] == "train" and tuple(a) not in done
        }
        for run in ("runs/demo", "runs/receipts"):
            if run not in trained:
                shutil.copytree(front / run, work / run, ignore=_only_the_run)
        monkeypatch.chdir(work)
        for b in todo:
            run_block(b, done)
    os.chdir(ROOT)
