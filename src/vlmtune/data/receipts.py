"""Synthetic receipt-counting data set (the counting task's embedded default).

Each image shows 0..``max_count`` receipt-like papers (light, taller than wide, with
printed lines) on a varied background, rotated, scaled and partly overlapping, but each
at most :data:`MAX_HIDDEN_FRACTION` hidden. The output follows the counting format (docs/data.md,
"Data formats")::

    out_dir/
      images/receipts_00000.png ...
      train.jsonl  val.jsonl  test.jsonl   {"image", "question", "answer", "count"}
      boxes.json    image relative path -> list of receipt quadrilaterals
      meta.json     generator settings and per-split count histograms

Quadrilaterals are 4 ``[x, y]`` corner points in pixels (top-left, top-right,
bottom-right, bottom-left of the paper before rotation), listed in paint order
(bottom-most receipt first). They are exact for the drawn paper, so they can serve as
ground truth for "does attention fall inside a receipt".

Everything is drawn from ``numpy.random.default_rng([seed, index])``: no global RNG is
touched, and image ``i`` depends only on ``(seed, i)`` and the settings.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from vlmtune.console import progress
from vlmtune.runfolder import claim_generated, finish_generated, write_atomic, write_text
from vlmtune.tasks.counting.config import DEFAULT_ANSWERS, DEFAULT_QUESTIONS

__all__ = ["ANSWER_TEMPLATES", "MAX_HIDDEN_FRACTION", "QUESTIONS", "bucket_count", "generate_receipts"]

# The questions and answers (counts >= 1 as digits, zero as "no": one consistent style
# that vlmtune.metrics.text.parse_count reads back) are the counting templates' defaults
# (counting.question_templates / answer_templates), defined with the config.
QUESTIONS: tuple[str, ...] = DEFAULT_QUESTIONS
ANSWER_TEMPLATES: dict[str, tuple[str, ...]] = DEFAULT_ANSWERS

MAX_HIDDEN_FRACTION = 0.3
"""At most this fraction of any receipt's area is covered by receipts drawn above it."""

_SHOPS = (
    "FRESH MART",
    "CORNER SHOP",
    "CITY DELI",
    "GREEN GROCER",
    "BOOK NOOK",
    "CAFE LUNA",
    "HARDWARE CO",
    "PHARMA PLUS",
    "BAKERY 21",
    "SUPER SAVE",
    "THE MARKET",
    "FUEL STOP",
)
_ITEMS = (
    "MILK",
    "BREAD",
    "EGGS",
    "COFFEE",
    "APPLES",
    "RICE",
    "PASTA",
    "CHEESE",
    "SOAP",
    "TEA",
    "BUTTER",
    "JUICE",
    "NAILS",
    "TAPE",
    "PENS",
    "WATER",
    "SUGAR",
    "SALT",
)
# Paper is drawn at this width and then resized: PIL's default font needs ~6 px a
# character, so the text is laid out at a legible size and shrinks with the paper.
_PAPER_BASE_WIDTH = 120
_MAX_PLACEMENT_TRIES = 60


def bucket_count(count: int, buckets: list[int]) -> int:
    """Map a count to the index of its class.

    ``buckets`` are the ascending lower bounds of the classes; the last one is open
    ended. ``buckets=[0, 1, 2]`` gives classes 0 -> 0, 1 -> 1, 2 or more -> 2;
    ``[0, 1, 3]`` gives 0 -> 0, 1-2 -> 1, 3 or more -> 2.
    """
    if not buckets or any(b >= c for b, c in zip(buckets, buckets[1:])):
        raise ValueError(f"buckets must be strictly ascending and non-empty, got {buckets}")
    if count < buckets[0]:
        raise ValueError(f"count {count} is below the first bucket {buckets[0]}")
    index = 0
    for i, lower in enumerate(buckets):
        if count >= lower:
            index = i
    return index


def generate_receipts(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    max_count: int = 3,
    image_size: tuple[int, int] | int = 128,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write ``n`` synthetic receipt images with train/val/test JSONL annotations.

    A non-empty ``out_dir`` is refused unless ``overwrite``; the folder gets a marker
    (``.vlmtune-generated.json``) listing the files written.

    ``image_size`` is ``(width, height)`` or one int for a square. Splits take
    ``round(n * fraction)`` images (test takes the rest); within each split the counts
    cycle through 0..max_count before shuffling, so every split is as close to uniform
    as its size allows. Returns ``{"train": path, "val": path, "test": path}``.
    """
    width, height = _check_arguments(n, max_count, image_size, split_fractions)

    out = Path(out_dir)
    params = {"n": n, "seed": seed, "max_count": max_count, "image_size": [width, height]}
    claim_generated(out, "vlmtune.data.receipts", params, overwrite)
    (out / "images").mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    n_train = round(n * split_fractions[0])
    n_val = min(round(n * split_fractions[1]), n - n_train)
    sizes = {"train": n_train, "val": n_val, "test": n - n_train - n_val}

    # Split membership and counts come from their own stream, separate from the
    # per-image streams, so changing one never shifts the other.
    plan_rng = np.random.default_rng([seed, 0x5EED])
    boxes: dict[str, list[list[list[float]]]] = {}
    histograms: dict[str, dict[str, int]] = {}
    paths: dict[str, Path] = {}
    index = 0
    bar = progress(desc="generating receipts", total=sum(sizes.values()), unit="img")
    for split, size in sizes.items():
        counts = [i % (max_count + 1) for i in range(size)]
        plan_rng.shuffle(counts)
        histograms[split] = {str(c): counts.count(c) for c in range(max_count + 1)}
        records = []
        for count in counts:
            rng = np.random.default_rng([seed, index])
            image, quads = _render_image(rng, width, height, int(count))
            rel = f"images/receipts_{index:05d}.png"
            write_atomic(out / rel, lambda path, image=image: image.save(path, format="PNG"))
            written.append(out / rel)
            boxes[rel] = [[[round(x, 2), round(y, 2)] for x, y in q] for q in quads]
            records.append(
                {"image": rel, "question": str(rng.choice(QUESTIONS)), "answer": _answer(int(count), rng), "count": int(count)}
            )
            index += 1
            bar.update(1)
        paths[split] = out / f"{split}.jsonl"
        write_text(paths[split], "".join(json.dumps(r) + "\n" for r in records))
    bar.close()

    write_text(out / "boxes.json", json.dumps(boxes))
    meta = {
        "generator": "vlmtune.data.receipts.generate_receipts",
        "n": n,
        "seed": seed,
        "max_count": max_count,
        "image_size": [width, height],
        "split_fractions": list(split_fractions),
        "max_hidden_fraction": MAX_HIDDEN_FRACTION,
        "splits": {s: {"n": sizes[s], "count_histogram": histograms[s]} for s in sizes},
    }
    write_text(out / "meta.json", json.dumps(meta, indent=2))
    finish_generated(out, "vlmtune.data.receipts", params, [*written, *paths.values(), out / "boxes.json", out / "meta.json"])
    return paths


def _check_arguments(
    n: int, max_count: int, image_size: tuple[int, int] | int, split_fractions: tuple[float, float, float]
) -> tuple[int, int]:
    """(width, height) of ``image_size``, once every argument of :func:`generate_receipts` is checked."""
    width, height = (image_size, image_size) if isinstance(image_size, int) else image_size
    if n < 0 or max_count < 0:
        raise ValueError(f"n and max_count must be >= 0, got n={n}, max_count={max_count}")
    if width < 16 or height < 16:
        raise ValueError(f"image_size must be at least 16 px a side, got {image_size}")
    if len(split_fractions) != 3 or min(split_fractions) < 0 or not math.isclose(sum(split_fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"split_fractions must be 3 non-negative numbers summing to 1, got {split_fractions}")
    return width, height


def _answer(count: int, rng: np.random.Generator) -> str:
    key = "zero" if count == 0 else "one" if count == 1 else "many"
    return str(rng.choice(ANSWER_TEMPLATES[key])).format(n=count)


# --------------------------------------------------------------------------- drawing


def _render_image(
    rng: np.random.Generator, width: int, height: int, count: int
) -> tuple[Image.Image, list[list[tuple[float, float]]]]:
    """Draw one image with ``count`` receipts; return it and their quadrilaterals."""
    canvas = _background(rng, width, height)
    quads: list[list[tuple[float, float]]] = []
    masks: list[np.ndarray] = []  # full footprint of each placed receipt
    visible: list[np.ndarray] = []  # what is still uncovered of each
    # More receipts on the same canvas must be smaller to fit without heavy overlap.
    crowd = 1.0 if count <= 1 else 0.85 if count == 2 else 0.75 * (3 / count) ** 0.5
    for _ in range(count):
        scale = crowd * rng.uniform(0.5, 0.8)
        for attempt in range(_MAX_PLACEMENT_TRIES):
            if attempt and attempt % 15 == 0:
                scale *= 0.85  # crowded: shrink rather than give up
            placed = _try_place(rng, width, height, scale, masks, visible)
            if placed is not None:
                break
        else:  # pragma: no cover - the shrinking above makes this practically unreachable
            raise RuntimeError("could not place a receipt without hiding another")
        quad, mask, paper, angle = placed
        visible = [v & ~mask for v in visible]
        masks.append(mask)
        visible.append(mask.copy())
        quads.append(quad)
        _paste(canvas, paper, angle, quad)
    return canvas.convert("RGB"), quads


def _try_place(
    rng: np.random.Generator, width: int, height: int, scale: float, masks: list[np.ndarray], visible: list[np.ndarray]
) -> tuple[list[tuple[float, float]], np.ndarray, Image.Image, float] | None:
    """Propose one receipt; None when it leaves the image or hides too much of another."""
    paper = _paper(rng)
    # Height relative to the image, capped for wide images so papers stay portrait.
    h = scale * min(height, 1.6 * width)
    w = h * paper.width / paper.height
    angle = float(rng.uniform(-25, 25))
    t = math.radians(angle)
    # Extent of the rotated rectangle; the centre is drawn so all of it stays inside.
    ext_x = (abs(w * math.cos(t)) + abs(h * math.sin(t))) / 2
    ext_y = (abs(w * math.sin(t)) + abs(h * math.cos(t))) / 2
    if 2 * ext_x > width - 2 or 2 * ext_y > height - 2:
        return None
    cx = rng.uniform(ext_x + 1, width - ext_x - 1)
    cy = rng.uniform(ext_y + 1, height - ext_y - 1)
    # Corners in y-down pixels, rotated counter-clockwise on screen as PIL's rotate does.
    quad = []
    for dx, dy in ((-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)):
        quad.append((cx + dx * math.cos(t) + dy * math.sin(t), cy - dx * math.sin(t) + dy * math.cos(t)))
    mask = _polygon_mask(quad, width, height)
    area = mask.sum()
    if area == 0:
        return None
    for full, vis in zip(masks, visible):
        if (vis & ~mask).sum() < (1 - MAX_HIDDEN_FRACTION) * full.sum():
            return None
    return quad, mask, paper.resize((max(1, round(w)), max(1, round(h))), Image.Resampling.LANCZOS), angle


def _polygon_mask(quad: list[tuple[float, float]], width: int, height: int) -> np.ndarray:
    img = Image.new("L", (width, height), 0)
    ImageDraw.Draw(img).polygon(quad, fill=1)
    return np.asarray(img, dtype=bool)


def _paste(canvas: Image.Image, paper: Image.Image, angle: float, quad: list[tuple[float, float]]) -> None:
    """Composite ``paper`` onto ``canvas`` so that its corners land exactly on ``quad``."""
    t = math.radians(angle)
    cx = sum(x for x, _ in quad) / 4
    cy = sum(y for _, y in quad) / 4
    # One affine map from canvas to paper pixels (PIL's transform takes the inverse):
    # undo the translation, the rotation and the scale. Sub-pixel exact, unlike a
    # rotate(expand=True) pasted at a rounded offset.
    w = math.dist(quad[0], quad[1])
    h = math.dist(quad[1], quad[2])
    sx, sy = paper.width / w, paper.height / h
    cos, sin = math.cos(t), math.sin(t)
    coeffs = (
        sx * cos,
        -sx * sin,
        paper.width / 2 - sx * (cos * cx - sin * cy),
        sy * sin,
        sy * cos,
        paper.height / 2 - sy * (sin * cx + cos * cy),
    )
    layer = paper.convert("RGBA").transform(canvas.size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BICUBIC)
    canvas.alpha_composite(layer)


def _paper(rng: np.random.Generator) -> Image.Image:
    """One receipt at base resolution: shop name, 2-5 items with prices, TOTAL."""
    font = _font()
    n_items = int(rng.integers(2, 6))
    line_h = 12
    lines_h = line_h * (n_items + 5)
    # Taller than wide always; extra blank paper below the text varies the aspect.
    height = max(int(_PAPER_BASE_WIDTH * rng.uniform(1.5, 2.4)), lines_h + 16)
    tint = (int(rng.integers(238, 256)), int(rng.integers(234, 252)), int(rng.integers(220, 246)))
    paper = Image.new("RGB", (_PAPER_BASE_WIDTH, height), tint)
    draw = ImageDraw.Draw(paper)
    ink = tuple(int(v) for v in rng.integers(10, 70, size=3))
    y = 8
    shop = str(rng.choice(_SHOPS))
    draw.text(((_PAPER_BASE_WIDTH - draw.textlength(shop, font=font)) / 2, y), shop, fill=ink, font=font)
    y += line_h + 4
    draw.line((6, y, _PAPER_BASE_WIDTH - 6, y), fill=ink)
    y += 4
    total = 0.0
    for item in rng.choice(_ITEMS, size=n_items, replace=False):
        price = round(float(rng.uniform(0.5, 30.0)), 2)
        total += price
        _row(draw, font, y, str(item), f"{price:.2f}", ink)
        y += line_h
    draw.line((6, y + 2, _PAPER_BASE_WIDTH - 6, y + 2), fill=ink)
    _row(draw, font, y + 6, "TOTAL", f"{total:.2f}", ink)
    return paper


def _row(
    draw: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    y: int,
    left: str,
    right: str,
    ink: tuple[int, ...],
) -> None:
    draw.text((6, y), left, fill=ink, font=font)
    draw.text((_PAPER_BASE_WIDTH - 6 - draw.textlength(right, font=font), y), right, fill=ink, font=font)


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A solid, gradient, noise or wood-like background, kept darker than the paper."""
    kind = str(rng.choice(["solid", "gradient", "noise", "wood"]))

    def colour() -> np.ndarray:
        return rng.uniform(20, 180, size=3)

    if kind == "solid":
        pixels = np.broadcast_to(colour(), (height, width, 3))
    elif kind == "gradient":
        a, b = colour(), colour()
        theta = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:height, 0:width]
        proj = xx * math.cos(theta) + yy * math.sin(theta)
        s = (proj - proj.min()) / max(np.ptp(proj), 1e-6)
        pixels = a + s[..., None] * (b - a)
    elif kind == "noise":
        # Low-resolution noise upsampled: a blotchy texture rather than per-pixel static.
        cells = rng.uniform(-1, 1, size=(max(2, height // 16), max(2, width // 16), 1))
        small = Image.fromarray(((cells[..., 0] + 1) * 127.5).astype(np.uint8))
        blotch = np.asarray(small.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float64)[..., None] / 255
        fine = rng.normal(0, 0.05, size=(height, width, 1))
        pixels = colour() * (0.6 + 0.6 * blotch + fine)
    else:  # wood: sinusoidal grain along a random direction, brown hues
        base = np.array([rng.uniform(90, 160), rng.uniform(55, 100), rng.uniform(25, 60)])
        theta = rng.uniform(0, math.pi)
        yy, xx = np.mgrid[0:height, 0:width]
        along = -xx * math.sin(theta) + yy * math.cos(theta)
        across = xx * math.cos(theta) + yy * math.sin(theta)
        freq = rng.uniform(0.15, 0.45)
        grain = np.sin(freq * across + 2.0 * np.sin(0.03 * along + rng.uniform(0, 6)))
        pixels = base * (0.85 + 0.15 * grain[..., None]) + rng.normal(0, 4, size=(height, width, 1))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    if kind == "noise":
        image = image.filter(ImageFilter.GaussianBlur(0.6))
    return image.convert("RGBA")
