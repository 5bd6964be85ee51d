"""The frozen vision-language model: InternVL through `transformers`.

:class:`Backbone` loads InternVL from a hub id, a local folder, or the ``tiny`` preset
(a 2-layer InternVL built from a config by `transformers`' own classes, with random
weights and a BPE tokenizer trained locally by `tokenizers`). It reads hidden sizes
from the loaded config, exposes vision tokens and text tokens with the pooling rules
that are right for each tower, and names its components so a stage plan can unfreeze
them by module, never by matching parameter names.

What is built from a backbone lives with its users: cache fingerprints in
``data/cache.py``, the identity a checkpoint records in ``checkpoint.py``, the chat
prompt and tile grid of counting in ``data/counting.py``.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from vlmtune.config.schema import BackboneConfig
from vlmtune.console import quiet_libraries, status
from vlmtune.errors import ConfigError
from vlmtune.remote_code import check_no_remote_code

if TYPE_CHECKING:
    from transformers import InternVLForConditionalGeneration, InternVLVisionModel, PreTrainedConfig, PreTrainedModel

log = logging.getLogger(__name__)

# ImageNet statistics, as InternVL normalises.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
CHAT_START, CHAT_END = "<|im_start|>", "<|im_end|>"
TINY_SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", IMG_START, IMG_END, IMG_CONTEXT, CHAT_START, CHAT_END]

# A small corpus for the tiny preset's tokenizer: the vocabulary of the synthetic data
# sets plus common English, so BPE merges whole words where it can. Any text still
# tokenizes (byte-level BPE), only into more pieces.
_TINY_CORPUS = """
the a an of is are in on at to and or with this that there these image picture photo
red green blue yellow purple orange pink cyan white black gray brown
circle square triangle star diamond cross frame ring box rectangle shape object small large big
left right above below inside outside of the next beside under over
how many receipts receipt are in this image do you see count the there is no none
one two three four five six seven eight nine ten zero 0 1 2 3 4 5 6 7 8 9 10
I can see there are receipts in the picture please answer question user assistant
shop store market total price item items coffee bread milk tea cash card change
"""


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [ln for ln in _TINY_CORPUS.strip().splitlines()]
    # Words with a leading space as well, the way they occur inside sentences.
    lines += [" " + w for ln in lines for w in ln.split()]
    tok.train_from_iterator(lines * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"start_image_token": IMG_START, "end_image_token": IMG_END, "context_image_token": IMG_CONTEXT},
    )


# Presets built from a config with random weights (no download). "tiny" is the embedded
# default (seconds on a CPU); "internvl3-1b-shapes" has the real InternVL3-1B shapes
# (InternViT-300M at 448 px, Qwen2.5-0.5B) so benchmarks pay the real model's costs.
PRESETS = ("tiny", "internvl3-1b-shapes")


def _preset_config(name: str, cfg: BackboneConfig, tokenizer: Any) -> tuple[Any, int]:
    from transformers import InternVLConfig

    special = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    if name == "tiny":
        h, n_layers, size, patch = cfg.tiny_hidden_size, cfg.tiny_layers, cfg.tiny_image_size, 8
        if size % (2 * patch):
            raise ConfigError(f"backbone.tiny_image_size: must be a multiple of {2 * patch}, got {size}")
        heads = max(1, h // 16)
        vision = dict(
            hidden_size=h,
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            intermediate_size=2 * h,
            image_size=[size, size],
            patch_size=[patch, patch],
        )
        text = dict(
            model_type="qwen2",
            hidden_size=h,
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            intermediate_size=2 * h,
            vocab_size=len(tokenizer),
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            **special,
        )
    else:  # internvl3-1b-shapes
        size, patch = 448, 14
        vision = dict(
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            image_size=[size, size],
            patch_size=[patch, patch],
        )
        # The real vocabulary size, so embedding and LM-head costs are the real ones;
        # the stand-in tokenizer only uses the first few hundred ids.
        text = dict(
            model_type="qwen2",
            hidden_size=896,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            intermediate_size=4864,
            vocab_size=151674,
            max_position_embeddings=32768,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            **special,
        )
    tokens_per_tile = (size // patch) ** 2 // 4  # pixel shuffle halves each side
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT),
        image_seq_length=tokens_per_tile,
        downsample_ratio=0.5,
    )
    return config, size


def build_preset(name: str, cfg: BackboneConfig, device_type: str = "cpu"):
    """A real InternVL architecture built by transformers from a config, random weights."""
    from transformers import InternVLForConditionalGeneration

    tokenizer, processor = preset_preprocessing(name, cfg)
    config, _ = _preset_config(name, cfg, tokenizer)
    config._attn_implementation = _attn_impl(cfg.attn_implementation)
    # The random weights stand in for pretrained ones, so they do not vary with the run's
    # seed (and the tiny preset is also saved with every checkpoint).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model: nn.Module = InternVLForConditionalGeneration(config)
    if name != "tiny":
        model = model.to(_resolve_dtype(cfg.dtype, device_type))
    return model, tokenizer, processor


def preset_preprocessing(name: str, cfg: BackboneConfig) -> tuple[Any, Any]:
    """The tokenizer and image processor of preset ``name``, without building its model
    (what a loader reads: the bench's loader section on ``internvl3-1b-shapes``)."""
    from transformers import GotOcr2ImageProcessorPil

    tokenizer = _tiny_tokenizer()
    _, size = _preset_config(name, cfg, tokenizer)
    processor = GotOcr2ImageProcessorPil(
        size={"height": size, "width": size},
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        crop_to_patches=False,
        max_patches=12,
    )
    return tokenizer, processor


def _resolve_dtype(name: str, device_type: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _attn_impl(name: str) -> str:
    """The attention kernel to load with. FlashAttention-2 needs the flash-attn package
    and an Ampere-or-newer GPU; where either is missing InternVL users otherwise meet an
    import error deep in loading, so fall back to SDPA (which itself uses a flash
    kernel where PyTorch has one) and say so."""
    if name == "auto":
        return "sdpa"
    if name == "flash_attention_2":
        import importlib.util

        if not torch.cuda.is_available():
            why = "no CUDA device"
        elif torch.cuda.get_device_capability()[0] < 8:
            why = f"GPU compute capability {torch.cuda.get_device_capability()} < (8, 0)"
        elif importlib.util.find_spec("flash_attn") is None:
            why = "the flash-attn package is not installed"
        else:
            return name
        log.warning("backbone.attn_implementation=flash_attention_2 is not available (%s); using sdpa", why)
        return "sdpa"
    return name


def load_pretrained(cfg: BackboneConfig, source: str | Path, device_type: str = "cpu"):
    """InternVL (hf format) from a hub id or folder, with its tokenizer and a PIL image processor."""
    from transformers import AutoTokenizer, GotOcr2ImageProcessorPil, InternVLForConditionalGeneration

    src = str(source)
    is_dir = Path(src).is_dir()
    if not is_dir and ("/" not in src or src.startswith((".", "/"))):
        raise ConfigError(f"backbone.name_or_path: '{src}' is neither a folder nor a hub id (owner/name) nor 'tiny'")
    if is_dir and not cfg.trust_remote_code:
        # Before transformers opens anything: an auto_map in config.json imports the
        # folder's module while the model loads, whatever trust_remote_code says later.
        check_no_remote_code(src)
    kw: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision and not is_dir:
        kw["revision"] = cfg.revision
    try:
        model = InternVLForConditionalGeneration.from_pretrained(
            src, dtype=_resolve_dtype(cfg.dtype, device_type), attn_implementation=_attn_impl(cfg.attn_implementation), **kw
        )
        tokenizer = AutoTokenizer.from_pretrained(src, **kw)
    except pickle.UnpicklingError as e:
        # torch refused a pickled weights file (weights_only): say so in our words. Its own
        # message advises re-running with weights_only=False, which would run the file's code.
        from vlmtune.utils import unpickling_reason

        bins = sorted(p.name for p in Path(src).glob("*.bin")) if is_dir else []
        where = f"{src}/{bins[0]}" if bins else src
        key = "backbone.name_or_path: " if src == cfg.name_or_path else ""  # else a checkpoint's backbone
        raise ConfigError(
            f"{key}{where}: refused: a pickled weights file that is not only tensors "
            f"({unpickling_reason(e)}); nothing in it was run. Use the model's safetensors weights "
            f"(model.safetensors) from a source you trust"
        ) from None
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        why = " (HF_HUB_OFFLINE=1: only local folders and the local cache are searched)" if offline else ""
        raise ConfigError(f"backbone.name_or_path: cannot load '{src}'{why}: {str(e).splitlines()[0]}") from None
    size = _side(cast("PreTrainedConfig", model.config.vision_config).image_size)  # a config once loaded
    try:
        # The PIL processor does InternVL's resizing and dynamic tiling without torchvision.
        processor = GotOcr2ImageProcessorPil.from_pretrained(src, **kw)
    except (OSError, ValueError, TypeError):
        processor = GotOcr2ImageProcessorPil(
            size={"height": size, "width": size}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
        )
    processor.crop_to_patches = False
    return model, tokenizer, processor


def _side(size: int | list[int] | tuple[int, ...]) -> int:
    """A vision config's image or patch size, stored as one int or as [height, width]
    (square in InternVL)."""
    return int(size[0] if isinstance(size, (list, tuple)) else size)


@dataclass(frozen=True)
class BackboneInfo:
    vision_hidden: int
    text_hidden: int
    image_size: int
    patch_size: int
    num_vision_blocks: int
    tokens_per_tile: int


class Backbone(nn.Module):
    """InternVL with named components and pooled features."""

    def __init__(
        self,
        model: InternVLForConditionalGeneration,
        tokenizer: Any,
        image_processor: Any,
        source: str,
        revision: str | None = None,
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.source = source
        self.revision = revision
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        mc = model.config
        vc = cast("PreTrainedConfig", mc.vision_config)  # a config once built (the stubs allow dict and None)
        size, patch = _side(vc.image_size), _side(vc.patch_size)
        self.info = BackboneInfo(
            vision_hidden=vc.hidden_size,
            text_hidden=cast("PreTrainedConfig", mc.text_config).hidden_size,
            image_size=size,
            patch_size=patch,
            num_vision_blocks=len(self.vision_blocks),
            tokens_per_tile=int((size // patch) ** 2 * mc.downsample_ratio**2),
        )
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        # The tiny preset travels inside every checkpoint, as it was before any stage
        # trained a block of it (trained blocks live in the checkpoint's weights), so
        # each checkpoint's backbone folder is the same network.
        self.pristine = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if source == "tiny" else None

    # ---- components, by module
    @property
    def vision_tower(self) -> InternVLVisionModel:
        return self.model.model.vision_tower

    @property
    def vision_blocks(self) -> nn.ModuleList:
        return self.model.model.vision_tower.encoder.layer

    @property
    def mm_projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    @property
    def language_model(self) -> PreTrainedModel:
        return self.model.model.language_model

    def component_modules(self, name: str, vision_blocks: int = 0) -> list[nn.Module]:
        """Modules making up a named backbone component."""
        if name == "vision_blocks":
            n = len(self.vision_blocks)
            if vision_blocks > n:
                raise ConfigError(f"stages: vision_blocks={vision_blocks} but the vision tower has only {n} blocks")
            # The final norm after the last block trains with it.
            return list(self.vision_blocks[n - vision_blocks :]) + [self.vision_tower.layernorm]
        if name == "vision_tower":
            return [self.vision_tower]
        if name == "mm_projector":
            return [self.mm_projector]
        if name == "language_model":
            return [self.language_model, self.model.lm_head]
        raise KeyError(name)

    # ---- features
    def vision_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Last hidden state of the vision tower, [B, 1 + patches, Dv] (CLS first)."""
        dtype = next(self.vision_tower.parameters()).dtype
        return self.vision_tower(pixel_values=pixel_values.to(dtype)).last_hidden_state

    def text_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden state of the language model over text alone, [B, T, Dt] (no
        key/value cache: see :func:`lm_states`)."""
        return lm_states(self.language_model, attention_mask, input_ids=input_ids).last_hidden_state

    # ---- the vision tower in two parts: a frozen prefix (cacheable) and the rest
    # A stage that trains only the last N blocks leaves embeddings + blocks[:L-N] frozen:
    # their output (the hidden state entering block L-N) can come from the feature cache,
    # and only blocks[L-N:] (and the final norm) run live. ``start`` names that boundary:
    # L means the whole tower is frozen (only the final norm runs on the cached state).
    def vision_hidden(self, pixel_values: torch.Tensor, upto: int) -> torch.Tensor:
        """Hidden state after the patch embeddings and ``blocks[:upto]``, [B, 1 + patches, Dv]."""
        tower = self.vision_tower
        hidden = tower.embeddings(pixel_values.to(next(tower.parameters()).dtype))
        for block in self.vision_blocks[:upto]:
            hidden = block(hidden)
        return hidden

    def vision_from_hidden(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """The tower's last hidden state (what :meth:`vision_tokens` returns) from the
        state entering block ``start`` (a cache's rows, cast to the tower's dtype):
        ``blocks[start:]`` and the final norm, run live."""
        hidden = hidden.to(next(self.vision_tower.parameters()).dtype)
        for block in self.vision_blocks[start:]:
            hidden = block(hidden)
        return self.vision_tower.layernorm(hidden)

    def vision_prefix_modules(self, upto: int) -> list[nn.Module]:
        """The modules whose weights decide :meth:`vision_hidden` (``upto`` blocks): what a
        cache of that state is keyed by."""
        return [self.vision_tower.embeddings, *self.vision_blocks[:upto]]

    def project_vision(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """The tower's last hidden state [T, 1 + patches, Dv] -> projected image tokens
        [T, tokens_per_tile, Dt]: InternVL's feature selection, pixel shuffle and
        projector (``get_image_features`` after its tower call), for
        ``vision_feature_layer`` = -1, the value every InternVL3 checkpoint ships."""
        mm = self.model.model
        mc = self.model.config
        if mc.vision_feature_layer != -1:
            raise ValueError(
                f"vision_feature_layer={mc.vision_feature_layer}: only -1 (the last layer) is supported from cached vision states"
            )
        feats = vision_tokens[:, 1:, :] if mc.vision_feature_select_strategy == "default" else vision_tokens
        n, side = feats.shape[0], int(feats.shape[1] ** 0.5)
        feats = mm.pixel_shuffle(feats.reshape(n, side, side, -1), scale_factor=mc.downsample_ratio)
        return mm.multi_modal_projector(feats.reshape(n, -1, feats.shape[-1]))

    # ---- multimodal inputs (image tokens in the LM's sequence, as InternVL does)
    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles [T, 3, S, S] -> projected image tokens [T, tokens_per_tile, Dt] (pixel shuffle + projector)."""
        dtype = next(self.vision_tower.parameters()).dtype
        mc = self.model.config
        out = self.model.model.get_image_features(
            pixel_values=pixel_values.to(dtype),
            vision_feature_layer=mc.vision_feature_layer,
            vision_feature_select_strategy=mc.vision_feature_select_strategy,
            return_dict=True,
        )
        return out.pooler_output

    def embed_multimodal(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, *, vision_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings with every image placeholder replaced by its image feature, [B, L, Dt].

        The image features come from the tiles' ``pixel_values`` [T, 3, S, S], or from
        ``vision_tokens`` [T, 1 + patches, Dv], the tower's last hidden state for those
        tiles (a feature cache's rows): only the projector then runs, so it still trains.

        Feeding these as ``inputs_embeds`` (rather than ``pixel_values`` to ``generate``)
        keeps beam search right: ``generate`` expands rows per beam, but would expand a
        flat [tiles, ...] pixel tensor tile by tile, pairing beams with the wrong tiles.
        """
        embeds = self.model.get_input_embeddings()(input_ids)
        mask = input_ids == self.image_token_id
        if (pixel_values is None) == (vision_tokens is None):
            raise ValueError("embed_multimodal: give either pixel_values or vision_tokens")
        if vision_tokens is not None:
            feats = self.project_vision(vision_tokens.to(next(self.mm_projector.parameters()).dtype))
        else:
            assert pixel_values is not None  # one of the two, checked above
            feats = self.image_features(pixel_values)
        n_ph, n_feat = int(mask.sum()), feats.shape[0] * feats.shape[1]
        if n_ph != n_feat:
            raise ValueError(f"{n_ph} image placeholder tokens but {n_feat} image features")
        return embeds.masked_scatter(mask.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]).to(embeds.dtype))

    # ---- training mode and gradient checkpointing
    def train(self, mode: bool = True) -> Backbone:
        """The frozen backbone stays in eval mode (its dropout off) whatever ``mode`` is.

        Two kinds of module follow ``mode``: LoRA layers (their dropout is part of the
        method) and layers under gradient checkpointing, which transformers only
        recomputes in training mode. InternVL's vision and text layers have no dropout
        at their shipped rates (0.0), so this changes memory, not results.
        """
        super().train(False)
        self.training = mode
        for m in self._follow_mode():
            m.train(mode)
        return self

    def _follow_mode(self) -> list[nn.Module]:
        mods = list(getattr(self, "_checkpointed", []))
        try:
            from peft.tuners.lora import LoraLayer

            mods += [m for m in self.modules() if isinstance(m, LoraLayer)]
        except ImportError:  # pragma: no cover - peft is a dependency
            pass
        return mods

    def set_gradient_checkpointing(self, components: set[str]) -> None:
        """Recompute activations in the backward pass of the towers that ``components``
        train (vision_blocks / vision_tower, language_model); off for the others."""
        self._checkpointed: list[nn.Module] = []
        kwargs = {"use_reentrant": False}
        for tower, names in ((self.vision_tower, {"vision_blocks", "vision_tower"}), (self.language_model, {"language_model"})):
            if tower.is_activation_checkpointing:
                tower.activation_checkpointing_disable()
            if names & components:
                tower.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
                self._checkpointed.append(tower)
        self.train(self.training)

    def set_attention(self, implementation: str) -> None:
        """Switch the attention kernel, e.g. to "eager" for a pass that returns attention maps
        (SDPA computes none)."""
        self.model.set_attn_implementation(implementation)

    # ---- saving, loading's mirror
    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        # The backbone is saved as transformers loads it: without LoRA adapters a task may
        # have injected (those go to the checkpoint's own weights file).
        state = self.pristine if self.pristine is not None else _without_lora(self.model)
        self.model.save_pretrained(folder, state_dict=state)
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)


def _without_lora(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as if no peft LoRA layer had been injected."""
    sd = model.state_dict()
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return sd
    wrapped = [name for name, mod in model.named_modules() if isinstance(mod, LoraLayer)]
    if not wrapped:
        return sd
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        owner = next((w for w in wrapped if key.startswith(w + ".")), None)
        if owner is None:
            out[key] = value
            continue
        rest = key[len(owner) + 1 :]
        if rest.startswith("base_layer."):
            out[f"{owner}.{rest[len('base_layer.') :]}"] = value
        # lora_A / lora_B / dropout entries belong to the adapter, not the backbone
    return out


def lm_states(language_model: nn.Module, attention_mask: torch.Tensor, **inputs: Any) -> Any:
    """The language model's forward over a whole sequence (``input_ids`` or
    ``inputs_embeds``) without a key/value cache. transformers builds one whenever the
    config's ``use_cache`` is on, and it keeps every layer's keys and values until the
    forward returns: nothing here reads it, and at InternVL3-1B's shapes (8 x 1,024
    tokens, no gradients) it raised the peak memory from 0.9 to 1.5 GB. Returns the
    model's output; its ``last_hidden_state`` is [B, L, Dt]."""
    return language_model(attention_mask=attention_mask, use_cache=False, **inputs)


def tokenize(tokenizer: Any, texts: list[str], max_tokens: int) -> dict[str, torch.Tensor]:
    """Captions for the text tower, padded on the right: a causal LM's states of the
    real tokens then do not depend on the padding (so they can also be cached)."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt", padding_side="right")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def preprocess_images(processor: Any, images: list[Any], max_tiles: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL images -> (pixel_values [tiles, 3, S, S], tiles per image [B]).

    With ``max_tiles`` > 1 an image is cut into up to that many tiles on the grid that
    best fits its aspect ratio, plus a thumbnail, as InternVL does.
    """
    kw: dict[str, Any] = {"crop_to_patches": max_tiles > 1}
    if max_tiles > 1:
        kw["max_patches"] = max_tiles
    out = processor(images=images, return_tensors="pt", **kw)
    n = out.get("num_patches")
    n = torch.as_tensor(n) if n is not None else torch.ones(len(images), dtype=torch.long)
    return out["pixel_values"], n


def pool_text(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool a causal LM's token states: the last real token, or the masked mean.

    Token 0 of a causal LM has only seen itself, so it is the same for every caption
    that starts alike; it is never a sentence embedding.
    """
    mask = attention_mask.to(hidden.dtype)
    if mode == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
    # Position of the last 1 in the mask works for left and right padding alike.
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = (positions * attention_mask.long()).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def load_backbone(cfg: BackboneConfig, device_type: str = "cpu", folder: str | Path | None = None) -> Backbone:
    """Build the backbone a config asks for; ``folder`` overrides the source (checkpoints).
    transformers' own bars and messages stay out of it unless ``--verbose``."""
    if cfg.name_or_path not in PRESETS:  # a real model: seconds to minutes (a preset: well under one)
        status("loading the backbone %s%s", cfg.name_or_path, f" from {folder}" if folder is not None else "")
    with quiet_libraries():
        if folder is not None:
            model, tok, proc = load_pretrained(cfg, folder, device_type)
        elif cfg.name_or_path in PRESETS:
            model, tok, proc = build_preset(cfg.name_or_path, cfg, device_type)
        else:
            model, tok, proc = load_pretrained(cfg, cfg.name_or_path, device_type)
    return Backbone(model, tok, proc, source=cfg.name_or_path, revision=cfg.revision)
