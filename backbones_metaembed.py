"""Backbone adapters: everything about a vision-language family that MetaEmbed needs, declared in one place.

The model (`modeling_metaembed.py`) and the processor (`processing_metaembed.py`) are family-neutral; per family
an adapter declares how the reference prompts are rendered (fixed strings: no chat template, so nothing such as
today's date enters a prompt), which text the family's own processor expands into an image's tokens, the default
Meta Token placeholder, the position ids (M-RoPE through the backbone's `get_rope_index`, otherwise 1-D positions
from the attention mask), the extra inputs the family's processor produces and the LoRA target modules.
Images are always prepared by the family's own processor (its token expansion, tiling and masks).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Literal

PromptKind = Literal["text", "image", "image_text"]
IMAGE_FIELD = "{image}"
"""Where a template puts the image: replaced by the family's expansion of `BackboneAdapter.image_placeholder`."""

_INSTRUCTIONS = {
    "instruction": {
        "text": "{prefix}{text}Summarize above sentences in one word.",
        "image": "{prefix}Summarize the above image in one word.",
        "image_text": "{prefix}{text}Summarize the above image and sentences in one word.",
    },
    "simple": {"text": "{prefix}{text}", "image": "{prefix}Describe the image.", "image_text": "{prefix}{text}"},
}


def _templates(start: str, end: str, image_before_start: bool = False) -> dict[str, dict[str, str]]:
    """The reference prompts (facebookresearch/MetaEmbed) in a family's user turn: `start`, the image (if any),
    the instruction, `end` (PaliGemma puts the image before `start`). `{prefix}` is the query/candidate prefix;
    task instructions are part of `{text}`."""
    templates: dict[str, dict[str, str]] = {}
    for style, instructions in _INSTRUCTIONS.items():
        templates[style] = {}
        for kind, instruction in instructions.items():
            image = IMAGE_FIELD if kind != "text" else ""
            head = image + start if image_before_start else start + image
            templates[style][kind] = head + instruction + end
    return templates


def _lora_targets(vision_tower: str, vision_layers: str) -> str:
    """peft `target_modules` regex: q/k/v/o/gate/up/down of the language model (`language_model`, Idefics3's and
    SmolVLM's `text_model`) and the linear layers of the vision tower (`vision_layers`, under the module
    `vision_tower`), as the reference LoRA."""
    return (
        r"vlm\.((language_model|text_model)\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
        rf"|{vision_tower}\..*\.({vision_layers}))"
    )


_QWEN_LORA = _lora_targets(
    r"visual\.blocks",
    r"attn\.qkv|attn\.proj|mlp\.gate_proj|mlp\.up_proj|mlp\.down_proj|mlp\.linear_fc1|mlp\.linear_fc2",
)
_SIGLIP_LORA_LAYERS = r"self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.fc1|mlp\.fc2"


@dataclass(frozen=True)
class BackboneAdapter:
    """What differs between vision-language families, for one backbone `model_type`.

    Attributes:
        model_type: the backbone config's `model_type`.
        name: the family's name in messages.
        processor_class: the transformers processor class that prepares this family's images and image tokens.
        prompt_templates: `{prompt_style: {kind: template}}`, kind "text" / "image" / "image_text"; a template holds
            `{prefix}`, `{text}` and (image kinds) `{image}`; the rest is fixed text and `template_tokens`.
        template_tokens: the special tokens the templates use (the tokenizer must have them).
        image_placeholder: the text `{image}` stands for, which the family's processor expands.
        image_token: the token whose embeddings the image features replace (the processor's expansion repeats it).
        image_span_tokens: the expansion's first and last tokens; what the processor adds around them (a BOS, a
            newline) is not part of the image.
        meta_tokens: Meta Token placeholder candidates, the first the tokenizer has is the default.
        vision_token_attributes: backbone config attributes holding ids of vision tokens (a Meta Token
            placeholder must not be one; the tokenizer must give these tokens these ids).
        image_token_attribute: config attribute of the token whose embeddings the image features replace.
        rope: "mrope" (positions from the backbone's `get_rope_index`) or "1d" (from the attention mask).
        position_offset: first position (PaliGemma counts from 1).
        nested_images: the processor takes images as one list per text.
        token_type_ids: "image" (1 at image tokens, Gemma3's bidirectional image blocks), "prefix" (0 over the
            content, PaliGemma's bidirectional prefix), or None.
        meta_token_type_id: `token_type_ids` value at the Meta Tokens (PaliGemma: 1, the causal suffix, so a
            prefix of the vectors depends only on the rows before it).
        cross_attention: Mllama: images reach the text through cross-attention, `cross_attention_mask` extends
            over the Meta Tokens, and rows without an image run without pixel inputs.
        extra_input_names: model inputs besides `input_ids` and `attention_mask` the processor can produce.
        lora_target_modules: peft `target_modules` regex (language model and vision tower linear layers).
    """

    model_type: str
    name: str
    processor_class: str
    prompt_templates: dict[str, dict[str, str]]
    template_tokens: tuple[str, ...]
    image_placeholder: str
    image_token: str
    image_span_tokens: tuple[str, ...]
    meta_tokens: tuple[str, ...]
    vision_token_attributes: tuple[str, ...]
    image_token_attribute: str
    extra_input_names: tuple[str, ...]
    lora_target_modules: str
    rope: Literal["mrope", "1d"] = "1d"
    position_offset: int = 0
    nested_images: bool = True
    token_type_ids: Literal["image", "prefix"] | None = None
    meta_token_type_id: int = 0
    cross_attention: bool = False
    extra_named_token_ids: tuple[tuple[str, str], ...] = ()

    def named_token_ids(self) -> dict[str, str]:
        """`{token: config attribute}`: the tokens whose ids the backbone's config names; the tokenizer must give
        them exactly those ids."""
        return {self.image_token: self.image_token_attribute, **dict(self.extra_named_token_ids)}

    def render_prompt(self, kind: PromptKind, prompt_style: str, prefix: str, text: str) -> list[tuple[str, bool]]:
        """The prompt of an item as segments `(string, is_plain_text)`: plain text (the prefix, the user's text and
        the template's words, joined where adjacent) is tokenised with special tokens as ordinary text; the other
        segments are one template token each, or `{image}` (the placeholder, expanded by the family's processor).
        Joined, the strings give the whole prompt."""
        template = self.prompt_templates[prompt_style][kind]
        markers = sorted({*self.template_tokens, IMAGE_FIELD}, key=len, reverse=True)
        segments: list[tuple[str, bool]] = []
        position = 0
        while position < len(template):
            marker = next((m for m in markers if template.startswith(m, position)), None)
            if marker is not None:
                segments.append((marker, False))
                position += len(marker)
                continue
            end = min((index for m in markers if (index := template.find(m, position)) != -1), default=len(template))
            piece = template[position:end].replace("{prefix}", "\0prefix\0").replace("{text}", "\0text\0")
            parts = piece.split("\0")
            rendered = "".join(prefix if p == "prefix" else text if p == "text" else p for p in parts)
            if rendered:
                segments.append((rendered, True))
            position = end
        merged: list[tuple[str, bool]] = []
        for string, plain in segments:
            if merged and plain and merged[-1][1]:
                merged[-1] = (merged[-1][0] + string, True)
            else:
                merged.append((string, plain))
        return merged

    def prompt_string(self, kind: PromptKind, prompt_style: str, prefix: str, text: str) -> str:
        """The prompt as one string, the image as `image_placeholder` (not yet expanded)."""
        return "".join(
            self.image_placeholder if (string == IMAGE_FIELD and not plain) else string
            for string, plain in self.render_prompt(kind, prompt_style, prefix, text)
        )

    def vision_token_ids(self, backbone_config: Any) -> dict[str, int]:
        """`{attribute: id}` of the vision tokens the backbone's config names."""
        ids = {}
        for attribute in self.vision_token_attributes:
            value = getattr(backbone_config, attribute, None)
            if isinstance(value, int):
                ids[attribute] = value
        return ids

    def image_token_id(self, backbone_config: Any) -> int:
        return getattr(backbone_config, self.image_token_attribute)

    def processor_init_kwargs(self, options: dict[str, Any]) -> dict[str, Any]:
        """The options of the family's processor (from its processor_config.json) its constructor takes, besides
        the image processor, the tokenizer and the chat template (MetaEmbed renders its own prompts)."""
        import transformers

        parameters = inspect.signature(getattr(transformers, self.processor_class).__init__).parameters
        skipped = {"self", "image_processor", "tokenizer", "video_processor", "chat_template", "kwargs", "args"}
        return {key: value for key, value in (options or {}).items() if key in parameters and key not in skipped}

    def build_processor(self, image_processor: Any, tokenizer: Any, options: dict[str, Any] | None = None) -> Any:
        """The family's processor over `image_processor` and `tokenizer`, without a video processor: MetaEmbed
        embeds images, and video processors need torchvision, which a user may not have.

        The one place that leans on transformers internals: `ProcessorMixin` takes its sub-processors from
        `get_attributes()`, narrowed here to the two kept. tests/test_backbone_contracts.py builds every family's
        processor this way and fails loudly if that changes."""
        import transformers

        processor_class = getattr(transformers, self.processor_class)
        attributes = [name for name in processor_class.get_attributes() if name in ("image_processor", "tokenizer")]
        images_only = type(
            processor_class.__name__, (processor_class,), {"get_attributes": classmethod(lambda cls: attributes)}
        )
        # Some processors take `video_processor` as a required argument: it is not kept (see `get_attributes`).
        parameters = inspect.signature(processor_class.__init__).parameters
        no_video = {"video_processor": None} if "video_processor" in parameters else {}
        try:
            return images_only(
                image_processor=image_processor, tokenizer=tokenizer, **no_video, **self.processor_init_kwargs(options)
            )
        except ImportError as error:  # e.g. SmolVLM's processor needs num2words, as in transformers
            raise ImportError(f"the {self.name} processor ({self.processor_class}) cannot be built: {error}") from error


_QWEN_TEMPLATE_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>")
_QWEN_VISION_ATTRIBUTES = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def _qwen(model_type: str, name: str, processor_class: str) -> BackboneAdapter:
    # Today's reference prompts, byte for byte: "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>..."
    return BackboneAdapter(
        model_type=model_type,
        name=name,
        processor_class=processor_class,
        prompt_templates=_templates("<|im_start|>user\n", "<|im_end|><|endoftext|>"),
        template_tokens=_QWEN_TEMPLATE_TOKENS,
        image_placeholder="<|vision_start|><|image_pad|><|vision_end|>",
        image_token="<|image_pad|>",
        image_span_tokens=("<|vision_start|>", "<|vision_end|>"),
        meta_tokens=("<|box_start|>",),
        vision_token_attributes=_QWEN_VISION_ATTRIBUTES,
        image_token_attribute="image_token_id",
        extra_input_names=("pixel_values", "image_grid_thw", "mm_token_type_ids"),
        lora_target_modules=_QWEN_LORA,
        rope="mrope",
        nested_images=False,
        extra_named_token_ids=(
            ("<|video_pad|>", "video_token_id"),
            ("<|vision_start|>", "vision_start_token_id"),
            ("<|vision_end|>", "vision_end_token_id"),
        ),
    )


_LLAMA3_START = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
_CHATML_START = "<|im_start|>user\n"

_ADAPTERS: dict[str, BackboneAdapter] = {}
for _adapter in (
    _qwen("qwen2_vl", "Qwen2-VL", "Qwen2VLProcessor"),
    _qwen("qwen2_5_vl", "Qwen2.5-VL", "Qwen2_5_VLProcessor"),
    _qwen("qwen3_vl", "Qwen3-VL", "Qwen3VLProcessor"),
    _qwen("qwen3_vl_moe", "Qwen3-VL-MoE", "Qwen3VLProcessor"),
    _qwen("qwen3_5", "Qwen3.5", "Qwen3VLProcessor"),
    BackboneAdapter(
        model_type="mllama",
        name="Llama-3.2-Vision (Mllama)",
        processor_class="MllamaProcessor",
        # The chat format without a system header: Llama 3.2's chat template would insert today's date.
        prompt_templates=_templates(_LLAMA3_START, "<|eot_id|>"),
        template_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        image_placeholder="<|image|>",
        image_token="<|image|>",
        image_span_tokens=("<|image|>",),
        meta_tokens=("<|reserved_special_token_0|>", "<|finetune_right_pad_id|>", "<|python_tag|>"),
        vision_token_attributes=("image_token_id",),
        image_token_attribute="image_token_id",
        extra_input_names=("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"),
        lora_target_modules=_lora_targets(
            r"vision_model", r"self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.fc1|mlp\.fc2"
        ),
        cross_attention=True,
    ),
    *(
        BackboneAdapter(
            model_type="paligemma",
            name="PaliGemma / PaliGemma 2",
            processor_class="PaliGemmaProcessor",
            # PaliGemma's own layout: image tokens, BOS, the prompt, "\n" (the end of its prefix).
            prompt_templates=_templates("<bos>", "\n", image_before_start=True),
            template_tokens=("<bos>",),
            image_placeholder="<image>",
            image_token="<image>",
            image_span_tokens=("<image>",),
            meta_tokens=("<unused0>", "<unused1>", "<eos>"),
            vision_token_attributes=("image_token_id",),
            image_token_attribute="image_token_id",
            extra_input_names=("pixel_values", "token_type_ids"),
            lora_target_modules=_lora_targets(r"vision_tower", _SIGLIP_LORA_LAYERS),
            position_offset=1,
            token_type_ids="prefix",
            meta_token_type_id=1,
        ),
    ),
    *(
        BackboneAdapter(
            model_type=model_type,
            name=name,
            processor_class=processor_class,
            prompt_templates=_templates(start, "<end_of_utterance>"),
            template_tokens=(bos, "<end_of_utterance>", "<fake_token_around_image>"),
            image_placeholder="<image>",
            image_token="<image>",
            image_span_tokens=("<fake_token_around_image>",),
            meta_tokens=meta_tokens,
            vision_token_attributes=("image_token_id",),
            image_token_attribute="image_token_id",
            extra_input_names=("pixel_values", "pixel_attention_mask"),
            lora_target_modules=_lora_targets(r"vision_model", _SIGLIP_LORA_LAYERS),
        )
        for model_type, name, processor_class, bos, start, meta_tokens in (
            (
                "idefics3",
                "Idefics3",
                "Idefics3Processor",
                "<|begin_of_text|>",
                "<|begin_of_text|>User:",
                ("<|reserved_special_token_0|>", "<|finetune_right_pad_id|>"),
            ),
            ("smolvlm", "SmolVLM", "SmolVLMProcessor", "<|im_start|>", "<|im_start|>User:", ("<|endoftext|>",)),
        )
    ),
    BackboneAdapter(
        model_type="gemma3",
        name="Gemma 3",
        processor_class="Gemma3Processor",
        prompt_templates=_templates("<bos><start_of_turn>user\n", "<end_of_turn>\n"),
        template_tokens=("<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>"),
        image_placeholder="<start_of_image>",
        image_token="<image_soft_token>",
        image_span_tokens=("<start_of_image>", "<end_of_image>"),
        meta_tokens=("<unused0>", "<unused1>", "<eos>"),
        vision_token_attributes=("image_token_id", "boi_token_id", "eoi_token_id"),
        image_token_attribute="image_token_id",
        extra_input_names=("pixel_values", "token_type_ids"),
        lora_target_modules=_lora_targets(r"vision_tower", _SIGLIP_LORA_LAYERS),
        token_type_ids="image",
        extra_named_token_ids=(("<start_of_image>", "boi_token_id"), ("<end_of_image>", "eoi_token_id")),
    ),
    *(
        BackboneAdapter(
            model_type=model_type,
            name=name,
            processor_class=processor_class,
            prompt_templates=_templates(start, end),
            template_tokens=template_tokens,
            image_placeholder="<IMG_CONTEXT>" if model_type == "internvl" else "<image>",
            image_token="<IMG_CONTEXT>" if model_type == "internvl" else "<image>",
            image_span_tokens=span,
            meta_tokens=meta_tokens,
            vision_token_attributes=("image_token_id", "video_token_id"),
            image_token_attribute="image_token_id",
            extra_input_names=extra,
            lora_target_modules=_lora_targets(r"vision_tower", vision_layers),
        )
        for model_type, name, processor_class, start, end, template_tokens, span, meta_tokens, extra, vision_layers in (
            (
                "llava_onevision",
                "LLaVA-OneVision",
                "LlavaOnevisionProcessor",
                _CHATML_START,
                "<|im_end|>",
                ("<|im_start|>", "<|im_end|>"),
                ("<image>",),
                ("<|endoftext|>", "<|box_start|>"),
                ("pixel_values", "image_sizes"),
                _SIGLIP_LORA_LAYERS,
            ),
            (
                "llava_next",
                "LLaVA-NeXT",
                "LlavaNextProcessor",
                "<s>[INST] ",
                " [/INST]",
                ("<s>",),
                ("<image>",),
                ("<unk>", "</s>"),
                ("pixel_values", "image_sizes"),
                _SIGLIP_LORA_LAYERS,
            ),
            (
                "internvl",
                "InternVL",
                "InternVLProcessor",
                _CHATML_START,
                "<|im_end|>",
                ("<|im_start|>", "<|im_end|>"),
                ("<img>", "</img>"),
                ("<|endoftext|>", "<|box_start|>"),
                ("pixel_values",),
                r"attention\.(q_proj|k_proj|v_proj|projection_layer)|mlp\.fc1|mlp\.fc2",
            ),
        )
    ),
):
    _ADAPTERS[_adapter.model_type] = _adapter

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_ADAPTERS)
"""The backbone `model_type`s MetaEmbed supports (PaliGemma 2 is `paligemma`)."""


def get_backbone_adapter(model_type: str) -> BackboneAdapter:
    """The adapter of backbone `model_type`; `ValueError` naming it and the supported types otherwise."""
    adapter = _ADAPTERS.get(model_type) if isinstance(model_type, str) else None
    if adapter is None:
        raise ValueError(
            f"MetaEmbed does not support backbones of model_type {model_type!r}; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return adapter


__all__ = ["IMAGE_FIELD", "SUPPORTED_MODEL_TYPES", "BackboneAdapter", "get_backbone_adapter"]
