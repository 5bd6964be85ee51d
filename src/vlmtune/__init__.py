"""vlmtune: staged fine-tuning of a frozen InternVL with small trainable parts."""

__version__ = "0.1.0"
