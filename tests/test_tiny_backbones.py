"""The tiny random backbones of `metaembed.testing` are shaped like the real Hub repositories: transformers' Auto
classes load them, the family's own processor prepares an image, and the image really changes the text states."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from metaembed.testing import (
    BACKBONE_FAMILIES,
    SUPPORTED_FAMILIES,
    UNSUPPORTED_FAMILIES,
    VIDEO_PROCESSOR_FAMILIES,
)

ALL_FAMILIES = SUPPORTED_FAMILIES + UNSUPPORTED_FAMILIES
# The placeholder a prompt holds for one image, for folders without a chat template.
IMAGE_PLACEHOLDERS = {
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "paligemma": "<image>",
    "paligemma2": "<image>",
    "llava": "<image>\n",
    "aya_vision": "<image>",
    "glm4v": "<|begin_of_image|><|image|><|end_of_image|>",
}
# model_type of each family's config (and of its text model where the family name says which).
MODEL_TYPES = {"paligemma2": ("paligemma", "gemma2"), "paligemma": ("paligemma", "gemma")}
# Token names the real repos use for the image, by family (each must be one token of the tokenizer).
IMAGE_TOKENS = {
    "mllama": "<|image|>",
    "paligemma": "<image>",
    "paligemma2": "<image>",
    "idefics3": "<image>",
    "smolvlm": "<image>",
    "gemma3": "<image_soft_token>",
    "llava_onevision": "<image>",
    "llava_next": "<image>",
    "internvl": "<IMG_CONTEXT>",
    "qwen3_vl_moe": "<|image_pad|>",
    "qwen3_5": "<|image_pad|>",
}


def family_processor(folder: str):
    """The folder's processor: `AutoProcessor` where it can be built here. Where the family bundles a video
    processor, its class needs torchvision (absent on this machine): then the same processor class is built from
    the folder's image processor, tokenizer, settings and chat template, without the video processor (images only)."""
    try:
        return AutoProcessor.from_pretrained(folder)
    except ImportError:
        pass
    settings_path = os.path.join(folder, "processor_config.json")
    if os.path.exists(settings_path):
        with open(settings_path) as file:
            settings = json.load(file)
    else:  # the historic Qwen test layout: tokenizer and image processor only
        model_type = AutoConfig.from_pretrained(folder).model_type
        settings = {"processor_class": "Qwen3VLProcessor" if model_type == "qwen3_vl" else "Qwen2VLProcessor"}
    processor_class = getattr(transformers, settings.pop("processor_class"))

    class ImageOnlyProcessor(processor_class):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    template_path = Path(folder) / "chat_template.jinja"
    chat_template = template_path.read_text() if template_path.exists() else None
    return ImageOnlyProcessor(
        image_processor=AutoImageProcessor.from_pretrained(folder),
        tokenizer=AutoTokenizer.from_pretrained(folder),
        video_processor=None,
        chat_template=chat_template,
        **settings,
    )


def prompt_with_image(processor, family: str) -> str:
    if family in IMAGE_PLACEHOLDERS or processor.chat_template is None:
        return IMAGE_PLACEHOLDERS[family] + "describe the picture"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the picture"}]}]
    # The tokenizer renders the processor's template (SmolVLM's own apply_chat_template reads its video processor).
    return processor.tokenizer.apply_chat_template(
        messages, chat_template=processor.chat_template, add_generation_prompt=True, tokenize=False
    )


def noise_image(seed: int, size=(40, 30)) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


pytestmark = pytest.mark.usefixtures("num2words_stand_in")


def test_family_lists_match_the_supported_model_types():
    from backbones_metaembed import SUPPORTED_MODEL_TYPES

    assert set(BACKBONE_FAMILIES) < set(SUPPORTED_FAMILIES)
    assert {MODEL_TYPES.get(family, (family,))[0] for family in SUPPORTED_FAMILIES} == set(SUPPORTED_MODEL_TYPES)
    assert not {MODEL_TYPES.get(family, (family,))[0] for family in UNSUPPORTED_FAMILIES} & set(SUPPORTED_MODEL_TYPES)
    assert set(VIDEO_PROCESSOR_FAMILIES) <= set(ALL_FAMILIES)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_backbone_loads_and_an_image_changes_the_text_states(family, family_backbone_dir):
    folder = family_backbone_dir(family)
    config = AutoConfig.from_pretrained(folder)
    model_type, text_model_type = MODEL_TYPES.get(family, (family, None))
    assert config.model_type == model_type
    if text_model_type:
        assert config.text_config.model_type == text_model_type
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    # The real repos hold the *ForConditionalGeneration weights (the Qwen test backbones predate this layout).
    assert type(model).__name__.endswith("ForConditionalGeneration")
    assert model.config.get_text_config().hidden_size == 64
    if family == "mistral3":
        pytest.skip("PixtralProcessor cannot be built without torchvision; the backbone loads (checked above)")
    processor = family_processor(folder)
    tokenizer = processor.tokenizer
    assert model.config.get_text_config().vocab_size >= len(tokenizer)
    if family in IMAGE_TOKENS:
        image_token = IMAGE_TOKENS[family]
        image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        config_image_token_id = getattr(config, "image_token_id", None) or config.image_token_index
        assert image_token_id == config_image_token_id != tokenizer.unk_token_id
        assert tokenizer.tokenize(image_token) == [image_token]  # a special token: never split
    prompt = prompt_with_image(processor, family)

    def last_text_state(image):
        features = processor(text=[prompt], images=[[image]], return_tensors="pt")
        with torch.no_grad():
            output = model(**features, output_hidden_states=True)
        # The last position is text that follows the image (for Mllama: sees it through cross-attention).
        return features, output.hidden_states[-1][0, -1]

    features, first = last_text_state(noise_image(1))
    second_features, second = last_text_state(noise_image(2))
    assert torch.equal(features["input_ids"], second_features["input_ids"])  # same prompt, only the pixels differ
    assert first.shape == (64,) and torch.isfinite(first).all()
    assert not torch.allclose(first, second, atol=1e-4), "the image has no effect on the text states"


@pytest.mark.parametrize("family", ["mllama", "gemma3"])
def test_zero_initialised_image_path_weights_are_randomised(family, family_backbone_dir):
    """transformers initialises these to zero; the saved test backbones must not keep them at zero."""
    model = AutoModelForImageTextToText.from_pretrained(family_backbone_dir(family))
    names = {"mllama": ("cross_attn_attn_gate", "cross_attn_mlp_gate", "gate"), "gemma3": ("mm_input_projection",)}
    checked = [
        (name, parameter)
        for name, parameter in model.named_parameters()
        if any(part in name for part in names[family]) and not name.endswith("bias")
    ]
    assert checked
    assert all(parameter.abs().sum() > 0 for _, parameter in checked), [name for name, p in checked if not p.any()]


def test_video_processor_families_hold_the_files_of_the_real_repos(family_backbone_dir):
    for family in VIDEO_PROCESSOR_FAMILIES:
        folder = family_backbone_dir(family)
        with open(os.path.join(folder, "video_preprocessor_config.json")) as file:
            assert file and json.load(file)["video_processor_type"].endswith("VideoProcessor")
        with open(os.path.join(folder, "processor_config.json")) as file:
            assert json.load(file)["processor_class"].endswith("Processor")


def test_mllama_chat_template_writes_the_date_like_the_real_one(family_backbone_dir):
    """Llama 3.2 Vision's template inserts today's date: prompts built from it would change with the calendar."""
    processor = family_processor(family_backbone_dir("mllama"))
    text = processor.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "Today Date: " in text and text.startswith("<|begin_of_text|>")
