"""What vlmtune shows while it works: progress bars on a terminal, plain lines in a log,
and the libraries it uses kept quiet unless asked.

- :func:`progress` is the one progress bar: tqdm's bar when stderr is a terminal; when
  it is a file or a pipe (a log), no carriage returns: a plain line every
  :data:`LOG_EVERY_S` seconds and a last one when a step that took :data:`LONG_S` or
  more ends (a short step writes nothing).
- :func:`status` is the line for a long step that has no loop to count (loading a
  backbone, computing the text baselines).
- Quiet by default: :func:`quiet_libraries` keeps transformers' own bars ("Loading
  weights") and info messages out of a load; :func:`set_verbose` (the CLI's
  ``--verbose``, or ``VLMTUNE_VERBOSE=1``) lets them through.

Nothing here imports torch or transformers at import time (the CLI starts fast).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("vlmtune")

LOG_EVERY_S = 10.0  # a plain progress line this often when stderr is not a terminal
LONG_S = 2.0  # a step at least this long gets a last line in a log

# Third-party loggers kept at WARNING unless --verbose: transformers and accelerate are
# chatty at INFO, faiss announces its build ("Loading faiss with AVX2 support"),
# rouge_score's absl logger says "Using default tokenizer." on every scorer.
QUIET_LOGGERS = ("transformers", "accelerate", "urllib3", "huggingface_hub", "PIL", "matplotlib", "faiss", "absl")

_verbose = False
_bars = True  # train.progress=false turns every bar of a run off (bars())


def set_verbose(flag: bool) -> None:
    """Let the libraries' own bars, banners and warnings through (``--verbose``)."""
    global _verbose
    _verbose = flag


def is_verbose() -> bool:
    return _verbose or os.environ.get("VLMTUNE_VERBOSE", "") not in ("", "0")


def quiet_loggers(quiet: bool = True) -> None:
    """The third-party loggers of :data:`QUIET_LOGGERS` at WARNING (transformers at
    ERROR: its warnings are about its own internals), or with ``quiet=False`` back at
    their default (the CLI's ``--verbose`` and ``--debug``)."""
    for name in QUIET_LOGGERS:
        level = logging.ERROR if name == "transformers" else logging.WARNING
        logging.getLogger(name).setLevel(level if quiet else logging.NOTSET)
    if quiet:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Inside: transformers' progress bars ("Loading weights") and its info and warning
    messages are off, and its FutureWarnings ignored, unless :func:`is_verbose`. The
    Hub's download bars stay as they were (a download is a long step worth showing).
    Everything is restored on the way out."""
    if is_verbose():
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    bars, level, hub_off = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity(), are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # also turns the Hub's bars off ...
    if not hub_off:
        enable_progress_bars()  # ... which stay as they were
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|accelerate)(\.|$)")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
        if hub_off:
            disable_progress_bars()


@contextmanager
def bars(enabled: bool) -> Iterator[None]:
    """Inside: :func:`progress` draws nothing when not ``enabled`` (a run's
    ``train.progress=false`` reaches the bars of the steps it calls, the cache's too)."""
    global _bars
    before, _bars = _bars, _bars and enabled
    try:
        yield
    finally:
        _bars = before


def status(message: str, *args: Any) -> None:
    """One line saying what a long step without a loop to count is doing."""
    log.info(message, *args)


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without it, or closed
        return False


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str,
    total: int | None = None,
    enabled: bool = True,
    unit: str = "it",
    leave: bool = False,
    initial: int = 0,
) -> Any:
    """A tqdm progress bar over ``iterable`` (or, without one, updated by hand with
    ``update(n)``) on a terminal; plain periodic lines when stderr is not one; nothing
    when not ``enabled``. Use it as tqdm: iterate, ``set_postfix``, ``close``."""
    from tqdm.auto import tqdm

    if not (enabled and _bars):
        return tqdm(iterable, total=total, disable=True)
    if stderr_is_terminal():
        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, initial=initial, dynamic_ncols=True)
    return _log_lines_class()(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        initial=initial,
        leave=False,
        file=_NoBlankWrites(sys.stderr),
        mininterval=LOG_EVERY_S,
        maxinterval=LOG_EVERY_S,
        ascii=True,
    )


class _NoBlankWrites:
    """A stream that drops what tqdm writes to move the cursor ("\\r", "\\n" alone)."""

    def __init__(self, stream: Any):
        self.stream = stream

    def write(self, text: str) -> int:
        if text.strip():
            self.stream.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


_LOG_LINES: Any = None


def _log_lines_class() -> Any:
    """tqdm for a log file or a pipe (built on first use: tqdm is imported then)."""
    global _LOG_LINES
    if _LOG_LINES is not None:
        return _LOG_LINES
    from tqdm.std import tqdm

    class LogLines(tqdm):
        """A line of the bar's state at each refresh past the start; at the close, the
        last state once more when it changed and the step took LONG_S or more."""

        def display(self, msg: str | None = None, pos: int | None = None) -> bool:
            if msg is None and self.n > 0:
                self.fp.write(self.__str__().rstrip() + "\n")
                self.fp.flush()
                self.printed_n = self.n
            return True

        def close(self) -> None:
            if not self.disable and self.n != getattr(self, "printed_n", 0) and time.time() - self.start_t >= LONG_S:
                self.display()
            super().close()

    _LOG_LINES = LogLines
    return LogLines
