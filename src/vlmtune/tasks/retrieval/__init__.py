"""Cross-modal retrieval with grounding: one package, one module per concern.

- :mod:`.config`: its config section, ``model:`` (``ModelConfig``; no torch);
- :mod:`.model`: ``RetrievalModel`` (adapters, projectors, heads) and its encodings of a batch;
- :mod:`.losses`: the functions of its registered losses (contrastive, matching, box, relation);
- :mod:`.data`: the loader and the frozen-feature caches;
- :mod:`.evaluation`: metrics, baselines and per-query rankings;
- :mod:`.spec`: its declarations (components, sections, losses, metrics; no torch);
- :mod:`.task`: ``RetrievalTask``, what the engine sees.

The names below are importable from the package itself (``from vlmtune.tasks.retrieval
import RetrievalTask``); each module is imported when one of its names is first asked
for, so reading the config section does not import torch.
"""

from __future__ import annotations

from vlmtune.utils import lazy_exports

EXPORTS: dict[str, str] = {
    "ModelConfig": "config",
    "RetrievalEncodings": "model",
    "RetrievalModel": "model",
    "pool_tokens": "model",
    "LOSSES": "spec",
    "RetrievalSpec": "spec",
    "build_text_cache": "data",
    "build_vision_cache": "data",
    "make_loader": "data",
    "vision_namespace": "data",
    "EvalOutputs": "evaluation",
    "check_ks": "evaluation",
    "embed_outputs": "evaluation",
    "evaluate_with_rankings": "evaluation",
    "ranking_rows": "evaluation",
    "relation_text_baselines": "evaluation",
    "score_outputs": "evaluation",
    "RetrievalTask": "task",
}

__all__ = sorted(EXPORTS)


__getattr__ = lazy_exports(__name__, EXPORTS)
