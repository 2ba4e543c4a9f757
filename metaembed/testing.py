"""Small random Qwen-VL backbones built offline, for tests, the demo and benchmarks.

No weights can be downloaded in those settings, so this writes a complete backbone folder (config,
safetensors, tokenizer, image processor) with a byte-level tokenizer and a few-layer model.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from transformers import AutoModel, Qwen2_5_VLConfig, Qwen2Tokenizer, Qwen2VLConfig, Qwen3VLConfig
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

BackboneFamily = Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
BACKBONE_FAMILIES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# Qwen2-VL special tokens in their real order (the real ids start at 151643).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def build_tiny_tokenizer() -> Qwen2Tokenizer:
    """A Qwen2 tokenizer over the 256 byte symbols (no merges) plus the Qwen-VL special tokens."""
    vocab = {symbol: index for index, symbol in enumerate(bytes_to_unicode().values())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


def build_tiny_backbone_config(
    family: BackboneFamily = "qwen2_5_vl",
    tokenizer: Qwen2Tokenizer | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vision_depth: int = 2,
    initializer_range: float = 0.02,
):
    """Config of a small `family` backbone whose special-token ids match `tokenizer`.

    `initializer_range` is the std of the random weights (language model and vision tower)."""
    tokenizer = tokenizer or build_tiny_tokenizer()
    token_id = tokenizer.convert_tokens_to_ids
    head_dim = hidden_size // num_heads
    # M-RoPE sections (temporal, height, width) must sum to head_dim / 2.
    spatial = (head_dim // 2) * 3 // 8
    mrope_section = [head_dim // 2 - 2 * spatial, spatial, spatial]
    text_config = dict(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        head_dim=head_dim,
        vocab_size=len(tokenizer),
        max_position_embeddings=32768,
        initializer_range=initializer_range,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
        bos_token_id=token_id("<|endoftext|>"),
        eos_token_id=token_id("<|im_end|>"),
        pad_token_id=token_id("<|endoftext|>"),
    )
    composite_options = dict(  # the top-level config: its init std and special-token ids
        initializer_range=initializer_range,
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
    )
    vision = dict(
        depth=vision_depth,
        num_heads=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        initializer_range=initializer_range,
    )
    if family == "qwen2_vl":
        vision_config = dict(vision, embed_dim=32, hidden_size=hidden_size, mlp_ratio=2)
        return Qwen2VLConfig(text_config=text_config, vision_config=vision_config, **composite_options)
    if family == "qwen2_5_vl":
        vision_config = dict(
            vision,
            hidden_size=32,
            out_hidden_size=hidden_size,
            intermediate_size=64,
            window_size=56,
            fullatt_block_indexes=[vision_depth - 1],
        )
        return Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, **composite_options)
    if family == "qwen3_vl":
        vision_config = dict(
            vision,
            hidden_size=32,
            out_hidden_size=hidden_size,
            intermediate_size=64,
            deepstack_visual_indexes=[vision_depth - 1],
            num_position_embeddings=64,
        )
        return Qwen3VLConfig(text_config=text_config, vision_config=vision_config, **composite_options)
    raise ValueError(f"family must be one of {BACKBONE_FAMILIES}, got {family!r}")


def save_tiny_backbone(
    folder: str | os.PathLike,
    family: BackboneFamily = "qwen2_5_vl",
    seed: int = 0,
    max_image_tokens: int = 64,
    **config_kwargs,
) -> str:
    """Write a random `family` backbone folder (weights, tokenizer, image processor) loadable offline.

    `max_image_tokens` caps merged image tokens per image (max_pixels = N * 28 * 28).
    """
    tokenizer = build_tiny_tokenizer()
    config = build_tiny_backbone_config(family, tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    folder = os.fspath(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=4 * 28 * 28, max_pixels=max_image_tokens * 28 * 28)
    image_processor.save_pretrained(folder)
    return folder


__all__ = ["BACKBONE_FAMILIES", "build_tiny_backbone_config", "build_tiny_tokenizer", "save_tiny_backbone"]
