"""Tasks: what differs between recipes, behind one small interface the engine uses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn
from torch.utils.data import DataLoader


@dataclass(frozen=True)
class TaskSpec:
    """The functions a task provides to the training loop and the commands.

    build_model(backbone, cfg) -> nn.Module with ``forward(batch, active_losses)``
        returning named unweighted loss terms, ``component_modules(name, n)``,
        ``head_state_dict()`` and ``backbone``.
    resolve_data_paths(cfg, output_dir) -> {"train", "val", "test"} annotation files.
    read_split(path, cfg) -> records.
    make_loader(records, backbone, cfg, train, seed) -> DataLoader.
    evaluate(model, records, cfg, device, train_records, progress) -> flat metrics.
    loss_weights(cfg) -> {term: weight}.
    cacheable: make_loader and validate take ``cache_dir``, ``cache_vision`` and
        ``cache_text`` keywords, and read frozen features from the cache there.
    validate(...) -> flat metrics: the per-epoch validation pass, same arguments as
        ``evaluate``; tasks whose final evaluation is costly (beam search) give a
        cheaper one here. Default: ``evaluate``.
    """

    name: str
    build_model: Callable[..., nn.Module]
    resolve_data_paths: Callable[..., dict[str, str]]
    read_split: Callable[..., list[Any]]
    make_loader: Callable[..., DataLoader]
    evaluate: Callable[..., dict[str, Any]]
    loss_weights: Callable[..., dict[str, float]]
    validate: Callable[..., dict[str, Any]] | None = None
    # Tasks whose make_loader/validate accept cache_dir, cache_vision, cache_text.
    cacheable: bool = False

    def validation(self) -> Callable[..., dict[str, Any]]:
        return self.validate or self.evaluate


def data_paths(cfg: Any, output_dir: Path, generate: Callable[[Path], Any], ext: str) -> dict[str, str]:
    """The train/val/test annotation files a config names, or the task's synthetic set:
    generated once by ``generate(folder)`` into data.synthetic_dir (default
    OUTPUT_DIR/data) and reused while its test file exists."""
    from vlmtune.errors import DataError

    d = cfg.data
    if d.train:
        missing = [k for k in ("val", "test") if not getattr(d, k)]
        if missing:
            raise DataError(f"data.{missing[0]}: needed when data.train is given")
        return {"train": d.train, "val": d.val, "test": d.test}
    folder = Path(d.synthetic_dir) if d.synthetic_dir else Path(output_dir) / "data"
    if not (folder / f"test{ext}").is_file():
        generate(folder)
    return {split: str((folder / f"{split}{ext}").resolve()) for split in ("train", "val", "test")}


def get_task(name: str) -> TaskSpec:
    if name == "retrieval":
        from vlmtune.tasks import retrieval as m
    elif name == "counting":
        from vlmtune.tasks import counting as m
    else:  # pragma: no cover - the config rejects unknown tasks first
        raise KeyError(name)
    return TaskSpec(name, m.build_model, m.resolve_data_paths, m.read_split, m.make_loader, m.evaluate, m.loss_weights,
                    getattr(m, "validate", None), getattr(m, "CACHEABLE", False))


__all__ = ["TaskSpec", "get_task"]
