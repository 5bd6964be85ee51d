"""``python -m vlmtune.cli`` (what ``torchrun`` and ``accelerate launch`` run)."""

from __future__ import annotations

import sys

from vlmtune.cli import main

sys.exit(main())
