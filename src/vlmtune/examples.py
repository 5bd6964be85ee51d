"""Per-query results of an evaluation: rankings JSONL files and ``examples.html``.

``examples.html`` is one self-contained page (thumbnails as data URIs, inline CSS, no
script and no external request) that a person reads in a browser. It shows a sample
of queries, the worst first, then a random draw from the rest (seeded):

- retrieval, text to image: the caption, its ground-truth rank, the top 5 images with
  their scores, the ground truth framed in green (and shown after them when it is
  not among them); for grounding records the image with the true box (green) and
  the predicted box (red) drawn on it.
- retrieval, image to text: the image, its top 5 captions with scores, the ground
  truth marked.
- counting: the image, the answer's attention over it (the count token's, as
  ``vlmtune predict --attention-out`` draws it), the true and predicted counts (head
  and answer) and the generated answer.

Worst first: a caption or image whose ground truth ranks lowest; for counting, a
wrong answer and a wrong head before a right one, then the lowest probability of the
true count.
"""

from __future__ import annotations

import base64
import html
import io
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from vlmtune.runfolder import write_file

THUMB = 160  # thumbnail side (longest), pixels
TOP_SHOWN = 5
GREEN, RED = (22, 163, 74), (220, 38, 38)


def write_rankings(folder: Path, details: dict[str, list[dict[str, Any]]]) -> list[Path]:
    """``rankings_NAME.jsonl`` per kind of query (t2i, i2t, counting): one line per query."""
    written = []
    for name, rows in details.items():
        path = folder / f"rankings_{name}.jsonl"
        write_file(path, "".join(json.dumps(row) + "\n" for row in rows))  # a link there is refused, not followed
        written.append(path)
    return written


def sample_queries(
    rows: list[dict[str, Any]], n: int, badness: Callable[[dict[str, Any]], Any], seed: int = 0
) -> list[tuple[str, dict[str, Any]]]:
    """About half of ``n`` worst rows (highest ``badness``, ties in row order), then a
    seeded random draw from the others; each tagged "worst" or "random"."""
    if n <= 0 or not rows:
        return []
    order = sorted(range(len(rows)), key=lambda i: badness(rows[i]), reverse=True)
    n_worst = min(len(rows), (n + 1) // 2)
    worst = order[:n_worst]
    rest = sorted(order[n_worst:])
    rng = random.Random(seed)
    drawn = sorted(rng.sample(rest, min(len(rest), n - n_worst)))
    return [("worst", rows[i]) for i in worst] + [("random", rows[i]) for i in drawn]


# --------------------------------------------------------------------------- images


def _open(path: str) -> Image.Image:
    from vlmtune.data.formats import load_image

    return load_image(Path(path))


def _thumb(image: Image.Image, side: int = THUMB) -> tuple[Image.Image, float]:
    """A copy ``side`` pixels on its long side (small images are enlarged so they can be
    seen); returns it and the scale applied."""
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.convert("RGB").resize(size, Image.Resampling.BILINEAR), scale


def _draw_boxes(image: Image.Image, scale: float, boxes: list[tuple[list[float], tuple[int, int, int]]]) -> Image.Image:
    draw = ImageDraw.Draw(image)
    width = max(2, round(max(image.size) / 80))
    for box, colour in boxes:
        x0, y0, x1, y1 = (v * scale for v in box)
        draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=colour, width=width)
    return image


def data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class _Thumbs:
    """Data URIs of plain thumbnails, made once per image path."""

    def __init__(self) -> None:
        self.cache: dict[str, str] = {}

    def __call__(self, path: str) -> str:
        if path not in self.cache:
            self.cache[path] = data_uri(_thumb(_open(path))[0])
        return self.cache[path]


def _img(src: str, alt: str, cls: str = "") -> str:
    return f'<img src="{src}" alt="{html.escape(alt)}"{f" class={chr(34)}{cls}{chr(34)}" if cls else ""}>'


# --------------------------------------------------------------------------- page


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1f2937;background:#f9fafb}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d1d5db;padding-bottom:4px}
.meta{color:#4b5563;font-size:13px;margin-bottom:12px}.meta code{background:#e5e7eb;padding:1px 4px;border-radius:3px}
.card{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:12px 14px;margin:12px 0}
.q{font-size:15px;margin-bottom:8px}.tag{display:inline-block;font-size:11px;padding:1px 6px;border-radius:9px;margin-right:6px;
background:#e5e7eb;color:#374151;text-transform:uppercase;letter-spacing:.03em}.tag.worst{background:#fee2e2;color:#991b1b}
.row{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
figure{margin:0;text-align:center;font-size:12px;color:#374151;max-width:170px}
figure img{display:block;border:3px solid #e5e7eb;border-radius:4px;margin:0 auto 3px;max-width:164px}
figure.gt img{border-color:#16a34a}figure.gt figcaption{color:#15803d;font-weight:600}
figure.query img{border-color:#6b7280}
ol.captions{margin:0;padding-left:22px;font-size:14px}ol.captions li{margin:3px 0}ol.captions li.gt{color:#15803d;font-weight:600}
.score{color:#6b7280;font-variant-numeric:tabular-nums}.sep{width:1px;background:#e5e7eb;align-self:stretch}
.legend span{display:inline-block;width:12px;height:12px;vertical-align:middle;margin:0 4px 0 10px;border:2px solid}
table.kv{border-collapse:collapse;font-size:14px}table.kv td{padding:2px 10px 2px 0}
.ok{color:#15803d;font-weight:600}.bad{color:#b91c1c;font-weight:600}
"""


def _page(title: str, meta: str, body: list[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f'<h1>{html.escape(title)}</h1><div class="meta">{meta}</div>' + "\n".join(body) + "</body></html>\n"
    )


def _meta(checkpoint: str, data: str, metrics: dict[str, Any], keys: tuple[str, ...]) -> str:
    shown = ", ".join(f"{html.escape(k)} <b>{metrics[k]:.2f}</b>" for k in keys if isinstance(metrics.get(k), (int, float)))
    return f"checkpoint <code>{html.escape(checkpoint)}</code> &middot; data <code>{html.escape(data)}</code>" + (
        f"<br>{shown}" if shown else ""
    )


def _score_text(e: dict[str, Any]) -> str:
    s = f"{e['score']:.3f}"
    return s + (f" &middot; match {e['match']:.2f}" if "match" in e else "")


def _t2i_card(tag: str, row: dict[str, Any], thumbs: _Thumbs) -> str:
    figs = []
    if "box_true" in row:  # grounding: the caption's own image with both boxes
        image, scale = _thumb(_open(row["image"]))
        _draw_boxes(image, scale, [(row["box_true"], GREEN), (row["box_pred"], RED)])
        cap = f"its image (ground truth, rank {row['gt_rank']})<br>boxes: true (green), predicted (red), IoU {row['iou']:.2f}"
        if "relation_true" in row:
            cap += f"<br>relation: {html.escape(row['relation_pred'])} (true {html.escape(row['relation_true'])})"
        figs.append(
            f'<figure class="gt">{_img(data_uri(image), "query image with boxes")}<figcaption>{cap}</figcaption></figure>'
        )
        figs.append('<div class="sep"></div>')
    for e in row["top"][:TOP_SHOWN]:
        cls = "gt" if e["gt"] else ""
        label = f'#{e["rank"]} <span class="score">{_score_text(e)}</span>' + ("<br>ground truth" if e["gt"] else "")
        figs.append(
            f'<figure class="{cls}">{_img(thumbs(e["image"]), Path(e["image"]).name)}<figcaption>{label}</figcaption></figure>'
        )
    if not any(e["gt"] for e in row["top"][:TOP_SHOWN]) and "box_true" not in row:  # else shown first already
        figs.append('<div class="sep"></div>')
        figs.append(
            f'<figure class="gt">{_img(thumbs(row["image"]), Path(row["image"]).name)}'
            f"<figcaption>ground truth, rank {row['gt_rank']}</figcaption></figure>"
        )
    return (
        f'<div class="card"><div class="q"><span class="tag {tag}">{tag}</span>&ldquo;{html.escape(row["text"])}&rdquo; '
        f'<span class="score">&middot; ground truth at rank {row["gt_rank"]}</span></div>'
        f'<div class="row">{"".join(figs)}</div></div>'
    )


def _i2t_card(tag: str, row: dict[str, Any], thumbs: _Thumbs) -> str:
    items = []
    for e in row["top"][:TOP_SHOWN]:
        mark = " &#10003; ground truth" if e["gt"] else ""
        items.append(
            f'<li class="{"gt" if e["gt"] else ""}">{html.escape(e["text"])} '
            f'<span class="score">{_score_text(e)}</span>{mark}</li>'
        )
    missing = ""
    if not any(e["gt"] for e in row["top"][:TOP_SHOWN]) and row["captions"]:
        missing = (
            f'<div class="score">ground truth (first at rank {row["gt_rank"]}): '
            + "; ".join(f"&ldquo;{html.escape(c)}&rdquo;" for c in row["captions"][:3])
            + "</div>"
        )
    rank = f"ground truth at rank {row['gt_rank']}" if row["gt_rank"] > 0 else "no caption"
    return (
        f'<div class="card"><div class="q"><span class="tag {tag}">{tag}</span>{html.escape(Path(row["image"]).name)} '
        f'<span class="score">&middot; {rank}</span></div><div class="row">'
        f'<figure class="query">{_img(thumbs(row["image"]), Path(row["image"]).name)}</figure>'
        f'<div><ol class="captions">{"".join(items)}</ol>{missing}</div></div></div>'
    )


def retrieval_page(
    details: dict[str, list[dict[str, Any]]], *, checkpoint: str, data: str, metrics: dict[str, Any], n: int = 24, seed: int = 0
) -> str:
    thumbs = _Thumbs()
    body = [
        '<div class="legend">ground truth <span style="border-color:#16a34a"></span> '
        'true box <span style="border-color:#16a34a"></span> predicted box <span style="border-color:#dc2626"></span></div>'
    ]
    t2i = sample_queries(details.get("t2i", []), n, lambda r: r["gt_rank"], seed)
    body.append(
        f"<h2>Text &rarr; image ({len(t2i)} of {len(details.get('t2i', []))} captions: worst ground-truth rank "
        "first, then random)</h2>"
    )
    body += [_t2i_card(tag, row, thumbs) for tag, row in t2i]
    i2t_rows = [r for r in details.get("i2t", []) if r["gt_rank"] > 0]
    i2t = sample_queries(i2t_rows, n, lambda r: r["gt_rank"], seed)
    body.append(f"<h2>Image &rarr; text ({len(i2t)} of {len(i2t_rows)} images: worst first, then random)</h2>")
    body += [_i2t_card(tag, row, thumbs) for tag, row in i2t]
    keys = ("retrieval/t2i_r1", "retrieval/t2i_r5", "retrieval/i2t_r1", "retrieval/i2t_r5", "grounding/acc50", "grounding/miou")
    return _page("Retrieval examples", _meta(checkpoint, data, metrics, keys), body)


def counting_badness(row: dict[str, Any]) -> tuple:
    return (row["answer_correct"] is False, not row["head_correct"], -row["prob_true"])


def attention_overlay(image: Image.Image, heat: Any) -> Image.Image:
    """``image`` with a heatmap (an [H, W] array at the image's size) blended over it."""
    import numpy as np
    from matplotlib import colormaps

    h = np.asarray(heat, dtype=np.float64)
    h = h / max(float(h.max()), 1e-12)
    rgba = (colormaps["jet"](h)[..., :3] * 255).astype(np.uint8)
    return Image.blend(image.convert("RGB"), Image.fromarray(rgba).resize(image.size), alpha=0.45)


def counting_page(
    rows: list[dict[str, Any]],
    *,
    model: Any,
    cfg: Any,
    checkpoint: str,
    data: str,
    metrics: dict[str, Any],
    n: int = 24,
    seed: int = 0,
) -> str:
    from vlmtune.predict import predict_image

    body = []
    chosen = sample_queries(rows, n, counting_badness, seed)
    body.append(f"<h2>{len(chosen)} of {len(rows)} images: wrong answers and wrong counts first, then random</h2>")
    for tag, row in chosen:
        image = _open(row["image"])
        thumb, _ = _thumb(image, 2 * THUMB)
        pred = predict_image(model, cfg, image, row["question"], attention=True, heatmap_size=thumb.size)
        overlay = attention_overlay(thumb, pred.heatmap)
        ok = lambda good: '<span class="ok">right</span>' if good else '<span class="bad">wrong</span>'  # noqa: E731
        answer = row["answer"] if row["answer"] is not None else "(not generated)"
        answer_cnt = row["answer_count"] if row["answer_count"] is not None else "none stated"
        table = (
            f'<table class="kv"><tr><td>true count</td><td><b>{row["count_true"]}</b></td></tr>'
            f"<tr><td>head</td><td>{html.escape(str(row['count_pred']))} ({100 * row['confidence']:.0f}%) "
            f"{ok(row['head_correct'])}</td></tr>"
            f"<tr><td>answer</td><td>&ldquo;{html.escape(answer)}&rdquo;</td></tr>"
            f"<tr><td>count in the answer</td><td>{html.escape(str(answer_cnt))} "
            f"{ok(bool(row['answer_correct']))}</td></tr>"
            f"<tr><td>reference answer</td><td>&ldquo;{html.escape(row['answer_true'])}&rdquo;</td></tr></table>"
        )
        body.append(
            f'<div class="card"><div class="q"><span class="tag {tag}">{tag}</span>{html.escape(row["question"])} '
            f'<span class="score">&middot; {html.escape(Path(row["image"]).name)}</span></div><div class="row">'
            f'<figure class="query">{_img(data_uri(thumb), "image")}<figcaption>image</figcaption></figure>'
            f"<figure>{_img(data_uri(overlay), 'attention overlay')}<figcaption>attention of the count token</figcaption></figure>"
            f"<div>{table}</div></div></div>"
        )
    keys = ("count/accuracy", "answer/count_accuracy", "count/macro_f1", "text/bleu4")
    return _page("Counting examples", _meta(checkpoint, data, metrics, keys), body)


def write_examples(
    path: Path,
    details: dict[str, list[dict[str, Any]]],
    *,
    checkpoint: str,
    data: str,
    metrics: dict[str, Any],
    model: Any = None,
    cfg: Any = None,
    n: int = 24,
    seed: int = 0,
) -> Path:
    """Write ``examples.html`` for per-query ``details``: the page of the kinds of query
    they hold (``counting`` rows, or ``t2i`` / ``i2t`` rankings), whichever task gave them."""
    if "counting" in details:
        page = counting_page(
            details["counting"], model=model, cfg=cfg, checkpoint=checkpoint, data=data, metrics=metrics, n=n, seed=seed
        )
    else:
        page = retrieval_page(details, checkpoint=checkpoint, data=data, metrics=metrics, n=n, seed=seed)
    write_file(path, page)
    return path
