"""The counting task: counting with answer generation."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from vlmtune.backbone import Backbone
from vlmtune.config.schema import Config, DataConfig
from vlmtune.data.cache import resolve_cache_dtype
from vlmtune.data.formats import CountRecord, options_from_config, read_counting
from vlmtune.data.receipts import generate_receipts
from vlmtune.tasks.base import FeatureCache, data_paths
from vlmtune.tasks.counting.config import CountingConfig, GenerationConfig
from vlmtune.tasks.counting.data import make_loader
from vlmtune.tasks.counting.evaluation import evaluate
from vlmtune.tasks.counting.model import CountingModel
from vlmtune.tasks.counting.spec import CountingSpec
from vlmtune.tasks.retrieval.config import ModelConfig

RELIABILITY_PNG = "reliability.png"


class CountingTask(CountingSpec[CountingModel]):
    """Counting with answer generation (declarations: :class:`CountingSpec`)."""

    def __init__(
        self,
        *,
        counting: CountingConfig,
        generation: GenerationConfig,
        model: ModelConfig,
        data: DataConfig,
        loss: Mapping[str, float],
        train_batch_size: int,
        eval_batch_size: int,
        seed: int = 0,
        cache_dtype: str = "float32",
    ):
        """``loss``: the weight of each registered loss (defaults where it has none)."""
        super().__init__(loss=loss)
        self.counting, self.generation, self.model_cfg, self.data = counting, generation, model, data
        self.train_batch_size, self.eval_batch_size = train_batch_size, eval_batch_size
        self.seed = seed
        self.cache_dtype = cache_dtype

    @classmethod
    def from_config(cls, cfg: Config) -> CountingTask:
        counting: CountingConfig = cfg.section("counting")
        generation: GenerationConfig = cfg.section("generation")
        model: ModelConfig = cfg.section("model")
        return cls(
            counting=counting,
            generation=generation,
            model=model,
            data=cfg.data,
            loss=cfg.loss,
            train_batch_size=cfg.train.batch_size,
            eval_batch_size=cfg.eval.batch_size,
            seed=cfg.seed,
            cache_dtype=resolve_cache_dtype(cfg.cache.dtype),
        )

    def build_model(self, backbone: Backbone) -> CountingModel:
        return CountingModel(backbone, self.counting, self.model_cfg, self.losses, self.loss)

    def data_paths(self, output_dir: Path) -> dict[str, str]:
        """Annotation files from the config, or the synthetic receipts set, generated once."""
        s = self.data.synthetic
        return data_paths(
            self.data,
            output_dir,
            lambda folder: generate_receipts(
                folder, n=s.n, seed=s.seed, max_count=self.counting.max_count, image_size=s.image_size, overwrite=True
            ),
            ".jsonl",
        )  # data_paths has checked that the folder is empty or generated

    def read_split(self, path: str, split: str | None = None) -> list[CountRecord]:
        """Records of one split; bad records raise or are skipped (and logged) per data.on_error.
        Records without a question or answer get them from counting.*_templates."""
        return read_counting(
            path,
            max_count=self.counting.max_count,
            on_error=self.data.on_error,
            opts=options_from_config(self.data, self.counting, split=split),
        )

    def make_loader(
        self, records: list[CountRecord], backbone: Backbone, *, train: bool, seed: int = 0, cache: FeatureCache | None = None
    ) -> DataLoader:
        return make_loader(
            records,
            backbone,
            self.counting,
            batch_size=self.train_batch_size if train else self.eval_batch_size,
            train=train,
            seed=seed,
            num_workers=self.data.num_workers,
            cache=cache,
            cache_dtype=self.cache_dtype,
            cache_batch_size=self.eval_batch_size,
        )

    def validate(
        self, model: CountingModel, records: list[CountRecord], *, device: torch.device, cache: FeatureCache | None = None
    ) -> dict[str, Any]:
        """The cheap pass after each epoch: head metrics, answer perplexity, and answers
        sampled for the first ``generation.val_num_images`` images (a quick look)."""
        g = self.generation
        # Sampled answers draw from generators of their own, seeded by (run seed, record),
        # so validation neither perturbs the training stream (resume stays exact) nor
        # varies between identical runs or with the number of processes.
        return evaluate(
            model,
            records,
            self.loader_for(model, cache),
            device,
            counting=self.counting,
            max_new_tokens=g.max_new_tokens,
            n_generate=g.val_num_images,
            gen=dict(num_beams=1, do_sample=False, top_p=g.val_top_p, temperature=g.val_temperature),
            sample_seed=self.seed if g.val_do_sample else None,
        )

    def evaluate(
        self,
        model: CountingModel,
        records: list[CountRecord],
        *,
        device: torch.device,
        train_records: list[CountRecord] | None = None,
        progress: bool = False,
        cache: FeatureCache | None = None,
    ) -> dict[str, Any]:
        """The final evaluation: head metrics beside the majority class, perplexity, and a
        beam-search answer for every image (BLEU, ROUGE, count parsed from the answer)."""
        return self.final_evaluation(model, records, device, train_records, progress, cache=cache)

    def evaluate_with_rankings(
        self,
        model: CountingModel,
        records: list[CountRecord],
        *,
        device: torch.device,
        rankings_k: int,
        train_records: list[CountRecord] | None = None,
        progress: bool = False,
        cache: FeatureCache | None = None,
    ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
        """:meth:`evaluate` plus one row per record: {"counting": [...]} (``rankings_k`` is
        unused: a counting query has one answer, not a ranked list)."""
        rows: list[dict[str, Any]] = []
        metrics = self.final_evaluation(model, records, device, train_records, progress, record_rows=rows, cache=cache)
        return metrics, {"counting": rows}

    def final_evaluation(
        self,
        model: CountingModel,
        records: list[CountRecord],
        device: torch.device,
        train_records: list[CountRecord] | None,
        progress: bool,
        record_rows: list[dict[str, Any]] | None = None,
        cache: FeatureCache | None = None,
    ) -> dict[str, Any]:
        """The final evaluation's settings: an answer for every record, by beam search."""
        g = self.generation
        return evaluate(
            model,
            records,
            self.loader_for(model, cache),
            device,
            counting=self.counting,
            max_new_tokens=g.max_new_tokens,
            n_generate=len(records),
            gen=dict(num_beams=g.num_beams, do_sample=False),
            train_records=train_records,
            progress=progress,
            record_rows=record_rows,
        )

    def write_figures(self, metrics: dict[str, Any], folder: Path) -> list[str]:
        """reliability.png: the count head's reliability diagram (``count/reliability``)."""
        bins = metrics.get("count/reliability")
        if not bins:
            return []
        from io import BytesIO

        from vlmtune.metrics.counting import reliability_figure
        from vlmtune.runfolder import write_file

        buf = BytesIO()
        reliability_figure(bins, float(metrics["count/ece"]), "Count head: reliability on the test split").savefig(
            buf, format="png", dpi=110
        )
        write_file(Path(folder) / RELIABILITY_PNG, buf.getvalue())
        return [RELIABILITY_PNG]

    def loader_for(self, model: CountingModel, cache: FeatureCache | None) -> Callable[[list[CountRecord]], DataLoader]:
        """The evaluation loader of a shard of records (see :func:`evaluate`)."""
        return lambda shard: self.make_loader(shard, model.backbone, train=False, cache=cache)
