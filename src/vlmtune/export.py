"""``vlmtune export``: a checkpoint in the forms other tools load.

Three formats:

``peft``
    The LoRA that ``counting.lm_mode=lora`` trained in InternVL's language model, as a
    standard adapter folder (``adapter_config.json``, ``adapter_model.safetensors``)
    for the whole InternVL: ``PeftModel.from_pretrained(base, DIR)`` with ``base`` the
    untouched InternVL (``AutoModelForImageTextToText.from_pretrained(...)``). The
    adapter's ``target_modules`` is a pattern that names the language model's layers
    only, so the vision tower (which has ``q_proj``/``v_proj`` too) is left alone.
    Any other part of InternVL that a stage trained (projector, vision blocks) goes
    into the adapter as peft's ``modules_to_save``, so the adapted model is the
    trained one. The task's own heads, which InternVL has no place for, are written
    beside as ``vlmtune_heads.safetensors``.
``merged``
    The backbone with its trained blocks and the LoRA merged into the base weights,
    written by ``save_pretrained`` at the top of DIR (with tokenizer and image
    processor), so ``AutoModelForImageTextToText.from_pretrained(DIR)`` loads it.
    Beside it, DIR is also a vlmtune checkpoint holding only the task's own parts
    (``weights.safetensors``, ``config.yaml``, ``state.json``) whose backbone is the
    folder itself: ``vlmtune evaluate DIR`` and ``vlmtune.load(DIR)`` read it.
``vlmtune``
    A self-contained checkpoint folder: the checkpoint's weights, config and state
    plus the backbone in Hugging Face form under ``backbone/`` (also for a hub
    backbone, which a training checkpoint only names). No optimizer state: it is for
    using the model, not for resuming its run.

Every format is written into a private temporary folder that vlmtune creates
exclusively beside DIR under a hidden random name (``tempfile.mkdtemp``: mode 0700, so
no other user can plant a link in it, and no user's folder has its name), then renamed
into place; the files in it follow the umask. An existing non-empty DIR, a file or a
symbolic link at DIR is refused, never overwritten, and nothing vlmtune did not create
is removed (a folder of the user's named ``DIR.export-tmp`` stays as it was).

A ``merged`` or ``vlmtune`` export computes what its checkpoint computes, so it carries
the checkpoint's fingerprint (:func:`vlmtune.fingerprint.checkpoint_fingerprint`) in
``vlmtune_export.json`` together with a digest of the files it was written with: an
index built by the checkpoint serves the export (``search --checkpoint EXPORT``), and
an export whose files changed since has its own fingerprint again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors.torch import save_file

from vlmtune.checkpoint import Checkpoint, backbone_identity, check_identity, open_checkpoint, save_checkpoint
from vlmtune.console import quiet_libraries, status
from vlmtune.errors import CheckpointError, VlmtuneError
from vlmtune.fingerprint import EXPORT_INFO, checkpoint_fingerprint, files_digest
from vlmtune.runfolder import current_umask, follow_umask, make_folder, output_folder, write_text
from vlmtune.tasks import task_spec
from vlmtune.utils import shorten

if TYPE_CHECKING:
    from vlmtune.backbone import Backbone
    from vlmtune.tasks.counting.config import CountingConfig

FORMATS = ("peft", "merged", "vlmtune")
# Where a task model keeps InternVL (``CountingModel.backbone.model``) in its state dict.
BACKBONE_PREFIX = "backbone.model."
# InternVLForConditionalGeneration -> its language model (what counting's LoRA was injected into).
LM_PATH = "model.language_model"
HEADS_FILE = "vlmtune_heads.safetensors"


def export_checkpoint(checkpoint: str | Path, out: str | Path, fmt: str = "vlmtune") -> dict[str, Any]:
    """Export ``checkpoint`` to the new folder ``out`` in format ``fmt``; returns a summary.

    Raises :class:`~vlmtune.errors.VlmtuneError` for an unknown format, an ``out`` that is
    a file, a symbolic link, a non-empty folder or inside the checkpoint, and
    :class:`~vlmtune.errors.CheckpointError` for a checkpoint that cannot be exported."""
    if fmt not in FORMATS:
        raise VlmtuneError(f"--format: expected one of {', '.join(FORMATS)}, got '{fmt}'")
    ckpt = open_checkpoint(checkpoint)
    out = _check_out(out, ckpt)
    if fmt == "peft":
        _check_peft(ckpt)  # before any loading: a retrieval checkpoint fails at once
    make_folder(out.parent, "--out")
    # Private and exclusive: a name no user's file has, a folder no one else can write in.
    private = Path(tempfile.mkdtemp(prefix=f".{out.name[:80]}.vlmtune-export-", dir=out.parent))
    try:
        dest = private / "export"
        status("exporting %s as %s into %s", ckpt.folder, fmt, out)
        with quiet_libraries():  # peft's use of transformers' deprecated names warns on every export
            summary = {"peft": _export_peft, "merged": _export_merged, "vlmtune": _export_vlmtune}[fmt](ckpt, dest)
        _follow_umask(dest)
        _check_out(out, ckpt)  # again: the export took a while
        try:
            # rename(2) replaces an empty folder and fails on anything else (a file, a link,
            # a folder someone filled meanwhile), so nothing at ``out`` is ever removed.
            os.rename(dest, out)
        except OSError as e:
            raise VlmtuneError(f"--out {shorten(str(out))}: cannot move the export into place ({e.strerror or e})") from None
    finally:
        shutil.rmtree(private, ignore_errors=True)  # only the folder vlmtune created
    return {"format": fmt, "checkpoint": str(ckpt.folder), "out": str(out), **summary}


def _check_out(out: str | Path, ckpt: Checkpoint) -> Path:
    """``--out`` as a new or empty folder outside the checkpoint, not a link."""
    out = output_folder(out, "--out")
    if out.is_symlink():
        raise VlmtuneError(
            f"--out {shorten(str(out))}: is a symbolic link (to {shorten(os.readlink(out))}); "
            f"export does not write through links; name a new folder"
        )
    if out.exists() and any(out.iterdir()):
        raise VlmtuneError(f"--out: {out} exists and is not empty; export writes a new folder and overwrites nothing")
    if out.resolve() == ckpt.folder.resolve() or ckpt.folder.resolve() in out.resolve().parents:
        raise VlmtuneError(f"--out: {out} is inside the checkpoint {ckpt.folder}; choose a folder outside it")
    return out


def _follow_umask(folder: Path) -> None:
    """Give the files a library wrote with a mode of its own (safetensors: 0600) the
    mode the umask gives (0644 under 022), folders 0755; links are not followed."""
    mask = current_umask()  # read, not set: setting it would race another thread's new file
    for root, _dirs, _files in os.walk(folder, followlinks=False):
        os.chmod(root, 0o777 & ~mask)
    follow_umask(folder)  # every file 0666 less the umask, links not followed


def _write_source_record(folder: Path, ckpt: Checkpoint, fmt: str, **extra: Any) -> None:
    """``vlmtune_export.json`` of a merged or vlmtune export: its source, the source's
    fingerprint and the digest of the files as written (before the manifest lists them)."""
    from vlmtune.checkpoint import file_listing
    from vlmtune.utils import sha256_file

    digests = {rel: sha256_file(path, CheckpointError) for rel, path in file_listing(folder).items()}
    info = {
        "format": fmt,
        "task": ckpt.cfg.task,
        "source_checkpoint": str(ckpt.folder.resolve()),
        "fingerprint": checkpoint_fingerprint(ckpt),
        "files_sha256": files_digest(digests),
        **extra,
    }
    write_text(folder / EXPORT_INFO, json.dumps(info, indent=2) + "\n")


# --------------------------------------------------------------------------- peft


def _check_peft(ckpt: Checkpoint) -> None:
    why = task_spec(ckpt.cfg.task).lora_adapter(ckpt.cfg)
    if why is not None:
        raise CheckpointError(f"{ckpt.folder}: {why}; use --format merged or vlmtune")


def lora_target_pattern(target_modules: list[str]) -> str:
    """The peft ``target_modules`` pattern (matched in full against module names of the
    whole InternVL) naming exactly the modules that ``inject_adapter_in_model`` wrapped in
    the language model: a module whose name is, or ends with ``.`` + , a target."""
    names = "|".join(re.escape(t) for t in target_modules)
    return rf"{re.escape(LM_PATH)}(\..*)?\.({names})"


def portable_base(name: str | None) -> str | None:
    """Where an adapter's base lives, as ``adapter_config.json`` records it: a local
    folder as its absolute, resolved path (it works from any folder); a hub id such as
    ``OpenGVLab/InternVL3-1B-hf`` as it is."""
    if name and Path(name).is_dir():
        return str(Path(name).resolve())
    return name


def _export_peft(ckpt: Checkpoint, dest: Path) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    from vlmtune.backbone import load_backbone

    cfg = ckpt.cfg
    c: CountingConfig = cfg.section("counting")
    weights = ckpt.weights()
    backbone = load_backbone(cfg.backbone, device_type="cpu", folder=ckpt.backbone_folder)
    check_identity(ckpt, backbone_identity(backbone))
    lora = {k: v for k, v in weights.items() if k.startswith(BACKBONE_PREFIX) and ".lora_" in k}
    if not lora:
        raise CheckpointError(f"{ckpt.folder}: holds no LoRA weights although counting.lm_mode=lora")
    # Other parts of InternVL a stage trained (projector, vision blocks): whole modules in
    # peft's modules_to_save, named by the module that owns each parameter.
    trained = {k: v for k, v in weights.items() if k.startswith(BACKBONE_PREFIX) and ".lora_" not in k}
    owners = {k[len(BACKBONE_PREFIX) :].rsplit(".", 1)[0] for k in trained}
    # A module that holds parameters of its own (a vision block's layer scales) is saved
    # whole; its submodules then need no entry of their own (peft cannot nest them).
    to_save = sorted(m for m in owners if not any(m.startswith(o + ".") for o in owners))
    lora_cfg = LoraConfig(
        r=c.lora_r,
        lora_alpha=c.lora_alpha,
        lora_dropout=c.lora_dropout,
        target_modules=lora_target_pattern(list(c.lora_target_modules)),
        modules_to_save=to_save or None,
    )
    # peft records where the base was loaded from: the hub id, or for the tiny preset
    # the checkpoint's backbone folder; a folder as its absolute, resolved path, so the
    # adapter loads from any folder (not only the one export ran in).
    model = get_peft_model(backbone.model, lora_cfg)
    model.peft_config["default"].base_model_name_or_path = portable_base(model.peft_config["default"].base_model_name_or_path)
    own = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for k, v in lora.items():  # ...lora_A.default.weight keeps its place under base_model.model
        mapped["base_model.model." + k[len(BACKBONE_PREFIX) :]] = v
    for k, v in trained.items():
        name = k[len(BACKBONE_PREFIX) :]
        module = next(m for m in to_save if name.startswith(m + "."))
        mapped[f"base_model.model.{module}.modules_to_save.default.{name[len(module) + 1 :]}"] = v
    for k, v in mapped.items():
        if k not in own:
            raise CheckpointError(f"{ckpt.folder}: weight '{k}' has no place in the peft model of this backbone")
        if own[k].shape != v.shape:
            raise CheckpointError(f"{ckpt.folder}: weight '{k}' has shape {tuple(v.shape)}, peft expects {tuple(own[k].shape)}")
    left = [k for k in own if ".lora_" in k and k not in mapped]
    if left:  # the pattern wrapped a module the checkpoint has no LoRA for
        raise CheckpointError(f"{ckpt.folder}: no LoRA weights for '{left[0]}'")
    model.load_state_dict(mapped, strict=False)
    model.save_pretrained(str(dest), safe_serialization=True)
    heads = _head_weights(weights)
    save_file(heads, str(dest / HEADS_FILE), metadata={"format": "pt"})
    info = {
        "format": "peft",
        "task": cfg.task,
        "source_checkpoint": str(ckpt.folder.resolve()),
        "base_model": model.peft_config["default"].base_model_name_or_path,
        "lora_target_modules": lora_cfg.target_modules,
        "modules_to_save": to_save,
        "heads": HEADS_FILE,
        "head_tensors": sorted(heads),
        "config": _config_dict(ckpt),
    }
    write_text(dest / EXPORT_INFO, json.dumps(info, indent=2))
    return {"lora_tensors": len(lora), "modules_to_save": len(to_save)}


# --------------------------------------------------------------------------- merged


def merge_lora(language_model: torch.nn.Module) -> int:
    """Merge every injected LoRA layer into its base layer and put the base layer back in
    its place, leaving plain modules; returns how many were merged."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, mod in list(language_model.named_modules()):
        if not isinstance(mod, LoraLayer):
            continue
        mod.merge(safe_merge=True)
        parent_name, _, attr = name.rpartition(".")
        parent = language_model.get_submodule(parent_name) if parent_name else language_model
        setattr(parent, attr, mod.get_base_layer())
        merged += 1
    if hasattr(language_model, "peft_config"):
        del language_model.peft_config
    return merged


def _export_merged(ckpt: Checkpoint, dest: Path) -> dict[str, Any]:
    from vlmtune.config import apply_override, config_from_dict, config_to_dict
    from vlmtune.restore import load_model

    model, _ = load_model(ckpt, torch.device("cpu"))
    bb = cast("Backbone", model.backbone)  # every task's model holds its backbone there
    n_merged = merge_lora(bb.language_model) if getattr(model, "lm_mode", None) == "lora" else 0
    # The folder's own config describes what it now holds: no LoRA left to inject.
    data = config_to_dict(ckpt.cfg)
    if n_merged:
        apply_override(data, "counting.lm_mode=full")
    cfg = config_from_dict(data)
    heads = _head_weights(model.state_dict())

    def hf_model(folder: Path) -> None:
        bb.model.save_pretrained(folder, safe_serialization=True)
        bb.tokenizer.save_pretrained(folder)
        bb.image_processor.save_pretrained(folder)
        _write_source_record(folder, ckpt, "merged", lora_layers_merged=n_merged)

    save_checkpoint(dest, weights=heads, cfg=cfg, state=ckpt.state, trainer_state=None, backbone=None, extra_files=hf_model)
    return {"lora_layers_merged": n_merged, "head_tensors": len(heads)}


# --------------------------------------------------------------------------- vlmtune


def _export_vlmtune(ckpt: Checkpoint, dest: Path) -> dict[str, Any]:
    from vlmtune.restore import load_model

    model, _ = load_model(ckpt, torch.device("cpu"))  # also checks that the checkpoint loads
    weights = ckpt.weights()
    save_checkpoint(
        dest,
        weights=weights,
        cfg=ckpt.cfg,
        state=ckpt.state,
        trainer_state=None,
        backbone=model.backbone,
        extra_files=lambda folder: _write_source_record(folder, ckpt, "vlmtune"),
    )
    return {"tensors": len(weights)}


# --------------------------------------------------------------------------- helpers


def _head_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The task's own parts (adapters, projectors, heads): everything not in the backbone."""
    return {k: v.detach().cpu().contiguous() for k, v in state.items() if not k.startswith("backbone.")}


def _config_dict(ckpt: Checkpoint) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((ckpt.folder / "config.yaml").read_text())
