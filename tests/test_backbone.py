from pathlib import Path

import pytest
import torch

from vlmtune.backbone import lm_states, load_backbone, pool_text, preprocess_images, tokenize
from vlmtune.checkpoint import backbone_identity
from vlmtune.config import BackboneConfig
from vlmtune.errors import ConfigError


@pytest.fixture(scope="module")
def tiny():
    return load_backbone(BackboneConfig())


def test_tiny_preset_reads_sizes_from_its_config(tiny) -> None:
    assert tiny.info.vision_hidden == tiny.model.config.vision_config.hidden_size == 64
    assert tiny.info.text_hidden == tiny.model.config.text_config.hidden_size == 64
    assert tiny.info.num_vision_blocks == 2
    assert not any(p.requires_grad for p in tiny.parameters())


def test_tiny_preset_is_the_same_network_every_time(tiny) -> None:
    again = load_backbone(BackboneConfig())
    assert backbone_identity(tiny) == backbone_identity(again)
    assert all(torch.equal(a, b) for a, b in zip(tiny.parameters(), again.parameters()))


def test_local_folder_round_trip_is_the_real_model_path(tiny, tmp_path: Path) -> None:
    """save_pretrained / from_pretrained through backbone.name_or_path, as for OpenGVLab/InternVL3-1B-hf."""
    tiny.save_pretrained(tmp_path / "internvl")
    loaded = load_backbone(BackboneConfig(name_or_path=str(tmp_path / "internvl")))
    assert backbone_identity(loaded)["config_sha256"] == backbone_identity(tiny)["config_sha256"]
    assert all(torch.equal(a, b) for a, b in zip(tiny.parameters(), loaded.parameters()))
    assert loaded.tokenizer("the red circle").input_ids == tiny.tokenizer("the red circle").input_ids
    pv, _ = preprocess_images(loaded.image_processor, [__import__("PIL.Image").Image.new("RGB", (80, 40))])
    assert pv.shape == (1, 3, 64, 64)


def test_unknown_source_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="backbone.name_or_path"):
        load_backbone(BackboneConfig(name_or_path=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="backbone.name_or_path"):
        load_backbone(BackboneConfig(name_or_path=str(tmp_path)))  # a folder without a model


def test_last_token_pooling_for_left_and_right_padding() -> None:
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert torch.equal(pool_text(h, right, "last"), torch.stack([h[0, 1], h[1, 3]]))
    assert torch.equal(pool_text(h, left, "last"), torch.stack([h[0, 3], h[1, 3]]))
    assert torch.allclose(pool_text(h, right, "mean"), torch.stack([h[0, :2].mean(0), h[1].mean(0)]))


def test_text_pooling_is_not_token_zero(tiny) -> None:
    """Two captions with the same first token: token 0 of a causal LM is identical for
    both, the pooled embeddings must not be."""
    enc = tokenize(tiny.tokenizer, ["the red circle", "the blue square left of the frame"], max_tokens=48)
    hidden = tiny.text_tokens(**enc)
    assert torch.allclose(hidden[0, 0], hidden[1, 0])
    for mode in ("last", "mean"):
        pooled = pool_text(hidden, enc["attention_mask"], mode)
        assert not torch.allclose(pooled[0], pooled[1])


def test_language_model_states_keep_no_key_value_cache(tiny) -> None:
    """The config says use_cache (generation wants it); a whole-sequence forward must not
    build the cache (it holds every layer's keys and values), and its states are the
    ones the model computes with it."""
    assert tiny.language_model.config.use_cache
    enc = tokenize(tiny.tokenizer, ["the red circle", "a blue square left of the frame"], max_tokens=48)
    out = lm_states(tiny.language_model, enc["attention_mask"], input_ids=enc["input_ids"])
    assert out.past_key_values is None
    with_cache = tiny.language_model(**enc)
    assert with_cache.past_key_values is not None
    assert torch.equal(out.last_hidden_state, with_cache.last_hidden_state)
    assert torch.equal(tiny.text_tokens(**enc), out.last_hidden_state)


def test_flash_attention_falls_back_to_sdpa_with_a_warning(caplog) -> None:
    """On a machine without flash-attn (or without a suitable GPU) the run goes on with SDPA."""
    import logging

    from vlmtune.backbone import _attn_impl

    with caplog.at_level(logging.WARNING):
        assert _attn_impl("flash_attention_2") == "sdpa"
    assert "flash_attention_2 is not available" in caplog.text
    assert _attn_impl("auto") == "sdpa" and _attn_impl("eager") == "eager"
    b = load_backbone(BackboneConfig(attn_implementation="flash_attention_2"))
    assert b.model.config._attn_implementation == "sdpa"


def test_vision_tower_split_at_any_block_equals_the_whole_tower(tiny) -> None:
    """The cached-prefix path (embeddings + blocks[:k], then blocks[k:] + final norm) is
    the tower's own forward, for every split point; and the projection of its output is
    transformers' get_image_features."""
    pv = torch.randn(3, 3, tiny.info.image_size, tiny.info.image_size)
    with torch.no_grad():
        whole = tiny.vision_tokens(pv)
        for k in range(len(tiny.vision_blocks) + 1):
            split = tiny.vision_from_hidden(tiny.vision_hidden(pv, k), k)
            assert torch.allclose(split, whole, atol=1e-6), k
        assert torch.allclose(tiny.project_vision(whole), tiny.image_features(pv), atol=1e-6)
    assert len(tiny.vision_prefix_modules(1)) == 2
