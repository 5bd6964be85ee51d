"""vlmtune export: peft adapter, merged Hugging Face model, self-contained checkpoint.

Each format is loaded back the way its users would (PeftModel.from_pretrained on the
base InternVL, AutoModelForImageTextToText.from_pretrained, vlmtune's own loader and
`vlmtune evaluate`) and must give the checkpoint's outputs to float tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmtune.cli import main

ATOL = 1e-4


@pytest.fixture()
def lora_ckpt(lora_counting_checkpoint: Path) -> Path:
    return lora_counting_checkpoint


@pytest.fixture()
def retrieval_ckpt(retrieval_checkpoint: Path) -> Path:
    return retrieval_checkpoint


def _load(folder: Path):
    from vlmtune.checkpoint import open_checkpoint
    from vlmtune.evaluate import load_model

    ckpt = open_checkpoint(folder)
    model, _ = load_model(ckpt, torch.device("cpu"))
    return model, ckpt.cfg


def _counting_inputs(model, cfg, image_path: Path):
    """(input_ids [1, L], pixel_values [tiles, 3, S, S]) of one question about one image."""
    from vlmtune.backbone import preprocess_images
    from vlmtune.tasks.counting import prompt_builder

    bb = model.backbone
    pv, tiles = preprocess_images(bb.image_processor, [Image.open(image_path).convert("RGB")], cfg.counting.max_dynamic_patch)
    ids = prompt_builder(bb, cfg.counting).prompt_ids("How many receipts are in this image?", int(tiles[0]))
    return torch.tensor([ids]), pv


def _first_image(ckpt: Path) -> Path:
    from vlmtune.checkpoint import open_checkpoint

    test = Path(open_checkpoint(ckpt).state.data_paths["test"])
    return test.parent / json.loads(test.read_text().splitlines()[0])["image"]


@torch.no_grad()
def _counting_outputs(model, ids, pv):
    """LM logits over the prompt and the count head's logits, as vlmtune computes them."""
    logits = model.backbone.model(input_ids=ids, pixel_values=pv).logits
    hidden = model.hidden_states(ids, torch.ones_like(ids), pv)
    return logits, model.count_logits(hidden, ids, torch.tensor([ids.shape[1] - 1]))


def test_peft_adapter_loads_with_peftmodel_and_matches(lora_ckpt: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "adapter"
    assert main(["export", str(lora_ckpt), "--out", str(out), "--format", "peft"]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors", "vlmtune_heads.safetensors"} <= {p.name for p in out.iterdir()}
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "LORA" and adapter_cfg["r"] == 4
    # The trained projector and vision block travel as modules_to_save.
    assert "model.multi_modal_projector.linear_1" in adapter_cfg["modules_to_save"]
    assert "model.vision_tower.encoder.layer.1" in adapter_cfg["modules_to_save"]

    model, cfg = _load(lora_ckpt)
    ids, pv = _counting_inputs(model, cfg, _first_image(lora_ckpt))
    want, want_count = _counting_outputs(model, ids, pv)

    base = AutoModelForImageTextToText.from_pretrained(lora_ckpt / "backbone").eval()
    with torch.no_grad():
        plain = base(input_ids=ids, pixel_values=pv).logits
    assert not torch.allclose(plain, want, atol=1e-3)  # the adapter changes the model: the check below means something
    peft_model = PeftModel.from_pretrained(base, out).eval()
    # LoRA only where vlmtune injected it: the language model, never the vision tower.
    wrapped = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "lora_A" not in n.split(".")[-1]]
    assert wrapped and all(".language_model." in n for n in wrapped)
    assert len(wrapped) == 2 * cfg.backbone.tiny_layers  # q_proj and v_proj of each layer
    with torch.no_grad():
        got = peft_model(input_ids=ids, pixel_values=pv).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)

    heads = load_file(str(out / "vlmtune_heads.safetensors"))
    own = {k: v for k, v in model.state_dict().items() if k.startswith("count_head.")}
    assert set(heads) == set(own) and all(torch.equal(heads[k], own[k]) for k in own)
    assert torch.isfinite(want_count).all()


def test_merged_loads_in_transformers_and_in_vlmtune(lora_ckpt: Path, tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "merged"
    assert main(["export", str(lora_ckpt), "--out", str(out), "--format", "merged"]) == 0
    model, cfg = _load(lora_ckpt)
    ids, pv = _counting_inputs(model, cfg, _first_image(lora_ckpt))
    want, want_count = _counting_outputs(model, ids, pv)

    hf = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in hf.named_parameters())
    with torch.no_grad():
        got = hf(input_ids=ids, pixel_values=pv).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)

    # vlmtune reads the same folder back: heads beside the merged backbone, no LoRA left.
    back, back_cfg = _load(out)
    assert back_cfg.counting.lm_mode == "full"
    got, got_count = _counting_outputs(back, ids, pv)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(got_count, want_count, atol=ATOL, rtol=1e-4)

    # ...and evaluates it to the checkpoint's own metrics.
    capsys.readouterr()
    assert main(["evaluate", str(lora_ckpt), "--output-dir", str(tmp_path / "e0")]) == 0
    assert main(["evaluate", str(out), "--output-dir", str(tmp_path / "e1")]) == 0
    m0 = json.loads((tmp_path / "e0/metrics.json").read_text())
    m1 = json.loads((tmp_path / "e1/metrics.json").read_text())
    assert m1["count/accuracy"] == m0["count/accuracy"]
    assert m1["text/perplexity"] == pytest.approx(m0["text/perplexity"], rel=1e-4)


def test_vlmtune_format_is_a_self_contained_checkpoint(lora_ckpt: Path, retrieval_ckpt: Path, tmp_path: Path) -> None:
    from vlmtune.backbone import preprocess_images, tokenize

    out = tmp_path / "counting"
    assert main(["export", str(lora_ckpt), "--out", str(out), "--format", "vlmtune"]) == 0
    assert (out / "backbone" / "config.json").is_file() and not (out / "trainer_state.pt").exists()
    model, cfg = _load(lora_ckpt)
    ids, pv = _counting_inputs(model, cfg, _first_image(lora_ckpt))
    want = _counting_outputs(model, ids, pv)
    back, _ = _load(out)
    for g, w in zip(_counting_outputs(back, ids, pv), want):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=1e-4)

    # A retrieval checkpoint with a trained vision block, in both formats that fit it.
    model, cfg = _load(retrieval_ckpt)
    bb = model.backbone
    pv, _ = preprocess_images(bb.image_processor, [Image.open(_first_image_retrieval(retrieval_ckpt)).convert("RGB")])
    enc = tokenize(bb.tokenizer, ["a red circle left of a blue square", "a star"], cfg.backbone.max_text_tokens)
    with torch.no_grad():
        want_img, want_txt = model.encode_image(pv)[0], model.encode_text(enc["input_ids"], enc["attention_mask"])
    for fmt in ("vlmtune", "merged"):
        dest = tmp_path / f"retrieval_{fmt}"
        assert main(["export", str(retrieval_ckpt), "--out", str(dest), "--format", fmt]) == 0
        back, _ = _load(dest)
        with torch.no_grad():
            torch.testing.assert_close(back.encode_image(pv)[0], want_img, atol=ATOL, rtol=1e-4)
            torch.testing.assert_close(back.encode_text(enc["input_ids"], enc["attention_mask"]), want_txt, atol=ATOL, rtol=1e-4)


def _first_image_retrieval(ckpt: Path) -> Path:
    from vlmtune.checkpoint import open_checkpoint

    test = Path(open_checkpoint(ckpt).state.data_paths["test"])
    return test.parent / json.loads(test.read_text())[0]["image"]


def test_export_refusals(retrieval_ckpt: Path, tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["export", str(retrieval_ckpt), "--out", str(tmp_path / "a"), "--format", "peft"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "retrieval" in err and "no LoRA" in err and "Traceback" not in err
    assert not (tmp_path / "a").exists()

    full = tmp_path / "taken"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert main(["export", str(retrieval_ckpt), "--out", str(full), "--format", "vlmtune"]) == 2
    assert "not empty" in capsys.readouterr().err and (full / "keep.txt").read_text() == "mine"

    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "b")]) == 2
    assert "not found" in capsys.readouterr().err


# --------------------------------------------------------------------------- the write path


def test_export_never_follows_a_planted_temp_link_nor_removes_a_users_folder(
    lora_ckpt: Path, retrieval_ckpt: Path, tmp_path: Path, capsys
) -> None:
    import os

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "mine.txt").write_text("mine")
    out = tmp_path / "adapter"
    (tmp_path / "adapter.export-tmp").symlink_to(victim, target_is_directory=True)
    old = os.umask(0o022)
    try:
        assert main(["export", str(lora_ckpt), "--out", str(out), "--format", "peft"]) == 0
    finally:
        os.umask(old)
    assert sorted(p.name for p in victim.iterdir()) == ["mine.txt"]  # nothing written through the link
    assert (tmp_path / "adapter.export-tmp").is_symlink()  # and the link itself left alone
    assert (out / "adapter_model.safetensors").is_file()
    assert out.stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.iterdir() if p.is_file())

    # A folder of the user's that happens to have the old temporary name stays as it was.
    users = tmp_path / "ret.export-tmp"
    users.mkdir()
    (users / "notes.txt").write_text("keep me")
    assert main(["export", str(retrieval_ckpt), "--out", str(tmp_path / "ret"), "--format", "vlmtune"]) == 0
    assert (users / "notes.txt").read_text() == "keep me"
    # Nothing of vlmtune's is left beside --out: only what was there and the export.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["victim", "adapter", "adapter.export-tmp", "ret", "ret.export-tmp"]
    )

    # --out itself a link (to an empty folder, or dangling) is refused, its target untouched.
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "link").symlink_to(empty, target_is_directory=True)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    capsys.readouterr()
    for name in ("link", "dangling"):
        assert main(["export", str(retrieval_ckpt), "--out", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert "symbolic link" in err and len(err.strip().splitlines()) == 1
    assert list(empty.iterdir()) == [] and not (tmp_path / "nowhere").exists()


def test_export_failure_removes_only_its_own_temp_folder(retrieval_ckpt: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import vlmtune.export as ex

    def boom(ckpt, dest):
        dest.mkdir()
        (dest / "half.bin").write_bytes(b"x")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ex, "_export_vlmtune", boom)
    (tmp_path / "keep").mkdir()
    assert main(["export", str(retrieval_ckpt), "--out", str(tmp_path / "o")]) == 2
    assert "no space left" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]


# --------------------------------------------------------------------------- the fingerprint


def test_an_export_serves_the_checkpoints_index(retrieval_ckpt: Path, scenes: Path, tmp_path: Path, capsys) -> None:
    import vlmtune
    from vlmtune.checkpoint import open_checkpoint, write_manifest
    from vlmtune.fingerprint import fingerprint_parts, own_fingerprint

    src = vlmtune.load(retrieval_ckpt)
    images = sorted((scenes / "images").iterdir())[:6]
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in images:
        (folder / p.name).write_bytes(p.read_bytes())
    assert main(["embed", str(retrieval_ckpt), "--images", str(folder), "--out", str(tmp_path / "emb"), "--no-progress"]) == 0
    assert main(["index", str(tmp_path / "emb"), "--out", str(tmp_path / "idx")]) == 0
    for fmt in ("merged", "vlmtune"):
        dest = tmp_path / fmt
        assert main(["export", str(retrieval_ckpt), "--out", str(dest), "--format", fmt]) == 0
        exp = vlmtune.load(dest)
        assert exp.fingerprint == src.fingerprint
        if fmt == "merged":  # its own files differ (heads only beside the merged backbone)...
            assert own_fingerprint(exp.checkpoint) != src.fingerprint
            assert fingerprint_parts(exp.checkpoint)["weights"] != fingerprint_parts(src.checkpoint)["weights"]
        # ...but it computes the checkpoint's embeddings, so the checkpoint's index serves it.
        torch.testing.assert_close(exp.embed_images(images), src.embed_images(images), atol=1e-5, rtol=1e-5)
        capsys.readouterr()
        assert main(["search", str(tmp_path / "idx"), "--text", "a red circle", "--checkpoint", str(dest), "--json"]) == 0
        with_export = json.loads(capsys.readouterr().out)
        assert main(["search", str(tmp_path / "idx"), "--text", "a red circle", "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == with_export

    # An export whose files changed since (weights re-saved, manifest rewritten) is another model.
    from safetensors.torch import load_file, save_file

    dest = tmp_path / "merged"
    w = load_file(str(dest / "weights.safetensors"))
    k = next(iter(w))
    w[k] = w[k] + 1
    save_file(w, str(dest / "weights.safetensors"))
    write_manifest(dest)
    changed = open_checkpoint(dest)
    from vlmtune.fingerprint import checkpoint_fingerprint

    assert checkpoint_fingerprint(changed) == own_fingerprint(changed) != src.fingerprint
    assert main(["search", str(tmp_path / "idx"), "--text", "a red circle", "--checkpoint", str(dest)]) == 2
    assert "is not the model that built" in capsys.readouterr().err
    # A run folder given for the checkpoint is named as such, with the checkpoint to use.
    run = retrieval_ckpt.parent.parent
    assert main(["search", str(tmp_path / "idx"), "--text", "a red circle", "--checkpoint", str(run)]) == 2
    assert f"is a run folder, not a checkpoint; use {run / 'checkpoints' / 'best'}" in capsys.readouterr().err


def test_peft_adapter_config_names_its_base_from_anywhere(
    lora_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exported from a relative checkpoint path, adapter_config.json names the local
    base by its absolute, resolved path (loads from another folder); a hub id stays as
    it is; the files follow the umask (0644 under 022)."""
    import os

    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from vlmtune.export import portable_base

    monkeypatch.chdir(lora_ckpt.parent)
    out = tmp_path / "adapter"
    old = os.umask(0o022)
    try:
        assert main(["export", lora_ckpt.name, "--out", str(out), "--format", "peft"]) == 0
    finally:
        os.umask(old)
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str((lora_ckpt / "backbone").resolve()) and Path(base).is_absolute()
    assert json.loads((out / "vlmtune_export.json").read_text())["base_model"] == base
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {p.name: 0o644 for p in out.iterdir()} and (
        out / "adapter_model.safetensors"
    ).is_file()

    monkeypatch.chdir(tmp_path)  # another folder: the recorded path still finds the base
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), out)
    assert any(".lora_A." in n for n, _ in model.named_parameters())

    assert portable_base("OpenGVLab/InternVL3-1B-hf") == "OpenGVLab/InternVL3-1B-hf"  # a hub id: as it is
    (tmp_path / "local" / "base").mkdir(parents=True)
    assert portable_base("local/base") == str((tmp_path / "local" / "base").resolve())
