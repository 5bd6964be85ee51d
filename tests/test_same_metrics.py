"""The same data written in other formats gives the same metrics (issue 21).

The embedded default's test splits (the scenes set of the retrieval recipe, the receipts
set of the counting recipe) are written as InternVL, LLaVA, ms-swift (through
``data convert`` where it writes the format), webdataset shards and Flickr30k's token
file, and a trained checkpoint evaluates each: R@K equal to the native file's, grounding
mIoU / Acc@0.5 up to InternVL's 0-1000 rounding, count accuracy equal. (A few seconds:
the checkpoints are the session's shared ones.)
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from vlmtune.cli import main

RECALL = ("retrieval/i2t_r1", "retrieval/i2t_r5", "retrieval/t2i_r1", "retrieval/t2i_r5", "retrieval/mean_recall")
GROUNDING = ("grounding/miou", "grounding/acc50")


def _evaluate(capsys: pytest.CaptureFixture[str], ckpt: Path, data: Path | str, out: Path, *overrides: str) -> dict:
    code = main(["evaluate", str(ckpt), "--data", str(data), "--output-dir", str(out), "data.duplicates=keep", *overrides])
    err = capsys.readouterr().err
    assert code == 0, err
    return json.loads((out / "metrics.json").read_text())


def _convert(capsys: pytest.CaptureFixture[str], src: Path, target: str, out: Path, *overrides: str) -> dict:
    assert main(["data", "convert", str(src), "--to", target, "--out", str(out), "data.duplicates=keep", *overrides]) == 0
    return json.loads(capsys.readouterr().out)


def _by_image(recs: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in recs:
        groups.setdefault(r["image"], []).append(r)
    return groups


def _shards(recs: list[dict], folder: Path, src: Path) -> Path:
    """One sample per image: its bytes and a json with its captions (two shards)."""
    out = folder / "shards"
    out.mkdir()
    groups = list(_by_image(recs).items())
    half = (len(groups) + 1) // 2
    for s, part in enumerate((groups[:half], groups[half:])):
        with tarfile.open(out / f"{s:05d}.tar", "w") as tf:
            for image, group in part:
                key = Path(image).stem
                for name, data in (
                    (f"{key}.png", (src / image).read_bytes()),
                    (f"{key}.json", json.dumps({"captions": [r["text"] for r in group]}).encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return out / "{00000..00001}.tar"


def _flickr(recs: list[dict], path: Path) -> None:
    lines = []
    for image, group in _by_image(recs).items():
        lines += [f"{image}#{k}\t{r['text']}" for k, r in enumerate(group)]
    path.write_text("\n".join(lines) + "\n")


def _same(native: dict, other: dict, keys: tuple[str, ...], tol: float, what: str) -> None:
    for k in keys:
        assert abs(native[k] - other[k]) <= tol, (what, k, native[k], other[k])


def test_retrieval_metrics_agree_across_formats(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], one_stage_run: Path, scenes: Path
) -> None:
    ckpt = one_stage_run / "checkpoints" / "last"
    native = _evaluate(capsys, ckpt, scenes / "test.json", tmp_path / "native")
    recs = json.loads((scenes / "test.json").read_text())
    # InternVL and ms-swift hold no relation, and InternVL no negatives
    stripped = [{k: v for k, v in r.items() if k not in ("relation", "negatives")} for r in recs]
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(stripped))
    root = f"data.image_root={scenes}"
    n = len(recs)
    for target in ("internvl", "swift"):
        done = _convert(capsys, plain, target, tmp_path / target, root)
        back = Path(done["written"][-1] if target == "internvl" else done["written"][0])
        extra = () if target == "internvl" else (f"data.image_root={done['image_root']}",)
        got = _evaluate(capsys, ckpt, back, tmp_path / f"ev-{target}", *extra)
        _same(native, got, RECALL, 1e-6, target)
        tol = 1.0 if target == "internvl" else 1e-4  # 0-1000 rounding moves the true boxes by < 0.07 px
        _same(native, got, ("grounding/miou",), tol, target)
        _same(native, got, ("grounding/acc50",), 100 / n + 1e-6, target)
    llava = tmp_path / "llava.json"
    _llava_at(stripped, llava, scenes)
    got = _evaluate(capsys, ckpt, llava, tmp_path / "ev-llava", root)
    _same(native, got, RECALL, 1e-6, "llava")
    _same(native, got, ("grounding/miou",), 1.0, "llava")
    shards = _shards(recs, tmp_path, scenes)
    got = _evaluate(capsys, ckpt, shards, tmp_path / "ev-wds")
    _same(native, got, RECALL, 1e-6, "webdataset")
    token = tmp_path / "results_20130124.token"
    _flickr(recs, token)
    got = _evaluate(capsys, ckpt, token, tmp_path / "ev-flickr", root)
    _same(native, got, RECALL, 1e-6, "flickr30k")


def _llava_at(recs: list[dict], path: Path, image_root: Path) -> None:
    """LLaVA's JSON list, images named relative to ``image_root``."""
    from PIL import Image

    from vlmtune.data.formats.boxes import to_norm1000

    rows = []
    for image, group in _by_image(recs).items():
        size = Image.open(image_root / image).size
        turns = []
        for r in group:
            ref = f"<ref>{r['text']}</ref>"
            q = ("<image>\n" if not turns else "") + f"Where is {ref}?"
            turns += [
                {"from": "human", "value": q},
                {"from": "gpt", "value": f"{ref}<box>[{to_norm1000(r['bbox'], size)}]</box>"},
            ]
        rows.append({"id": len(rows), "image": image, "conversations": turns})
    path.write_text(json.dumps(rows))


def test_count_accuracy_agrees_across_formats(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lora_counting_checkpoint: Path
) -> None:
    ckpt = lora_counting_checkpoint
    data = ckpt.parents[2] / "data"
    quick = ("generation.num_beams=1", "generation.max_new_tokens=4")
    native = _evaluate(capsys, ckpt, data / "test.jsonl", tmp_path / "native", *quick)
    root = f"data.image_root={data}"
    for target in ("internvl", "swift"):
        done = _convert(capsys, data / "test.jsonl", target, tmp_path / target, root)
        back = Path(done["written"][-1] if target == "internvl" else done["written"][0])
        extra = () if target == "internvl" else (f"data.image_root={done['image_root']}",)
        got = _evaluate(capsys, ckpt, back, tmp_path / f"ev-{target}", *quick, *extra)
        _same(native, got, ("count/accuracy", "count/macro_f1"), 1e-6, target)
