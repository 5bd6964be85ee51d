"""Matryoshka embeddings (MRL; sentence-transformers' ``MatryoshkaLoss``, ms-swift's
``mrl_dims``): the first ``d`` coordinates of the joint-space embedding, renormalised,
are an embedding in their own right for each trained ``d``.

``model.mrl_dims`` lists the nested widths besides the full ``model.embed_dim`` (always
trained); the contrastive loss becomes the sum over the trained widths, each weighted
(``model.mrl_weights``, one per trained width in ascending order; 1 each unless set), of
the InfoNCE of the truncated, renormalised embeddings. Evaluation reports R@K at every
trained width (``retrieval/mrl{d}/...``); ``embed`` / ``index`` / ``search --dim d`` use
width ``d``. With ``mrl_dims`` empty nothing here runs: the loss is the plain one.

No torch at import: config checks read :func:`trained_dims` and :func:`check_mrl`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from vlmtune.errors import ConfigError

if TYPE_CHECKING:
    import torch


def trained_dims(embed_dim: int, mrl_dims: Sequence[int]) -> list[int]:
    """Every width the loss trains, ascending: ``mrl_dims`` and the full ``embed_dim``."""
    return sorted({int(d) for d in mrl_dims} | {int(embed_dim)})


def check_mrl(embed_dim: int, mrl_dims: Sequence[int], mrl_weights: Sequence[float]) -> None:
    """Each nested width in 1..embed_dim, none repeated; weights one per trained width."""
    for d in mrl_dims:
        if not 1 <= int(d) <= embed_dim:
            raise ConfigError(
                f"model.mrl_dims: {d} is not a width in 1..model.embed_dim ({embed_dim}); drop it or raise embed_dim"
            )
    if len(set(mrl_dims)) != len(mrl_dims):
        raise ConfigError(f"model.mrl_dims: {list(mrl_dims)} repeats a width; list each once")
    dims = trained_dims(embed_dim, mrl_dims)
    if mrl_weights and len(mrl_weights) != len(dims):
        raise ConfigError(
            f"model.mrl_weights: {len(mrl_weights)} weights for {len(dims)} trained widths {dims} "
            f"(model.mrl_dims plus embed_dim, ascending); give one per width, or none for 1 each"
        )
    if any(float(w) < 0 for w in mrl_weights):
        raise ConfigError(f"model.mrl_weights: {list(mrl_weights)} holds a negative weight; weights must be >= 0")


def weights(embed_dim: int, mrl_dims: Sequence[int], mrl_weights: Sequence[float]) -> list[tuple[int, float]]:
    """(width, weight) of every trained width, ascending."""
    dims = trained_dims(embed_dim, mrl_dims)
    w = [float(x) for x in mrl_weights] if mrl_weights else [1.0] * len(dims)
    return list(zip(dims, w))


def truncate(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The first ``dim`` coordinates of each row of ``x``, L2-renormalised (the full
    width returned as it is: the projector's output is already normalised)."""
    import torch.nn.functional as F

    if dim >= x.shape[-1]:
        return x
    return F.normalize(x[..., :dim], dim=-1)


def mrl_loss(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    text: torch.Tensor,
    dim_weights: Sequence[tuple[int, float]],
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Σ_d w_d · loss_fn(truncate(image, d), truncate(text, d)), and each width's
    unweighted loss as a diagnostic (``diag/mrl{d}``)."""
    total = None
    diag: dict[str, Any] = {}
    for d, w in dim_weights:
        term = loss_fn(truncate(image, d), truncate(text, d))
        diag[f"diag/mrl{d}"] = term.detach()
        total = w * term if total is None else total + w * term
    assert total is not None, "at least the full width is trained"
    return total, diag


def contrastive_terms(enc: Any, loss: Callable[..., torch.Tensor]) -> dict[str, Any]:
    """The contrastive term of :class:`~.model.RetrievalEncodings` ``enc`` summed over
    the trained widths; ``loss(image, text, ids, logit_scale)`` is the plain InfoNCE."""
    m = enc.model
    scale = m.logit_scale()
    total, diag = mrl_loss(
        lambda v, t: loss(v, t, enc.ids, scale),
        enc.image,
        enc.text,
        weights(m.cfg.embed_dim, m.cfg.mrl_dims, m.cfg.mrl_weights),
    )
    return {"contrastive": total, **diag}


def width_metrics(cfg: Any, gallery: torch.Tensor, texts: torch.Tensor, t2i: torch.Tensor, ev: Any) -> dict[str, float]:
    """R@K and their mean at every trained width below the full one (``cfg``: the
    model section; ``ev``: the eval section), keyed ``retrieval/mrl{d}/i2t_r1``...:
    contrastive ranking of the truncated, renormalised embeddings (no re-ranking, the
    matching head reads full-width pairs). Nothing without ``mrl_dims``."""
    import re

    from vlmtune.metrics.retrieval import retrieval_metrics

    out: dict[str, float] = {}
    for d in trained_dims(cfg.embed_dim, cfg.mrl_dims):
        if d >= cfg.embed_dim:
            continue
        m = retrieval_metrics(
            truncate(gallery, d), truncate(texts, d), t2i, ks=tuple(ev.ks), chunk_size=ev.chunk_size, search=ev.search
        )
        assert isinstance(m, dict)  # no rankings asked for
        for k, v in m.items():
            if re.fullmatch(r"retrieval/((i2t|t2i)_r\d+|mean_recall)", k):
                out[k.replace("retrieval/", f"retrieval/mrl{d}/", 1)] = v
    return out


def check_dim(dim: int, embed_dim: int, mrl_dims: Sequence[int], what: str) -> None:
    """Refuse (one line) a width ``dim`` the checkpoint did not train."""
    dims = trained_dims(embed_dim, mrl_dims)
    if dim not in dims:
        hint = (
            "train with model.mrl_dims to get nested widths"
            if dims == [embed_dim]
            else f"pick one of {dims} (model.mrl_dims plus embed_dim)"
        )
        raise ConfigError(f"--dim: {what} trained the widths {dims}, not {dim}; {hint}")
