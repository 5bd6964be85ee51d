"""The engine's config sections: what every task's run reads.

Each field is a :func:`~vlmtune.config.fields.setting`: its default, help text and
bounds in one place. The sections a task owns (retrieval's ``model``, counting's
``counting`` and ``generation``) live in the task's package and join these in
:mod:`vlmtune.config.compose`; the ``loss`` mapping is checked against the run's
task's registered losses there too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from vlmtune.config.fields import setting

# Components a stage can train that every task shares (the backbone's); a task adds its own.
BACKBONE_COMPONENTS = ("vision_blocks", "vision_tower", "mm_projector", "language_model")


@dataclass
class BackboneConfig:
    name_or_path: str = setting(
        "tiny",
        "Hub id (e.g. OpenGVLab/InternVL3-1B-hf), a local folder, or a random-weight preset: 'tiny' (the embedded default) or 'internvl3-1b-shapes' (the real model's sizes, for benchmarks).",
    )
    trust_remote_code: bool = setting(False, "Allow code shipped with the model to run. Off unless you ask.")
    revision: str | None = setting(None, "Hub revision (branch, tag or commit) to load.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting(
        "auto", "Weights dtype of the frozen backbone; auto = bfloat16 on GPU, float32 on CPU."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = setting(
        "auto", "Attention kernel; auto = sdpa. flash_attention_2 falls back to sdpa with a warning where it is not installed."
    )
    vision_pooling: Literal["cls", "mean"] = setting(
        "mean", "Pool vision tokens by the CLS token or the mean of the patch tokens."
    )
    text_pooling: Literal["last", "mean"] = setting(
        "mean", "Pool text tokens by the last non-pad token or the masked mean (never token 0 of a causal LM)."
    )
    max_text_tokens: int = setting(48, "Captions are truncated to this many tokens.", low=2, high=65536)
    gradient_checkpointing: bool = setting(
        False, "Recompute activations of the trained tower blocks in the backward pass (saves memory)."
    )
    tiny_image_size: int = setting(64, "Tile size of the tiny preset.", low=16, high=1024)
    tiny_hidden_size: int = setting(64, "Hidden size of the tiny preset's vision tower and language model.", low=8, high=4096)
    tiny_layers: int = setting(2, "Layers of the tiny preset's vision tower and language model.", low=1, high=64)


@dataclass
class SyntheticConfig:
    n: int = setting(400, "Number of images to generate.", low=10, high=10**6)
    seed: int = setting(0, "Generator seed.", low=0, high=2**32 - 1)
    image_size: int = setting(96, "Side of the generated images in pixels.", low=48, high=4096)


@dataclass
class DataConfig:
    train: str | None = setting(None, "Training annotation file. Empty: generate the synthetic set of the task.")
    val: str | None = setting(None, "Validation annotation file (early stopping, best checkpoint).")
    test: str | None = setting(None, "Test annotation file (final evaluation).")
    synthetic: SyntheticConfig = setting(SyntheticConfig(), "Settings of the generated data set when no files are given.")
    synthetic_dir: str | None = setting(None, "Where to write the generated data set; default: <output_dir>/data.")
    num_workers: int | None = setting(
        None,
        "DataLoader worker processes; null: chosen by device (several where CUDA is, up to 8; none on a CPU, where "
        "workers compete with the model's threads).",
        low=0,
        high=1024,
    )
    on_error: Literal["raise", "skip"] = setting(
        "raise",
        "Bad records (missing or corrupt image, bad box, empty caption, ...): raise = stop with the list's count and first problem; skip = decode every image up front, leave bad records out and log which.",
    )
    max_text_chars: int = setting(
        1000, "Longest caption, question or answer, in characters; longer ones are bad records.", low=1, high=10**6
    )
    image_root: str | None = setting(
        None,
        "Folder image paths resolve against (e.g. COCO's val2014/, Flickr30k's flickr30k-images/); default: the annotation file's folder. Images must stay inside it (.., absolute paths and symlinks out of it are refused).",
    )
    format: str = setting(
        "auto", "Annotation format; auto detects it from the file's shape and logs which. See docs/data.md, 'Your data'."
    )
    box_tolerance_px: float = setting(
        0.0,
        "Boxes that overrun the image by at most this many pixels are clipped to it (and counted in the log); beyond it they are bad records. Overruns under a pixel (float rounding of normalised boxes) are always clipped and counted.",
        low=0,
    )
    duplicates: Literal["error", "keep", "drop"] = setting(
        "error",
        "Records repeating an earlier one (same image and text, and box): error, keep them, or drop them (counted in the log). RefCOCO repeats short expressions legitimately.",
    )


@dataclass
class StageConfig:
    name: str = setting("stage", "Name shown in logs.")
    start_epoch: int | None = setting(
        None,
        "Epochs trained before this stage starts (start_epoch 6: the stage's first epoch is epoch 7, as the logs count "
        "from 1). Give this or 'start', not both; the first stage starts at 0 (its default).",
        low=0,
    )
    start: float | None = setting(
        None,
        "Where this stage starts as a fraction of train.epochs, in [0, 1): start_epoch = round(start * train.epochs) "
        "(halves round up), and at least the previous stage's start_epoch + 1, so a shorter run keeps every stage. "
        "Give this or 'start_epoch', not both; a command-line override of one replaces the other.",
    )
    train: dict[str, float] = setting({}, "Components that train in this stage, each with its LR multiplier.")
    vision_blocks: int = setting(
        0, "How many of the vision tower's LAST blocks the 'vision_blocks' component unfreezes.", low=0, high=1000
    )
    losses: list[str] | None = setting(None, "Loss terms active in this stage (default: all with weight > 0).")


@dataclass
class OptimConfig:
    lr: float = setting(1e-3, "Base learning rate; each component's LR = lr * its stage multiplier.", low=0, low_open=True)
    weight_decay: float = setting(0.01, "AdamW weight decay (not applied to biases, norms or the temperature).", low=0)
    betas: list[float] = setting([0.9, 0.999], "AdamW betas.", low=0, high=1, high_open=True)
    warmup_ratio: float = setting(0.1, "Share of each stage's steps spent in linear warm-up.", low=0, high=1, high_open=True)
    grad_clip: float = setting(1.0, "Clip the global gradient norm to this value; 0 turns clipping off.", low=0)


@dataclass
class EarlyStoppingConfig:
    metric: str | None = setting(
        None,
        "Validation metric that picks the best checkpoint; null: the task's default (retrieval/mean_recall, count/accuracy, ...: see its default_metric), written out in the run's config.yaml.",
    )
    mode: Literal["max", "min"] = setting("max", "Whether larger or smaller is better.")
    patience: int = setting(0, "Stop after this many evaluations without improvement; 0 never stops early.", low=0, high=100000)
    min_delta: float = setting(0.0, "Smallest change that counts as an improvement.")


@dataclass
class FsdpConfig:
    enabled: bool = setting(
        False,
        "Shard the model with FSDP2 (PyTorch fully_shard) over the processes of a distributed launch (torchrun or "
        "accelerate launch): each process holds 1/N of every weight, gradient and optimizer state. Also on when an "
        "Accelerate config file says distributed_type: FSDP (its fsdp_config then applies; these keys win when enabled).",
    )
    reshard_after_forward: bool = setting(
        True,
        "Free a block's gathered weights after its forward and gather them again for its backward "
        "(least memory); false keeps them from forward to backward (one all-gather less per block).",
    )
    cpu_offload: bool = setting(
        False,
        "Keep the sharded weights, gradients and optimizer state in CPU memory, moved to the GPU per block "
        "(much less GPU memory, slower steps).",
    )
    wrap: list[str] | None = setting(
        None,
        "Module class names that become their own FSDP unit; null = the backbone's transformer blocks "
        "(transformers' _no_split_modules: InternVLVisionLayer, Qwen2DecoderLayer, ...).",
    )


@dataclass
class TrainConfig:
    epochs: int = setting(8, "Total epochs over all stages.", low=1, high=100000)
    batch_size: int = setting(32, "Batch size per process.", low=1, high=10**6)
    grad_accum: int = setting(1, "Gradient accumulation steps.", low=1, high=10**6)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = setting("auto", "auto = bf16 on GPU, fp32 (no) on CPU.")
    early_stopping: EarlyStoppingConfig = setting(EarlyStoppingConfig(), "Early stopping on a validation metric.")
    log_every: int = setting(10, "Write a history line every N optimizer steps.", low=1, high=10**9)
    progress: bool = setting(True, "Show a progress bar.")
    keep_last: int = setting(
        1,
        "Checkpoints to keep: checkpoints/last is the newest, last-1, last-2, ... the ones before it (1 = last only).",
        low=1,
        high=1000,
    )
    max_bad_steps: int = setting(
        5,
        "A step whose loss is NaN or infinite is skipped (and counted); after this many in a row the run stops with a checkpoint.",
        low=1,
        high=10**9,
    )
    num_threads: int | None = setting(
        None,
        "CPU threads PyTorch uses in this run (torch.set_num_threads at its start); null or 0: the cores this process "
        "may use (affinity, divided among the processes of a launch), or 1 when the load average already exceeds them "
        "(said in one line at the start).",
    )
    fsdp: FsdpConfig = setting(FsdpConfig(), "FSDP2 sharding of the model across processes (see docs/gpus.md).")
    init_from: str | None = setting(
        None,
        "Warm start: a checkpoint of another run whose trained weights this run starts from (fresh schedule and history; "
        "set by 'vlmtune train --init-from CKPT'). Checked against the backbone and the model's shapes; --resume re-checks it.",
    )


@dataclass
class EvalConfig:
    batch_size: int = setting(64, "Batch size for embedding and scoring.", low=1, high=10**6)
    ks: list[int] = setting([1, 5, 10], "K values of recall@K.", low=1, high=10**8)
    chunk_size: int | None = setting(
        None,
        "Block size of the chunked similarity (bounds memory); null: chosen from the gallery sizes (metrics.retrieval.auto_chunk_size).",
        low=1,
        high=10**8,
    )
    rerank_k: int = setting(0, "Re-rank the contrastive top-k with the matching head; 0 turns it off.", low=0, high=10**6)
    search: Literal["chunked", "faiss"] = setting(
        "chunked", "Top-k search: chunked similarity with a running top-k, or an exact FAISS index (pip install faiss-cpu)."
    )


@dataclass
class CacheConfig:
    enabled: bool = setting(
        True, "Cache a frozen tower's outputs (computed once, memory-mapped on disk) while a stage keeps it frozen."
    )
    dir: str | None = setting(
        None, "Cache folder; default <output_dir>/cache. A shared folder lets runs reuse each other's features."
    )
    dtype: Literal["auto", "float32", "float16"] = setting(
        "auto",
        "Storage type of cached features (float16 halves the disk and memory); auto = float16 where CUDA is, "
        "float32 on CPU. (NumPy, which stores them, has no bfloat16.)",
    )


@dataclass
class Config:
    """The sections every run has. :func:`vlmtune.config.compose.config_class` adds each registered
    task's own sections to these and checks the whole on construction: build configs with
    :func:`~vlmtune.config.load_config` or :func:`~vlmtune.config.config_from_dict`, not
    by calling this class (which checks nothing)."""

    task: str = setting("retrieval", "The recipe: a registered task (vlmtune.tasks.TASKS): retrieval or counting.")
    seed: int = setting(0, "Seed of everything random in a run.", low=0, high=2**32 - 1)
    backbone: BackboneConfig = setting(BackboneConfig(), "The frozen vision-language model.")
    data: DataConfig = setting(DataConfig(), "Annotation files or the synthetic set.")
    loss: dict[str, float] = setting(
        {},
        "Loss weights by name, the run's task's registered losses (see 'vlmtune config explain "
        "loss'); a loss left out keeps its default weight, and the resolved mapping is written "
        "out in the run's config.yaml.",
        low=0,
    )
    stages: list[StageConfig] = setting(
        [StageConfig(name="all", start_epoch=0, train={"adapters": 1.0, "heads": 1.0})], "The stage plan."
    )
    optim: OptimConfig = setting(OptimConfig(), "Optimizer and schedule.")
    train: TrainConfig = setting(TrainConfig(), "Training loop.")
    eval: EvalConfig = setting(EvalConfig(), "Evaluation.")
    cache: CacheConfig = setting(CacheConfig(), "Frozen-feature cache.")

    def section(self, name: str) -> Any:
        """A task's own config section by name (``cfg.section("counting")``): the task
        sections are added when the config class is composed, so a type checker cannot
        see them as attributes."""
        return getattr(self, name)
