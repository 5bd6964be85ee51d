"""Negatives beyond the batch (the ``negatives:`` config section): from the data and mined.

- Data negatives: the negative captions (of a record's image) and negative images (of
  its caption) the records carry (:class:`~vlmtune.data.formats.PairRecord`
  ``negatives`` / ``negative_images``), with ``negatives.data``.
- Mined negatives, with ``negatives.mine``: every ``negatives.refresh_every`` epochs the
  training split is embedded with the current adapters (from the frozen-feature cache
  where the stage has one) and scored chunk by chunk
  (:func:`~vlmtune.metrics.retrieval.chunked_topk_both`, never the whole matrix); each
  image keeps its top ``per_query`` captions that are not positives, each caption its
  top ``per_query`` images (:func:`mine_lists`). False negatives are filtered: captions
  of the same image (the positives), captions identical to one of the query's own (up
  to case and spacing; by caption text, so an image whose caption repeats another's is
  no negative of that caption either), and candidates scoring above ``exclude_above``
  times the query's positive score (NV-Retriever's positive-aware filter).

Each training step, each row of the batch draws ``negatives.sample`` of its own
negatives per direction (:meth:`NegativeBank.columns`); their encodings are extra
columns of the contrastive loss and the matching head's negatives
(:mod:`vlmtune.losses.negatives`). The mined lists and the counters are part of the
checkpoint (:meth:`NegativeBank.state_dict`), so ``--resume`` continues with exactly
the lists the interrupted run had.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vlmtune.data.formats import PairRecord
from vlmtune.data.pairs import PairCollator, PairDataset
from vlmtune.errors import DataError
from vlmtune.metrics.retrieval import auto_chunk_size, chunked_topk, chunked_topk_both
from vlmtune.tasks.retrieval.negconfig import NegativesConfig

log = logging.getLogger("vlmtune")

# The bank's counters, in metrics.json as negatives/<name>.
COUNTERS = (
    "refreshes",
    "data_used",  # data negatives used as extra columns, over all steps (this process)
    "mined_used",  # mined negatives used as extra columns, over all steps (this process)
    "filtered_same_text",  # mined candidates left out: identical to a caption of the query's image (all refreshes)
    "filtered_above",  # ... left out: above exclude_above x the positive's score (all refreshes)
    "short_queries",  # queries of the last refresh that got fewer than per_query negatives
    "refresh_wall_s",  # seconds spent mining, all refreshes (embedding the split and scoring it)
)


# How deep a query left short by the filters is searched at most (candidates per query):
# the running top-k of a block of queries holds this many scores per query, so memory
# stays bounded whatever the gallery; a query still short keeps fewer negatives
# (negatives/short_queries counts them).
MAX_DEPTH = 1024


def text_group(text: str) -> str:
    """What makes two captions identical for the false-negative filter: the same words
    up to case and spacing."""
    return " ".join(text.split()).casefold()


@dataclass
class NegativeColumns:
    """A batch's extra columns: encodings, the image id of each (-1: no training image)
    and its owner (the batch row it was drawn for)."""

    text: torch.Tensor
    text_ids: torch.Tensor
    text_owner: torch.Tensor
    image: torch.Tensor
    image_ids: torch.Tensor
    image_owner: torch.Tensor


@dataclass
class MinedLists:
    """Per image: its mined captions (record indices); per caption (record): its mined
    images (image indices); -1 pads a query that got fewer than ``per_query``."""

    i2t: torch.Tensor  # [images, per_query]
    t2i: torch.Tensor  # [captions, per_query]
    filtered_same_text: int
    filtered_above: int
    short_queries: int


def _select(
    cand: torch.Tensor, excluded: tuple[torch.Tensor, torch.Tensor, torch.Tensor], per_query: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first ``per_query`` candidates of each (ranked) row that no rule excludes.
    ``excluded``: (positive, identical text, above the threshold) masks like ``cand``.
    Returns (kept [Q, per_query], -1 padded; how many each row kept; per row, the
    identical-text and the above-threshold exclusions met before its last kept
    candidate, or all of them where it kept fewer)."""
    same, dup, above = excluded
    keep = ~(same | dup | above)
    before = keep.long().cumsum(1) - keep.long()  # kept candidates ranked above each position
    considered = before < per_query
    chosen = keep & considered
    order = (~chosen).long().argsort(dim=1, stable=True)[:, :per_query]
    kept = cand.gather(1, order)
    ok = chosen.gather(1, order)
    kept = torch.where(ok, kept, torch.full_like(kept, -1))
    if kept.shape[1] < per_query:
        kept = torch.cat([kept, kept.new_full((kept.shape[0], per_query - kept.shape[1]), -1)], dim=1)
    return kept, chosen.sum(1), (dup & considered).sum(1), (above & considered).sum(1)


def mine_lists(
    images: torch.Tensor,
    texts: torch.Tensor,
    text_image: torch.Tensor,
    text_groups: torch.Tensor,
    per_query: int,
    exclude_above: float | None,
    chunk_size: int | None = None,
) -> MinedLists:
    """Hard negatives of every image (captions) and every caption (images).

    ``images`` [I, D] and ``texts`` [N, D] are L2-normalised embeddings; ``text_image``
    [N] the image index of each caption, ``text_groups`` [N] an id shared by identical
    captions. A query's positive score is its best positive's (an image's best caption;
    a caption's own image). Ranked by score (ties: lower index first, as evaluation
    ranks), the first ``per_query`` candidates that are not filtered are kept. The
    scores are computed in blocks (``chunk_size``); a query left short by the filters
    is searched again deeper until it has enough, or :data:`MAX_DEPTH` candidates (or
    the whole gallery) were searched.
    """
    n_img, n_txt = len(images), len(texts)
    device = images.device  # where the scoring runs (the model's device); the lists come back on the CPU
    images, texts = images.float(), texts.float().to(device)
    text_image, text_groups = text_image.to(device), text_groups.to(device)
    chunk = chunk_size or auto_chunk_size(n_img, n_txt)
    own = (images[text_image] * texts).sum(1)  # each caption against its own image
    pos_img = torch.full((n_img,), float("-inf"), device=device).scatter_reduce(0, text_image, own, "amax")
    pairs = torch.unique(text_groups * n_img + text_image)  # (caption text, image) pairs present
    per_img = torch.bincount(text_image, minlength=n_img)
    thr = exclude_above

    def excl_i2t(q: torch.Tensor, cand: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        same = text_image[cand] == q[:, None]
        dup = torch.isin(text_groups[cand] * n_img + q[:, None], pairs) & ~same
        above = (s > thr * pos_img[q][:, None]) & ~same & ~dup if thr is not None else torch.zeros_like(same)
        return same, dup, above

    def excl_t2i(c: torch.Tensor, cand: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        same = cand == text_image[c][:, None]
        dup = torch.isin(text_groups[c][:, None] * n_img + cand, pairs) & ~same
        above = (s > thr * own[c][:, None]) & ~same & ~dup if thr is not None else torch.zeros_like(same)
        return same, dup, above

    k0 = per_query * 2 + int(per_img.max()) + 8 if n_img else 1
    i2t_idx, t2i_idx, i2t_s, t2i_s = chunked_topk_both(images, texts, k0, chunk, with_scores=True)
    totals = {"dup": 0, "above": 0, "short": 0}

    def finish(
        queries: torch.Tensor, keys: torch.Tensor, idx: torch.Tensor, s: torch.Tensor, excl: Callable[..., Any], k: int
    ) -> torch.Tensor:
        q = torch.arange(len(queries), device=device)
        kept, count, dup, above = _select(idx, excl(q, idx, s), per_query)
        short = (count < per_query).nonzero().flatten()
        depth = min(len(keys), max(MAX_DEPTH, k))
        while len(short) and k < depth:  # searched deeper, for the short rows only
            k = min(4 * k, depth)
            s2, idx2 = chunked_topk(queries[short], keys, k, chunk)
            kept[short], count[short], dup[short], above[short] = _select(idx2, excl(short, idx2, s2), per_query)
            short = short[count[short] < per_query]
        totals["dup"] += int(dup.sum())
        totals["above"] += int(above.sum())
        totals["short"] += int((count < per_query).sum())
        return kept

    i2t = finish(images, texts, i2t_idx, i2t_s, excl_i2t, i2t_idx.shape[1])
    t2i = finish(texts, images, t2i_idx, t2i_s, excl_t2i, t2i_idx.shape[1])
    return MinedLists(i2t.cpu(), t2i.cpu(), totals["dup"], totals["above"], totals["short"])


class NegativeBank:
    """A run's negatives beyond the batch: the data's, the mined lists and their counters.

    :meth:`attach` (by the task's training loader) ties it to the training records and
    the stage's feature stores; :meth:`refresh` mines; :meth:`columns` gives a step's
    extra columns (None when there are none); :meth:`state_dict` is what a checkpoint
    keeps."""

    def __init__(self, cfg: NegativesConfig):
        self.cfg = cfg
        self.counters: dict[str, float] = dict.fromkeys(COUNTERS, 0)
        self.mined: MinedLists | None = None
        self.records: list[PairRecord] = []
        self.dataset: PairDataset | None = None

    # ---- the training split
    def attach(
        self,
        records: list[PairRecord],
        dataset: PairDataset,
        collator: PairCollator,
        negatives_dataset: Callable[[list[PairRecord]], PairDataset],
    ) -> None:
        """The training records and their dataset (a stage's loader: its caches);
        ``negatives_dataset(records)`` builds the dataset of the data negatives (as
        pseudo-records: a negative caption with the record's image, a negative image
        with its caption), read from the same caches."""
        self.records, self.dataset, self.collator = records, dataset, collator
        first: dict[int, int] = {}
        for r in records:
            first.setdefault(r.image_id, len(first))
        self.image_of = torch.tensor([first[r.image_id] for r in records], dtype=torch.long)  # record -> image index
        self.first_record = torch.zeros(len(first), dtype=torch.long)
        for i in reversed(range(len(records))):
            self.first_record[self.image_of[i]] = i
        m = self.mined
        if m is not None and (len(m.i2t) != len(first) or len(m.t2i) != len(records)):
            # Resumed with changed data (--accept-changed-data): the saved lists index other records.
            log.warning(
                "negatives: the mined lists of the checkpoint are for %d images and %d captions, the training split "
                "has %d and %d; they are dropped and mined again at the next refresh",
                len(m.i2t),
                len(m.t2i),
                len(first),
                len(records),
            )
            self.mined = None
        groups: dict[str, int] = {}
        self.text_groups = torch.tensor([groups.setdefault(text_group(r.text), len(groups)) for r in records], dtype=torch.long)
        self.data_text: list[list[int]] = [[] for _ in records]
        self.data_image: list[list[int]] = [[] for _ in records]
        self.data_text_ids: list[int] = []
        self.data_image_ids: list[int] = []
        self.data_dataset: PairDataset | None = None
        self.n_data_text = 0
        if not self.cfg.data:
            return
        if not any(r.negatives or r.negative_images for r in records):
            where = records[0].source.split(": record")[0].split(": line")[0] if records else "the training data"
            raise DataError(
                f"{where}: negatives.data is true but no training record carries negative captions or images "
                "(pairs 'negatives' / 'negative_images', ms-swift 'negative_messages' / 'negative_images'); "
                "add them or set negatives.data=false"
            )
        # An extra column is a positive of the rows whose image it is (or has this caption of).
        by_text: dict[str, set[int]] = {}
        by_path: dict[str, int] = {}
        for r in records:
            by_text.setdefault(text_group(r.text), set()).add(r.image_id)
            by_path.setdefault(str(r.image), r.image_id)
        pseudo: list[PairRecord] = []
        for i, r in enumerate(records):
            for t in r.negatives:
                self.data_text[i].append(len(pseudo))
                ids = by_text.get(text_group(t), set())
                self.data_text_ids.append(next(iter(ids)) if len(ids) == 1 else -1)
                pseudo.append(dataclasses.replace(r, text=t, bbox=None, relation=None, negatives=(), negative_images=()))
        n_text = len(pseudo)
        for i, r in enumerate(records):
            for p in r.negative_images:
                self.data_image[i].append(len(pseudo))
                self.data_image_ids.append(by_path.get(str(p), -1))
                pseudo.append(dataclasses.replace(r, image=p, bbox=None, relation=None, negatives=(), negative_images=()))
        self.n_data_text = n_text
        self.data_dataset = negatives_dataset(pseudo)

    # ---- mining
    @torch.no_grad()
    def refresh(self, model: Any, loader: Any, device: torch.device) -> None:
        """Embed the training split (``loader``: its evaluation loader, in record order)
        with the model as it is, and mine the lists anew."""
        t0 = time.perf_counter()
        model.eval()
        n = len(self.records)
        texts: list[torch.Tensor] = [torch.empty(0)] * n
        images: list[torch.Tensor | None] = [None] * len(self.first_record)
        for batch in loader:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            t = model.encode_text(batch["input_ids"], batch["attention_mask"], batch.get("text_hidden"))
            v, _ = model.encode_batch_images(batch)
            for row, rec in enumerate(batch["index"].tolist()):
                texts[rec] = t[row].float()
                img = int(self.image_of[rec])
                if images[img] is None:
                    images[img] = v[row].float()
        text_emb = torch.stack(texts)
        image_emb = torch.stack([x for x in images if x is not None])
        self.mined = mine_lists(image_emb, text_emb, self.image_of, self.text_groups, self.cfg.per_query, self.cfg.exclude_above)
        self.counters["refreshes"] += 1
        self.counters["filtered_same_text"] += self.mined.filtered_same_text
        self.counters["filtered_above"] += self.mined.filtered_above
        self.counters["short_queries"] = self.mined.short_queries
        wall = time.perf_counter() - t0
        self.counters["refresh_wall_s"] += wall
        log.info(
            "negatives: mined %d per query for %d images and %d captions in %.1f s; false negatives filtered: %d "
            "identical captions, %d above %s x the positive",
            self.cfg.per_query,
            len(image_emb),
            n,
            wall,
            self.mined.filtered_same_text,
            self.mined.filtered_above,
            self.cfg.exclude_above,
        )

    # ---- a step's extra columns
    def _draw(self, pool: list[tuple[bool, int]]) -> list[tuple[bool, int]]:
        k = self.cfg.sample
        if k == 0 or len(pool) <= k:
            return pool
        return [pool[i] for i in torch.randperm(len(pool))[:k].tolist()]

    def columns(self, model: Any, batch: dict[str, Any]) -> NegativeColumns | None:
        """The extra columns of a training batch (rows by ``batch["index"]``, record
        indices of the training split), encoded by ``model``; None without any."""
        if self.dataset is None:
            return None
        mined = self.mined
        rows = batch["index"].cpu().tolist()
        t_items, t_ids, t_owner, v_items, v_ids, v_owner = [], [], [], [], [], []
        for row, rec in enumerate(rows):
            pool = [(True, k) for k in self.data_text[rec]]
            if mined is not None:
                pool += [(False, j) for j in mined.i2t[self.image_of[rec]].tolist() if j >= 0]
            for is_data, k in self._draw(pool):
                if is_data:
                    assert self.data_dataset is not None
                    t_items.append(self.data_dataset[k])
                    t_ids.append(self.data_text_ids[k])
                else:
                    t_items.append(self.dataset[k])
                    t_ids.append(self.records[k].image_id)
                t_owner.append(row)
                self.counters["data_used" if is_data else "mined_used"] += 1
            pool = [(True, k) for k in self.data_image[rec]]
            if mined is not None:
                pool += [(False, q) for q in mined.t2i[rec].tolist() if q >= 0]
            for is_data, k in self._draw(pool):
                if is_data:
                    assert self.data_dataset is not None
                    v_items.append(self.data_dataset[k])
                    v_ids.append(self.data_image_ids[k - self.n_data_text])
                else:
                    j = int(self.first_record[k])
                    v_items.append(self.dataset[j])
                    v_ids.append(self.records[j].image_id)
                v_owner.append(row)
                self.counters["data_used" if is_data else "mined_used"] += 1
        if not t_items and not v_items:
            return None
        device = batch["image_id"].device
        d = model.cfg.embed_dim
        text = torch.zeros(0, d, device=device)
        image = torch.zeros(0, d, device=device)
        if t_items:
            tb = _to(self.collator(t_items), device)
            text = model.encode_text(tb["input_ids"], tb["attention_mask"], tb.get("text_hidden"))
        if v_items:
            image = model.encode_batch_images(_to(self.collator(v_items), device))[0]
        return NegativeColumns(
            text,
            torch.tensor(t_ids, dtype=torch.long, device=device),
            torch.tensor(t_owner, dtype=torch.long, device=device),
            image,
            torch.tensor(v_ids, dtype=torch.long, device=device),
            torch.tensor(v_owner, dtype=torch.long, device=device),
        )

    # ---- checkpoint and metrics
    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"counters": dict(self.counters)}
        if self.mined is not None:
            m = self.mined
            out["mined"] = {
                "i2t": m.i2t.clone(),
                "t2i": m.t2i.clone(),
                "filtered_same_text": m.filtered_same_text,
                "filtered_above": m.filtered_above,
                "short_queries": m.short_queries,
            }
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("counters", {})
        self.counters = {k: float(saved.get(k, 0)) if k.endswith("_s") else int(saved.get(k, 0)) for k in COUNTERS}
        m = state.get("mined")
        self.mined = (
            None
            if m is None
            else MinedLists(m["i2t"], m["t2i"], int(m["filtered_same_text"]), int(m["filtered_above"]), int(m["short_queries"]))
        )

    def metrics(self, n_data_captions: int, n_data_images: int) -> dict[str, Any]:
        """The run's ``negatives/...`` record for metrics.json."""
        out: dict[str, Any] = {
            "negatives/data": self.cfg.data,
            "negatives/mine": self.cfg.mine,
            "negatives/sample": self.cfg.sample,
            "negatives/data_captions": n_data_captions,
            "negatives/data_images": n_data_images,
        }
        if self.cfg.mine:
            out["negatives/mined_per_query"] = self.cfg.per_query
            out["negatives/refresh_every"] = self.cfg.refresh_every
            if self.cfg.exclude_above is not None:  # null: the positive-aware filter was off
                out["negatives/exclude_above"] = self.cfg.exclude_above
        for k in COUNTERS:
            out[f"negatives/{k}"] = round(self.counters[k], 3) if k.endswith("_s") else self.counters[k]
        out["negatives/false_negatives_filtered"] = self.counters["filtered_same_text"] + self.counters["filtered_above"]
        return out


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
