"""Small faithful copies of the data sets users download, laid out as their sources ship them.

Each builder writes a few records with tiny images (32-48 px) in the real folder layout
and returns a :class:`Layout`: the annotation file(s) and the image root a user would
pass (None where the format's paths resolve against the annotation file's folder).

- COCO 2014 captions: ``annotations/captions_val2014.json`` beside ``val2014/``.
- Karpathy splits: ``dataset_flickr30k.json`` + ``flickr30k-images/``;
  ``dataset_coco.json`` (with ``filepath``) + ``train2014/``, ``val2014/``.
- ALBEF / X-VLM / LAVIS: ``data/coco_train.json`` (one caption per record, ``image_id``),
  ``data/coco_val.json`` / ``coco_test.json`` (5 captions) under an image root.
- refer: ``refcoco/refs(unc).p`` (a Python pickle of plain dicts) + ``refcoco/instances.json``,
  images in COCO's ``train2014/``; X-VLM's RefCOCO JSON with ``bbox`` and ``ref_id``.
- GeoText-1652: ``train.json`` / ``test.json`` with ``caption``, ``sentences`` and
  normalised ``bboxes`` (some null), images under ``train/<building>/``.
- Counting: the receipt counter's CSV (``filename,receipt_count``) beside ``images/``,
  and a JSONL with only ``image`` and ``count``.
- Hugging Face ``datasets``: an imagefolder with ``train/metadata.jsonl`` ... (``file_name``),
  a ``save_to_disk`` folder, a parquet file.
"""

from __future__ import annotations

import csv
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "cyan")
RGB = {
    "red": (220, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 30, 220),
    "yellow": (230, 230, 20),
    "purple": (140, 30, 160),
    "orange": (250, 140, 0),
    "white": (250, 250, 250),
    "black": (5, 5, 5),
    "cyan": (20, 220, 220),
}


@dataclass
class Layout:
    train: Path
    val: Path
    test: Path
    image_root: Path | None = None
    has_boxes: bool = False
    kind: str = "pairs"

    def overrides(self) -> list[str]:
        out = [f"data.train={self.train}", f"data.val={self.val}", f"data.test={self.test}"]
        return out + ([f"data.image_root={self.image_root}"] if self.image_root else [])


def _image(path: Path, i: int, size: tuple[int, int] = (48, 40), fmt: str = "JPEG") -> tuple[int, int]:
    """A picture whose square's colour and place follow ``i`` (so captions mean something)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    arr = np.full((h, w, 3), 90, dtype=np.uint8)
    colour = RGB[COLOURS[i % len(COLOURS)]]
    x0, y0 = (i * 7) % (w // 2), (i * 5) % (h // 2)
    arr[y0 : y0 + h // 2, x0 : x0 + w // 2] = colour
    Image.fromarray(arr).save(path, format=fmt)
    return w, h


def _box(i: int, size: tuple[int, int] = (48, 40)) -> list[float]:
    w, h = size
    return [float((i * 7) % (w // 2)), float((i * 5) % (h // 2)), float(w // 2), float(h // 2)]


def _caption(i: int, k: int = 0) -> str:
    c = COLOURS[i % len(COLOURS)]
    return [
        f"a {c} square",
        f"{c} block on grey",
        f"the {c} patch number {i}",
        f"a grey picture with {c}",
        f"{c} square seen from above",
    ][k % 5] + (f" {i}" if k else "")


def _write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


# --------------------------------------------------------------------------- retrieval


def coco_captions(root: Path, n: int = 8) -> Layout:
    """COCO 2014 as downloaded: annotations/captions_val2014.json, images in val2014/."""
    images, anns = [], []
    for i in range(n):
        name = f"COCO_val2014_{100 + i:012d}.jpg"
        w, h = _image(root / "val2014" / name, i)
        images.append(
            {
                "license": 1,
                "file_name": name,
                "coco_url": f"http://images.cocodataset.org/val2014/{name}",
                "height": h,
                "width": w,
                "date_captured": "2013-11-14 16:28:13",
                "flickr_url": "",
                "id": 100 + i,
            }
        )
        for k in range(2):
            anns.append({"image_id": 100 + i, "id": 1000 + 10 * i + k, "caption": _caption(i, k)})
    data = {"info": {"description": "COCO 2014 Dataset"}, "licenses": [], "images": images, "annotations": anns}
    path = _write_json(root / "annotations" / "captions_val2014.json", data)
    return Layout(path, path, path, root / "val2014")


def karpathy_flickr(root: Path, n: int = 12) -> Layout:
    """dataset_flickr30k.json (every split in one file) beside flickr30k-images/."""
    images = []
    for i in range(n):
        name = f"{1000092795 + i}.jpg"
        _image(root / "flickr30k-images" / name, i)
        split = "train" if i < n // 2 else "val" if i < 3 * n // 4 else "test"
        sents = [
            {"tokens": _caption(i, k).split(), "raw": _caption(i, k) + ".", "imgid": i, "sentid": 5 * i + k} for k in range(5)
        ]
        images.append(
            {"sentids": [5 * i + k for k in range(5)], "imgid": i, "sentences": sents, "split": split, "filename": name}
        )
    path = _write_json(root / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})
    return Layout(path, path, path, root / "flickr30k-images")


def karpathy_coco(root: Path, n: int = 12) -> Layout:
    """dataset_coco.json: 'filepath' names train2014/ or val2014/ under the COCO folder; restval trains."""
    images = []
    for i in range(n):
        split = ("train", "restval", "val", "test")[i % 4]
        folder = "train2014" if split == "train" else "val2014"
        name = f"COCO_{folder}_{200 + i:012d}.jpg"
        _image(root / folder / name, i)
        sents = [{"tokens": _caption(i, k).split(), "raw": _caption(i, k), "imgid": i, "sentid": 5 * i + k} for k in range(5)]
        images.append(
            {
                "filepath": folder,
                "sentids": [5 * i + k for k in range(5)],
                "filename": name,
                "imgid": i,
                "split": split,
                "sentences": sents,
                "cocoid": 200 + i,
            }
        )
    path = _write_json(root / "dataset_coco.json", {"images": images, "dataset": "coco"})
    return Layout(path, path, path, root)


def albef_coco(root: Path, n: int = 8) -> Layout:
    """ALBEF / X-VLM / LAVIS retrieval JSONs in data/, images under an image root (COCO's folder)."""
    train, val, test = [], [], []
    for i in range(n):
        rel = f"val2014/COCO_val2014_{300 + i:012d}.jpg"
        _image(root / "coco" / rel, i)
        for k in range(2):
            train.append({"image": rel, "caption": _caption(i, k), "image_id": f"coco_{300 + i}"})
        (val if i % 2 else test).append({"image": rel, "caption": [_caption(i, k) for k in range(5)]})
    data = root / "data"
    return Layout(
        _write_json(data / "coco_train.json", train),
        _write_json(data / "coco_val.json", val),
        _write_json(data / "coco_test.json", test),
        root / "coco",
    )


def refer_refcoco(root: Path, n: int = 8) -> Layout:
    """refer's refcoco/refs(unc).p + refcoco/instances.json; images in COCO's train2014/."""
    images, anns, refs = [], [], []
    for i in range(n):
        name = f"COCO_train2014_{400 + i:012d}.jpg"
        w, h = _image(root / "train2014" / name, i)
        images.append({"license": 1, "file_name": name, "height": h, "width": w, "id": 400 + i})
        anns.append(
            {
                "segmentation": [[0, 0, 1, 1]],
                "area": 100.0,
                "iscrowd": 0,
                "image_id": 400 + i,
                "bbox": _box(i),
                "category_id": 1,
                "id": 5000 + i,
            }
        )
        split = ("train", "train", "train", "val", "testA", "testB", "train", "val")[i % 8]
        sents = [
            {"tokens": _caption(i, k).split(), "raw": _caption(i, k), "sent_id": 10 * i + k, "sent": _caption(i, k)}
            for k in range(2)
        ]
        # refer's file_name carries the annotation id; the image file is the instances' one.
        refs.append(
            {
                "sent_ids": [10 * i, 10 * i + 1],
                "file_name": f"COCO_train2014_{400 + i:012d}_{5000 + i}.jpg",
                "ann_id": 5000 + i,
                "ref_id": 70 + i,
                "image_id": 400 + i,
                "split": split,
                "sentences": sents,
                "category_id": 1,
            }
        )
    folder = root / "refcoco"
    _write_json(
        folder / "instances.json",
        {
            "info": {},
            "images": images,
            "licenses": [],
            "annotations": anns,
            "categories": [{"supercategory": "thing", "id": 1, "name": "square"}],
        },
    )
    path = folder / "refs(unc).p"
    path.write_bytes(pickle.dumps(refs, protocol=2))
    return Layout(path, path, path, root / "train2014", has_boxes=True)


def xvlm_refcoco(root: Path, n: int = 8) -> Layout:
    """X-VLM's RefCOCO grounding JSONs: {"image", "text", "bbox" [x, y, w, h] px, "ref_id"}."""
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for i in range(n):
        rel = f"coco/train2014/COCO_train2014_{500 + i:012d}.jpg"
        _image(root / rel, i)
        split = "train" if i < n // 2 else "val" if i % 2 else "test"
        for k in range(2):
            splits[split].append({"image": rel, "text": _caption(i, k), "bbox": _box(i), "ref_id": 90 + i, "image_id": 500 + i})
        splits[split].append(dict(splits[split][-2]))  # RefCOCO repeats short expressions: kept with duplicates=keep
    paths = {s: _write_json(root / "data" / "finetune" / f"refcoco+_{s}.json", recs) for s, recs in splits.items()}
    return Layout(paths["train"], paths["val"], paths["test"], root, has_boxes=True)


def geotext(root: Path, n: int = 8) -> Layout:
    """GeoText-1652: train.json / test.json records with caption, sentences and normalised
    centre boxes (null where a sentence has none); images under train/<building>/."""
    out: dict[str, list[dict]] = {"train": [], "test": []}
    for i in range(n):
        split = "train" if i < n // 2 + 1 else "test"
        rel = f"{split}/{839 + i // 2:04d}/image-{40 + i}.jpeg"
        w, h = _image(root / rel, i)
        x, y, bw, bh = _box(i)
        box = [(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h]
        out[split].append(
            {
                "image_id": f"{839 + i // 2:04d}_{40 + i}",
                "image": rel,
                "caption": " ".join(_caption(i, k) for k in range(3)) + ".",
                "sentences": [_caption(i, 1), _caption(i, 2), "the sky above the roofs"],
                "bboxes": [box, box, None],
            }
        )
    train = _write_json(root / "train.json", out["train"])
    test = _write_json(root / "test.json", out["test"])
    return Layout(train, test, test, None, has_boxes=True)


def grounding(root: Path, n: int = 8) -> Layout:
    """vlmtune's own grounding list: {"image", "text", "bbox", "relation"?}."""
    recs = []
    for i in range(n):
        rel = f"images/{i}.png"
        _image(root / rel, i, fmt="PNG")
        recs.append({"image": rel, "text": _caption(i), "bbox": _box(i)})
    path = _write_json(root / "grounding.json", recs)
    return Layout(path, path, path, None, has_boxes=True)


def pairs(root: Path, n: int = 8) -> Layout:
    recs = []
    for i in range(n):
        rel = f"images/{i}.png"
        _image(root / rel, i, fmt="PNG")
        recs.append({"image": rel, "caption": [_caption(i, 0), _caption(i, 1)]})
    path = _write_json(root / "pairs.json", recs)
    return Layout(path, path, path, None)


# --------------------------------------------------------------------------- counting


def receipts_csv(root: Path, n: int = 10) -> Layout:
    """The receipt counter's layout: train.csv / test.csv (filename,receipt_count) beside images/."""
    paths = {}
    for split, rng in (("train", range(n)), ("test", range(n, n + 6))):
        path = root / f"{split}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["filename", "receipt_count"])
            for i in rng:
                name = f"receipt_{i:04d}.jpg"
                _image(root / "images" / name, i)
                wr.writerow([name, i % 4])
        paths[split] = path
    return Layout(paths["train"], paths["test"], paths["test"], root / "images", kind="counting")


def counting_jsonl(root: Path, n: int = 10) -> Layout:
    """A JSONL with only image and count: questions and answers come from the templates."""
    lines = []
    for i in range(n):
        rel = f"images/{i}.png"
        _image(root / rel, i, fmt="PNG")
        lines.append(json.dumps({"image": rel, "count": i % 4}))
    path = root / "counts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return Layout(path, path, path, None, kind="counting")


# --------------------------------------------------------------------------- Hugging Face datasets


def hf_imagefolder(root: Path, n: int = 12) -> Layout:
    """An imagefolder: train/ val/ test/ each with images and metadata.jsonl ('file_name')."""
    for i in range(n):
        split = ("train", "train", "validation", "test")[i % 4]
        name = f"{i}.png"
        _image(root / split / name, i, fmt="PNG")
        with (root / split / "metadata.jsonl").open("a") as f:
            f.write(json.dumps({"file_name": name, "caption": _caption(i)}) + "\n")
    return Layout(root, root, root, None)


def hf_save_to_disk(root: Path, n: int = 12) -> Layout:
    """A DatasetDict saved with save_to_disk; 'image' holds paths relative to the image root."""
    import datasets

    rows: dict[str, dict[str, list]] = {s: {"image": [], "caption": []} for s in ("train", "validation", "test")}
    for i in range(n):
        split = ("train", "train", "validation", "test")[i % 4]
        rel = f"{i}.png"
        _image(root / "images" / rel, i, fmt="PNG")
        rows[split]["image"].append(rel)
        rows[split]["caption"].append(_caption(i))
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict(r) for s, r in rows.items()})
    dd.save_to_disk(str(root / "saved"))
    return Layout(root / "saved", root / "saved", root / "saved", root / "images")


def hf_parquet(root: Path, n: int = 10) -> Layout:
    """A parquet file of counting rows (image path, count) beside its images."""
    import datasets

    rows: dict[str, list] = {"image": [], "count": []}
    for i in range(n):
        rel = f"images/{i}.png"
        _image(root / rel, i, fmt="PNG")
        rows["image"].append(rel)
        rows["count"].append(i % 3)
    path = root / "counts.parquet"
    datasets.Dataset.from_dict(rows).to_parquet(str(path))
    return Layout(path, path, path, None, kind="counting")


BUILDERS = {
    "coco": coco_captions,
    "karpathy-flickr30k": karpathy_flickr,
    "karpathy-coco": karpathy_coco,
    "albef": albef_coco,
    "refcoco-refer": refer_refcoco,
    "refcoco-xvlm": xvlm_refcoco,
    "geotext": geotext,
    "grounding": grounding,
    "pairs": pairs,
    "csv": receipts_csv,
    "counting": counting_jsonl,
    "hf-imagefolder": hf_imagefolder,
    "hf-save-to-disk": hf_save_to_disk,
    "hf-parquet": hf_parquet,
}

# The format auto-detection must find for each layout.
DETECTED = {
    "coco": "coco",
    "karpathy-flickr30k": "karpathy",
    "karpathy-coco": "karpathy",
    "albef": "albef",
    "refcoco-refer": "refcoco",
    "refcoco-xvlm": "refcoco",
    "geotext": "geotext",
    "grounding": "grounding",
    "pairs": "pairs",
    "csv": "csv",
    "counting": "counting",
    "hf-imagefolder": "hf",
    "hf-save-to-disk": "hf",
    "hf-parquet": "hf",
}


# --------------------------------------------------------------------------- the VLM fine-tuning formats (issue 21)


def exif_rotated(path: Path, i: int, size: tuple[int, int] = (40, 48)) -> tuple[int, int]:
    """A JPEG stored on its side with EXIF orientation 6: loaded (EXIF applied) it is
    ``size`` (w, h) and looks like ``_image(i, size)``; its header says (h, w)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".upright.png")
    _image(tmp, i, size, fmt="PNG")
    upright = Image.open(tmp)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 rotates it back
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, format="JPEG", exif=exif.tobytes(), quality=95)
    tmp.unlink()
    return size


def _norm1000(box: list[float], size: tuple[int, int]) -> list[int]:
    from vlmtune.data.formats.boxes import to_norm1000

    return to_norm1000(box, size)


def _caption_turns(i: int, n: int = 2) -> list[dict]:
    turns = []
    for k in range(n):
        q = ("<image>\n" if k == 0 else "") + ("Describe the image concisely." if k % 2 == 0 else "Write a short caption.")
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": _caption(i, k)}]
    return turns


def _grounding_turn(i: int, size: tuple[int, int], first: bool = False) -> list[dict]:
    phrase = f"the {COLOURS[i % len(COLOURS)]} square"
    box = _norm1000(_box(i, size), size)
    q = (
        "<image>\n" if first else ""
    ) + f"Please provide the bounding box coordinate of the region this sentence describes: <ref>{phrase}</ref>"
    return [{"from": "human", "value": q}, {"from": "gpt", "value": f"<ref>{phrase}</ref><box>[{box}]</box>"}]


def internvl_meta(root: Path, n: int = 8) -> Layout:
    """InternVL's fine-tuning layout: internvl_chat/shell/data/finetune.json names two
    entries (a COCO caption JSONL and a RefCOCO grounding JSONL under playground/),
    paths relative to internvl_chat/ (the folder InternVL runs in). Some images are
    EXIF-rotated phone photos; some records hold a VQA turn, which is not a caption."""
    chat = root / "internvl_chat"
    cap, ground = [], []
    for i in range(n):
        rel = f"train2014/COCO_train2014_{600 + i:012d}.jpg"
        if i % 3 == 2:
            size = exif_rotated(chat / "playground/data/coco" / rel, i)
        else:
            size = _image(chat / "playground/data/coco" / rel, i)
        turns = _caption_turns(i)
        if i % 2:
            turns += [{"from": "human", "value": "What colour is the square?"}, {"from": "gpt", "value": COLOURS[i % 9]}]
        cap.append({"id": i, "image": rel, "width": size[0], "height": size[1], "conversations": turns})
        ground.append(
            {"id": 100 + i, "image": rel, "width": size[0], "height": size[1], "conversations": _grounding_turn(i, size, True)}
        )
    folder = chat / "playground/opensource"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "coco_caption.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cap))
    (folder / "refcoco_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ground))
    entry = {"root": "playground/data/coco/", "data_augment": False, "max_dynamic_patch": 6, "repeat_time": 1}
    meta = {
        "coco_caption": {**entry, "annotation": "playground/opensource/coco_caption.jsonl", "length": n},
        "refcoco_train": {**entry, "annotation": "playground/opensource/refcoco_train.jsonl", "length": n},
    }
    path = _write_json(chat / "shell/data/finetune.json", meta)
    return Layout(path, path, path, chat, has_boxes=True)


def internvl_counting(root: Path, n: int = 10) -> Layout:
    """An InternVL annotation JSONL of counting questions: the count in the answer as a
    digit or a word, or in an explicit 'count' field; images under images/."""
    words = ("zero", "one", "two", "three")
    lines = []
    for i in range(n):
        rel = f"receipt_{i:04d}.jpg"
        _image(root / "images" / rel, i)
        c = i % 4
        answer = (f"There are {words[c]} receipts.", f"I can see {c} receipts", str(c), "Counted them all.")[i % 4]
        rec = {
            "id": i,
            "image": rel,
            "conversations": [
                {"from": "human", "value": "<image>\nHow many receipts are in the image?"},
                {"from": "gpt", "value": answer},
            ],
        }
        if i % 4 == 3:
            rec["count"] = c
        lines.append(json.dumps(rec))
    path = root / "receipts_count.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return Layout(path, path, path, root / "images", kind="counting")


def llava_json(root: Path, n: int = 8) -> Layout:
    """LLaVA's llava_v1_5_mix665k.json style: one JSON list, images under playground/data/."""
    recs = []
    for i in range(n):
        rel = f"coco/train2017/{700 + i:012d}.jpg"
        size = _image(root / "playground/data" / rel, i)
        turns = _caption_turns(i) + _grounding_turn(i, size)
        recs.append({"id": f"{700 + i:012d}", "image": rel, "conversations": turns})
    recs.append({"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]})
    path = _write_json(root / "playground/data/llava_v1_5_mix665k.json", recs)
    return Layout(path, path, path, root / "playground/data", has_boxes=True)


def sharegpt_jsonl(root: Path, n: int = 8) -> Layout:
    """ShareGPT-style JSONL: 'conversation' with user/assistant role/content, 'images'."""
    lines = []
    for i in range(n):
        rel = f"images/{i}.png"
        _image(root / rel, i, fmt="PNG")
        conv = [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "<image>Describe this picture."},
            {"role": "assistant", "content": _caption(i)},
        ]
        lines.append(json.dumps({"conversation": conv, "images": [rel]}))
    path = root / "sharegpt.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return Layout(path, path, path, None)


def swift_jsonl(root: Path, n: int = 8) -> Layout:
    """ms-swift's JSONL: captions as messages, grounding through objects (bbox_type real
    for even images, norm1000 for odd ones) with <ref-object>/<bbox> tags."""
    lines = []
    for i in range(n):
        rel = f"images/{i}.jpg"
        size = _image(root / rel, i)
        lines.append(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "<image>Describe the image."},
                        {"role": "assistant", "content": _caption(i)},
                    ],
                    "images": [rel],
                }
            )
        )
        x, y, w, h = _box(i, size)
        real = i % 2 == 0
        bbox = [x, y, x + w, y + h] if real else _norm1000([x, y, w, h], size)
        lines.append(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "<image>Find the <ref-object>"},
                        {"role": "assistant", "content": "<bbox>"},
                    ],
                    "images": [rel],
                    "objects": {
                        "ref": [f"the {COLOURS[i % 9]} square"],
                        "bbox": [bbox],
                        "bbox_type": "real" if real else "norm1000",
                    },
                }
            )
        )
    path = root / "swift_train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return Layout(path, path, path, None, has_boxes=True)


def swift_embedding(root: Path, n: int = 8) -> Layout:
    """ms-swift's embedding JSONL: an image anchor, caption positives, caption negatives."""
    lines = []
    for i in range(n):
        rel = f"images/{i}.png"
        _image(root / rel, i, fmt="PNG")
        lines.append(
            json.dumps(
                {
                    "messages": [{"role": "user", "content": "<image>"}],
                    "images": [rel],
                    "positive_messages": [
                        [{"role": "user", "content": _caption(i)}],
                        [{"role": "user", "content": _caption(i, 1)}],
                    ],
                    "negative_messages": [[{"role": "user", "content": _caption(i + 1)}]],
                }
            )
        )
    path = root / "embedding.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return Layout(path, path, path, None)


def _tar_add(tf: object, name: str, data: bytes, mtime: int = 1_700_000_000) -> None:
    import io
    import tarfile

    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), mtime
    tf.addfile(info, io.BytesIO(data))  # type: ignore[attr-defined]


def _encoded(i: int, fmt: str, size: tuple[int, int] = (48, 40)) -> bytes:
    import io

    buf = io.BytesIO()
    w, h = size
    arr = np.full((h, w, 3), 90, dtype=np.uint8)
    x0, y0 = (i * 7) % (w // 2), (i * 5) % (h // 2)
    arr[y0 : y0 + h // 2, x0 : x0 + w // 2] = RGB[COLOURS[i % len(COLOURS)]]
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def webdataset_shards(root: Path, n: int = 12, per_shard: int = 4) -> Layout:
    """img2dataset's output: shards/00000.tar ... with KEY.jpg + KEY.txt + KEY.json per
    sample (and the _stats.json / .parquet files beside each shard); train is the brace
    pattern of its shards, val and test are shard files of their own."""
    import tarfile

    folder = root / "shards"
    folder.mkdir(parents=True, exist_ok=True)
    n_shards = (n + per_shard - 1) // per_shard
    for s in range(n_shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                key = f"{s:05d}{i:04d}"
                fmt, ext = (("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"))[i % 3]
                _tar_add(tf, f"{key}.{ext}", _encoded(i, fmt))
                meta = {
                    "url": f"http://example.com/{i}.jpg",
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "width": 48,
                    "height": 40,
                    "original_width": 480,
                    "original_height": 400,
                    "exif": "{}",
                    "sha256": "0" * 64,
                    "caption": _caption(i),
                }
                if i % 2 == 0:
                    _tar_add(tf, f"{key}.txt", _caption(i).encode())
                _tar_add(tf, f"{key}.json", json.dumps(meta).encode())
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
    last = n_shards - 1
    train = folder / f"{{00000..{last - 1:05d}}}.tar" if n_shards > 1 else folder / "00000.tar"
    return Layout(train, folder / f"{last:05d}.tar", folder / f"{last:05d}.tar", None)


def flickr30k_token(root: Path, n: int = 8) -> Layout:
    """Flickr30k as downloaded: results_20130124.token (NAME.jpg#K<TAB>caption) and flickr30k-images/."""
    lines = []
    for i in range(n):
        name = f"{1000092795 + i}.jpg"
        _image(root / "flickr30k-images" / name, i)
        lines += [f"{name}#{k}\t{_caption(i, k)} ." for k in range(5)]
    path = root / "results_20130124.token"
    path.write_text("\n".join(lines) + "\n")
    return Layout(path, path, path, root / "flickr30k-images")


def flickr30k_csv(root: Path, n: int = 8) -> Layout:
    """Kaggle's Flickr30k: flickr30k_images/results.csv (image_name| comment_number| comment),
    images in flickr30k_images/flickr30k_images/."""
    lines = ["image_name| comment_number| comment"]
    for i in range(n):
        name = f"{1000092795 + i}.jpg"
        _image(root / "flickr30k_images" / "flickr30k_images" / name, i)
        lines += [f"{name}| {k}| {_caption(i, k)} ." for k in range(5)]
    path = root / "flickr30k_images" / "results.csv"
    path.write_text("\n".join(lines) + "\n")
    return Layout(path, path, path, root / "flickr30k_images" / "flickr30k_images")


VLM_BUILDERS = {
    "internvl-meta": internvl_meta,
    "internvl-counting": internvl_counting,
    "llava": llava_json,
    "sharegpt": sharegpt_jsonl,
    "swift": swift_jsonl,
    "swift-embedding": swift_embedding,
    "webdataset": webdataset_shards,
    "flickr30k-token": flickr30k_token,
    "flickr30k-csv": flickr30k_csv,
}
BUILDERS.update(VLM_BUILDERS)
DETECTED.update(
    {
        "internvl-meta": "internvl",
        "internvl-counting": "internvl",
        "llava": "llava",
        "sharegpt": "sharegpt",
        "swift": "swift",
        "swift-embedding": "swift",
        "webdataset": "webdataset",
        "flickr30k-token": "flickr30k",
        "flickr30k-csv": "flickr30k",
    }
)
