"""The retrieval task: cross-modal retrieval with grounding and spatial relations."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from vlmtune.backbone import Backbone
from vlmtune.config.schema import Config, DataConfig, EvalConfig
from vlmtune.data.cache import resolve_cache_dtype
from vlmtune.data.formats import PairRecord, options_from_config, read_pairs
from vlmtune.data.pairs import PairCollator, PairDataset
from vlmtune.data.scenes import generate_scenes
from vlmtune.tasks.base import FeatureCache, data_paths
from vlmtune.tasks.retrieval.config import ModelConfig
from vlmtune.tasks.retrieval.data import make_loader
from vlmtune.tasks.retrieval.evaluation import check_ks, evaluate_with_rankings
from vlmtune.tasks.retrieval.model import RetrievalModel
from vlmtune.tasks.retrieval.negatives import NegativeBank
from vlmtune.tasks.retrieval.negconfig import NegativesConfig
from vlmtune.tasks.retrieval.spec import RetrievalSpec


class RetrievalTask(RetrievalSpec[RetrievalModel]):
    """Cross-modal retrieval with grounding and spatial relations (declarations: :class:`RetrievalSpec`)."""

    def __init__(
        self,
        *,
        model: ModelConfig,
        loss: Mapping[str, float],
        data: DataConfig,
        eval: EvalConfig,
        train_batch_size: int,
        max_text_tokens: int,
        vision_pooling: str = "mean",
        text_pooling: str = "mean",
        cache_dtype: str = "float32",
        negatives: NegativesConfig | None = None,
    ):
        """``loss``: the weight of each registered loss and part (defaults where it has none);
        ``negatives``: negatives beyond the batch (None or all off: in-batch only).
        ``model.contrastive_batch`` > ``train_batch_size``: training batches hold that
        many pairs, in chunks of ``train_batch_size`` (:mod:`.bigbatch`)."""
        super().__init__(loss=loss)
        self.negatives = negatives or NegativesConfig()
        self.negative_bank: NegativeBank | None = NegativeBank(self.negatives) if self.negatives.enabled else None
        self.model_cfg, self.data, self.eval_cfg = model, data, eval
        self.train_batch_size = train_batch_size
        # Rows per training batch, and the chunk a contrastive batch is cut into (0: none).
        big = model.contrastive_batch > train_batch_size
        self.train_rows = model.contrastive_batch if big else train_batch_size
        self.chunk_rows = train_batch_size if big else 0
        self.max_text_tokens = max_text_tokens
        self.vision_pooling, self.text_pooling = vision_pooling, text_pooling
        self.cache_dtype = cache_dtype

    @classmethod
    def from_config(cls, cfg: Config) -> RetrievalTask:
        model: ModelConfig = cfg.section("model")
        return cls(
            model=model,
            loss=cfg.loss,
            data=cfg.data,
            eval=cfg.eval,
            train_batch_size=cfg.train.batch_size,
            max_text_tokens=cfg.backbone.max_text_tokens,
            vision_pooling=cfg.backbone.vision_pooling,
            text_pooling=cfg.backbone.text_pooling,
            cache_dtype=resolve_cache_dtype(cfg.cache.dtype),
            negatives=cfg.section("negatives"),
        )

    def build_model(self, backbone: Backbone) -> RetrievalModel:
        model = RetrievalModel(
            backbone,
            self.model_cfg,
            self.losses,
            self.loss,
            vision_pooling=self.vision_pooling,
            text_pooling=self.text_pooling,
            chunk_rows=self.chunk_rows,
        )
        model.negative_bank = self.negative_bank
        return model

    def data_paths(self, output_dir: Path) -> dict[str, str]:
        """Annotation files from the config, or the synthetic scenes set, generated once."""
        s = self.data.synthetic
        return data_paths(
            self.data,
            output_dir,
            lambda folder: generate_scenes(folder, n=s.n, seed=s.seed, image_size=s.image_size, overwrite=True),
            ".json",
        )  # checked: empty or generated

    def read_split(self, path: str, split: str | None = None) -> list[PairRecord]:
        """Records of one split; bad records raise or are skipped (and logged) per data.on_error.
        ``split`` picks a split from a file that holds them all (Karpathy, refer)."""
        return read_pairs(path, on_error=self.data.on_error, opts=options_from_config(self.data, split=split))

    def make_loader(
        self, records: list[PairRecord], backbone: Backbone, *, train: bool, seed: int = 0, cache: FeatureCache | None = None
    ) -> DataLoader:
        loader = make_loader(
            records,
            backbone,
            batch_size=self.train_rows if train else self.eval_cfg.batch_size,
            max_text_tokens=self.max_text_tokens,
            train=train,
            seed=seed,
            num_workers=self.data.num_workers,
            cache=cache,
            cache_dtype=self.cache_dtype,
            cache_batch_size=self.eval_cfg.batch_size,
        )
        if train and self.negative_bank is not None:
            # The bank reads the training rows (mined negatives) and the data negatives
            # from the same caches as this loader.
            def negatives_dataset(pseudo: list[PairRecord]) -> Any:
                return make_loader(
                    pseudo,
                    backbone,
                    batch_size=1,
                    max_text_tokens=self.max_text_tokens,
                    num_workers=0,
                    cache=cache,
                    cache_dtype=self.cache_dtype,
                    cache_batch_size=self.eval_cfg.batch_size,
                ).dataset

            dataset, collator = loader.dataset, loader.collate_fn
            assert isinstance(dataset, PairDataset) and isinstance(collator, PairCollator)
            self.negative_bank.attach(records, dataset, collator, negatives_dataset)
        return loader

    # ---- negatives beyond the batch (vlmtune.tasks.retrieval.negatives)
    def start_epoch(
        self,
        model: RetrievalModel,
        records: list[PairRecord],
        *,
        epoch: int,
        backbone: Backbone,
        cache: FeatureCache | None,
        device: torch.device,
    ) -> None:
        """Mine the hard negatives anew every negatives.refresh_every epochs."""
        bank, n = self.negative_bank, self.negatives
        if bank is None or not n.mine or epoch % n.refresh_every:
            return
        bank.refresh(model, self.make_loader(records, backbone, train=False, cache=cache), device)

    def train_state(self) -> dict[str, Any]:
        return {} if self.negative_bank is None else {"negatives": self.negative_bank.state_dict()}

    def load_train_state(self, state: dict[str, Any]) -> None:
        if self.negative_bank is not None and "negatives" in state:
            self.negative_bank.load_state_dict(state["negatives"])

    def train_metrics(self, train_records: list[PairRecord]) -> dict[str, Any]:
        """What the contrastive loss saw beyond the plain batch: the pairs of a
        contrastive batch (per process), and the data and mined negatives used."""
        batch = {"negatives/contrastive_batch": self.train_rows}
        if self.negative_bank is None:
            return batch
        captions = sum(len(r.negatives) for r in train_records)
        images = sum(len(r.negative_images) for r in train_records)
        return batch | self.negative_bank.metrics(captions, images)

    def check_eval_records(self, records: list[PairRecord], where: str) -> None:
        """eval.ks must fit the gallery of each direction: the captions an image query
        ranks (i2t) and the images a caption query ranks (t2i). A K beyond it scores 100
        whatever the model, and the best checkpoint would be picked by that number."""
        check_ks(self.eval_cfg.ks, n_images=len({r.image_id for r in records}), n_captions=len(records), where=where)

    def validate(
        self, model: RetrievalModel, records: list[PairRecord], *, device: torch.device, cache: FeatureCache | None = None
    ) -> dict[str, Any]:
        return self.evaluate(model, records, device=device, cache=cache)

    def evaluate(
        self,
        model: RetrievalModel,
        records: list[PairRecord],
        *,
        device: torch.device,
        train_records: list[PairRecord] | None = None,
        progress: bool = False,
        cache: FeatureCache | None = None,
    ) -> dict[str, Any]:
        return self.evaluate_with_rankings(
            model, records, device=device, rankings_k=0, train_records=train_records, progress=progress, cache=cache
        )[0]

    def evaluate_with_rankings(
        self,
        model: RetrievalModel,
        records: list[PairRecord],
        *,
        device: torch.device,
        rankings_k: int,
        train_records: list[PairRecord] | None = None,
        progress: bool = False,
        cache: FeatureCache | None = None,
    ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
        """:meth:`evaluate` plus per-query results: {"t2i": [...], "i2t": [...]} rows
        (with ``rankings_k`` > 0; none with 0)."""
        self.check_eval_records(records, records[0].source.split(": record")[0] if records else "the evaluation data")

        def loader_for(shard: list[PairRecord]) -> DataLoader:
            return self.make_loader(shard, model.backbone, train=False, cache=cache)

        return evaluate_with_rankings(
            model, records, loader_for, device, self.eval_cfg, train_records, progress, rankings_k=rankings_k
        )
