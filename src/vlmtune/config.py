"""Typed configuration: YAML files plus ``key.sub=value`` overrides.

Every field documents itself (``help`` metadata) and is checked when the config is
built: an unknown key, a value of the wrong type or an impossible combination is a
:class:`ConfigError` that names the key. The rest of the code receives these typed
objects (or plain values taken from them), never a raw dict.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vlmtune.errors import ConfigError

def setting(default: Any, help: str, *, low: float | None = None, high: float | None = None, **kw: Any) -> Any:
    """A config field: its default, its help text and (numbers) its inclusive bounds
    ``low`` / ``high``, kept in the field's metadata, the one home that validation,
    ``config explain`` and the CLI flags mirroring the key read. Mutable defaults go
    through a factory."""
    meta = {"help": help, "low": low, "high": high}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        import copy

        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


_f = setting

# The task packages' own sections (their config.py modules need no torch and take
# ``setting`` from above, so they are imported here, once it exists).
from vlmtune.tasks.base import BACKBONE_COMPONENTS  # noqa: E402
from vlmtune.tasks.counting.config import (DEFAULT_ANSWERS, DEFAULT_QUESTIONS, CountingConfig,  # noqa: E402,F401
                                           GenerationConfig)
from vlmtune.tasks.retrieval.config import ModelConfig  # noqa: E402


# --------------------------------------------------------------------------- sections


@dataclass
class BackboneConfig:
    name_or_path: str = _f("tiny", "Hub id (e.g. OpenGVLab/InternVL3-1B-hf), a local folder, or a random-weight preset: 'tiny' (the embedded default) or 'internvl3-1b-shapes' (the real model's sizes, for benchmarks).")
    trust_remote_code: bool = _f(False, "Allow code shipped with the model to run. Off unless you ask.")
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) to load.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f("auto", "Weights dtype of the frozen backbone; auto = bfloat16 on GPU, float32 on CPU.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = _f("auto", "Attention kernel; auto = sdpa. flash_attention_2 falls back to sdpa with a warning where it is not installed.")
    vision_pooling: Literal["cls", "mean"] = _f("mean", "Pool vision tokens by the CLS token or the mean of the patch tokens.")
    text_pooling: Literal["last", "mean"] = _f("mean", "Pool text tokens by the last non-pad token or the masked mean (never token 0 of a causal LM).")
    max_text_tokens: int = _f(48, "Captions are truncated to this many tokens.")
    gradient_checkpointing: bool = _f(False, "Recompute activations of the trained tower blocks in the backward pass (saves memory).")
    tiny_image_size: int = _f(64, "Tile size of the tiny preset.")
    tiny_hidden_size: int = _f(64, "Hidden size of the tiny preset's vision tower and language model.")
    tiny_layers: int = _f(2, "Layers of the tiny preset's vision tower and language model.")


@dataclass
class SyntheticConfig:
    n: int = _f(400, "Number of images to generate.")
    seed: int = _f(0, "Generator seed.")
    image_size: int = _f(96, "Side of the generated images in pixels.")


@dataclass
class DataConfig:
    train: str | None = _f(None, "Training annotation file. Empty: generate the synthetic set of the task.")
    val: str | None = _f(None, "Validation annotation file (early stopping, best checkpoint).")
    test: str | None = _f(None, "Test annotation file (final evaluation).")
    synthetic: SyntheticConfig = _f(SyntheticConfig(), "Settings of the generated data set when no files are given.")
    synthetic_dir: str | None = _f(None, "Where to write the generated data set; default: <output_dir>/data.")
    num_workers: int = _f(0, "DataLoader worker processes.")
    on_error: Literal["raise", "skip"] = _f("raise", "Bad records (missing or corrupt image, bad box, empty caption, ...): raise = stop with the list's count and first problem; skip = decode every image up front, leave bad records out and log which.")
    max_text_chars: int = _f(1000, "Longest caption, question or answer, in characters; longer ones are bad records.")
    image_root: str | None = _f(None, "Folder image paths resolve against (e.g. COCO's val2014/, Flickr30k's flickr30k-images/); default: the annotation file's folder. Images must stay inside it (.., absolute paths and symlinks out of it are refused).")
    format: Literal["auto", "pairs", "coco", "karpathy", "albef", "refcoco", "geotext", "grounding", "counting", "csv", "hf"] = _f("auto", "Annotation format; auto detects it from the file's shape and logs which. See README 'Your data'.")
    box_tolerance_px: float = _f(0.0, "Boxes that overrun the image by at most this many pixels are clipped to it (and counted in the log); beyond it they are bad records.")
    duplicates: Literal["error", "keep", "drop"] = _f("error", "Records repeating an earlier one (same image and text, and box): error, keep them, or drop them (counted in the log). RefCOCO repeats short expressions legitimately.")


@dataclass
class LossConfig:
    contrastive: float = _f(1.0, "Weight of the symmetric InfoNCE loss.")
    matching: float = _f(1.0, "Weight of the image-text matching loss (hard negatives).")
    box: float = _f(0.1, "Weight of the box loss (L1 + GIoU).")
    relation: float = _f(0.1, "Weight of the spatial relation loss: cross-entropy, plus the L1 distance of the relation head's subject position to the centre of the record's box where it has one.")
    box_l1: float = _f(1.0, "Weight of L1 inside the box loss.")
    box_giou: float = _f(1.0, "Weight of GIoU inside the box loss.")
    lm: float = _f(1.0, "Counting: weight of the token cross-entropy on the answer tokens (prompt masked).")
    count: float = _f(1.0, "Counting: weight of the count-classification cross-entropy.")


@dataclass
class StageConfig:
    name: str = _f("stage", "Name shown in logs.")
    start_epoch: int | None = _f(None, "First epoch (0-based) of this stage. Give this or 'start', not both; the first stage starts at 0 (its default).")
    start: float | None = _f(None, "First epoch of this stage as a fraction of train.epochs, in [0, 1): epoch = round(start * train.epochs) "
                             "(halves round up), and at least the previous stage's first epoch + 1, so a shorter run keeps every stage. "
                             "Give this or 'start_epoch', not both; a command-line override of one replaces the other.")
    train: dict[str, float] = _f({}, "Components that train in this stage, each with its LR multiplier.")
    vision_blocks: int = _f(0, "How many of the vision tower's LAST blocks the 'vision_blocks' component unfreezes.")
    losses: list[str] | None = _f(None, "Loss terms active in this stage (default: all with weight > 0).")


@dataclass
class OptimConfig:
    lr: float = _f(1e-3, "Base learning rate; each component's LR = lr * its stage multiplier.")
    weight_decay: float = _f(0.01, "AdamW weight decay (not applied to biases, norms or the temperature).")
    betas: list[float] = _f([0.9, 0.999], "AdamW betas.")
    warmup_ratio: float = _f(0.1, "Share of each stage's steps spent in linear warm-up.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this value; 0 turns clipping off.")


@dataclass
class EarlyStoppingConfig:
    metric: str = _f("retrieval/mean_recall", "Validation metric that picks the best checkpoint.")
    mode: Literal["max", "min"] = _f("max", "Whether larger or smaller is better.")
    patience: int = _f(0, "Stop after this many evaluations without improvement; 0 never stops early.")
    min_delta: float = _f(0.0, "Smallest change that counts as an improvement.")


@dataclass
class FsdpConfig:
    enabled: bool = _f(False, "Shard the model with FSDP2 (PyTorch fully_shard) over the processes of a distributed launch (torchrun or "
                       "accelerate launch): each process holds 1/N of every weight, gradient and optimizer state. Also on when an "
                       "Accelerate config file says distributed_type: FSDP (its fsdp_config then applies; these keys win when enabled).")
    reshard_after_forward: bool = _f(True, "Free a block's gathered weights after its forward and gather them again for its backward "
                                     "(least memory); false keeps them from forward to backward (one all-gather less per block).")
    cpu_offload: bool = _f(False, "Keep the sharded weights, gradients and optimizer state in CPU memory, moved to the GPU per block "
                           "(much less GPU memory, slower steps).")
    wrap: list[str] | None = _f(None, "Module class names that become their own FSDP unit; null = the backbone's transformer blocks "
                                "(transformers' _no_split_modules: InternVLVisionLayer, Qwen2DecoderLayer, ...).")


@dataclass
class TrainConfig:
    epochs: int = _f(8, "Total epochs over all stages.")
    batch_size: int = _f(32, "Batch size per process.")
    grad_accum: int = _f(1, "Gradient accumulation steps.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = _f("auto", "auto = bf16 on GPU, fp32 (no) on CPU.")
    early_stopping: EarlyStoppingConfig = _f(EarlyStoppingConfig(), "Early stopping on a validation metric.")
    log_every: int = _f(10, "Write a history line every N optimizer steps.")
    progress: bool = _f(True, "Show a progress bar.")
    keep_last: int = _f(1, "Checkpoints to keep: checkpoints/last is the newest, last-1, last-2, ... the ones before it (1 = last only).")
    max_bad_steps: int = _f(5, "A step whose loss is NaN or infinite is skipped (and counted); after this many in a row the run stops with a checkpoint.")
    num_threads: int | None = _f(None, "CPU threads PyTorch uses in this run (torch.set_num_threads at its start); null or 0 leaves PyTorch's default. "
                                 "On a shared or small CPU, 1 is often much faster than the default.")
    fsdp: FsdpConfig = _f(FsdpConfig(), "FSDP2 sharding of the model across processes (see README: Many GPUs).")
    init_from: str | None = _f(None, "Warm start: a checkpoint of another run whose trained weights this run starts from (fresh schedule and history; "
                               "set by 'vlmtune train --init-from CKPT'). Checked against the backbone and the model's shapes; --resume re-checks it.")


@dataclass
class EvalConfig:
    batch_size: int = _f(64, "Batch size for embedding and scoring.")
    ks: list[int] = _f([1, 5, 10], "K values of recall@K.")
    chunk_size: int = _f(4096, "Block size of the chunked similarity (bounds memory).")
    rerank_k: int = _f(0, "Re-rank the contrastive top-k with the matching head; 0 turns it off.")
    search: Literal["chunked", "faiss"] = _f("chunked", "Top-k search: chunked similarity with a running top-k, or an exact FAISS index (pip install faiss-cpu).")


@dataclass
class CacheConfig:
    enabled: bool = _f(True, "Cache a frozen tower's outputs (computed once, memory-mapped on disk) while a stage keeps it frozen.")
    dir: str | None = _f(None, "Cache folder; default <output_dir>/cache. A shared folder lets runs reuse each other's features.")
    dtype: Literal["float32", "float16"] = _f("float32", "Storage type of cached features (float16 halves the disk and memory).")


@dataclass
class Config:
    task: str = _f("retrieval", "The recipe: a registered task (vlmtune.tasks.TASKS): retrieval or counting.")
    seed: int = _f(0, "Seed of everything random in a run.")
    backbone: BackboneConfig = _f(BackboneConfig(), "The frozen vision-language model.")
    data: DataConfig = _f(DataConfig(), "Annotation files or the synthetic set.")
    model: ModelConfig = _f(ModelConfig(), "Adapters, projectors and heads.")
    loss: LossConfig = _f(LossConfig(), "Loss weights.")
    stages: list[StageConfig] = _f([StageConfig(name="all", start_epoch=0, train={"adapters": 1.0, "heads": 1.0})], "The stage plan.")
    optim: OptimConfig = _f(OptimConfig(), "Optimizer and schedule.")
    train: TrainConfig = _f(TrainConfig(), "Training loop.")
    eval: EvalConfig = _f(EvalConfig(), "Evaluation.")
    cache: CacheConfig = _f(CacheConfig(), "Frozen-feature cache.")
    counting: CountingConfig = _f(CountingConfig(), "Counting recipe: classes, tiling, prompt lengths, LoRA.")
    generation: GenerationConfig = _f(GenerationConfig(), "Answer generation (counting): validation sampling, final beam search.")

    def __post_init__(self) -> None:
        validate(self)


# --------------------------------------------------------------------------- checks

# Components a stage can train: the backbone's (BACKBONE_COMPONENTS), shared by every
# task, and the task's own (declared on its class, as are the loss terms a stage can switch on).


def validate(cfg: Config) -> None:
    """Reject impossible values and combinations, naming the key."""

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{key}: {msg}")

    need(cfg.optim.lr > 0, "optim.lr", f"must be > 0, got {cfg.optim.lr}")
    need(cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(0 <= cfg.optim.warmup_ratio < 1, "optim.warmup_ratio", "must be in [0, 1)")
    need(len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas), "optim.betas", "must be two numbers in [0, 1)")
    need(cfg.optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
    need(cfg.train.epochs >= 1, "train.epochs", "must be >= 1")
    need(cfg.train.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    need(cfg.train.log_every >= 1, "train.log_every", "must be >= 1")
    need(cfg.train.keep_last >= 1, "train.keep_last", "must be >= 1")
    need(cfg.train.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1")
    need(cfg.train.num_threads is None or cfg.train.num_threads >= 0, "train.num_threads",
         f"must be >= 1 (or 0 / null: PyTorch's default), got {cfg.train.num_threads}")
    need(cfg.train.init_from is None or cfg.train.init_from.strip() != "", "train.init_from",
         "must name a checkpoint folder (or be null)")
    need(cfg.train.early_stopping.patience >= 0, "train.early_stopping.patience", "must be >= 0")
    need(cfg.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
    need(cfg.eval.chunk_size >= 1, "eval.chunk_size", "must be >= 1")
    need(all(k >= 1 for k in cfg.eval.ks) and len(cfg.eval.ks) > 0, "eval.ks", "must be positive integers")
    need(cfg.eval.rerank_k >= 0, "eval.rerank_k", "must be >= 0")
    need(cfg.model.embed_dim >= 1, "model.embed_dim", "must be >= 1")
    need(0 <= cfg.model.adapter_dropout < 1, "model.adapter_dropout", "must be in [0, 1)")
    m = cfg.model
    need(0 < m.temperature_min <= m.temperature_init <= m.temperature_max, "model.temperature_init",
         f"must lie in [temperature_min, temperature_max] = [{m.temperature_min}, {m.temperature_max}]")
    for name in ("contrastive", "matching", "box", "relation", "box_l1", "box_giou", "lm", "count"):
        need(getattr(cfg.loss, name) >= 0, f"loss.{name}", "must be >= 0")
    need(cfg.backbone.max_text_tokens >= 2, "backbone.max_text_tokens", "must be >= 2")
    need(cfg.data.synthetic.n >= 10, "data.synthetic.n", "must be >= 10")
    need(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    need(cfg.data.max_text_chars >= 1, "data.max_text_chars", "must be >= 1")
    need(cfg.data.box_tolerance_px >= 0, "data.box_tolerance_px", f"must be >= 0, got {cfg.data.box_tolerance_px}")

    from vlmtune.tasks import TASKS, task_class

    need(cfg.task in TASKS, "task", f"unknown task {cfg.task!r}; choose from {', '.join(TASKS)}")
    task = task_class(cfg.task)
    # The tasks' own rules (counting's sections, retrieval's negatives). Every Config still
    # holds every task's sections, so every registered task's rules apply, as they did;
    # once a config holds only its task's sections (issue 18), only its task's will.
    for name in TASKS:
        task_class(name).check_config(cfg)
    _validate_sizes(cfg, need)

    components, losses = tuple(task.components) + BACKBONE_COMPONENTS, tuple(task.losses)
    # The backbone components the task's model reads; training another would count as
    # trainable and never change (retrieval never runs the projector into the LM).
    used = tuple(getattr(task, "backbone_components", BACKBONE_COMPONENTS))
    need(len(cfg.stages) >= 1, "stages", "needs at least one stage")
    stage_starts(cfg.stages, cfg.train.epochs)
    for i, st in enumerate(cfg.stages):
        key = f"stages[{i}]"
        need(len(st.train) > 0, f"{key}.train", "no component trains in this stage")
        for comp, mult in st.train.items():
            need(comp in components, f"{key}.train.{comp}", f"unknown component; choose from {', '.join(components)}")
            need(comp in used or comp not in BACKBONE_COMPONENTS, f"{key}.train.{comp}",
                 f"the {cfg.task} task never uses the backbone's {comp} (it would count as trainable and never change); "
                 f"choose from {', '.join(tuple(task.components) + used)}")
            need(mult > 0, f"{key}.train.{comp}", f"LR multiplier must be > 0, got {mult}")
        if "vision_blocks" in st.train:
            need(st.vision_blocks >= 1, f"{key}.vision_blocks", "must be >= 1 when the 'vision_blocks' component trains")
        else:
            need(st.vision_blocks == 0, f"{key}.vision_blocks", "is set but 'vision_blocks' is not in this stage's train list")
        for term in st.losses or []:
            need(term in losses, f"{key}.losses", f"unknown loss '{term}'; choose from {', '.join(losses)}")


# Sizes and counts: each must lie in [low, high]. The upper bounds keep a typo (an
# extra zero or two) from allocating the machine's memory before anything is checked.
_SIZES: tuple[tuple[str, int, int], ...] = (
    ("seed", 0, 2**32 - 1),
    ("backbone.max_text_tokens", 2, 65536),
    ("backbone.tiny_image_size", 16, 1024),
    ("backbone.tiny_hidden_size", 8, 4096),
    ("backbone.tiny_layers", 1, 64),
    ("data.synthetic.n", 10, 10**6),
    ("data.synthetic.seed", 0, 2**32 - 1),
    ("data.synthetic.image_size", 16, 4096),
    ("data.num_workers", 0, 1024),
    ("data.max_text_chars", 1, 10**6),
    ("model.embed_dim", 1, 65536),
    ("model.head_hidden", 1, 65536),
    ("train.epochs", 1, 100000),
    ("train.batch_size", 2, 10**6),
    ("train.grad_accum", 1, 10**6),
    ("train.log_every", 1, 10**9),
    ("train.keep_last", 1, 1000),
    ("train.max_bad_steps", 1, 10**9),
    ("train.early_stopping.patience", 0, 100000),
    ("eval.batch_size", 1, 10**6),
    ("eval.chunk_size", 1, 10**8),
    ("eval.rerank_k", 0, 10**6),
    ("counting.max_count", 1, 1000),
    ("counting.max_dynamic_patch", 1, 40),
    ("counting.question_max_tokens", 1, 65536),
    ("counting.answer_max_tokens", 1, 65536),
    ("counting.lora_r", 1, 65536),
    ("counting.lora_alpha", 1, 10**6),
    ("generation.max_new_tokens", 1, 65536),
    ("generation.num_beams", 1, 64),
    ("generation.val_num_images", 0, 10**6),
)


def _validate_sizes(cfg: Config, need: Any) -> None:
    for key, low, high in _SIZES:
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        need(low <= value <= high, key, f"must be between {low} and {high}, got {_short(value, 40)}")
    need(len(cfg.eval.ks) <= 100 and all(1 <= k <= 10**8 for k in cfg.eval.ks), "eval.ks",
         f"must be at most 100 integers between 1 and 100000000, got {_short(cfg.eval.ks, 60)}")
    for i, st in enumerate(cfg.stages):
        need(0 <= st.vision_blocks <= 1000, f"stages[{i}].vision_blocks", f"must be between 0 and 1000, got {st.vision_blocks}")
        need(st.start_epoch is None or 0 <= st.start_epoch, f"stages[{i}].start_epoch", f"must be >= 0, got {st.start_epoch}")
    bb = cfg.backbone
    need(bb.tiny_image_size % 16 == 0, "backbone.tiny_image_size", f"must be a multiple of 16, got {bb.tiny_image_size}")
    # The tiny preset has hidden/16 attention heads and half as many key-value heads: 16 or a multiple of 32.
    need(bb.tiny_hidden_size == 16 or bb.tiny_hidden_size % 32 == 0, "backbone.tiny_hidden_size",
         f"must be 16 or a multiple of 32, got {bb.tiny_hidden_size}")
    b = cfg.counting.buckets or []
    need(all(0 <= x <= 1000 for x in b), "counting.buckets", "bounds must be between 0 and 1000")
    need(len(cfg.counting.lora_target_modules) <= 100, "counting.lora_target_modules", "at most 100 names")


def stage_starts(stages: list[StageConfig], epochs: int) -> list[int]:
    """The first epoch of each stage: ``start_epoch`` as given, or ``start`` (a fraction
    of ``epochs``) as ``floor(start * epochs + 0.5)`` (halves round up), raised to the
    previous stage's first epoch + 1 where rounding would make the two meet. Every
    stage must begin before ``epochs``. A bad value is a :class:`ConfigError` naming it."""
    starts: list[int] = []
    for i, st in enumerate(stages):
        key = f"stages[{i}]"
        if st.start_epoch is not None and st.start is not None:
            raise ConfigError(f"{key}: give start_epoch ({st.start_epoch}) or start ({st.start}), not both")
        if i == 0:
            if st.start_epoch not in (None, 0):
                raise ConfigError(f"{key}.start_epoch: the first stage must start at epoch 0")
            if st.start not in (None, 0):
                raise ConfigError(f"{key}.start: the first stage must start at 0")
            starts.append(0)
            continue
        prev, prev_st = starts[-1], stages[i - 1]
        if st.start_epoch is None and st.start is None:
            raise ConfigError(f"{key}.start_epoch: missing; give start_epoch (an epoch, 0-based) or start "
                              f"(a fraction of train.epochs, e.g. 0.25)")
        if st.start_epoch is not None:
            if st.start_epoch <= prev:
                where = (f"stages[{i - 1}].start_epoch ({prev})" if prev_st.start is None
                         else f"stages[{i - 1}]'s first epoch ({prev}, from start={prev_st.start:g})")
                raise ConfigError(f"{key}.start_epoch: must be after {where}")
            if st.start_epoch >= epochs:
                raise ConfigError(f"{key}.start_epoch: {st.start_epoch} is not before train.epochs ({epochs}); "
                                  f"the stage would never run")
            starts.append(st.start_epoch)
            continue
        frac = float(st.start)  # type: ignore[arg-type]
        if not 0 < frac < 1:
            raise ConfigError(f"{key}.start: must be a fraction of train.epochs in (0, 1), got {frac:g}")
        if prev_st.start is not None and frac <= prev_st.start:
            raise ConfigError(f"{key}.start: must be above stages[{i - 1}].start ({prev_st.start:g}), got {frac:g}")
        epoch = max(math.floor(frac * epochs + 0.5), prev + 1)
        if epoch >= epochs:
            raise ConfigError(f"{key}.start: {frac:g} of train.epochs ({epochs}) gives epoch {epoch}, which is not before "
                              f"train.epochs; the stage would never run (raise train.epochs to at least {epoch + 1})")
        starts.append(epoch)
    return starts


# --------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_REPR = reprlib.Repr()  # keyword arguments only from Python 3.12
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 8, 8, 120, 120


def _short(value: Any, limit: int = 200) -> str:
    """``repr(value)`` for an error message, bounded: a YAML alias bomb is a small file
    whose full repr would not fit in memory, let alone on one line."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and build nested dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {_short(value)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {_short(value)} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_short(value)}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_short(value)}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {_short(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_short(value)}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 3e-4 (no dot) as a string; accept what Python reads as a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_short(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_short(value)}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")  # pragma: no cover


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = [n for n in names if n.startswith(str(k)[:3])]
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise ConfigError(f"{key}: unknown key{hint}")
        kwargs[k] = _coerce(v, hints[k], key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - all fields have defaults
        raise ConfigError(f"{prefix or 'config'}: {e}") from None


def config_from_dict(data: dict[str, Any]) -> Config:
    if not isinstance(data, dict):
        raise ConfigError("config: the top level must be a mapping")
    return _build(Config, data)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``a.b.c=value`` (value parsed as YAML) to a nested dict in place."""
    if "=" not in override:
        raise ConfigError(f"{override}: overrides look like key.sub=value")
    key, raw = override.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    except (ValueError, RecursionError) as e:  # a number of thousands of digits, deep nesting
        raise ConfigError(f"{_short(key)}: cannot read the value ({_short(str(e) or type(e).__name__, 120)})") from None
    node: Any = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        sub = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = _list_item(node, part, sub)
            continue
        if part not in node or node[part] is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"{sub}: is a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        idx = int(last) if last.isdigit() else None
        if idx is None or idx >= len(node):
            raise ConfigError(f"{key}: no such list item")
        node[idx] = value
    else:
        node[last] = value


def with_overrides(cfg: Config, overrides: list[str] | None, sections: tuple[str, ...], what: str) -> Config:
    """``cfg`` (a checkpoint's training config) with ``key=value`` overrides applied to
    the keys under ``sections`` only (evaluate / predict: ``data.*``, ``eval.*``, ...);
    any other key is a :class:`ConfigError` naming it, since the model's shape and
    training come from the checkpoint. ``what`` names the command in the message."""
    if not overrides:
        return cfg
    data = config_to_dict(cfg)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"{ov}: overrides look like key.sub=value")
        key = ov.split("=", 1)[0].strip()
        if key.split(".", 1)[0] not in sections or "." not in key:
            raise ConfigError(f"{key}: cannot be set for {what}; only {', '.join(s + '.*' for s in sections)} keys can "
                              f"(the rest comes from the checkpoint's training config)")
        apply_override(data, ov)
    return config_from_dict(data)


def _list_item(node: list, part: str, key: str) -> Any:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{key}: no such list item (the list has {len(node)})")
    return node[int(part)]


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping: plain YAML loading
    keeps the last one silently, so a second ``optim:`` section would drop the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' merges a mapping; not a key
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in first:
                    raise ConfigError(f"line {line}: key {_short(key)} appears twice in one mapping "
                                      f"(first on line {first[key]})")
                first[key] = line
            except TypeError:  # unhashable: the base class reports it
                pass
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults) and apply dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if "\x00" in str(path):
            raise ConfigError(f"{_short(str(path))}: the file name contains a NUL character")
        try:
            found = p.is_file()
        except (OSError, ValueError) as e:  # a NUL in the name, a name too long, a link loop
            raise ConfigError(f"{_short(str(p))}: cannot open ({getattr(e, 'strerror', None) or e})") from None
        if not found and p.is_symlink():
            raise ConfigError(f"{_short(str(p))}: a symbolic link to nothing or a link loop, not a config file")
        if not found:
            raise ConfigError(f"{_short(str(p))}: config file not found")
        try:
            loaded = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        except RecursionError:
            raise ConfigError(f"{p}: nested too deeply to be a config") from None
        except ValueError as e:  # e.g. an integer of more digits than Python converts
            raise ConfigError(f"{p}: {_short(str(e).splitlines()[0] if str(e) else type(e).__name__)}") from None
        except OSError as e:
            raise ConfigError(f"{p}: cannot read ({e.strerror or e})") from None
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
        data = loaded
    # Unknown keys are caught first, on the file as written, so the message names them.
    config_from_dict(data)
    merged = _merge(config_to_dict(Config()), data)
    for ov in overrides or []:
        _clear_other_start(merged, ov)
        apply_override(merged, ov)
    return config_from_dict(merged)


_START_KEY = re.compile(r"^\s*stages\.(\d+)\.(start_epoch|start)\s*=(.*)$", re.S)


def _clear_other_start(data: dict[str, Any], override: str) -> None:
    """``stages.N.start_epoch=E`` on the command line replaces the stage's ``start``
    fraction from the file, and ``stages.N.start=F`` its ``start_epoch``: a stage has
    exactly one of the two, and an override says which the user means now."""
    m = _START_KEY.match(override)
    stages = data.get("stages")
    if not m or not isinstance(stages, list) or int(m.group(1)) >= len(stages) or not m.group(3).strip():
        return
    try:
        if yaml.safe_load(m.group(3)) is None:
            return
    except yaml.YAMLError:
        return
    stage = stages[int(m.group(1))]
    if isinstance(stage, dict):
        stage["start" if m.group(2) == "start_epoch" else "start_epoch"] = None


def _merge(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; anything else (lists included) is replaced."""
    out = dict(base)
    for k, v in new.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def config_yaml(cfg: Config) -> str:
    """The whole config as YAML, every key written out, in declaration order."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    from vlmtune.runfolder import write_text

    write_text(Path(path), config_yaml(cfg))  # a symbolic link at ``path`` is refused, not written through


# --------------------------------------------------------------------------- help


@dataclass(frozen=True)
class FieldDoc:
    """One config key as ``vlmtune config explain`` shows it."""

    key: str  # dotted; an item of a list of sections is [N]: stages[N].name
    type: str  # as the value is written: int, str | null, {max,min}, list[int]; "section" for a nested section
    default: Any  # plain data (what config_to_dict gives); None for a section
    help: str


def _type_text(tp: Any) -> str:
    """An annotation as the user writes the value: ``str | null``, ``{max,min}``, ``list[int]``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_text(a) for a in args)
    if origin is Literal:
        return "{" + ",".join(map(str, args)) + "}"
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_text(a) for a in args)}]"
    return "null" if tp is type(None) else _type_name(tp)


def _field_docs(cls: type, instance: Any, prefix: str) -> list[FieldDoc]:
    """Docs of ``cls``'s fields, nested sections and list items included, defaults
    taken from ``instance`` (so a parent's default for a section wins)."""
    hints = typing.get_type_hints(cls)
    docs: list[FieldDoc] = []
    for f in dataclasses.fields(cls):
        key, tp, value, help = prefix + f.name, hints[f.name], getattr(instance, f.name), f.metadata.get("help", "")
        if dataclasses.is_dataclass(tp):
            docs.append(FieldDoc(key, "section", None, help))
            docs += _field_docs(tp, value, key + ".")
            continue
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        plain = [dataclasses.asdict(v) for v in value] if dataclasses.is_dataclass(item) else value
        docs.append(FieldDoc(key, _type_text(tp), plain, help))
        if dataclasses.is_dataclass(item):
            docs += _field_docs(item, item(), key + "[N].")
    return docs


def explain(section: str | None = None) -> list[FieldDoc]:
    """Every config key under ``section``, in declaration order; all keys when None.

    ``section`` is dotted: ``optim``, ``train.early_stopping``, ``stages`` (or
    ``stages.1`` / ``stages[1]``, shown as ``stages[N]``), or one key such as ``optim.lr``.
    """
    docs = _field_docs(Config, Config(), "")
    if not section:
        return docs
    want = re.sub(r"\.(\d+)(?=\.|$)|\[(\d+|N)\]", "[N]", section.strip())
    picked = [d for d in docs if d.key == want or d.key.startswith((want + ".", want + "["))]
    if picked:
        return picked
    close = [d.key for d in docs if d.key.rsplit(".", 1)[-1] == want.rsplit(".", 1)[-1]]
    hint = f"did you mean {', '.join(close)}?" if close else f"sections: {', '.join(f.name for f in dataclasses.fields(Config))}"
    raise ConfigError(f"{section}: no such config section or key ({hint})")


def _yaml_text(value: Any) -> str:
    """A value on one line as YAML (and an override) writes it: null, true, [1, 5, 10]."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip().removesuffix("\n...")


def format_explain(docs: list[FieldDoc], width: int = 88) -> str:
    """``key: type = default`` per key with its help wrapped and indented below it; a
    blank line where a section starts or ends."""
    def parent(key: str) -> str:
        return key.rsplit(".", 1)[0] if "." in key else ""

    lines: list[str] = []
    prev: FieldDoc | None = None
    for d in docs:
        # No blank line between a section (or a list of sections) and its first key.
        first_key = prev is not None and parent(d.key) in (prev.key, prev.key + "[N]")
        if prev is not None and not first_key and (d.type == "section" or parent(d.key) != parent(prev.key)):
            lines.append("")
        lines.append(f"{d.key}: section" if d.type == "section" else f"{d.key}: {d.type} = {_yaml_text(d.default)}")
        lines += textwrap.wrap(d.help, width, initial_indent="    ", subsequent_indent="    ")
        prev = d
    return "\n".join(lines)
