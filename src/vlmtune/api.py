"""The public Python API: use a trained checkpoint outside the CLI.

```python
import vlmtune
m = vlmtune.load("runs/r2/checkpoints/best")          # any task's checkpoint
img = m.embed_images(["a.jpg", pil_image])            # [N, D] float32 torch tensor, L2-normalised
txt = m.embed_texts(["a red circle left of a star"])  # [M, D]
m.similarity(img, txt)                                 # [N, M]: cosine x the model's learnt logit scale
m.ground("a.jpg", "the red circle")                   # Grounding(box=(x0, y0, x1, y1) in pixels, score)
m.ask("receipts.jpg", "How many receipts?")           # counting: Prediction(answer, count, probabilities, ...)
```

A :class:`Model` is built by :func:`load` through the same steps as ``vlmtune
evaluate`` (``checkpoint.open_checkpoint``, then ``evaluate.load_model``), so every
check a checkpoint gets there (file digests, backbone identity, tensor names and
shapes) holds here too, and the embeddings are the ones evaluation ranks: images go
through the backbone's image processor as one square tile and the vision tower,
adapter and projector; captions through the backbone's tokenizer (right padding,
``backbone.max_text_tokens``) and the text tower, adapter and projector. Work is done
in batches of ``eval.batch_size`` on the checkpoint's device (the first GPU where CUDA
is present, else the CPU, or ``device=``); results come back as float32 tensors on the
CPU.

With ``cache_dir`` the frozen towers' outputs are kept in the frozen-feature cache
(``vlmtune.data.cache.FeatureStore``, the same namespaces training and evaluation use),
keyed by the image file's content or the caption's text, so embedding the same files
again skips the towers. PIL images passed directly are always computed live.

Errors: every one is a :class:`~vlmtune.errors.VlmtuneError` whose message names what
is wrong. A method the checkpoint's task cannot serve (``ask`` on a retrieval
checkpoint, ``embed_images`` on a counting one) raises ``VlmtuneError`` naming the task
and the method; an argument of the wrong type raises
:class:`~vlmtune.errors.ArgumentTypeError` (also a ``TypeError``), a bad value
:class:`~vlmtune.errors.ArgumentError` (also a ``ValueError``), each naming the
argument; an image that cannot be read :class:`~vlmtune.errors.DataError`; a checkpoint
that cannot be opened :class:`~vlmtune.errors.CheckpointError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import torch

from vlmtune.errors import ArgumentError, ArgumentTypeError, VlmtuneError
from vlmtune.fingerprint import checkpoint_fingerprint, fingerprint_parts
from vlmtune.tasks import TASKS, task_spec

if TYPE_CHECKING:
    from PIL import Image

    from vlmtune.checkpoint import Checkpoint
    from vlmtune.predict import Prediction

ImageInput = Union[str, Path, "Image.Image"]


@dataclass(frozen=True)
class Grounding:
    """Where a phrase is in an image.

    ``box``: (x0, y0, x1, y1) in pixels of the image as loaded (EXIF orientation
    applied), the grounding head's prediction; ``score``: the matching head's
    probability that the phrase describes the image (0..1).
    """

    box: tuple[float, float, float, float]
    score: float

    @property
    def box_xywh(self) -> tuple[float, float, float, float]:
        """The box as (x, y, width, height) in pixels, the annotation format."""
        x0, y0, x1, y1 = self.box
        return (x0, y0, x1 - x0, y1 - y0)

    def to_json(self) -> dict[str, Any]:
        return {
            "box": [round(v, 3) for v in self.box],
            "box_xywh": [round(v, 3) for v in self.box_xywh],
            "score": round(self.score, 6),
        }


class Model:
    """A trained checkpoint, ready to embed, ground or answer. Build it with :func:`load`."""

    def __init__(self, ckpt: Checkpoint, device: str | torch.device | None = None, cache_dir: str | Path | None = None):
        from vlmtune.restore import default_device, load_model

        self.checkpoint = ckpt
        self.folder = ckpt.folder
        self.cfg = ckpt.cfg
        self.task_name = ckpt.cfg.task
        self.device = _device(device) if device is not None else default_device()
        self.cache_dir = _path(cache_dir, "cache_dir") if cache_dir is not None else None
        self.batch_size = ckpt.cfg.eval.batch_size
        # The task's model: which methods it has depends on the task (``_require`` checks).
        self.model: Any
        self.model, self.task = load_model(ckpt, self.device)
        self.fingerprint = checkpoint_fingerprint(ckpt)

    def __repr__(self) -> str:
        return f"vlmtune.Model(task={self.task_name!r}, folder='{self.folder}', device='{self.device}')"

    # ------------------------------------------------------------------ helpers
    def _require(self, method: str) -> None:
        own = task_spec(self.task_name).serves  # each task declares the methods its checkpoints serve
        if method not in own:
            able = [t for t in TASKS if method in task_spec(t).serves]
            serves = ", ".join(f"{m}()" for m in own) or "nothing"
            raise VlmtuneError(
                f"{self.folder}: a '{self.task_name}' checkpoint cannot {method}() (that needs a "
                f"{' or '.join(able)} checkpoint); it serves {serves}"
            )

    @property
    def dim(self) -> int:
        """Size of the joint embedding space (retrieval checkpoints)."""
        self._require("embed_images")
        return int(self.cfg.section("model").embed_dim)

    @property
    def logit_scale(self) -> float:
        """The learnt scale (1 / temperature) that turns cosines into contrastive logits."""
        self._require("similarity")
        return float(self.model.logit_scale().detach())

    @staticmethod
    def _image(item: ImageInput, name: str = "image") -> Image.Image:
        """A path (read as evaluation reads it) or a PIL image, as 8-bit RGB; ``name``:
        the argument, for the message of one that is neither."""
        from PIL import Image as PILImage

        from vlmtune.data.formats import load_image, to_rgb

        if isinstance(item, PILImage.Image):
            from PIL import ImageOps

            return to_rgb(ImageOps.exif_transpose(item))
        if isinstance(item, (str, Path)):
            return load_image(Path(item))
        raise ArgumentTypeError(f"{name}: expected an image path (str or Path) or a PIL image, got {type(item).__name__}")

    # ------------------------------------------------------------------ retrieval
    @torch.no_grad()
    def _vision_tokens(self, items: Sequence[ImageInput]) -> torch.Tensor:
        """The frozen vision tower's tokens of ``items`` [B, 1 + N, Dv], from the cache where possible."""
        from vlmtune.backbone import preprocess_images

        bb = self.model.backbone
        store, keys = None, {}
        if self.cache_dir is not None:
            from vlmtune.data.cache import FeatureStore, content_key, resolve_cache_dtype
            from vlmtune.tasks.retrieval import vision_namespace

            store = FeatureStore(self.cache_dir, vision_namespace(bb, resolve_cache_dtype(self.cfg.cache.dtype)))
            for i, it in enumerate(items):
                if isinstance(it, (str, Path)):
                    try:
                        keys[i] = content_key(it)
                    except OSError:
                        pass  # reported by load_image below, naming the file
        out: list[torch.Tensor | None] = [None] * len(items)
        live = [i for i in range(len(items)) if i not in keys]
        if store is not None and keys:
            by_key = {k: items[i] for i, k in keys.items()}

            def compute(batch_keys: list[str]):
                pv, _ = preprocess_images(bb.image_processor, [self._image(by_key[k]) for k in batch_keys], max_tiles=1)
                return bb.vision_tokens(pv.to(self.device)).float().cpu().numpy()

            store.ensure(
                list(keys.values()), compute, batch_size=self.batch_size, dtype=resolve_cache_dtype(self.cfg.cache.dtype)
            )
            for i, k in keys.items():
                out[i] = torch.from_numpy(store.get(k).astype("float32"))
        for s in range(0, len(live), self.batch_size):
            idx = live[s : s + self.batch_size]
            pv, _ = preprocess_images(bb.image_processor, [self._image(items[i]) for i in idx], max_tiles=1)
            tokens = bb.vision_tokens(pv.to(self.device)).float().cpu()
            for j, i in enumerate(idx):
                out[i] = tokens[j]
        return torch.stack(out)  # type: ignore[arg-type]

    @torch.no_grad()
    def _encode_images(self, items: Sequence[ImageInput]) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [B, D], adapted patch tokens [B, N, D]) on the model's device."""
        if self.cache_dir is not None:
            return self.model.encode_image(vision_tokens=self._vision_tokens(items).to(self.device))
        from vlmtune.backbone import preprocess_images

        pv, _ = preprocess_images(self.model.backbone.image_processor, [self._image(it) for it in items], max_tiles=1)
        return self.model.encode_image(pv.to(self.device))

    def embed_images(self, images: Sequence[ImageInput] | ImageInput, progress: bool = False) -> torch.Tensor:
        """Joint-space embeddings of images (paths or PIL images): [N, D] float32 on the
        CPU, each row L2-normalised. A single image gives [1, D]. ``progress``: a bar on
        a terminal, plain periodic lines when stderr is a log (:func:`vlmtune.console.progress`).

        Raises :class:`~vlmtune.errors.ArgumentTypeError` (a ``TypeError``) naming
        ``images`` or ``images[i]`` for anything that is not an image path, a PIL image
        or a sequence of them, and :class:`~vlmtune.errors.DataError` naming the file for
        an image that cannot be read."""
        from vlmtune.console import progress as progress_bar

        self._require("embed_images")
        items = _as_list(images)
        for i, it in enumerate(items):
            self._check_image(it, f"images[{i}]")
        parts = [torch.zeros(0, self.cfg.section("model").embed_dim)]
        for s in progress_bar(range(0, len(items), self.batch_size), desc="images", unit="batch", enabled=progress):
            emb, _ = self._encode_images(items[s : s + self.batch_size])
            parts.append(emb.float().cpu())
        return torch.cat(parts)

    @torch.no_grad()
    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        from vlmtune.backbone import tokenize

        bb = self.model.backbone
        max_tokens = self.cfg.backbone.max_text_tokens
        enc = tokenize(bb.tokenizer, texts, max_tokens)
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        hidden = None
        if self.cache_dir is not None:
            from vlmtune.checkpoint import backbone_identity
            from vlmtune.data.cache import FeatureStore, resolve_cache_dtype, text_fingerprint, text_key

            dtype = resolve_cache_dtype(self.cfg.cache.dtype)
            ns = {
                "kind": "text_tokens",
                "backbone": backbone_identity(bb),
                "weights": text_fingerprint(bb),
                "max_tokens": max_tokens,
                "dtype": dtype,
            }  # build_text_cache's namespace
            store = FeatureStore(self.cache_dir, ns)
            by_key = {text_key(t): t for t in texts}

            def compute(batch_keys: list[str]):
                e = tokenize(bb.tokenizer, [by_key[k] for k in batch_keys], max_tokens)
                h = bb.text_tokens(e["input_ids"].to(self.device), e["attention_mask"].to(self.device)).float().cpu()
                return torch.nn.functional.pad(h, (0, 0, 0, max_tokens - h.shape[1])).numpy()

            store.ensure(list(by_key), compute, batch_size=self.batch_size, dtype=dtype)
            t = ids.shape[1]
            hidden = torch.stack([torch.from_numpy(store.get(text_key(x)).astype("float32"))[:t] for x in texts])
            hidden = hidden.to(self.device)
        return self.model.encode_text(ids, mask, hidden)

    def embed_texts(self, texts: Sequence[str] | str, progress: bool = False) -> torch.Tensor:
        """Joint-space embeddings of captions: [M, D] float32 on the CPU, L2-normalised.
        ``progress`` as for :meth:`embed_images`.

        Raises :class:`~vlmtune.errors.ArgumentTypeError` (a ``TypeError``) naming
        ``texts`` or ``texts[i]`` for anything but a string or a sequence of strings."""
        from vlmtune.console import progress as progress_bar

        self._require("embed_texts")
        items = _texts(texts, "texts")
        parts = [torch.zeros(0, self.cfg.section("model").embed_dim)]
        for s in progress_bar(range(0, len(items), self.batch_size), desc="texts", unit="batch", enabled=progress):
            parts.append(self._encode_texts(items[s : s + self.batch_size]).float().cpu())
        return torch.cat(parts)

    @torch.no_grad()
    def similarity(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """[N, M] contrastive logits: cosine of each image and text embedding times the
        model's learnt logit scale (``logit_scale``), as the contrastive loss uses them.

        ``images`` [N, D] and ``texts`` [M, D] (or one row, [D]) as :meth:`embed_images`
        and :meth:`embed_texts` give them. Raises
        :class:`~vlmtune.errors.ArgumentTypeError` (a ``TypeError``) for an argument that
        is not a tensor, :class:`~vlmtune.errors.ArgumentError` (a ``ValueError``) for
        one of the wrong shape, naming it."""
        self._require("similarity")
        images, texts = self._embeddings(images, "images"), self._embeddings(texts, "texts")
        cos = torch.nn.functional.normalize(images, dim=-1) @ torch.nn.functional.normalize(texts, dim=-1).T
        return cos * self.logit_scale

    @torch.no_grad()
    def match_scores(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """The matching head's log-probability that each (image, text) pair matches:
        1-D, one per row of the equal-length embedding batches. This is the score
        evaluation's re-rank (``eval.rerank_k``) and ``vlmtune search --rerank`` sort by.

        Raises :class:`~vlmtune.errors.ArgumentTypeError` (a ``TypeError``) for an
        argument that is not a tensor, :class:`~vlmtune.errors.ArgumentError` (a
        ``ValueError``) for batches of unequal lengths or of the wrong width."""
        self._require("similarity")
        images, texts = self._embeddings(images, "images"), self._embeddings(texts, "texts")
        if len(images) != len(texts):
            raise ArgumentError(
                f"match_scores: images has {len(images)} rows and texts {len(texts)}; it scores pairs, "
                f"one image and one text per row (for all pairs use similarity())"
            )
        out = []
        for s in range(0, len(images), 1024):
            logits = self.model.match_logits(images[s : s + 1024].to(self.device), texts[s : s + 1024].to(self.device))
            out.append(logits.float().log_softmax(-1)[:, 1].cpu())
        return torch.cat(out) if out else torch.zeros(0)

    @torch.no_grad()
    def ground(self, image: ImageInput, text: str | Sequence[str]) -> Grounding | list[Grounding]:
        """The box the grounding head gives for ``text`` in ``image``, in pixels (xyxy),
        with the matching head's probability as its score. A list of texts gives a list.

        Raises :class:`~vlmtune.errors.ArgumentTypeError` (a ``TypeError``) naming
        ``image`` or ``text`` for an argument of the wrong type,
        :class:`~vlmtune.errors.ArgumentError` (a ``ValueError``) for an empty text."""
        from vlmtune.boxes import cxcywh_to_xyxy

        self._require("ground")
        single = isinstance(text, str)
        texts = _texts(text, "text")
        for i, phrase in enumerate(texts):
            if not phrase.strip():
                raise ArgumentError(f"text{'' if single else f'[{i}]'}: empty; name the phrase to find in the image")
        im = self._image(image)
        w, h = im.size
        v, patches = self._encode_images([im])
        results = []
        for s in range(0, len(texts), self.batch_size):
            chunk = texts[s : s + self.batch_size]
            t = self._encode_texts(list(chunk))
            pred, _ = self.model.ground(t, patches.expand(len(chunk), -1, -1))
            boxes = cxcywh_to_xyxy(pred.float()).cpu() * torch.tensor([w, h, w, h], dtype=torch.float32)
            prob = self.model.match_logits(v.expand(len(chunk), -1), t).float().softmax(-1)[:, 1].cpu()
            results += [Grounding(tuple(float(x) for x in b), float(p)) for b, p in zip(boxes, prob)]  # type: ignore[arg-type]
        return results[0] if single else results

    # ------------------------------------------------------------------ counting
    def ask(self, image: ImageInput, question: str | None = None, attention: bool = False) -> Prediction:
        """Answer a counting question: a :class:`~vlmtune.predict.Prediction` with the
        generated ``answer``, the count head's ``count`` (class index), ``count_label``,
        ``confidence`` and ``probabilities`` (and the answer's attention map with
        ``attention=True``), exactly as ``vlmtune predict`` gives them; ``agrees`` and
        ``disagreement`` say when the answer's count is not the head's.

        ``question=None`` asks ``vlmtune predict``'s default question; an empty or blank
        question raises :class:`~vlmtune.errors.ArgumentError` (a ``ValueError``), a
        question or image of the wrong type :class:`~vlmtune.errors.ArgumentTypeError`
        (a ``TypeError``); nothing is replaced silently."""
        from vlmtune.predict import DEFAULT_QUESTION, predict_image

        self._require("ask")
        if question is None:
            question = DEFAULT_QUESTION
        elif not isinstance(question, str):
            raise ArgumentTypeError(f"question: expected a string, got {type(question).__name__}")
        elif not question.strip():
            raise ArgumentError("question: empty; ask a question, or pass question=None for the default one")
        return predict_image(self.model, self.cfg, self._image(image), question, attention=attention)

    # ------------------------------------------------------------------ argument checks
    @staticmethod
    def _check_image(item: Any, name: str) -> None:
        from PIL import Image as PILImage

        if not isinstance(item, (str, Path, PILImage.Image)):
            raise ArgumentTypeError(f"{name}: expected an image path (str or Path) or a PIL image, got {type(item).__name__}")

    def _embeddings(self, value: Any, name: str) -> torch.Tensor:
        """An embedding batch [N, D] (a row [D] becomes [1, D]) as float32, checked."""
        import numpy as np

        if not isinstance(value, (torch.Tensor, np.ndarray)):
            raise ArgumentTypeError(
                f"{name}: expected a tensor of embeddings [N, D] (from embed_images/embed_texts), got {type(value).__name__}"
            )
        t = torch.as_tensor(value)
        if t.ndim == 1:
            t = t[None]
        dim = int(self.cfg.section("model").embed_dim)
        if t.ndim != 2 or t.shape[-1] != dim:
            raise ArgumentError(f"{name}: expected embeddings of shape [N, {dim}], got {list(t.shape)}")
        if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
            raise ArgumentTypeError(f"{name}: expected a float tensor, got {t.dtype}")
        return t.float()


def _as_list(images: Any) -> list[Any]:
    from PIL import Image as PILImage

    if isinstance(images, (str, Path, PILImage.Image)):
        return [images]
    if isinstance(images, (bytes, dict)) or not hasattr(images, "__iter__"):
        raise ArgumentTypeError(
            f"images: expected an image path (str or Path), a PIL image or a sequence of them, got {type(images).__name__}"
        )
    return list(images)


def _texts(texts: Any, name: str) -> list[str]:
    """A string or a sequence of strings as a list, each checked."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, dict)) or not hasattr(texts, "__iter__"):
        raise ArgumentTypeError(f"{name}: expected a string or a sequence of strings, got {type(texts).__name__}")
    items = list(texts)
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise ArgumentTypeError(f"{name}[{i}]: expected a string, got {type(t).__name__}")
    return items


def _path(value: Any, name: str) -> Path:
    import os

    if not isinstance(value, (str, os.PathLike)):
        raise ArgumentTypeError(f"{name}: expected a folder path (str or Path), got {type(value).__name__}")
    if not str(value).strip():
        raise ArgumentError(f"{name}: empty; name a folder")
    return Path(value)


def _device(value: Any) -> torch.device:
    """``device=`` as a torch device that exists here."""
    if not isinstance(value, (str, torch.device)):
        raise ArgumentTypeError(
            f"device: expected a string such as 'cpu' or 'cuda:0', or a torch.device, got {type(value).__name__}"
        )
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise ArgumentError(f"device: {str(value)[:60]!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ArgumentError(f"device: {str(value)[:60]!r}: CUDA is not available here; use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ArgumentError(f"device: {str(value)[:60]!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ArgumentError(f"device: {str(value)[:60]!r}: MPS is not available here; use 'cpu'")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ArgumentError(f"device: {str(value)[:60]!r}: vlmtune runs on 'cpu', 'cuda' or 'mps'")
    return dev


def load(path: str | Path, device: str | torch.device | None = None, cache_dir: str | Path | None = None) -> Model:
    """Open a checkpoint folder (``runs/NAME/checkpoints/best``, or a folder written by
    ``vlmtune export --format vlmtune``) with every check evaluation applies, and load
    its model on ``device`` (default: the first GPU, else the CPU). ``cache_dir``: keep
    the frozen towers' features there (optional).

    Raises :class:`~vlmtune.errors.CheckpointError` for a folder that is not a
    checkpoint (a run folder: the message names its ``checkpoints/best``; a file; a
    missing, modified or foreign checkpoint), :class:`~vlmtune.errors.ArgumentError`
    (a ``ValueError``) for a ``device`` that is not one here (``"nope"``, ``"cuda"``
    without CUDA) and :class:`~vlmtune.errors.ArgumentTypeError` (a ``TypeError``) for an
    argument of the wrong type, each naming the argument."""
    from vlmtune.checkpoint import open_checkpoint

    folder = _path(path, "path")
    dev = _device(device) if device is not None else None  # before the checkpoint is read
    if cache_dir is not None:
        _path(cache_dir, "cache_dir")
    return Model(open_checkpoint(folder), dev, cache_dir)


__all__ = ["Grounding", "Model", "checkpoint_fingerprint", "fingerprint_parts", "load"]
