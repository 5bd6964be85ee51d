"""The counting task's config sections, ``counting:`` and ``generation:`` (no torch:
config loading reads them), and the synthetic receipts set's questions and answers,
the templates' defaults.

Bounds live in each field (``setting(..., low=, high=)``), the one home that
validation, ``config explain`` and the CLI flags mirroring a key read; the rules
between fields are :meth:`CountingTask.check_config`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vlmtune.config.fields import setting
from vlmtune.errors import ConfigError

DEFAULT_QUESTIONS: tuple[str, ...] = (
    "How many receipts are in this image?",
    "How many receipts do you see?",
    "Count the receipts in the picture.",
    "How many receipts are there?",
    "What is the number of receipts in this photo?",
    "How many receipts can you count in the image?",
)
DEFAULT_ANSWERS: dict[str, tuple[str, ...]] = {
    "zero": ("There are no receipts.", "I see no receipts.", "I can see no receipts."),
    "one": ("There is 1 receipt.", "I see 1 receipt.", "I can see 1 receipt."),
    "many": ("There are {n} receipts.", "I see {n} receipts.", "I can see {n} receipts."),
}


@dataclass
class CountingConfig:
    """Counting recipe: classes, tiling, prompt lengths, LoRA."""

    max_count: int = setting(
        3, "Largest count in the data; the head has max_count + 1 classes unless buckets are given.", low=1, high=1000
    )
    buckets: list[int] | None = setting(
        None,
        "Ascending lower bounds of count classes, first 0, e.g. [0, 1, 2] = 0 / 1 / 2+; none: one class per count.",
        low=0,
        high=1000,
    )
    max_dynamic_patch: int = setting(
        4,
        "Most tiles an image is cut into (InternVL dynamic tiling, plus a thumbnail when > 1 tile); 1 = one square tile.",
        low=1,
        high=40,
    )
    question_max_tokens: int = setting(32, "Questions are truncated to this many tokens.", low=1, high=65536)
    answer_max_tokens: int = setting(24, "Answers (training targets) are truncated to this many tokens.", low=1, high=65536)
    pooling: Literal["image", "prompt_last"] = setting(
        "image",
        "Features of the count head: mean of the LM's states over the image tokens, or the state of the last prompt token.",
    )
    lm_mode: Literal["lora", "full"] = setting(
        "full",
        "How the 'language_model' component trains: LoRA adapters through peft, or all its weights (fine for the tiny preset).",
    )
    question_templates: list[str] = setting(
        list(DEFAULT_QUESTIONS), "Questions given to counting records that have none (one picked per image)."
    )
    answer_templates: dict[str, list[str]] = setting(
        {k: list(v) for k, v in DEFAULT_ANSWERS.items()},
        "Answers given to counting records that have none, by count: zero, one, many ({n} is the count).",
    )
    lora_r: int = setting(16, "LoRA rank.", low=1, high=65536)
    lora_alpha: int = setting(32, "LoRA alpha (scale = alpha / r).", low=1, high=10**6)
    lora_dropout: float = setting(0.05, "Dropout on the LoRA input.", low=0, high=1, high_open=True)
    lora_target_modules: list[str] = setting(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Linear layers of the language model that get LoRA adapters.",
    )


@dataclass
class GenerationConfig:
    """Answer generation (counting): validation sampling, final beam search."""

    max_new_tokens: int = setting(16, "Longest generated answer, in tokens.", low=1, high=65536)
    num_beams: int = setting(3, "Beams of the final evaluation's beam search.", low=1, high=64)
    val_num_images: int = setting(
        8, "Validation: images answered by sampling each epoch (a quick look; 0 turns it off).", low=0, high=10**6
    )
    val_do_sample: bool = setting(True, "Validation: sample (true) or decode greedily (false).")
    val_top_p: float = setting(0.9, "Validation: nucleus sampling threshold.", low=0, high=1, low_open=True)
    val_temperature: float = setting(0.7, "Validation: sampling temperature.", low=0, low_open=True)


def need(cond: bool, key: str, msg: str) -> None:
    """A broken rule is a ConfigError naming the key."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def check_counting(c: CountingConfig) -> None:
    """The counting section's rules: classes, tiling, prompt lengths, templates, LoRA."""
    if c.buckets is not None:
        b = c.buckets
        need(len(b) >= 2, "counting.buckets", f"needs at least two classes, got {b}")
        need(b[0] == 0, "counting.buckets", f"must start at 0, got {b}")
        need(all(x < y for x, y in zip(b, b[1:])), "counting.buckets", f"must be strictly ascending, got {b}")
        need(b[-1] <= c.max_count, "counting.buckets", f"last bound {b[-1]} is above counting.max_count ({c.max_count})")
    need(
        len(c.question_templates) > 0 and all(q.strip() for q in c.question_templates),
        "counting.question_templates",
        "needs at least one non-empty question",
    )
    need(
        set(c.answer_templates) == {"zero", "one", "many"},
        "counting.answer_templates",
        f"needs exactly the keys zero, one, many, got {', '.join(sorted(c.answer_templates)) or 'none'}",
    )
    for key, options in c.answer_templates.items():
        need(len(options) > 0, f"counting.answer_templates.{key}", "needs at least one answer")
        for a in options:
            try:
                a.format(n=2)
            except (KeyError, IndexError, ValueError) as e:
                need(False, f"counting.answer_templates.{key}", f"{a!r} is not a template with only {{n}}: {e}")
    need(0 < len(c.lora_target_modules) <= 100, "counting.lora_target_modules", "needs 1 to 100 module names")
