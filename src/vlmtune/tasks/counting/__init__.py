"""Counting with answer generation: one package, one module per concern.

- :mod:`.config`: its config sections, ``counting:`` and ``generation:`` (no torch);
- :mod:`.model`: ``CountingModel`` (the backbone's LM, optionally with LoRA, and a
  count head), its encodings of a batch, and answer generation;
- :mod:`.losses`: the functions of its registered losses (lm, count);
- :mod:`.data`: prompts, the loader and the vision cache;
- :mod:`.evaluation`: metrics, baselines, answers and per-record rows;
- :mod:`.spec`: its declarations (components, sections, losses, metrics; no torch);
- :mod:`.task`: ``CountingTask``, what the engine sees.

The names below are importable from the package itself (``from vlmtune.tasks.counting
import CountingTask``); each module is imported when one of its names is first asked
for, so reading the config sections does not import torch.
"""

from __future__ import annotations

from vlmtune.utils import lazy_exports

EXPORTS: dict[str, str] = {
    "DEFAULT_ANSWERS": "config",
    "DEFAULT_QUESTIONS": "config",
    "CountingConfig": "config",
    "GenerationConfig": "config",
    "check_counting": "config",
    "CountingEncodings": "model",
    "CountingModel": "model",
    "IMAGE_KEYS": "model",
    "answer_token_ce": "model",
    "answer_token_loss": "model",
    "class_names": "model",
    "decode": "model",
    "generate_answers": "model",
    "image_inputs": "model",
    "num_classes": "model",
    "prompt_last": "model",
    "stop_token_ids": "model",
    "tiles_of": "model",
    "LOSSES": "spec",
    "CountingSpec": "spec",
    "build_vision_cache": "data",
    "make_loader": "data",
    "prompt_builder": "data",
    "vision_namespace": "data",
    "RecordSampler": "evaluation",
    "answer_metrics": "evaluation",
    "answer_token_nll": "evaluation",
    "evaluate": "evaluation",
    "merged_metrics": "evaluation",
    "per_record_rows": "evaluation",
    "CountingTask": "task",
}

__all__ = sorted(EXPORTS)


__getattr__ = lazy_exports(__name__, EXPORTS)
