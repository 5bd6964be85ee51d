"""Per-query rankings: the chunked pass's lists and scores against a full-matrix
reference, ground-truth ranks, `vlmtune evaluate --rankings` files and examples.html
opened in a real headless browser."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from test_metrics import _assert_same_metrics, _fancy_rerank, _grid_emb, _variable_captions
from vlmtune.cli import main
from vlmtune.metrics.retrieval import ground_truth_ranks, retrieval_metrics, retrieval_metrics_reference


def _reference_lists(image_emb, text_emb, t2i_map, k, rerank, rerank_k):
    """Full-matrix ranked lists (stable argsort, head re-ranked stably), scores, gt ranks."""
    sim = image_emb @ text_emb.T
    out = {}
    for name, s, is_img in (("i2t", sim, True), ("t2i", sim.T, False)):
        order = s.argsort(dim=1, descending=True, stable=True)
        rows, matches = [], []
        for q in range(order.shape[0]):
            o = order[q]
            if rerank is not None:
                r = min(rerank_k, o.numel())
                head = o[:r]
                qq = torch.full_like(head, q)
                sc = rerank(qq, head) if is_img else rerank(head, qq)
                perm = sc.argsort(descending=True, stable=True)
                o = torch.cat((head[perm], o[r:]))
                matches.append(sc[perm])
            rows.append(o)
        full = torch.stack(rows)
        truth = (t2i_map[full] == torch.arange(full.shape[0]).unsqueeze(1)) if is_img else (full == t2i_map.unsqueeze(1))
        gt = torch.tensor([int(t.nonzero()[0]) + 1 if t.any() else -1 for t in truth])
        out[name] = (full[:, :k], s.gather(1, full)[:, :k], torch.stack(matches) if matches else None, gt)
    return out


@pytest.mark.parametrize("rerank, rerank_k", [(None, 16), (_fancy_rerank, 4)])
@pytest.mark.parametrize("chunk_size", [3, 4096])
@pytest.mark.parametrize("step", [0.25, 1.0])  # 1.0: heavy ties
def test_rankings_match_full_matrix(rerank, rerank_k, chunk_size, step) -> None:
    gen = torch.Generator().manual_seed(4)
    n = 19
    t2i = _variable_captions(gen, n)
    t2i = t2i[t2i != 5]  # image 5 has no caption: rank -1, still a t2i distractor
    img, txt = _grid_emb(gen, n, 8, step), _grid_emb(gen, t2i.numel(), 8, step)
    metrics, rk = retrieval_metrics(
        img, txt, t2i, ks=(1, 5), chunk_size=chunk_size, rerank=rerank, rerank_k=rerank_k, rankings_k=7, return_rankings=True
    )
    _assert_same_metrics(metrics, retrieval_metrics_reference(img, txt, t2i, ks=(1, 5), rerank=rerank, rerank_k=rerank_k))
    k = max(7, rerank_k if rerank else 0)
    ref = _reference_lists(img, txt, t2i, k, rerank, rerank_k)
    for name, idx, scores, match, gt in (
        ("i2t", rk.i2t, rk.i2t_scores, rk.i2t_match, rk.i2t_gt_rank),
        ("t2i", rk.t2i, rk.t2i_scores, rk.t2i_match, rk.t2i_gt_rank),
    ):
        r_idx, r_scores, r_match, r_gt = ref[name]
        assert torch.equal(idx, r_idx), name
        assert torch.equal(scores, r_scores), name
        assert torch.equal(gt, r_gt), name
        assert (match is None) == (r_match is None)
        if match is not None:
            assert torch.equal(match, r_match)
    assert int(rk.i2t_gt_rank[5]) == -1
    assert int(rk.t2i_gt_rank.max()) > k  # some ground truths lie beyond the lists: counted, not listed


def test_ground_truth_ranks_alone() -> None:
    gen = torch.Generator().manual_seed(9)
    t2i = _variable_captions(gen, 30)
    img, txt = _grid_emb(gen, 30, 6, 1.0), _grid_emb(gen, t2i.numel(), 6, 1.0)
    ref = _reference_lists(img, txt, t2i, 1, None, 0)
    for chunk in (4, 1000):
        i2t, t2i_rank = ground_truth_ranks(img, txt, t2i, chunk)
        assert torch.equal(i2t, ref["i2t"][3]) and torch.equal(t2i_rank, ref["t2i"][3])


# --------------------------------------------------------------------------- the browser

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
_CHECK = """<script>window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0 && i.naturalHeight > 0)).map(i => i.alt);
  const out = document.createElement('pre'); out.id = 'vlmtune-check';
  out.textContent = JSON.stringify({n: imgs.length, bad: bad, width: imgs.map(i => i.naturalWidth)});
  document.body.appendChild(out);
});</script>"""


def _browser() -> str:
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if found is None:
        pytest.skip(
            "no headless browser: install Debian's chromium (apt-get install -y chromium; .ci/run does it when apt is available)"
        )
    return found


def browser_image_check(page: Path, tmp_path: Path) -> dict:
    """Open ``page`` in headless Chromium and report, after load, how many images it has
    and which did not load (naturalWidth 0). The page's own Content-Security-Policy is
    kept (images from data: URIs only, so a page that needed the network would fail
    here); only an inline script is allowed in the copy that carries the check."""
    text = page.read_text(encoding="utf-8")
    assert "default-src 'none'" in text
    text = text.replace("style-src 'unsafe-inline'", "style-src 'unsafe-inline'; script-src 'unsafe-inline'")
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", _CHECK + "</body>"), encoding="utf-8")
    cmd = [
        _browser(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=20000",
        "--dump-dom",
        probe.as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    import re

    m = re.search(r'<pre id="vlmtune-check">(.*?)</pre>', done.stdout, re.S)
    assert m, f"the check did not run; chromium exit {done.returncode}: {done.stderr[-800:]}"
    return json.loads(html_unescape(m.group(1)))


def html_unescape(text: str) -> str:
    import html

    return html.unescape(text)


def _assert_self_contained(page: Path) -> int:
    import re

    text = page.read_text(encoding="utf-8")
    srcs = re.findall(r'<img src="([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    assert not re.search(r'(?:src|href)="(?:https?:)?//', text) and "<link" not in text and "@import" not in text
    return len(srcs)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_retrieval_rankings_and_examples_page(retrieval_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                str(retrieval_checkpoint),
                "--rankings",
                "--rankings-k",
                "3",
                "--examples",
                "6",
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    t2i, i2t = _jsonl(out / "rankings_t2i.jsonl"), _jsonl(out / "rankings_i2t.jsonl")
    assert len(t2i) == metrics["retrieval/n_captions"] and len(i2t) == metrics["retrieval/n_images"]
    n_img = metrics["retrieval/n_images"]
    for row in t2i:
        assert len(row["top"]) == min(3, n_img) and [e["rank"] for e in row["top"]] == list(range(1, len(row["top"]) + 1))
        scores = [e["score"] for e in row["top"]]
        assert scores == sorted(scores, reverse=True)
        gt = [e["rank"] for e in row["top"] if e["gt"]]
        assert gt == ([row["gt_rank"]] if row["gt_rank"] <= 3 else [])
        assert all(e["gt"] == (e["image_id"] == row["image_id"]) for e in row["top"])
        assert "box_true" in row and len(row["box_pred"]) == 4 and 0.0 <= row["iou"] <= 1.0  # scenes ground every caption
    # The rows give back the recall the metrics report.
    assert 100.0 * sum(r["gt_rank"] == 1 for r in t2i) / len(t2i) == pytest.approx(metrics["retrieval/t2i_r1"])
    assert 100.0 * sum(r["gt_rank"] <= 5 for r in t2i) / len(t2i) == pytest.approx(metrics["retrieval/t2i_r5"])
    assert 100.0 * sum(r["gt_rank"] == 1 for r in i2t) / len(i2t) == pytest.approx(metrics["retrieval/i2t_r1"])
    for row in i2t:
        assert all(e["gt"] == (e["text"] in row["captions"]) for e in row["top"])

    page = out / "examples.html"
    n_imgs = _assert_self_contained(page)
    text = page.read_text()
    worst = max(t2i, key=lambda r: r["gt_rank"])
    assert worst["text"].replace("'", "&#x27;") in text  # worst first
    assert "ground truth" in text and "IoU" in text
    result = browser_image_check(page, tmp_path)
    assert result["n"] == n_imgs and result["bad"] == [], result


def test_counting_rankings_and_examples_page(lora_counting_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    assert main(["evaluate", str(lora_counting_checkpoint), "--rankings", "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    rows = _jsonl(out / "rankings_counting.jsonl")
    assert len(rows) == metrics["count/n"]
    assert 100.0 * sum(r["head_correct"] for r in rows) / len(rows) == pytest.approx(metrics["count/accuracy"])
    assert 100.0 * sum(bool(r["answer_correct"]) for r in rows) / len(rows) == pytest.approx(metrics["answer/count_accuracy"])
    for r in rows:
        assert sum(r["probabilities"]) == pytest.approx(1.0, abs=1e-3) and isinstance(r["answer"], str)
    page = out / "examples.html"
    n_imgs = _assert_self_contained(page)
    assert n_imgs == 2 * len(rows)  # the image and its attention overlay, every image (fewer than --examples)
    assert "attention" in page.read_text()
    result = browser_image_check(page, tmp_path)
    assert result["n"] == n_imgs and result["bad"] == [], result


def test_rankings_refusals(retrieval_checkpoint: Path, tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    assert (
        main(["evaluate", str(retrieval_checkpoint), "--rankings", "--rankings-k", "0", "--output-dir", str(tmp_path / "a")]) == 2
    )
    assert "--rankings-k" in capsys.readouterr().err
    assert (
        main(
            [
                "evaluate",
                str(retrieval_checkpoint),
                str(retrieval_checkpoint),
                "--labels",
                "a",
                "b",
                "--rankings",
                "--output-dir",
                str(tmp_path / "b"),
            ]
        )
        == 2
    )
    assert "one checkpoint" in capsys.readouterr().err
