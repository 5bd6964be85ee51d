"""vlmtune: staged fine-tuning of a frozen InternVL with small trainable parts.

``vlmtune.load(CHECKPOINT)`` gives a :class:`vlmtune.api.Model` that embeds images
and texts, grounds a phrase or answers a counting question (see ``vlmtune.api``).
Both names are imported on first use, so ``import vlmtune`` stays cheap (no torch).
"""

__version__ = "0.3.0"

__all__ = ["Grounding", "Model", "load", "__version__"]


def __getattr__(name: str):
    # PEP 562: the API module (and torch with it) is imported when first asked for.
    if name in ("load", "Model", "Grounding"):
        from vlmtune import api

        return getattr(api, name)
    raise AttributeError(f"module 'vlmtune' has no attribute {name!r}")
