"""Small random vision-language backbones built offline, for tests, the demo and benchmarks.

No weights can be downloaded in those settings, so this writes complete backbone folders shaped like the real
Hub repositories: the `*ForConditionalGeneration` weights (safetensors), the config with token ids matching the
tokenizer, a byte-level tokenizer of the family's class holding the family's real special tokens in their real
order, the family's image processor at a tiny image size, its processor settings and chat template. Every family
builds in well under a second (hidden size 64, 2 layers).

The three original Qwen families (`BACKBONE_FAMILIES`) keep their historic layout (bare model weights, tokenizer
and image processor only) so that folders, and the vectors tests and the demo compute from them, stay unchanged.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModel,
    AutoModelForImageTextToText,
    GemmaTokenizer,
    GPT2Tokenizer,
    LlamaTokenizer,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen3VLConfig,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

BackboneFamily = Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
BACKBONE_FAMILIES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# Every family MetaEmbed supports (issue 15), by the name `save_tiny_backbone` takes. `paligemma` has Gemma text,
# `paligemma2` Gemma2 text (both are model_type "paligemma").
SUPPORTED_FAMILIES: tuple[str, ...] = (
    *BACKBONE_FAMILIES,
    "qwen3_vl_moe",
    "qwen3_5",
    "mllama",
    "paligemma",
    "paligemma2",
    "idefics3",
    "smolvlm",
    "gemma3",
    "llava_onevision",
    "llava_next",
    "internvl",
)
# Vision-language models MetaEmbed refuses (examples for refusal tests): each is model_type == family name.
UNSUPPORTED_FAMILIES: tuple[str, ...] = ("llava", "aya_vision", "mistral3", "glm4v")
# The paper's backbones (Qwen2.5-VL 3B/7B/32B and Llama-3.2-11B-Vision).
PAPER_FAMILIES: tuple[str, ...] = ("qwen2_5_vl", "mllama")
# Families whose real processor bundles a video processor: it needs torchvision to be constructed, so the
# processor files are written here without constructing it (see `_save_processor`).
VIDEO_PROCESSOR_FAMILIES: tuple[str, ...] = (
    "qwen3_vl_moe",
    "qwen3_5",
    "smolvlm",
    "llava_onevision",
    "internvl",
    "glm4v",
)

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
# Llama 3 special tokens in their real order (ids 128000..128010), then Mllama's image token (128256).
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
# Gemma's first ids: <pad> 0, <eos> 1, <bos> 2, <unk> 3, <mask> 4; turn markers follow later in the vocabulary.
GEMMA_BASE_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
GEMMA_TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>")
# SentencePiece Llama / Mistral: <unk> 0, <s> 1, </s> 2.
SENTENCEPIECE_BASE_TOKENS = ("<unk>", "<s>", "</s>")
# Idefics3 / SmolVLM tile tags: "<row_i_col_j>" for the largest grid their image processors produce here.
IDEFICS3_TILE_TOKENS = tuple(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7))

QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Llama 3.2 Vision's template writes today's date into the system turn (as the real one does).
MLLAMA_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    '{%- set date_string = strftime_now("%d %b %Y") %}{%- else %}{%- set date_string = "26 Jul 2024" %}{%- endif %}'
    "{%- endif %}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] | trim }}{%- else %}"
    "{%- for content in message['content'] %}{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] | trim }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
IDEFICS3_CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SMOLVLM_CHAT_TEMPLATE = IDEFICS3_CHAT_TEMPLATE.replace("<|begin_of_text|>", "<|im_start|>")
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{% endif %}{{ '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAVA_NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{% endif %}{% if message['role'] == 'user' %}{{ ' [/INST]' }}{% else %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are InternVL, a multimodal large language model.<|im_end|>\\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' }}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
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
    """Config of a small Qwen M-RoPE `family` backbone whose special-token ids match `tokenizer`.

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
    qwen3_vision_config = dict(
        vision, hidden_size=32, out_hidden_size=hidden_size, intermediate_size=64, num_position_embeddings=64
    )
    if family == "qwen3_vl":
        vision_config = dict(qwen3_vision_config, deepstack_visual_indexes=[vision_depth - 1])
        return Qwen3VLConfig(text_config=text_config, vision_config=vision_config, **composite_options)
    if family == "qwen3_vl_moe":
        from transformers import Qwen3VLMoeConfig

        moe_options = dict(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden_size, decoder_sparse_step=1
        )
        vision_config = dict(qwen3_vision_config, deepstack_visual_indexes=[vision_depth - 1])
        return Qwen3VLMoeConfig(
            text_config=dict(text_config, **moe_options), vision_config=vision_config, **composite_options
        )
    if family == "qwen3_5":
        from transformers import Qwen3_5Config

        # Qwen3.5 interleaves Gated DeltaNet (linear attention) layers with full attention, and rotates only part
        # of each head (partial_rotary_factor): the M-RoPE sections cover that part.
        rotary_half = head_dim // 4
        spatial = rotary_half * 3 // 8 or 1
        rope_parameters = dict(
            rope_type="default",
            rope_theta=10000.0,
            partial_rotary_factor=0.5,
            mrope_section=[rotary_half - 2 * spatial, spatial, spatial],
            mrope_interleaved=True,
        )
        hybrid = dict(
            rope_parameters=rope_parameters,
            layer_types=["linear_attention", "full_attention"] * (num_layers // 2)
            + ["full_attention"] * (num_layers % 2),
            linear_conv_kernel_dim=4,
            linear_key_head_dim=head_dim,
            linear_value_head_dim=head_dim,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
        )
        return Qwen3_5Config(
            text_config=dict(text_config, **hybrid), vision_config=qwen3_vision_config, **composite_options
        )
    raise ValueError(f"not a Qwen M-RoPE family: {family!r}")


def save_tiny_backbone(
    folder: str | os.PathLike,
    family: str = "qwen2_5_vl",
    seed: int = 0,
    max_image_tokens: int = 64,
    **config_kwargs,
) -> str:
    """Write a random `family` backbone folder loadable offline; returns its path.

    `family` is one of `SUPPORTED_FAMILIES` or `UNSUPPORTED_FAMILIES`. For the Qwen M-RoPE families
    `max_image_tokens` caps merged image tokens per image (max_pixels = N * 28 * 28). `config_kwargs`:
    `hidden_size`, `num_layers`, `num_heads` and `initializer_range` (std of the random weights).
    """
    folder = os.fspath(folder)
    if family in BACKBONE_FAMILIES:  # the historic layout, byte for byte
        tokenizer = build_tiny_tokenizer()
        config = build_tiny_backbone_config(family, tokenizer, **config_kwargs)
        torch.manual_seed(seed)
        model = AutoModel.from_config(config)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        image_processor = Qwen2VLImageProcessorPil(min_pixels=4 * 28 * 28, max_pixels=max_image_tokens * 28 * 28)
        image_processor.save_pretrained(folder)
        return folder
    if family not in FAMILY_BUILDERS:
        raise ValueError(f"family must be one of {SUPPORTED_FAMILIES + UNSUPPORTED_FAMILIES}, got {family!r}")
    parts = FAMILY_BUILDERS[family](TinySizes(**config_kwargs), max_image_tokens)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(parts.config)
    _randomise_zero_gates(model, parts.config)
    model.save_pretrained(folder)
    _save_processor(folder, parts)
    return folder


@dataclass
class TinySizes:
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def text(self, tokenizer, **extra) -> dict[str, Any]:
        """A small decoder's config fields, vocabulary sized to `tokenizer`."""
        return dict(
            hidden_size=self.hidden_size,
            intermediate_size=self.hidden_size * 2,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=max(1, self.num_heads // 2),
            head_dim=self.head_dim,
            vocab_size=len(tokenizer),
            max_position_embeddings=4096,
            initializer_range=self.initializer_range,
            **extra,
        )

    def vision(self, image_size: int, patch_size: int, **extra) -> dict[str, Any]:
        """A small ViT's config fields (SigLIP / CLIP / Idefics3 / InternVL vision naming)."""
        return dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch_size,
            initializer_range=self.initializer_range,
            **extra,
        )


@dataclass
class BackboneParts:
    """What a family's folder holds besides the weights."""

    config: PreTrainedConfig
    tokenizer: Any
    image_processor: Any
    processor_class: str
    processor_kwargs: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None
    video_processor: tuple[str, dict[str, Any]] | None = None  # class name, settings
    constructible: bool = True  # False: the processor class needs torchvision even without a video processor


def _randomise_zero_gates(model: torch.nn.Module, config: PreTrainedConfig) -> None:
    """Give random values to the weights transformers initialises to zero on the image path (Mllama's
    cross-attention and tile gates, Gemma3's multimodal projection, ...): at zero an image has no effect at all on
    the text states of a random model, and image tests would pass vacuously. Trained checkpoints are non-zero."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            on_image_path = "gate" in name or "multi_modal_projector" in name
            if on_image_path and parameter.numel() and not parameter.any() and not name.endswith("bias"):
                parameter.normal_(0.0, 0.5 if parameter.numel() == 1 else config.get_text_config().initializer_range)


def _byte_vocab(specials=()) -> dict[str, int]:
    """The 256 byte-level BPE symbols, then `specials` in order (so their ids keep the real relative order)."""
    return _vocab([*bytes_to_unicode().values(), *specials])


def _vocab(pieces) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    return vocab


def _mark_special(tokenizer, tokens):
    """Marks `tokens` (already in the vocabulary, so their ids stay) as special: never split, never produced from
    user text by the normal pieces."""
    tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)}, replace_extra_special_tokens=False)
    return tokenizer


def _named(named):
    """Named model-specific tokens (`tokenizer.image_token`, ...) as real v5 tokenizer configs declare them."""
    return {"extra_special_tokens": named} if named else {}


def _qwen_tokenizer(extra_tokens=(), named=None, cls=Qwen2Tokenizer, base_tokens=QWEN_SPECIAL_TOKENS):
    specials = tuple(base_tokens) + tuple(extra_tokens)
    tokenizer = cls(
        vocab=_byte_vocab(specials),
        merges=[],
        unk_token=None,
        bos_token=None,
        eos_token=None,
        pad_token=None,
        **_named(named),
    )
    _mark_special(tokenizer, specials)
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


def _byte_level_backend(specials) -> Tokenizer:
    backend = Tokenizer(models.BPE(vocab=_byte_vocab(specials), merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(specials))
    return backend


def _llama3_tokenizer(extra_tokens=(), named=None):
    """Llama 3 style: byte-level BPE in a PreTrainedTokenizerFast whose post-processor prepends
    <|begin_of_text|> (as the real tokenizer.json does)."""
    specials = LLAMA3_SPECIAL_TOKENS + tuple(extra_tokens)
    backend = _byte_level_backend(specials)
    bos_token = "<|begin_of_text|>"
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos_token} $A",
        pair=f"{bos_token} $A {bos_token} $B",
        special_tokens=[(bos_token, backend.token_to_id(bos_token))],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos_token,
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        **_named(named),
    )
    return _mark_special(tokenizer, specials)


def _sentencepiece_vocab(base_tokens, specials=(), plain=()) -> dict[str, int]:
    """SentencePiece-BPE style vocabulary: base special tokens first, the 256 byte-fallback pieces, the word
    boundary "▁" and printable ASCII (anything else falls back to bytes), then `plain` and `specials` in order."""
    pieces = [*base_tokens, *(f"<0x{byte:02X}>" for byte in range(256)), "▁"]
    return _vocab([*pieces, *(chr(code) for code in range(33, 127)), *plain, *specials])


def _gemma_tokenizer(extra_tokens=(), named=None, plain=()):
    specials = GEMMA_TURN_TOKENS + tuple(extra_tokens)
    vocab = _sentencepiece_vocab(GEMMA_BASE_TOKENS, specials, plain)
    return _mark_special(GemmaTokenizer(vocab=vocab, merges=[], **_named(named)), specials)


def _llama_tokenizer(extra_tokens=(), named=None, pad_token=None):
    vocab = _sentencepiece_vocab(SENTENCEPIECE_BASE_TOKENS, extra_tokens)
    tokenizer = _mark_special(LlamaTokenizer(vocab=vocab, merges=[], **_named(named)), extra_tokens)
    if pad_token:
        tokenizer.pad_token = pad_token
    return tokenizer


def _ids(tokenizer, **tokens: str) -> dict[str, int]:
    return {name: tokenizer.convert_tokens_to_ids(token) for name, token in tokens.items()}


def _qwen_m_rope(family: str):
    def build(sizes: TinySizes, max_image_tokens: int) -> BackboneParts:
        tokenizer = _qwen_tokenizer()
        if family == "qwen3_5":
            from transformers import Qwen3_5Tokenizer

            tokenizer = _qwen_tokenizer(cls=Qwen3_5Tokenizer)
        config = build_tiny_backbone_config(
            family,
            tokenizer,
            hidden_size=sizes.hidden_size,
            num_layers=sizes.num_layers,
            num_heads=sizes.num_heads,
            initializer_range=sizes.initializer_range,
        )
        # Qwen3-VL / Qwen3.5 preprocess with patch 16 (merged 32 px) on the real repos; the tiny vision tower
        # here keeps patch 14 like the other Qwen tiny backbones.
        image_processor = Qwen2VLImageProcessorPil(min_pixels=4 * 28 * 28, max_pixels=max_image_tokens * 28 * 28)
        processor_class = "Qwen3VLProcessor"
        return BackboneParts(
            config,
            tokenizer,
            image_processor,
            processor_class,
            chat_template=QWEN_CHAT_TEMPLATE,
            video_processor=("Qwen3VLVideoProcessor", dict(patch_size=14, merge_size=2, temporal_patch_size=2)),
        )

    return build


def _mllama(sizes: TinySizes, max_image_tokens: int) -> BackboneParts:
    from transformers import MllamaConfig
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tokenizer = _llama3_tokenizer(extra_tokens=("<|image|>",))
    ids = _ids(tokenizer, bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>")
    eos_ids = [tokenizer.convert_tokens_to_ids(token) for token in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    # Cross-attention layers sit between self-attention ones (every 5th in the real 11B: 3, 8, 13, ...).
    text_config = sizes.text(
        tokenizer,
        cross_attention_layers=[1],
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=ids["bos"],
        eos_token_id=eos_ids,
        pad_token_id=ids["pad"],
    )
    text_config["num_hidden_layers"] = max(2, sizes.num_layers)
    text_config.pop("head_dim")
    image_size = 28
    vision_config = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=2,
        image_size=image_size,
        patch_size=14,
        max_num_tiles=2,
        intermediate_layers_indices=[0, 1],
        vision_output_dim=32 * 3,
        supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
        initializer_range=sizes.initializer_range,
    )
    config = MllamaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"),
    )
    image_processor = MllamaImageProcessorPil(size={"height": image_size, "width": image_size}, max_image_tiles=2)
    return BackboneParts(config, tokenizer, image_processor, "MllamaProcessor", chat_template=MLLAMA_CHAT_TEMPLATE)


def _paligemma(text_model_type: str):
    def build(sizes: TinySizes, max_image_tokens: int) -> BackboneParts:
        from transformers import PaliGemmaConfig
        from transformers.models.paligemma.processing_paligemma import EXTRA_TOKENS
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        # Real order: <loc0000>..<loc1023>, <seg000>..<seg127> (ordinary tokens), then <image> (special).
        tokenizer = _gemma_tokenizer(("<image>",), {"image_token": "<image>"}, plain=EXTRA_TOKENS)
        tokenizer.add_tokens(EXTRA_TOKENS)  # as PaliGemmaProcessor does: never split
        tokenizer.add_bos_token, tokenizer.add_eos_token = False, False
        ids = _ids(tokenizer, bos="<bos>", eos="<eos>", pad="<pad>", image="<image>")
        image_size, patch_size = 28, 14
        num_image_tokens = (image_size // patch_size) ** 2
        text_config = sizes.text(
            tokenizer,
            model_type=text_model_type,
            bos_token_id=ids["bos"],
            eos_token_id=ids["eos"],
            pad_token_id=ids["pad"],
        )
        if text_model_type == "gemma2":
            text_config.update(sliding_window=512, query_pre_attn_scalar=sizes.head_dim)
        vision_config = sizes.vision(
            image_size,
            patch_size,
            num_image_tokens=num_image_tokens,
            projection_dim=sizes.hidden_size,
            vision_use_head=False,  # as the real configs: PaliGemma reads SigLIP's patch states
        )
        config = PaliGemmaConfig(
            text_config=text_config,
            vision_config=vision_config,
            image_token_index=ids["image"],
            projection_dim=sizes.hidden_size,
            hidden_size=sizes.hidden_size,
            vocab_size=len(tokenizer),
        )
        image_processor = SiglipImageProcessorPil(
            size={"height": image_size, "width": image_size}, image_seq_length=num_image_tokens, resample=3
        )
        # The pretrained ("pt") PaliGemma repos ship no chat template.
        return BackboneParts(config, tokenizer, image_processor, "PaliGemmaProcessor")

    return build


def _idefics3_like(family: str):
    def build(sizes: TinySizes, max_image_tokens: int) -> BackboneParts:
        image_tokens = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>")
        if family == "idefics3":  # Idefics3-8B-Llama3: Llama 3 vocabulary
            from transformers import Idefics3Config as config_class
            from transformers.models.idefics3.image_processing_pil_idefics3 import (
                Idefics3ImageProcessorPil as image_processor_class,
            )

            tokenizer = _llama3_tokenizer(extra_tokens=(*image_tokens, *IDEFICS3_TILE_TOKENS))
            ids = _ids(tokenizer, bos="<|begin_of_text|>", eos="<end_of_utterance>", pad="<|reserved_special_token_0|>")
            chat_template, scale_factor, image_size, patch_size = IDEFICS3_CHAT_TEMPLATE, 2, 56, 14
        else:  # SmolVLM-256M/500M/2.2B: SmolLM2 (GPT-2 style BPE) vocabulary, ChatML turn markers
            from transformers import SmolVLMConfig as config_class
            from transformers.models.smolvlm.image_processing_pil_smolvlm import (
                SmolVLMImageProcessorPil as image_processor_class,
            )

            first, later = (
                ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                ("<global-img>", *IDEFICS3_TILE_TOKENS, *image_tokens),
            )
            named = {
                "fake_image_token": "<fake_token_around_image>",
                "image_token": "<image>",
                "end_of_utterance_token": "<end_of_utterance>",
                "global_image_token": "<global-img>",
            }
            tokenizer = GPT2Tokenizer(
                vocab=_vocab([*first, *bytes_to_unicode().values(), *later]),
                merges=[],
                unk_token="<|endoftext|>",
                bos_token="<|im_start|>",
                eos_token="<end_of_utterance>",
                pad_token="<|im_end|>",
                **_named(named),
            )
            _mark_special(tokenizer, first + later)
            ids = _ids(tokenizer, bos="<|im_start|>", eos="<end_of_utterance>", pad="<|im_end|>")
            chat_template, scale_factor, image_size, patch_size = SMOLVLM_CHAT_TEMPLATE, 4, 64, 8
        image_seq_len = (image_size // patch_size) ** 2 // scale_factor**2
        text_config = sizes.text(
            tokenizer,
            model_type="llama",
            rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
            bos_token_id=ids["bos"],
            eos_token_id=ids["eos"],
            pad_token_id=ids["pad"],
        )
        config = config_class(
            text_config=text_config,
            vision_config=sizes.vision(image_size, patch_size),
            scale_factor=scale_factor,
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            pad_token_id=ids["pad"],
        )
        # Images are split into tiles of `max_image_size` (plus a global view) up to `size.longest_edge`.
        image_processor = image_processor_class(
            size={"longest_edge": 2 * image_size}, max_image_size={"longest_edge": image_size}, resample=1
        )
        video_processor = None
        if family == "smolvlm":
            video_processor = (
                "SmolVLMVideoProcessor",
                dict(
                    size={"longest_edge": 2 * image_size},
                    max_image_size={"longest_edge": image_size},
                    fps=1,
                    max_frames=4,
                ),
            )
        return BackboneParts(
            config,
            tokenizer,
            image_processor,
            "Idefics3Processor" if family == "idefics3" else "SmolVLMProcessor",
            processor_kwargs={"image_seq_len": image_seq_len},
            chat_template=chat_template,
            video_processor=video_processor,
        )

    return build


def _gemma3(sizes: TinySizes, max_image_tokens: int) -> BackboneParts:
    from transformers import Gemma3Config
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tokenizer = _gemma_tokenizer(("<start_of_image>", "<end_of_image>", "<image_soft_token>"), named)
    ids = _ids(tokenizer, bos="<bos>", eos="<end_of_turn>", pad="<pad>", **named)
    image_size, patch_size, mm_tokens_per_image = 56, 14, 4  # 4x4 patches pooled to 2x2 soft tokens
    text_config = sizes.text(
        tokenizer,
        sliding_window=512,
        query_pre_attn_scalar=sizes.head_dim,
        bos_token_id=ids["bos"],
        eos_token_id=[tokenizer.convert_tokens_to_ids("<eos>"), ids["eos"]],
        pad_token_id=ids["pad"],
    )
    config = Gemma3Config(
        text_config=text_config,
        vision_config=sizes.vision(image_size, patch_size, vision_use_head=False),
        mm_tokens_per_image=mm_tokens_per_image,
        boi_token_index=ids["boi_token"],
        eoi_token_index=ids["eoi_token"],
        image_token_index=ids["image_token"],
        initializer_range=sizes.initializer_range,
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}, resample=2)
    return BackboneParts(
        config,
        tokenizer,
        image_processor,
        "Gemma3Processor",
        processor_kwargs={"image_seq_length": mm_tokens_per_image},
        chat_template=GEMMA3_CHAT_TEMPLATE,
    )


def _llava_onevision(sizes: TinySizes, max_image_tokens: int) -> BackboneParts:
    from transformers import LlavaOnevisionConfig
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    # The Qwen2 (text) tokenizer: three special tokens, no vision or box tokens; <image>, <video> follow.
    tokenizer = _qwen_tokenizer(
        ("<image>", "<video>"),
        {"image_token": "<image>", "video_token": "<video>"},
        base_tokens=QWEN_SPECIAL_TOKENS[:3],
    )
    ids = _ids(tokenizer, image="<image>", video="<video>")
    image_size, patch_size = 28, 14
    pinpoints = [[image_size * rows, image_size * cols] for rows in (1, 2) for cols in (1, 2)]
    config = LlavaOnevisionConfig(
        text_config=sizes.text(tokenizer, model_type="qwen2", **_qwen_text_ids(tokenizer)),
        vision_config=sizes.vision(image_size, patch_size, model_type="siglip_vision_model", vision_use_head=False),
        image_token_index=ids["image"],
        video_token_index=ids["video"],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
    )
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_grid_pinpoints=pinpoints, resample=3
    )
    return BackboneParts(
        config,
        tokenizer,
        image_processor,
        "LlavaOnevisionProcessor",
        processor_kwargs={
            "num_image_tokens": (image_size // patch_size) ** 2,
            "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": "anyres_max_9",
        },
        chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE,
        video_processor=("LlavaOnevisionVideoProcessor", dict(size={"height": image_size, "width": image_size})),
    )


def _qwen_text_ids(tokenizer) -> dict[str, int]:
    ids = _ids(tokenizer, bos="<|endoftext|>", eos="<|im_end|>", pad="<|endoftext|>")
    return dict(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])


def _llava_next(sizes: TinySizes, max_image_tokens: int) -> BackboneParts:
    """llava-v1.6-mistral-7b-hf: Mistral text, CLIP vision, any-resolution tiles."""
    from transformers import LlavaNextConfig
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tokenizer = _llama_tokenizer(("<image>",), {"image_token": "<image>"}, pad_token="<unk>")
    ids = _ids(tokenizer, bos="<s>", eos="</s>", pad="<unk>", image="<image>")
    image_size, patch_size = 28, 14
    pinpoints = [[image_size * rows, image_size * cols] for rows in (1, 2) for cols in (1, 2)]
    config = LlavaNextConfig(
        text_config=sizes.text(
            tokenizer, model_type="mistral", bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"]
        ),
        vision_config=sizes.vision(image_size, patch_size, model_type="clip_vision_model", projection_dim=32),
        image_token_index=ids["image"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_grid_pinpoints=pinpoints,
        image_seq_length=(image_size // patch_size) ** 2,
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    return BackboneParts(
        config,
        tokenizer,
        image_processor,
        "LlavaNextProcessor",
        processor_kwargs={
            "patch_size": patch_size,
            "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1,
        },
        chat_template=LLAVA_NEXT_CHAT_TEMPLATE,
    )


def _internvl(sizes: TinySizes, max_image_tokens: int) -> BackboneParts:
    """InternVL3-*-hf: Qwen2.5 text, InternViT vision with pixel shuffle, 448-px tiles (tiny: 56 px)."""
    from transformers import InternVLConfig
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    named = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    extra = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>", "<video>")
    tokenizer = _qwen_tokenizer(extra, named)
    image_size, patch_size, downsample_ratio = 56, 14, 0.5
    image_seq_length = int((image_size // patch_size) ** 2 * downsample_ratio**2)
    config = InternVLConfig(
        text_config=sizes.text(tokenizer, model_type="qwen2", **_qwen_text_ids(tokenizer)),
        vision_config=sizes.vision(image_size, patch_size, use_mean_pooling=False, layer_scale_init_value=0.1),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=image_seq_length,
        downsample_ratio=downsample_ratio,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size}, crop_to_patches=False, min_patches=1, max_patches=4
    )
    return BackboneParts(
        config,
        tokenizer,
        image_processor,
        "InternVLProcessor",
        processor_kwargs={"image_seq_length": image_seq_length},
        chat_template=INTERNVL_CHAT_TEMPLATE,
        video_processor=("InternVLVideoProcessor", dict(size={"height": image_size, "width": image_size})),
    )


def _llava(sizes: TinySizes, max_image_tokens: int) -> BackboneParts:
    """llava-1.5-7b-hf (unsupported): Llama 2 text, CLIP vision."""
    from transformers import LlavaConfig
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = _llama_tokenizer(("<image>", "<pad>"), {"image_token": "<image>"}, pad_token="<pad>")
    ids = _ids(tokenizer, bos="<s>", eos="</s>", pad="<pad>", image="<image>")
    image_size, patch_size = 28, 14
    config = LlavaConfig(
        text_config=sizes.text(
            tokenizer, model_type="llama", bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"]
        ),
        vision_config=sizes.vision(image_size, patch_size, model_type="clip_vision_model", projection_dim=32),
        image_token_index=ids["image"],
        vision_feature_layer=-2,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return BackboneParts(
        config,
        tokenizer,
        image_processor,
        "LlavaProcessor",
        processor_kwargs={
            "patch_size": patch_size,
            "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1,
        },
    )


def _aya_vision(sizes: TinySizes, max_image_tokens: int) -> BackboneParts:
    """aya-vision-8b (unsupported): Cohere2 text, SigLIP vision, pixel shuffle."""
    from transformers import AyaVisionConfig, CohereTokenizer
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    base = ("<PAD>", "<UNK>", "<CLS>", "<SEP>", "<MASK_TOKEN>", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>")
    turns = ("<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>")
    image_tokens = ("<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>", "<image>")
    tokenizer = CohereTokenizer(vocab=_vocab([*base, *bytes_to_unicode().values(), *turns, *image_tokens]), merges=[])
    _mark_special(tokenizer, base + turns + image_tokens)
    ids = _ids(tokenizer, bos="<BOS_TOKEN>", eos="<|END_OF_TURN_TOKEN|>", pad="<PAD>")
    image_size, patch_size = 56, 14
    config = AyaVisionConfig(
        text_config=sizes.text(
            tokenizer, model_type="cohere2", bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"]
        ),
        vision_config=sizes.vision(image_size, patch_size, model_type="siglip_vision_model"),
        image_token_index=tokenizer.convert_tokens_to_ids("<|IMG_PATCH|>"),
        downsample_factor=2,
    )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size}, crop_to_patches=True, max_patches=4
    )
    return BackboneParts(
        config,
        tokenizer,
        image_processor,
        "AyaVisionProcessor",
        processor_kwargs={"patch_size": patch_size, "img_size": image_size, "downsample_factor": 2},
    )


def _mistral3(sizes: TinySizes, max_image_tokens: int) -> BackboneParts:
    """Mistral-Small-3.1 (unsupported): Mistral text, Pixtral vision with [IMG] / [IMG_BREAK] / [IMG_END]."""
    from transformers import Mistral3Config
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    tokenizer = _llama_tokenizer(("[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"), pad_token="<unk>")
    ids = _ids(tokenizer, bos="<s>", eos="</s>", pad="<unk>", image="[IMG]")
    patch_size = 14
    config = Mistral3Config(
        text_config=sizes.text(
            tokenizer, model_type="mistral", bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"]
        ),
        vision_config=dict(
            sizes.vision(56, patch_size, model_type="pixtral", head_dim=16),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        image_token_index=ids["image"],
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )
    image_processor = PixtralImageProcessorPil(size={"longest_edge": 56}, patch_size=patch_size)
    return BackboneParts(
        config,
        tokenizer,
        image_processor,
        "PixtralProcessor",
        processor_kwargs={"patch_size": patch_size, "spatial_merge_size": 2},
        constructible=False,
    )


def _glm4v(sizes: TinySizes, max_image_tokens: int) -> BackboneParts:
    """GLM-4.1V (unsupported here): M-RoPE like Qwen, its own special tokens."""
    from transformers import Glm4vConfig
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    specials = (
        "<|endoftext|>",
        "[gMASK]",
        "<sop>",
        "<|user|>",
        "<|assistant|>",
        "<|begin_of_image|>",
        "<|end_of_image|>",
        "<|image|>",
        "<|begin_of_video|>",
        "<|end_of_video|>",
        "<|video|>",
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_backend(specials), eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    ids = _ids(
        tokenizer,
        image="<|image|>",
        video="<|video|>",
        start="<|begin_of_image|>",
        end="<|end_of_image|>",
        pad="<|endoftext|>",
    )
    head_dim = sizes.head_dim
    spatial = (head_dim // 2) * 3 // 8
    text_config = sizes.text(
        tokenizer,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [head_dim // 2 - 2 * spatial, spatial, spatial],
            "partial_rotary_factor": 1.0,
        },
        pad_token_id=ids["pad"],
        eos_token_id=ids["pad"],
    )
    config = Glm4vConfig(
        text_config=text_config,
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=sizes.hidden_size,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            image_size=56,
            initializer_range=sizes.initializer_range,
        ),
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        image_start_token_id=ids["start"],
        image_end_token_id=ids["end"],
    )
    image_processor = Glm4vImageProcessorPil(size={"shortest_edge": 4 * 28 * 28, "longest_edge": 64 * 28 * 28})
    return BackboneParts(
        config,
        tokenizer,
        image_processor,
        "Glm4vProcessor",
        video_processor=("Glm4vVideoProcessor", dict(patch_size=14, merge_size=2, temporal_patch_size=2)),
    )


FAMILY_BUILDERS = {
    "qwen3_vl_moe": _qwen_m_rope("qwen3_vl_moe"),
    "qwen3_5": _qwen_m_rope("qwen3_5"),
    "mllama": _mllama,
    "paligemma": _paligemma("gemma"),
    "paligemma2": _paligemma("gemma2"),
    "idefics3": _idefics3_like("idefics3"),
    "smolvlm": _idefics3_like("smolvlm"),
    "gemma3": _gemma3,
    "llava_onevision": _llava_onevision,
    "llava_next": _llava_next,
    "internvl": _internvl,
    "llava": _llava,
    "aya_vision": _aya_vision,
    "mistral3": _mistral3,
    "glm4v": _glm4v,
}


def _save_processor(folder: str, parts: BackboneParts) -> None:
    """Save the family's processor as its Hub repo holds it. Where the processor bundles a video processor, the
    class needs torchvision to be constructed (absent here), so its files are written one by one instead: the
    tokenizer, preprocessor_config.json, video_preprocessor_config.json, processor_config.json and the chat template
    (the layout of the real repos, which `AutoProcessor` loads where torchvision is installed)."""
    import transformers

    if parts.video_processor is None and parts.constructible:
        processor_class = getattr(transformers, parts.processor_class)
        processor = processor_class(
            image_processor=parts.image_processor,
            tokenizer=parts.tokenizer,
            chat_template=parts.chat_template,
            **parts.processor_kwargs,
        )
        processor.save_pretrained(folder)
        return
    parts.tokenizer.save_pretrained(folder)
    parts.image_processor.save_pretrained(folder)
    if parts.video_processor is not None:
        video_processor_type, video_settings = parts.video_processor
        video_config = {
            **parts.image_processor.to_dict(),
            **video_settings,
            "video_processor_type": video_processor_type,
        }
        video_config.pop("image_processor_type", None)
        with open(os.path.join(folder, "video_preprocessor_config.json"), "w", encoding="utf-8") as file:
            json.dump(video_config, file, indent=2, sort_keys=True, default=_json_default)
    with open(os.path.join(folder, "processor_config.json"), "w", encoding="utf-8") as file:
        json.dump({**parts.processor_kwargs, "processor_class": parts.processor_class}, file, indent=2, sort_keys=True)
    if parts.chat_template:
        with open(os.path.join(folder, "chat_template.jinja"), "w", encoding="utf-8") as file:
            file.write(parts.chat_template)


def _json_default(value):
    return int(value) if hasattr(value, "__int__") else str(value)


__all__ = [
    "BACKBONE_FAMILIES",
    "PAPER_FAMILIES",
    "SUPPORTED_FAMILIES",
    "UNSUPPORTED_FAMILIES",
    "VIDEO_PROCESSOR_FAMILIES",
    "build_tiny_backbone_config",
    "build_tiny_tokenizer",
    "save_tiny_backbone",
]


def run_concurrently(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run each call in its own thread, all started before any is joined; their results in order (a call's
    exception is raised here, the first in order)."""
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException | None] = [None] * len(calls)

    def run(slot: int) -> None:
        try:
            results[slot] = calls[slot]()
        except BaseException as error:  # handed to the caller below
            errors[slot] = error

    threads = [threading.Thread(target=run, args=(slot,)) for slot in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for error in errors:
        if error is not None:
            raise error
    return results
