"""What identifies the model a checkpoint computes (its fingerprint), for embed folders
and indexes to refuse vectors of another model, and the record an export keeps of its
source's fingerprint (``vlmtune_export.json``). No torch: it reads a checkpoint's
recorded digests and config."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from vlmtune.errors import VlmtuneError
from vlmtune.utils import sha256_bytes

if TYPE_CHECKING:
    from vlmtune.checkpoint import Checkpoint
    from vlmtune.tasks.retrieval.config import ModelConfig

# The export record: format, source, the source's fingerprint, the digest of the files written.
EXPORT_INFO = "vlmtune_export.json"


def files_digest(digests: dict[str, str]) -> str:
    """One sha256 over a checkpoint's files and their digests, ``vlmtune_export.json``
    and the manifest left out: what an export records of the files it wrote."""
    own = {k: v for k, v in digests.items() if k != EXPORT_INFO}
    return sha256_bytes(json.dumps(own, sort_keys=True).encode())


def checkpoint_fingerprint(ckpt: Checkpoint) -> str:
    """What identifies the model a checkpoint computes: the sha256 of its trained
    weights (recorded in state.json and checked on reading), the backbone's identity,
    the task and the settings that shape embeddings (pooling, text length, the
    adapter/projector config). The same model re-saved elsewhere has the same
    fingerprint; another training run, epoch or backbone does not.

    An export (``vlmtune export --format merged`` or ``vlmtune``) computes what its
    source computes and records the source's fingerprint in ``vlmtune_export.json``
    with a digest of its files as written: while its files are those (the manifest
    checks them), its fingerprint is its source's, so an index built by the checkpoint
    serves the export."""
    recorded = export_fingerprint(ckpt)
    return recorded if recorded is not None else own_fingerprint(ckpt)


def own_fingerprint(ckpt: Checkpoint) -> str:
    """The fingerprint of a checkpoint's own files (no export record consulted)."""
    return sha256_bytes(json.dumps(fingerprint_parts(ckpt), sort_keys=True, default=str).encode())


def fingerprint_parts(ckpt: Checkpoint) -> dict[str, Any]:
    """What :func:`own_fingerprint` hashes, by name (to say what differs between two)."""
    cfg = ckpt.cfg
    model: ModelConfig = cfg.section("model")
    return {
        "task": cfg.task,
        "weights": ckpt.digests.get("weights.safetensors"),
        "backbone": {k: ckpt.state.backbone.get(k) for k in ("config_sha256", "vision_hidden", "text_hidden")},
        "pooling": [cfg.backbone.vision_pooling, cfg.backbone.text_pooling, cfg.backbone.max_text_tokens],
        "model": {k: v for k, v in asdict(model).items() if k not in getattr(model, "TRAINING_ONLY", ())},
    }


def export_fingerprint(ckpt: Checkpoint) -> str | None:
    """The source's fingerprint an export recorded, or None: no record, a record that is
    not the export's (its files digest is not that of the files the folder holds), or
    one that cannot be read."""
    if EXPORT_INFO not in ckpt.digests:  # only a file the manifest lists (and checked)
        return None
    try:
        info = json.loads(ckpt._read(EXPORT_INFO).decode("utf-8"))
    except (VlmtuneError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(info, dict) or info.get("files_sha256") != files_digest(ckpt.digests):
        return None
    fp = info.get("fingerprint")
    return fp if isinstance(fp, str) and len(fp) == 64 else None


# What each part of :func:`fingerprint_parts` is, as a refusal names it.
PART_LABELS = {
    "task": "task",
    "weights": "weights (another training run or epoch)",
    "backbone": "backbone (another base model)",
    "pooling": "pooling (backbone.vision_pooling, backbone.text_pooling or backbone.max_text_tokens)",
    "model": "model settings",
}


def parts_differ(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """What differs between two :func:`fingerprint_parts`, each as :data:`PART_LABELS`
    names it (the task with both names, the model settings with the keys that differ)."""
    out = []
    for key, label in PART_LABELS.items():
        x, y = a.get(key), b.get(key)
        if x == y:
            continue
        if key == "task":
            label = f"task ({x} vs {y})"
        elif key == "model" and isinstance(x, dict) and isinstance(y, dict):
            keys = sorted(k for k in {*x, *y} if x.get(k) != y.get(k))
            label = f"model settings ({', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''})"
        out.append(label)
    return out
