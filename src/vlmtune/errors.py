"""User-facing errors.

Anything raised as a :class:`VlmtuneError` is a problem with the user's input (a config
key, a data file, a checkpoint) rather than a bug. The CLI prints its message on one
line and exits non-zero without a traceback (unless ``--debug``).
"""

from __future__ import annotations


class VlmtuneError(Exception):
    """Base class of errors whose message is meant for the user."""


class ConfigError(VlmtuneError):
    """A bad config file, key or value. The message names the key."""


class DataError(VlmtuneError):
    """A bad annotation file, record or image. The message names the file and record."""


class CheckpointError(VlmtuneError):
    """A missing, truncated or foreign checkpoint."""


class ArgumentError(VlmtuneError, ValueError):
    """A bad value passed to the Python API (``vlmtune.load(device="nope")``, an empty
    question, embedding batches of unequal lengths). The message names the argument.
    A ``ValueError`` too, so ``except ValueError`` catches it as Python code expects."""


class ArgumentTypeError(VlmtuneError, TypeError):
    """An argument of the wrong type passed to the Python API (``embed_images(5)``).
    The message names the argument and the types it takes. A ``TypeError`` too."""


class TrainingStopped(VlmtuneError):
    """Training stopped before its end and left a checkpoint to resume from (or to
    inspect). ``exit_code`` is what the CLI returns; ``label`` starts its message."""

    exit_code = 2
    label = "error"


class Interrupted(TrainingStopped):
    """SIGINT or SIGTERM: the current step finished, a checkpoint was saved."""

    label = "interrupted"

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class Diverged(TrainingStopped):
    """The loss was NaN or infinite for train.max_bad_steps steps in a row."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its class name when it has none), for
    one-line errors that quote a library's multi-line message."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
