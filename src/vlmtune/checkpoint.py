"""Checkpoints: trainable weights in safetensors, everything else in plain files.

A checkpoint folder holds
  weights.safetensors   the task's own parts + any backbone block a stage trains
  config.yaml           the resolved config
  state.json            epoch, step, stage, best metric, backbone identity, data paths,
                        and the sha256 of weights.safetensors and trainer_state.pt
  trainer_state.pt      optimizer, scheduler and RNG state (tensors and plain data
                        only; loaded with weights_only=True, so nothing unpickles code)
  backbone/             only for the tiny preset: its random weights and tokenizer
It is written to a temporary folder and renamed into place, so a kill never leaves a
half-written checkpoint under the real name. Reading checks each file against its
recorded sha256, so a truncated, corrupted or edited file is refused with a message
naming it. (The digests catch accidents and casual edits, not a forger who also
rewrites state.json; what keeps a forged file harmless is that nothing is unpickled:
safetensors for weights, ``weights_only=True`` for the rest.)
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from vlmtune.config import Config, load_config, save_config
from vlmtune.errors import CheckpointError, ConfigError, first_line
from vlmtune.state import TrainState

FORMAT_VERSION = 1
# Files whose sha256 state.json records (under "sha256") and reading checks.
HASHED_FILES = ("weights.safetensors", "trainer_state.pt")


def rng_state() -> dict[str, Any]:
    st = np.random.get_state()
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


def save_checkpoint(folder: Path, *, weights: dict[str, torch.Tensor], cfg: Config, state: TrainState,
                    trainer_state: dict[str, Any] | None, backbone: Any | None, keep: int = 1) -> None:
    """Write a checkpoint atomically (temporary folder, then rename); ``keep`` > 1 keeps
    the previous ones as FOLDER-1 (the one before), FOLDER-2, ... up to FOLDER-(keep-1)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
    save_config(cfg, tmp / "config.yaml")
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    # state.json last: it records the digests of the files as written.
    digests = {name: _sha256((tmp / name).read_bytes()) for name in HASHED_FILES if (tmp / name).is_file()}
    (tmp / "state.json").write_text(json.dumps({"format_version": FORMAT_VERSION, **state.to_json(), "sha256": digests},
                                               indent=2, default=str))
    if backbone is not None:
        backbone.save_pretrained(tmp / "backbone")
    _move_into_place(tmp, folder, keep)


def copy_checkpoint(src: Path, dst: Path, keep: int = 1) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    _move_into_place(tmp, dst, keep)


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
    digests: dict[str, str]  # sha256 of the files in HASHED_FILES, as recorded in state.json

    @property
    def backbone_folder(self) -> Path | None:
        f = self.folder / "backbone"
        if f.is_dir():
            return f
        # A merged export (vlmtune export --format merged) holds the Hugging Face model
        # at its top, beside the checkpoint's own files.
        return self.folder if (self.folder / "config.json").is_file() else None

    def _read(self, name: str) -> bytes:
        """A file's bytes, checked against the sha256 that state.json recorded for it."""
        path = self.folder / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing") from None
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
        expected = self.digests.get(name)
        if expected is None:
            raise CheckpointError(f"{path}: has no recorded sha256 in state.json; refused")
        if _sha256(data) != expected:
            raise CheckpointError(f"{path}: does not match its recorded sha256 (modified or truncated)")
        return data

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
            raise CheckpointError(f"{path}: refused: it holds pickled objects other than tensors and plain data "
                                  f"({_unpickling_reason(e)}); nothing in it was run") from None
        except Exception as e:  # noqa: BLE001 - any other failure is a bad file
            raise CheckpointError(f"{path}: cannot read trainer state ({first_line(e)})") from None


def open_checkpoint(folder: str | Path) -> Checkpoint:
    """Open a checkpoint folder, checking that its files are present and readable."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    for name in ("weights.safetensors", "config.yaml", "state.json"):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: not a vlmtune checkpoint ({name} is missing)")
    where = str(folder / "state.json")
    try:
        raw = json.loads((folder / "state.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{where}: not valid JSON ({str(e)[:200]})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder}: checkpoint format {str(raw.get('format_version'))[:40]} is not {FORMAT_VERSION}")
    digests = raw.get("sha256")
    if not isinstance(digests, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in digests.items()):
        raise CheckpointError(f"{where}: field 'sha256' must map file names to digests")
    state = TrainState.from_json(raw, where)
    try:
        cfg = load_config(folder / "config.yaml")
    except ConfigError as e:
        raise CheckpointError(f"{folder / 'config.yaml'}: {e}") from None
    state.check_against(cfg.train.epochs, where)
    return Checkpoint(folder, cfg, state, digests)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _unpickling_reason(e: BaseException) -> str:
    """The line of torch's weights_only message that names the refused object."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    named = [ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln]
    return (named or lines or [type(e).__name__])[0]


_NOT_ARCHITECTURE = {"_name_or_path", "architectures", "dtype", "torch_dtype", "transformers_version", "_attn_implementation_autoset"}


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
        "config_sha256": hashlib.sha256(cfg_json.encode()).hexdigest(),
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


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Load a partial state dict (task parts + trained backbone blocks), strictly by name and shape."""
    own = model.state_dict()
    unknown = [k for k in weights if k not in own]
    if unknown:
        raise CheckpointError(f"{source}: weights do not fit this model (unexpected tensor '{unknown[0]}')")
    for k, v in weights.items():
        if own[k].shape != v.shape:
            raise CheckpointError(f"{source}: tensor '{k}' has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
    missing = [k for k in own if not k.startswith("backbone.") and k not in weights]
    if missing:
        raise CheckpointError(f"{source}: weights are missing '{missing[0]}'")
    model.load_state_dict(weights, strict=False)
