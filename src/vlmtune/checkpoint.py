"""Checkpoints: trainable weights in safetensors, everything else in plain files.

A checkpoint folder holds
  weights.safetensors   the task's own parts + any backbone block a stage trains
  config.yaml           the resolved config
  state.json            epoch, step, stage, best metric, backbone identity, data paths
                        and their sha256 (validated field by field when read)
  trainer_state.pt      optimizer, scheduler and RNG state (tensors and plain data
                        only; loaded with weights_only=True, so nothing unpickles code)
  backbone/             only for the tiny preset: its random weights and tokenizer
  manifest.json         every other file of the folder with its sha256; written last
It is written to a temporary folder and renamed into place, so a kill never leaves a
half-written checkpoint under the real name. Opening one requires the manifest and
checks the folder against it before anything is parsed: a missing, modified or
unlisted file (a planted ``backbone/*.py``), a symbolic link or a special file is
refused with a message naming it. (The digests catch accidents and casual edits, not
a forger who also rewrites the manifest; what keeps a forged file harmless is that
nothing is unpickled -- safetensors for weights, ``weights_only=True`` for the rest --
and that no code shipped in ``backbone/`` runs unless the user passes
``--trust-remote-code``: see :func:`check_no_remote_code`.)
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import random
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from vlmtune.config import Config, load_saved_config, save_config
from vlmtune.errors import CheckpointError, ConfigError, first_line
from vlmtune.runfolder import follow_umask
from vlmtune.state import TrainState
from vlmtune.utils import sha256_bytes, sha256_file, shorten, unpickling_reason

# 2: every file is listed in manifest.json (1 kept two digests in state.json).
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
# ``vlmtune evaluate CHECKPOINT`` writes its metrics here by default: not part of the
# checkpoint, not in the manifest, and nothing in it is ever loaded.
EVAL_DIR = "eval"
# Files every checkpoint has (trainer_state.pt and backbone/ are optional).
REQUIRED_FILES = ("weights.safetensors", "config.yaml", "state.json")
# A manifest larger than this is not one vlmtune wrote.
_MAX_MANIFEST_BYTES = 16 << 20


def rng_state() -> dict[str, Any]:
    # The legacy tuple (get_state's default); numpy's stub types the default call as the dict form.
    st = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [st[0], torch.from_numpy(st[1].astype(np.int64)), int(st[2]), int(st[3]), float(st[4])],
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    folder: Path,
    *,
    weights: dict[str, torch.Tensor],
    cfg: Config,
    state: TrainState,
    trainer_state: dict[str, Any] | None,
    backbone: Any | None,
    keep: int = 1,
    extra_files: Callable[[Path], None] | None = None,
) -> None:
    """Write a checkpoint atomically (temporary folder, then rename); ``keep`` > 1 keeps
    the previous ones as FOLDER-1 (the one before), FOLDER-2, ... up to FOLDER-(keep-1).
    ``extra_files(folder)`` writes more files into the folder before the manifest lists
    them (an export's Hugging Face model beside the heads)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
    save_config(cfg, tmp / "config.yaml")
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    (tmp / "state.json").write_text(json.dumps({"format_version": FORMAT_VERSION, **state.to_json()}, indent=2, default=str))
    if backbone is not None:
        from vlmtune.console import quiet_libraries

        with quiet_libraries():  # transformers' "Writing model shards" bar at every save
            backbone.save_pretrained(tmp / "backbone")
    if extra_files is not None:
        extra_files(tmp)
    follow_umask(tmp)  # safetensors writes 0600; a shared checkpoint must be readable as the umask says
    write_manifest(tmp)  # last: it lists the files as written
    _move_into_place(tmp, folder, keep)


def copy_checkpoint(src: Path, dst: Path, keep: int = 1) -> None:
    """Copy a checkpoint (``last`` to ``best``); the copy is checked against the
    manifest before it is renamed into place, so a bad copy never takes the name."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, symlinks=True)
    verify_manifest(tmp)
    _move_into_place(tmp, dst, keep)


# --------------------------------------------------------------------------- manifest


def file_listing(folder: Path) -> dict[str, Path]:
    """Every regular file under ``folder`` by its relative POSIX path (the manifest
    itself excluded). Symbolic links and special files are refused, never followed."""
    out: dict[str, Path] = {}
    for root, dirs, files in os.walk(folder, followlinks=False):
        if Path(root) == folder and EVAL_DIR in dirs and not (folder / EVAL_DIR).is_symlink():
            dirs.remove(EVAL_DIR)  # evaluate's default output, never read when loading
        for name in sorted(dirs + files):
            path = Path(root) / name
            try:
                mode = os.lstat(path).st_mode
            except OSError as e:
                raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
            rel = path.relative_to(folder).as_posix()
            if stat.S_ISLNK(mode):
                raise CheckpointError(f"{folder}/{_shown(rel)}: is a symbolic link; a checkpoint holds only plain files; refused")
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise CheckpointError(f"{folder}/{_shown(rel)}: is not a regular file; refused")
            if rel != MANIFEST:
                out[rel] = path
    return out


def write_manifest(folder: str | Path) -> dict[str, str]:
    """List every file of a checkpoint folder with its sha256 in ``manifest.json``."""
    folder = Path(folder)
    files = {rel: sha256_file(path, CheckpointError) for rel, path in sorted(file_listing(folder).items())}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"format_version": FORMAT_VERSION, "files": files}, indent=2))
    os.replace(tmp, folder / MANIFEST)
    return files


def read_manifest(folder: Path) -> dict[str, str]:
    """The manifest's file -> sha256 map, its shape checked (not yet the files)."""
    path = folder / MANIFEST
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CheckpointError(
            f"{folder}: not a vlmtune checkpoint ({MANIFEST} is missing; checkpoints written before manifests cannot be opened)"
        ) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: is not a regular file; refused")
    if st.st_size > _MAX_MANIFEST_BYTES:
        raise CheckpointError(f"{path}: {st.st_size} bytes is too large for a manifest; refused")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({str(e)[:120]})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(raw, dict) or set(raw) != {"format_version", "files"}:
        raise CheckpointError(f"{path}: expected an object with 'format_version' and 'files'")
    if raw["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{folder}: checkpoint format {str(raw['format_version'])[:40]} is not {FORMAT_VERSION}")
    files = raw["files"]
    if not isinstance(files, dict):
        raise CheckpointError(f"{path}: 'files' must map file names to sha256 digests")
    for name, digest in files.items():
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise CheckpointError(f"{path}: '{_shown(name)}' has no valid sha256 (got {_shown(str(digest))!r}); refused")
    return files


def _shown(name: str, limit: int = 200) -> str:
    """A file name as one short line (control characters escaped), for messages."""
    return shorten(json.dumps(name)[1:-1], limit)


def verify_manifest(folder: str | Path) -> dict[str, str]:
    """Check a checkpoint folder against its manifest: every listed file present and
    unchanged, no file unlisted, no link. Returns the manifest (file -> sha256)."""
    folder = Path(folder)
    files = read_manifest(folder)
    present = file_listing(folder)
    for name in REQUIRED_FILES:
        if name not in files and name not in present:
            raise CheckpointError(f"{folder}: not a vlmtune checkpoint ({name} is missing)")
    extra = sorted(set(present) - set(files))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"{folder}/{_shown(extra[0])}: not listed in {MANIFEST}{more}; refused")
    missing = sorted(set(files) - set(present))
    if missing:
        raise CheckpointError(f"{folder}: {_shown(missing[0])} is missing (listed in {MANIFEST})")
    # The small files first, so a tampered config is named before a large file is hashed.
    for name in sorted(files, key=lambda n: present[n].stat().st_size):
        if sha256_file(present[name], CheckpointError) != files[name]:
            raise CheckpointError(f"{present[name]}: does not match its sha256 in {MANIFEST} (modified or truncated)")
    return files


def _move_into_place(tmp: Path, folder: Path, keep: int = 1) -> None:
    """Replace ``folder`` by the complete ``tmp``: renames only, so at any instant the
    name holds either the whole old checkpoint or the whole new one (the old one
    briefly as ``.old``). With ``keep`` > 1 the old one becomes ``FOLDER-1`` and older
    ones shift to ``-2``, ... ``-(keep-1)``; the oldest beyond that is deleted."""
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    if keep > 1 and old.exists():
        older = [folder.with_name(f"{folder.name}-{i}") for i in range(1, keep)]
        shutil.rmtree(older[-1], ignore_errors=True)
        for i in range(len(older) - 1, 0, -1):
            if older[i - 1].exists():
                older[i - 1].rename(older[i])
        old.rename(older[0])
    shutil.rmtree(old, ignore_errors=True)


@dataclass
class Checkpoint:
    folder: Path
    cfg: Config
    state: TrainState
    digests: dict[str, str]  # manifest.json: every file's sha256, checked when opened

    @property
    def backbone_folder(self) -> Path | None:
        f = self.folder / "backbone"
        if f.is_dir():
            return f
        # A merged export (vlmtune export --format merged) holds the Hugging Face model
        # at its top, beside the checkpoint's own files.
        return self.folder if (self.folder / "config.json").is_file() else None

    def _read(self, name: str) -> bytes:
        """A file's bytes, checked (again: the file may have changed since it was opened)
        against its sha256 in the manifest."""
        path = self.folder / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing") from None
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
        expected = self.digests.get(name)
        if expected is None:
            raise CheckpointError(f"{path}: not listed in {MANIFEST}; refused")
        if sha256_bytes(data) != expected:
            raise CheckpointError(f"{path}: does not match its sha256 in {MANIFEST} (modified or truncated)")
        return data

    def backbone_config(self, trust_remote_code: bool = False) -> Any:
        """The checkpoint's backbone config with ``trust_remote_code`` as the *user*
        decided it (a command-line flag), never as the checkpoint's config.yaml says."""
        return dataclasses.replace(self.cfg.backbone, trust_remote_code=trust_remote_code)

    def weights(self) -> dict[str, torch.Tensor]:
        path = self.folder / "weights.safetensors"
        data = self._read("weights.safetensors")
        try:
            return load_safetensors(data)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read weights ({str(e).splitlines()[0]})") from None

    def trainer_state(self) -> dict[str, Any]:
        path = self.folder / "trainer_state.pt"
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; this checkpoint cannot resume training")
        data = self._read("trainer_state.pt")
        try:
            # weights_only: tensors and plain containers only; any other pickled object
            # (a class, a function such as os.system) is refused, never called.
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{path}: refused: a pickle that is not only tensors and plain data "
                f"({_unpickling_reason(e)}); nothing in it was run"
            ) from None
        except Exception as e:  # noqa: BLE001 - any other failure is a bad file
            raise CheckpointError(f"{path}: cannot read trainer state ({first_line(e)})") from None


def open_checkpoint(folder: str | Path) -> Checkpoint:
    """Open a checkpoint folder: every file checked against the manifest first (see
    :func:`verify_manifest`), then state.json validated and config.yaml parsed."""
    folder = Path(folder)
    check_checkpoint_path(folder)
    digests = verify_manifest(folder)
    where = str(folder / "state.json")
    try:
        raw = json.loads((folder / "state.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{where}: not valid JSON ({str(e)[:200]})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder}: checkpoint format {str(raw.get('format_version'))[:40]} is not {FORMAT_VERSION}")
    state = TrainState.from_json(raw, where)
    try:
        cfg = load_saved_config(folder / "config.yaml")
    except ConfigError as e:
        raise CheckpointError(f"{folder / 'config.yaml'}: {e}") from None
    state.check_against(cfg.train.epochs, where)
    return Checkpoint(folder, cfg, state, digests)


def check_checkpoint_path(folder: Path) -> None:
    """Name the usual mistakes of a checkpoint path as such: nothing there, a file given
    for the folder, a run folder or its ``checkpoints/`` given for one checkpoint."""
    shown = _shown(str(folder))
    if not folder.exists():
        why = " (a link to nothing)" if folder.is_symlink() else ""
        raise CheckpointError(f"{shown}: checkpoint folder not found{why}")
    if not folder.is_dir():
        raise CheckpointError(
            f"{shown}: is a file, not a checkpoint folder; name the folder that holds it "
            f"(e.g. runs/NAME/checkpoints/best{f', here {_shown(str(folder.parent))}' if folder.name in REQUIRED_FILES else ''})"
        )
    if (folder / MANIFEST).exists() or (folder / "state.json").exists():
        return
    for inner in ("checkpoints/best", "checkpoints/last", "best", "last"):
        if (folder / inner / MANIFEST).is_file():
            what = "a run folder" if inner.startswith("checkpoints") else "a run's checkpoints folder"
            best = folder / inner.replace("last", "best")
            pick = best if (best / MANIFEST).is_file() else folder / inner
            raise CheckpointError(f"{shown}: is {what}, not a checkpoint; use {_shown(str(pick))}")


def _unpickling_reason(e: BaseException) -> str:
    """What torch's weights_only refusal names of the refused object, in our words:
    never torch's own text, which advises re-running with ``weights_only=False`` (the
    one thing that would run the file's code)."""
    return unpickling_reason(e)


_NOT_ARCHITECTURE = {
    "_name_or_path",
    "architectures",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "_attn_implementation_autoset",
}


def _architecture(d: dict[str, Any]) -> dict[str, Any]:
    """A model config without the keys that change on save/load but not the network."""
    return {k: _architecture(v) if isinstance(v, dict) else v for k, v in d.items() if k not in _NOT_ARCHITECTURE}


def backbone_identity(backbone: Any) -> dict[str, Any]:
    """What a checkpoint records of a :class:`~vlmtune.backbone.Backbone` so its weights
    are never applied to another backbone (state.json's ``backbone``)."""
    cfg_json = json.dumps(_architecture(backbone.model.config.to_dict()), sort_keys=True, default=str)
    info = backbone.info
    return {
        "name_or_path": backbone.source,
        "revision": backbone.revision,
        "config_sha256": sha256_bytes(cfg_json.encode()),
        "vision_hidden": info.vision_hidden,
        "text_hidden": info.text_hidden,
        "num_vision_blocks": info.num_vision_blocks,
    }


def check_identity(ckpt: Checkpoint, identity: dict[str, Any]) -> None:
    """Refuse weights trained on top of a different backbone (``identity``: :func:`backbone_identity`)."""
    saved = ckpt.state.backbone
    for key in ("config_sha256", "vision_hidden", "text_hidden"):
        if saved.get(key) != identity.get(key):
            raise CheckpointError(
                f"{ckpt.folder}: trained on backbone '{saved.get('name_or_path')}' ({key}={saved.get(key)}), "
                f"not on the loaded '{identity.get('name_or_path')}' ({key}={identity.get(key)})"
            )


def first_misfit(own: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> tuple[str, str] | None:
    """Why ``weights`` do not fit a model whose state dict is ``own``: ("unexpected", key)
    for a tensor the model has no place for, else ("shape", key) for the first tensor (in
    the model's order) whose shape differs; None when every tensor fits."""
    unknown = sorted(k for k in weights if k not in own)
    if unknown:
        return "unexpected", unknown[0]
    for k in (k for k in own if k in weights):
        if own[k].shape != weights[k].shape:
            return "shape", k
    return None


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Load a partial state dict (task parts + trained backbone blocks), strictly by name and shape."""
    own = model.state_dict()
    misfit = first_misfit(own, weights)
    if misfit is not None:
        kind, k = misfit
        if kind == "unexpected":
            raise CheckpointError(f"{source}: weights do not fit this model (unexpected tensor '{k}')")
        raise CheckpointError(
            f"{source}: tensor '{k}' has shape {tuple(weights[k].shape)}, the model expects {tuple(own[k].shape)}"
        )
    missing = [k for k in own if not k.startswith("backbone.") and k not in weights]
    if missing:
        raise CheckpointError(f"{source}: weights are missing '{missing[0]}'")
    model.load_state_dict(weights, strict=False)
