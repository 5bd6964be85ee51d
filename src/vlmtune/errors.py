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
