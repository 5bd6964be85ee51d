"""The retrieval task's ``negatives:`` config section (no torch: config loading reads it).

Negatives beyond the batch: those the records carry (``negatives.data``) and those
mined from the training split with the current adapters (``negatives.mine``), used by
the contrastive loss as extra columns and by the matching head as its negatives
(:mod:`vlmtune.tasks.retrieval.negatives`). Everything off by default: the batch's
own rows are the only negatives, as before this section existed.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmtune.config.fields import setting
from vlmtune.errors import ConfigError


@dataclass
class NegativesConfig:
    """Extra negatives of the contrastive loss and the matching head: from the data and mined from the training split."""

    data: bool = setting(
        False,
        "Use the negative captions and negative images the training records carry (vlmtune pairs 'negatives' / "
        "'negative_images', ms-swift 'negative_messages' / 'negative_images', Hugging Face negative columns); "
        "a training split that carries none is an error.",
    )
    mine: bool = setting(
        False,
        "Mine hard negatives: every negatives.refresh_every epochs the training split is scored with the current "
        "adapters (from the frozen-feature cache, chunked) and the top negatives.per_query non-positives of each "
        "image (captions) and each caption (images) are kept; false negatives are filtered (see exclude_above).",
    )
    refresh_every: int = setting(
        1, "Epochs between two refreshes of the mined negatives (the first epoch always mines).", low=1, high=10**6
    )
    per_query: int = setting(4, "Mined negatives kept per query (per image: captions; per caption: images).", low=1, high=10000)
    exclude_above: float | None = setting(
        0.95,
        "Positive-aware filter of mined false negatives (NV-Retriever): a candidate scoring above this times the "
        "query's positive score is left out; null turns it off. Captions of the query's own image and captions "
        "identical to one of them (up to case and spacing) are always left out.",
        low=0,
        low_open=True,
    )
    sample: int = setting(
        1,
        "Extra negatives each row of a step uses per direction, drawn uniformly from its own (data and mined) "
        "negatives; 0: all of them. They join the batch's columns of the contrastive loss, and the matching head "
        "draws its negative among them.",
        low=0,
        high=10000,
    )

    @property
    def enabled(self) -> bool:
        return self.data or self.mine


def check_negatives(n: NegativesConfig) -> None:
    """A key set away from its default where it has no effect is refused: the mining keys
    need negatives.mine, ``sample`` needs data or mined negatives."""
    defaults = NegativesConfig()
    for key in ("refresh_every", "per_query", "exclude_above"):
        if not n.mine and getattr(n, key) != getattr(defaults, key):
            raise ConfigError(f"negatives.{key}: has no effect while negatives.mine is false; set negatives.mine=true")
    if not n.enabled and n.sample != defaults.sample:
        raise ConfigError("negatives.sample: has no effect while negatives.data and negatives.mine are both false")
