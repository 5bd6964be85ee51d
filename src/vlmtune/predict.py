"""Answer a question about one image with a counting checkpoint, and show where the
answer looks.

``predict_image`` generates the answer (beam search, as the final evaluation), reads
the count head's class and confidence, and, on request, the answer's attention over
the image: one extra teacher-forced pass over prompt + generated answer with eager
attention (SDPA returns no attention weights). The attention to the image tokens from
the position that produces the answer token stating the count ("3" in "There are 3
receipts."; all answer tokens when none states a count), averaged over every layer and
head, is renormalised over the image tokens and mapped back onto the image: each tile's
``sqrt(tokens_per_tile)`` x ``sqrt(tokens_per_tile)`` grid (after pixel shuffle) onto
the tile's place in the image, the thumbnail's grid onto the whole image. The map is a
density: a token's mass is spread evenly over the pixels it covers, so the map sums to
1 and its sum inside a region is the share of attention that region receives.

Why the count token: the other answer tokens ("There are", "receipts.") are the same
for every image and attend nearly uniformly; averaging them in washes the map out (the
measure below reports both readings).

``attention_inside_receipts`` measures that share inside the receipts of the synthetic
set (``boxes.json``) against the receipts' share of the image area.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from vlmtune.backbone import lm_states, preprocess_images
from vlmtune.checkpoint import open_checkpoint
from vlmtune.config import Config, evaluation_config
from vlmtune.data.counting import count_class, tile_grid
from vlmtune.data.formats import load_image
from vlmtune.errors import CheckpointError, DataError, VlmtuneError
from vlmtune.metrics.text import parse_count
from vlmtune.restore import load_model
from vlmtune.tasks import build_task, task_spec
from vlmtune.tasks.counting import CountingModel, class_names, decode, generate_answers, prompt_builder

if TYPE_CHECKING:
    from vlmtune.tasks.counting.config import CountingConfig, GenerationConfig

DEFAULT_QUESTION = "How many receipts are in this image?"


@dataclass
class Prediction:
    answer: str
    count: int  # class index of the count head
    count_label: str  # "3", or a bucket such as "2+"
    confidence: float  # softmax probability of that class
    probabilities: list[float]
    num_tiles: int
    grid: tuple[int, int]  # (columns, rows) of the tiles, thumbnail not included
    heatmap: np.ndarray | None = field(default=None, repr=False)  # [H, W], sums to 1 (the count token's attention)
    heatmap_all: np.ndarray | None = field(default=None, repr=False)  # the same over all answer tokens
    answer_count: int | None = None  # the count the answer states (None: it states none)
    agrees: bool | None = None  # whether that count falls in the head's class (None: no count stated)
    disagreement: str | None = None  # a sentence saying how head and answer differ; None when they agree

    def to_json(self) -> dict[str, Any]:
        out = {
            "answer": self.answer,
            "count": self.count,
            "count_label": self.count_label,
            "confidence": round(self.confidence, 4),
            "probabilities": [round(p, 4) for p in self.probabilities],
            "num_tiles": self.num_tiles,
            "grid": list(self.grid),
            "answer_count": self.answer_count,
            "head_agrees": self.agrees,
        }
        if self.disagreement:
            out["disagreement"] = self.disagreement
        return out


def head_answer_check(
    answer: str, label: str, klass: int, confidence: float, to_class: Any
) -> tuple[int | None, bool | None, str | None]:
    """(the answer's count, whether its class ``to_class(count)`` is the head's, and the
    sentence to print when not): head and answer are two readings of one model and
    may differ; a user should not have to spot it."""
    stated = parse_count(answer)
    if stated is None:
        return None, None, f"the answer states no count; the count head says {label} ({100 * confidence:.0f}%)"
    if to_class(stated) == klass:
        return stated, True, None
    return stated, False, f"the answer says {stated}, the count head says {label} ({100 * confidence:.0f}%): they disagree"


def load_counting_checkpoint(
    path: str | Path,
    device: torch.device | None = None,
    trust_remote_code: bool = False,
    overrides: list[str] | None = None,
    what: str = "predict",
) -> tuple[CountingModel, Config]:
    """A counting checkpoint's model with its trained weights, in eval mode, and its
    config with ``overrides`` (generation.*, data.*, eval.* only) applied
    (``trust_remote_code``: the user's flag; the checkpoint's config is not asked)."""
    ckpt = open_checkpoint(path)
    if "ask" not in task_spec(ckpt.cfg.task).serves:  # a task whose checkpoints answer questions
        raise CheckpointError(f"{ckpt.folder}: is a '{ckpt.cfg.task}' checkpoint; {what} needs a counting one")
    cfg = evaluation_config(ckpt.cfg, overrides, what)
    model, _ = load_model(ckpt, device, trust_remote_code=trust_remote_code, cfg=cfg)
    return model, cfg


@torch.no_grad()
def predict_image(
    model: CountingModel,
    cfg: Config,
    image: Image.Image,
    question: str = DEFAULT_QUESTION,
    attention: bool = False,
    heatmap_size: tuple[int, int] | None = None,
) -> Prediction:
    """Answer, count and (optionally) the answer's attention map at ``heatmap_size``
    (width, height; default the image's own size)."""
    bb = model.backbone
    device = next(model.parameters()).device
    counting: CountingConfig = cfg.section("counting")
    max_tiles = counting.max_dynamic_patch
    pixel_values, tiles = preprocess_images(bb.image_processor, [image], max_tiles)
    n = int(tiles[0])
    pixel_values = pixel_values.to(device)
    prompt = torch.tensor([prompt_builder(bb, counting).prompt_ids(question, n)], device=device)
    mask = torch.ones_like(prompt)

    hidden = model.hidden_states(prompt, mask, pixel_values)
    probs = model.count_logits(hidden, prompt, torch.tensor([prompt.shape[1] - 1], device=device)).softmax(-1)[0]
    k = int(probs.argmax())
    g: GenerationConfig = cfg.section("generation")
    ids = generate_answers(model, prompt, mask, pixel_values, max_new_tokens=g.max_new_tokens, num_beams=g.num_beams)
    answer = decode(bb.tokenizer, ids)[0]

    cols, rows = tile_grid(bb.image_processor, *image.size, max_tiles)
    expected = 1 if cols * rows == 1 else cols * rows + 1
    if expected != n:  # pragma: no cover - the processor and tile_grid share one rule
        raise RuntimeError(f"processor made {n} tiles, the grid {cols}x{rows} implies {expected}")
    heat: dict[str, np.ndarray | None] = {"count": None, "all": None}
    if attention:
        side = math.isqrt(bb.info.tokens_per_tile)
        for key, masses in answer_image_attentions(model, prompt, pixel_values, ids[0]).items():
            heat[key] = attention_heatmap(masses.reshape(n, side, side), (cols, rows), heatmap_size or image.size)
    label = class_names(counting)[k]
    stated, agrees, note = head_answer_check(answer, label, k, float(probs[k]), lambda c: count_class(c, counting.buckets))
    return Prediction(
        answer,
        k,
        label,
        float(probs[k]),
        [float(p) for p in probs],
        n,
        (cols, rows),
        heat["count"],
        heat["all"],
        stated,
        agrees,
        note,
    )


def count_token_index(tokenizer: Any, answer_ids: list[int]) -> int | None:
    """Position in the answer of the first token that states the count ("3", "three",
    "no", "a"), or None when the answer states none."""
    for i, t in enumerate(answer_ids):
        text = tokenizer.decode([t], skip_special_tokens=True).strip().lower()
        if text and (parse_count(text) is not None or text in ("no", "a", "an")):
            return i
    return None


@torch.no_grad()
def answer_image_attention(
    model: CountingModel, prompt: torch.Tensor, pixel_values: torch.Tensor, answer_ids: torch.Tensor, query: str = "count"
) -> np.ndarray:
    """Attention of the answer to each image token, [image tokens], summing to 1.

    The queries are the positions that produce answer tokens (a token is predicted at
    the position before it). ``query="count"`` keeps the one that produces the token
    stating the count, the answer token that depends on the image (falling back to all
    of them when the answer states no count); ``"all"`` averages every answer token,
    most of which ("There are", "receipts.") are the same for every image. Weights are
    averaged over all layers and heads, then renormalised over the image tokens.
    """
    masses = answer_image_attentions(model, prompt, pixel_values, answer_ids)
    return masses[query]


@torch.no_grad()
def answer_image_attentions(
    model: CountingModel, prompt: torch.Tensor, pixel_values: torch.Tensor, answer_ids: torch.Tensor
) -> dict[str, np.ndarray]:
    """{"count": ..., "all": ...}: both readings of :func:`answer_image_attention` from one pass."""
    bb = model.backbone
    pad = bb.tokenizer.pad_token_id
    answer = answer_ids[answer_ids != pad] if pad is not None else answer_ids
    if answer.numel() == 0:  # an empty answer: the query is the position that ended it
        answer = answer_ids[:1]
    ids = torch.cat([prompt[0], answer.to(prompt.device)]).unsqueeze(0)
    previous = bb.model.config._attn_implementation
    bb.set_attention("eager")
    try:
        embeds = bb.embed_multimodal(ids, pixel_values)
        out = lm_states(bb.language_model, torch.ones_like(ids), inputs_embeds=embeds, output_attentions=True)
    finally:
        bb.set_attention(previous)
    att = torch.stack([a[0].float() for a in out.attentions]).mean(dim=(0, 1))  # [L, L]
    p = prompt.shape[1]
    image = (ids[0] == bb.image_token_id).nonzero().flatten()
    rows = att[p - 1 : p - 1 + answer.numel()][:, image]  # positions predicting answer tokens
    k = count_token_index(bb.tokenizer, answer.tolist())
    out_masses = {"all": rows.mean(0), "count": rows[k] if k is not None else rows.mean(0)}
    return {key: (m / m.sum().clamp_min(1e-12)).cpu().numpy() for key, m in out_masses.items()}


def _spread(cells: np.ndarray, width: int, height: int) -> np.ndarray:
    """Each cell's mass spread evenly over the pixels whose centres fall in it."""
    a, b = cells.shape
    ys = np.minimum(((np.arange(height) + 0.5) * a / height).astype(int), a - 1)
    xs = np.minimum(((np.arange(width) + 0.5) * b / width).astype(int), b - 1)
    per_cell = np.outer(np.bincount(ys, minlength=a), np.bincount(xs, minlength=b)).astype(np.float64)
    density = np.divide(cells, per_cell, out=np.zeros_like(cells, dtype=np.float64), where=per_cell > 0)
    return density[ys][:, xs]


def attention_heatmap(masses: np.ndarray, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Token masses [tiles, s, s] -> attention per pixel [H, W] of an image of ``size`` (W, H).

    Tiles 0..cols*rows-1 are the grid, row-major, each covering its cell of the image;
    a last extra tile is the thumbnail, covering the whole image.
    """
    cols, rows = grid
    n, s, _ = masses.shape
    width, height = size
    if n == 1:
        mosaic, thumb = masses[0], None
    else:
        mosaic = masses[: cols * rows].reshape(rows, cols, s, s).transpose(0, 2, 1, 3).reshape(rows * s, cols * s)
        thumb = masses[cols * rows]
    heat = _spread(mosaic.astype(np.float64), width, height)
    if thumb is not None:
        heat = heat + _spread(thumb.astype(np.float64), width, height)
    total = heat.sum()
    return heat / total if total > 0 else heat


def save_overlay(image: Image.Image, pred: Prediction, path: str | Path, question: str = "") -> Path:
    """The image with the answer's attention over it, the tile grid and the answer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if pred.heatmap is None:
        raise ValueError("the prediction has no attention map (predict_image(..., attention=True))")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = image.size
    heat = pred.heatmap
    fig_w = 6.0
    fig, ax = plt.subplots(figsize=(fig_w, fig_w * h / w + 0.9), dpi=110)
    ax.imshow(image, extent=(0, w, h, 0))
    # The map is the count token's attention mass per pixel (it sums to 1 over the
    # image), shown against an even spread: 1 = the uniform share, 4 = four times it.
    relative = heat * heat.size
    shown = ax.imshow(
        relative,
        cmap="jet",
        alpha=0.45,
        extent=(0, w, h, 0),
        interpolation="bilinear",
        vmin=0.0,
        vmax=max(float(relative.max()), 1e-12),
    )
    bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    bar.set_label("count token's attention / even spread (1 = uniform)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    cols, rows = pred.grid
    for c in range(1, cols):
        ax.axvline(c * w / cols, color="white", lw=0.8, ls="--")
    for r in range(1, rows):
        ax.axhline(r * h / rows, color="white", lw=0.8, ls="--")
    ax.set_axis_off()
    title = f"{pred.answer}\nhead: {pred.count_label} ({100 * pred.confidence:.0f}%)"
    ax.set_title(f"Q: {question}\nA: {title}" if question else title, fontsize=9)
    fig.tight_layout()
    from vlmtune.runfolder import write_atomic

    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))  # never through a link at ``path``
    finally:
        plt.close(fig)
    return path


def predict_file(
    checkpoint: str | Path,
    image_path: str | Path,
    question: str = DEFAULT_QUESTION,
    attention_out: str | Path | None = None,
    trust_remote_code: bool = False,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """``vlmtune predict``: load, answer, optionally write the attention picture."""
    from vlmtune.utils import path_mistake

    if not isinstance(question, str) or not question.strip():
        raise VlmtuneError("--question: empty; ask a question (or leave --question out for the default one)")
    for flag, path, what in (("--image", image_path, "an image file"), ("--attention-out", attention_out, "a PNG file")):
        why = path_mistake(path, "file", what) if path is not None else None
        if why is not None:  # before the model loads
            raise VlmtuneError(f"{flag} {why}")
    model, cfg = load_counting_checkpoint(checkpoint, trust_remote_code=trust_remote_code, overrides=overrides)
    image = load_image(Path(image_path))
    # The overlay is drawn at most 768 px on its long side; any photo size works.
    scale = min(1.0, 768 / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    pred = predict_image(model, cfg, image, question, attention=attention_out is not None, heatmap_size=size)
    out = pred.to_json()
    out["image"] = str(image_path)
    out["question"] = question
    if attention_out is not None:
        shown = image if size == image.size else image.resize(size, Image.Resampling.BILINEAR)
        out["attention_out"] = str(save_overlay(shown, pred, attention_out, question))
    return out


# --------------------------------------------------------------------------- measure


def receipt_mask(quads: list[list[list[float]]], size: tuple[int, int]) -> np.ndarray:
    """Union of the receipt quadrilaterals as a boolean [H, W] mask."""
    img = Image.new("L", size, 0)
    draw = ImageDraw.Draw(img)
    for q in quads:
        draw.polygon([tuple(p) for p in q], fill=1)
    return np.asarray(img, dtype=bool)


def attention_inside_receipts(
    checkpoint: str | Path,
    data: str | Path | None = None,
    boxes: str | Path | None = None,
    limit: int | None = None,
    image_root: str | Path | None = None,
    trust_remote_code: bool = False,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Share of the answer's attention inside the receipts vs their share of the image
    area, averaged over the images with at least one receipt.

    ``data``: a counting JSONL (default: the checkpoint's test split); ``boxes``: the
    synthetic set's boxes.json (default: next to ``data``).
    """
    ckpt = open_checkpoint(checkpoint)
    from vlmtune.utils import path_mistake

    given = Path(data) if data else None
    data = Path(data or ckpt.state.data_paths.get("test", ""))
    for p, what in ((given, "a counting annotation file"), (Path(boxes) if boxes else None, "a boxes.json file")):
        why = path_mistake(p, "file", what) if p is not None else None
        if why is not None:
            raise DataError(why)
    if not data.is_file():
        raise DataError(f"{data}: counting annotation file not found (pass --data)")
    boxes = Path(boxes) if boxes else data.parent / "boxes.json"
    if not boxes.is_file():
        raise DataError(f"{boxes}: receipt boxes not found (the synthetic set writes boxes.json; pass --boxes)")
    quads = {(boxes.parent / k).resolve(): v for k, v in json.loads(boxes.read_text()).items()}
    model, cfg = load_counting_checkpoint(checkpoint, trust_remote_code=trust_remote_code, overrides=overrides, what="attention")
    inside, inside_all, area, rows = [], [], [], []
    # The task's reader: data.on_error, data.max_text_chars, ... as overridden; --image-root as given.
    if image_root is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_root=str(image_root)))
    records = [r for r in build_task(cfg).read_split(str(data), "test") if r.count >= 1]
    from vlmtune.console import progress

    # A generation with attention per image: seconds each on a CPU (a bar, or lines in a log).
    for r in progress(records[:limit], desc="attention", unit="img"):
        if r.image not in quads:
            raise DataError(f"{r.source}: image {r.image} has no entry in {boxes}")
        image = load_image(r.image, r.source)
        pred = predict_image(model, cfg, image, r.question, attention=True)
        mask = receipt_mask(quads[r.image], image.size)
        assert pred.heatmap is not None and pred.heatmap_all is not None  # attention=True gives both
        inside.append(float(pred.heatmap[mask].sum()))
        inside_all.append(float(pred.heatmap_all[mask].sum()))
        area.append(float(mask.mean()))
        rows.append(
            {
                "image": str(r.image),
                "count": r.count,
                "answer": pred.answer,
                "inside": round(inside[-1], 4),
                "inside_all_tokens": round(inside_all[-1], 4),
                "area": round(area[-1], 4),
            }
        )
    if not inside:
        raise DataError(f"{data}: no image with a receipt")
    ins, ins_all, ar = np.array(inside), np.array(inside_all), np.array(area)
    return {
        "attention/inside_share": 100.0 * float(ins.mean()),
        "attention/area_share": 100.0 * float(ar.mean()),
        "attention/ratio": float(ins.mean() / ar.mean()),
        "attention/images_above_area": 100.0 * float((ins > ar).mean()),
        "attention/inside_share_all_tokens": 100.0 * float(ins_all.mean()),
        "attention/ratio_all_tokens": float(ins_all.mean() / ar.mean()),
        "attention/n_images": len(inside),
        "data": str(data),
        "per_image": rows,
    }
