"""What the CLI prints when a command fails: one line on stderr, never a traceback
(unless ``--debug``), and never longer than :data:`MAX_MESSAGE`."""

from __future__ import annotations

import errno
import os
import sys

from vlmtune.errors import first_line

# No message is longer than this: a value quoted from the input is shortened.
MAX_MESSAGE = 500


def describe_error(e: BaseException) -> str:
    """One line for an error that was not raised as a VlmtuneError: the file and the
    system's reason for an OSError (disk full, read-only disk, name too long, a link
    loop, ...), the cause for the rest; unexpected ones say how to see the traceback."""
    if isinstance(e, OSError):
        reason = {
            errno.ENOSPC: "no space left on the device",
            errno.EROFS: "the file system is read-only",
            errno.ENAMETOOLONG: "the name is too long for the file system",
            errno.ELOOP: "too many levels of symbolic links (a link loop)",
            errno.EDQUOT: "disk quota exceeded",
        }.get(e.errno or -1, (e.strerror or first_line(e)).lower())
        names = " -> ".join(shorten(str(f), 160) for f in (e.filename, e.filename2) if f is not None)
        return f"{names}: {reason}" if names else f"{reason} ({type(e).__name__})"
    if isinstance(e, UnicodeDecodeError):
        return f"a file is not UTF-8 text (byte {e.start}: {e.reason}); check the input files"
    if isinstance(e, RecursionError):
        return "the input is nested too deeply to be read"
    if isinstance(e, MemoryError):
        return "out of memory (an input or a size in the config is too large)"
    text = first_line(e)
    if isinstance(e, RuntimeError) and ("write" in text.lower() or "No space" in text):
        return f"cannot write a file ({text}); is the disk full?"
    if isinstance(e, (ValueError, RuntimeError, OverflowError)):
        return f"{text} ({type(e).__name__}; run with --debug for the traceback)"
    return f"unexpected {type(e).__name__}: {text} (a bug in vlmtune? run with --debug for the traceback)"


def shorten(text: str, limit: int) -> str:
    """One line of at most ``limit`` characters: newlines and runs of blanks become one
    space; a longer text keeps its start and its end (where the cause usually is)."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    head = (limit - 5) * 2 // 3
    return text[:head] + " ... " + text[len(text) - (limit - 5 - head) :]


def say(message: str, whole: bool = False) -> None:
    """One line on stderr, at most MAX_MESSAGE characters (unless ``whole``); from the
    main process only."""
    if os.environ.get("RANK", "0") == "0":  # one message, not one per process
        print(message if whole else shorten(message, MAX_MESSAGE), file=sys.stderr)
