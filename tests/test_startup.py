"""Start-up: the CLI's parser and --help answer without importing torch or transformers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PROBE = """
import sys
from vlmtune.cli import build_parser, main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(sorted(m for m in ("torch", "transformers", "torchmetrics", "accelerate") if m in sys.modules))
"""


def _heavy(*argv: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(SRC))
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env, timeout=120)
    return out.stdout.strip().splitlines()[-1]


def test_help_imports_neither_torch_nor_transformers() -> None:
    assert _heavy("--help") == "[]"
    assert _heavy("train", "--help") == "[]"
    assert _heavy("bench", "--help") == "[]"
