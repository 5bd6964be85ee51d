"""Synthetic "scenes" data set for cross-modal retrieval with grounding.

Each image holds 2-4 coloured shapes on a muted background; about a third also hold a
hollow container (a frame or a ring) with a small shape inside it. Each caption names
one object (the subject) and relates it to another (the reference); the record's box is
the subject's and its relation is computed from the drawn geometry, so labels are right
by construction, and so are its hard negatives (the opposite relation; the subject in a
colour absent from the image). Output is the documented grounding format, readable by
``read_pairs``.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vlmtune.console import progress
from vlmtune.data.formats import RELATIONS
from vlmtune.runfolder import claim_generated, finish_generated, write_atomic, write_text

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
CONTAINERS: tuple[str, ...] = ("frame", "ring")

_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("left of", "to the left of"),
    "right": ("right of", "to the right of"),
    "above": ("above", "on top of"),
    "below": ("below", "beneath", "under"),
    "inside": ("inside", "in", "within"),
    "outside": ("outside", "outside of"),
}
_TEMPLATES: tuple[str, ...] = (
    "the {s} {rel} the {r}",
    "a {s} {rel} the {r}",
    "the {s} that is {rel} the {r}",
    "there is a {s} {rel} a {r}",
    "{s} {rel} {r}",
)
# A spatial relation is only labelled when one axis of the centre offset is at least
# this many times the other, so no caption describes a near-diagonal placement.
_DOMINANCE = 2.0


@dataclass(frozen=True)
class _Obj:
    colour: str
    shape: str
    x: int
    y: int
    size: int
    width: int = 0  # outline width; > 0 marks a hollow container
    small: bool = False  # drawn inside a container; captions may say "small"

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Tight box [x, y, w, h]: the shape covers pixels x .. x+size-1."""
        return (self.x, self.y, self.size, self.size)

    @property
    def centre(self) -> tuple[float, float]:
        return (self.x + self.size / 2, self.y + self.size / 2)


def _overlaps(a: _Obj, b: _Obj, gap: int = 0) -> bool:
    """Whether the boxes of a and b come within ``gap`` pixels of each other."""
    return not (a.x + a.size + gap <= b.x or b.x + b.size + gap <= a.x or a.y + a.size + gap <= b.y or b.y + b.size + gap <= a.y)


def _is_inside(sub: _Obj, cont: _Obj) -> bool:
    """Whether sub lies wholly within the container's interior (not touching the outline)."""
    if cont.shape == "frame":
        lo_x, lo_y = cont.x + cont.width, cont.y + cont.width
        hi_x, hi_y = cont.x + cont.size - cont.width, cont.y + cont.size - cont.width
        return lo_x < sub.x and sub.x + sub.size < hi_x and lo_y < sub.y and sub.y + sub.size < hi_y
    cx, cy = cont.centre
    r_in = cont.size / 2 - cont.width - 1  # one pixel of slack for the rasterised outline
    corners = [(sub.x + dx, sub.y + dy) for dx in (0, sub.size) for dy in (0, sub.size)]
    return all(math.hypot(px - cx, py - cy) < r_in for px, py in corners)


def _relation(sub: _Obj, ref: _Obj) -> str | None:
    """The relation of sub to ref, or None when it would be ambiguous."""
    if sub.width:
        return None  # containers are only ever references
    if ref.width:
        if _is_inside(sub, ref):
            return "inside"
        return None if _overlaps(sub, ref) else "outside"
    dx = sub.centre[0] - ref.centre[0]
    dy = sub.centre[1] - ref.centre[1]
    # Also require the boxes to be apart along the dominant axis.
    if abs(dx) >= _DOMINANCE * abs(dy) and abs(dx) >= (sub.size + ref.size) / 2:
        return "left" if dx < 0 else "right"
    if abs(dy) >= _DOMINANCE * abs(dx) and abs(dy) >= (sub.size + ref.size) / 2:
        return "above" if dy < 0 else "below"
    return None


def _place(
    rng: random.Random,
    size: int,
    lo: tuple[int, int],
    hi: tuple[int, int],
    others: list[_Obj],
    colour: str,
    shape: str,
    gap: int,
    width: int = 0,
    small: bool = False,
    tries: int = 60,
) -> _Obj | None:
    """Random position for a shape with its box in [lo, hi), clear of ``others``."""
    if hi[0] - size < lo[0] or hi[1] - size < lo[1]:
        return None
    for _ in range(tries):
        obj = _Obj(colour, shape, rng.randint(lo[0], hi[0] - size), rng.randint(lo[1], hi[1] - size), size, width, small)
        if not any(_overlaps(obj, o, gap) for o in others):
            return obj
    return None


def _layout(rng: random.Random, s: int, with_container: bool) -> list[_Obj] | None:
    """Objects of one image, or None when this attempt did not fit (the caller retries)."""
    margin, gap = 2, max(2, s // 32)
    combos = [(c, sh) for c in COLOURS for sh in SHAPES]
    rng.shuffle(combos)
    small_lo, small_hi = max(6, round(0.14 * s)), max(8, round(0.24 * s))
    objs: list[_Obj] = []
    inner: list[_Obj] = []
    if with_container:
        kind = rng.choice(CONTAINERS)
        width = max(2, s // 32)
        cont = _place(
            rng,
            rng.randint(round(0.42 * s), round(0.58 * s)),
            (margin, margin),
            (s - margin, s - margin),
            [],
            rng.choice(list(COLOURS)),
            kind,
            gap,
            width,
        )
        assert cont is not None
        # Interior square available to inner shapes: the frame's inside, or the square
        # inscribed in the ring's inner circle.
        if kind == "frame":
            pad = width + 2
            lo, side = (cont.x + pad, cont.y + pad), cont.size - 2 * pad
        else:
            side = int((cont.size / 2 - width - 2) * math.sqrt(2))
            lo = (round(cont.centre[0] - side / 2), round(cont.centre[1] - side / 2))
        hi = (lo[0] + side, lo[1] + side)
        n_inner = 2 if kind == "frame" and rng.random() < 0.35 else 1
        for _ in range(n_inner):
            size = rng.randint(max(5, side // 4), max(6, side // 2))
            c, sh = combos.pop()
            obj = _place(rng, size, lo, hi, inner, c, sh, gap, small=True)
            if obj is None or not _is_inside(obj, cont):
                return None
            inner.append(obj)
        objs = [cont, *inner]
        n_outer = rng.randint(1, 4 - len(objs)) if len(objs) < 4 else 0
    else:
        n_outer = rng.randint(2, 4)
    for _ in range(n_outer):
        c, sh = combos.pop()
        obj = _place(rng, rng.randint(small_lo, small_hi), (margin, margin), (s - margin, s - margin), objs, c, sh, gap)
        if obj is None:
            return None
        objs.append(obj)
    return objs


def _describe(obj: _Obj, rng: random.Random) -> str:
    """Noun phrase for an object, unique within its image by (colour, shape)."""
    small = "small " if obj.small and rng.random() < 0.5 else ""
    return f"{small}{obj.colour} {obj.shape}"


_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above", "inside": "outside", "outside": "inside"}


def _articles(text: str) -> str:
    """English article before a vowel ("an orange square")."""
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i] == "a" and words[i + 1][0] in "aeiou":
            words[i] = "an"
    return " ".join(words)


def _caption(
    sub: _Obj, ref: _Obj, rel: str, rng: random.Random, objs: list[_Obj], neg_rng: random.Random
) -> tuple[str, list[str]]:
    """A caption of (sub, rel, ref) and its hard negatives: the same words with the
    opposite relation, and with the subject in a colour (drawn from ``neg_rng``) no
    object of its shape has in this image. Both are false of the image; neither draws
    from ``rng``, so images and captions are those of generator version 1."""
    template = rng.choice(_TEMPLATES)
    s, r = _describe(sub, rng), _describe(ref, rng)
    phrase = rng.choice(_PHRASES[rel])
    text = _articles(template.format(s=s, r=r, rel=phrase))
    opposite = _PHRASES[_OPPOSITE[rel]]
    negatives = [_articles(template.format(s=s, r=r, rel=opposite[_PHRASES[rel].index(phrase) % len(opposite)]))]
    taken = {o.colour for o in objs if o.shape == sub.shape}
    others = [c for c in COLOURS if c not in taken]
    if others:
        other = neg_rng.choice(others)
        negatives.append(_articles(template.format(s=s.replace(sub.colour, other, 1), r=r, rel=phrase)))
    return text, negatives


def _captions(objs: list[_Obj], rng: random.Random) -> list[tuple[_Obj, _Obj, str]]:
    """Pick 2-4 (subject, reference, relation) triples for one image."""
    cands = [(a, b, r) for a in objs for b in objs if a is not b and (r := _relation(a, b))]
    inside = [t for t in cands if t[2] == "inside"]
    outside = [t for t in cands if t[2] == "outside"]
    rng.shuffle(outside)
    # Container images always describe their inside and outside objects: those are the
    # rarer relations, and this keeps the six classes roughly balanced.
    chosen = inside + outside[:1]
    rest = [t for t in cands if t not in chosen]
    rng.shuffle(rest)
    # Prefer pairs not yet described; a reversed pair ("b right of a") only as filler.
    rest.sort(key=lambda t: any({t[0].box, t[1].box} == {c[0].box, c[1].box} for c in chosen))
    k = max(rng.randint(2, 4), len(chosen))
    chosen += rest[: k - len(chosen)]
    rng.shuffle(chosen)
    return chosen


def _background(rng: np.random.Generator, s: int) -> Image.Image:
    """A muted grey, slightly tinted, sometimes with a soft gradient."""
    base = rng.integers(40, 110) + rng.integers(-12, 13, size=3)
    img = np.broadcast_to(base.astype(np.float64), (s, s, 3)).copy()
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:s, 0:s] / max(s - 1, 1) - 0.5
        img += (rng.uniform(10, 25) * (math.cos(angle) * xx + math.sin(angle) * yy))[..., None]
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), mode="RGB")


def _draw(img: Image.Image, objs: list[_Obj], rng: random.Random) -> None:
    draw = ImageDraw.Draw(img)
    for o in objs:
        # Slight colour jitter so that colour names are not single RGB values.
        fill = tuple(min(255, max(0, v + rng.randint(-12, 12))) for v in COLOURS[o.colour])
        x0, y0, x1, y1 = o.x, o.y, o.x + o.size - 1, o.y + o.size - 1
        mid_x, mid_y = (x0 + x1) / 2, (y0 + y1) / 2
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(mid_x, y0), (x1, y1), (x0, y1)], fill=fill)
        elif o.shape == "diamond":
            draw.polygon([(mid_x, y0), (x1, mid_y), (mid_x, y1), (x0, mid_y)], fill=fill)
        elif o.shape == "frame":
            draw.rectangle((x0, y0, x1, y1), outline=fill, width=o.width)
        elif o.shape == "ring":
            draw.ellipse((x0, y0, x1, y1), outline=fill, width=o.width)


def _split_counts(n: int, fractions: tuple[float, float, float]) -> list[int]:
    """Images per split; every split with a positive fraction gets at least one."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split_fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    counts = [round(n * f) for f in fractions[:2]]
    counts.append(n - sum(counts))
    for i, f in enumerate(fractions):
        if f > 0 and counts[i] <= 0:
            donor = max(range(3), key=lambda j: counts[j])
            counts[donor] -= 1 - counts[i]
            counts[i] = 1
    if min(counts) < 0 or any(f > 0 and c == 0 for f, c in zip(fractions, counts)):
        raise ValueError(f"n={n} is too small for split_fractions {fractions}")
    return counts


def generate_scenes(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    image_size: int = 96,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write ``n`` scene images and train/val/test grounding JSON files under ``out_dir``.

    Deterministic for a given seed. Splits are by image. Returns the three JSON paths.
    A non-empty ``out_dir`` is refused unless ``overwrite``; the folder gets a marker
    (``.vlmtune-generated.json``) listing the files written.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if image_size < 48:
        raise ValueError(f"image_size must be >= 48 for shapes to fit, got {image_size}")
    counts = _split_counts(n, split_fractions)
    out = Path(out_dir)
    params = {"n": n, "seed": seed, "image_size": image_size}
    claim_generated(out, "vlmtune.data.scenes", params, overwrite)
    (out / "images").mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    records: list[list[dict[str, object]]] = []
    for i in progress(range(n), desc="generating scenes", unit="img"):
        # One generator per image (string seeds hash stably), so scene i does not
        # depend on n and never on global random state.
        rng = random.Random(f"vlmtune.scenes:{seed}:{i}")
        np_rng = np.random.default_rng(rng.getrandbits(64))
        with_container = i % 3 == 2  # exactly every third image: inside/outside always occur
        for _ in range(1000):  # a few retries at most in practice
            objs = _layout(rng, image_size, with_container)
            triples = _captions(objs, rng) if objs else []
            if len(triples) >= 2:
                break
        else:
            raise RuntimeError(f"could not lay out scene {i} at image_size={image_size}")
        img = _background(np_rng, image_size)
        assert objs is not None  # the loop above ends on a layout with captions
        _draw(img, objs, rng)
        rel_path = f"images/scene_{i:05d}.png"
        write_atomic(out / rel_path, lambda path, img=img: img.save(path, format="PNG"))
        written.append(out / rel_path)
        recs: list[dict[str, object]] = []
        neg_rng = random.Random(f"vlmtune.scenes.negatives:{seed}:{i}")
        for sub, ref, rel in triples:
            text, negatives = _caption(sub, ref, rel, rng, objs, neg_rng)
            recs.append({"image": rel_path, "text": text, "bbox": list(sub.box), "relation": rel, "negatives": negatives})
        records.append(recs)

    order = list(range(n))
    random.Random(f"vlmtune.scenes.split:{seed}").shuffle(order)
    paths: dict[str, Path] = {}
    meta_counts: dict[str, dict[str, int]] = {}
    start = 0
    for name, count in zip(("train", "val", "test"), counts):
        idx = sorted(order[start : start + count])
        start += count
        split = [r for i in idx for r in records[i]]
        paths[name] = out / f"{name}.json"
        write_text(paths[name], json.dumps(split, indent=1) + "\n")
        meta_counts[name] = {"images": len(idx), "records": len(split)}

    all_rel = [r["relation"] for recs in records for r in recs]
    meta = {
        "generator": "vlmtune.data.scenes",
        "version": 2,  # 2: each record carries hard negative captions (images and captions as in 1)
        "n": n,
        "seed": seed,
        "image_size": image_size,
        "split_fractions": list(split_fractions),
        "counts": meta_counts,
        "relations": {rel: all_rel.count(rel) for rel in RELATIONS},
    }
    write_text(out / "meta.json", json.dumps(meta, indent=1) + "\n")
    finish_generated(out, "vlmtune.data.scenes", params, [*written, *paths.values(), out / "meta.json"])
    return paths
