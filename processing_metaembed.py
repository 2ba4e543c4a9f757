"""Turns MetaEmbed items (text, images, text + image) into backbone inputs.

The processor owns everything about an item before the network: checking it, loading its image safely,
formatting the reference prompt, truncating the content and padding on the left. Meta Tokens are not added
here: the model appends exactly the ones a call needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import PIL.Image
import torch
from transformers import BatchFeature, ProcessorMixin

try:
    from .scoring_metaembed import check_positive_int
except ImportError:  # a checkout or an installed package: plain top-level modules
    from scoring_metaembed import check_positive_int

# Reference prompt layout (facebookresearch/MetaEmbed). `{prefix}` is "Query: " for queries, empty for
# candidates; task instructions are part of `{text}`.
_VISION = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPT_TEMPLATES: dict[str, dict[str, str]] = {
    "instruction": {
        "text": "<|im_start|>user\n{prefix}{text}Summarize above sentences in one word.<|im_end|><|endoftext|>",
        "image": "<|im_start|>user\n"
        + _VISION
        + "{prefix}Summarize the above image in one word.<|im_end|><|endoftext|>",
        "image_text": "<|im_start|>user\n"
        + _VISION
        + "{prefix}{text}Summarize the above image and sentences in one word.<|im_end|><|endoftext|>",
    },
    "simple": {
        "text": "<|im_start|>user\n{prefix}{text}<|im_end|><|endoftext|>",
        "image": "<|im_start|>user\n" + _VISION + "{prefix}Describe the image.<|im_end|><|endoftext|>",
        "image_text": "<|im_start|>user\n" + _VISION + "{prefix}{text}<|im_end|><|endoftext|>",
    },
}
IMAGE_TOKEN = "<|image_pad|>"
_RESERVED_TOKENS = (IMAGE_TOKEN, "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
# Special tokens the prompt templates use: a tokenizer without them cannot format MetaEmbed prompts.
TEMPLATE_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>", IMAGE_TOKEN)
# The reference resizes images whose shorter edge is under one merged patch (28 px) up to it.
MIN_IMAGE_EDGE = 28
MAX_ASPECT_RATIO = 200  # the Qwen-VL image processors refuse more

Task = Literal["query", "candidate"]
ImageLike = PIL.Image.Image | str | os.PathLike


@dataclass(frozen=True)
class MetaEmbedItem:
    """One checked input item. `image` is a PIL image or a path that has not been opened yet."""

    text: str | None
    image: ImageLike | None


def check_task(task: Any) -> Task:
    """`task` if it is "query" or "candidate"; the one check of a MetaEmbed task, at each public entry point."""
    if task not in ("query", "candidate"):
        raise ValueError(f"task must be 'query' or 'candidate', got {task!r}")
    return task


def _describe(value: Any) -> str:
    return type(value).__name__ if value is not None else "None"


def normalize_item(item: Any, where: str) -> MetaEmbedItem:
    """Check one user item and return it as a `MetaEmbedItem`; `where` names it in errors (e.g. "inputs[3]").

    A `str` is always text (never sniffed as a path), a `PIL.Image.Image` an image, and a dict holds
    "text" and/or "image" (a PIL image or a file path).
    """
    if isinstance(item, str):
        return MetaEmbedItem(text=_check_text(item, where), image=None)
    if isinstance(item, PIL.Image.Image):
        return MetaEmbedItem(text=None, image=item)
    if isinstance(item, dict):
        unknown = sorted(set(map(str, item)) - {"text", "image"})
        if unknown:
            raise ValueError(f"{where} has unknown keys {unknown}; an item dict takes 'text' and/or 'image'")
        text, image = item.get("text"), item.get("image")
        if text is None and image is None:
            raise ValueError(f"{where} is a dict with neither 'text' nor 'image'")
        if text is not None:
            if not isinstance(text, str):
                raise TypeError(f"{where}['text'] is {_describe(text)}, expected str")
            # Empty text beside an image just means "no text".
            text = _check_text(text, f"{where}['text']") if image is None else (text or None)
        if image is not None:
            if isinstance(image, (str, os.PathLike)):
                _check_image_file(image, f"{where}['image']")
            elif not isinstance(image, PIL.Image.Image):
                raise TypeError(f"{where}['image'] is {_describe(image)}, expected a PIL.Image.Image or a file path")
        return MetaEmbedItem(text=text, image=image)
    raise TypeError(
        f"{where} is {_describe(item)}; expected a str (text), a PIL.Image.Image, or a dict with 'text' and/or 'image'"
    )


def _check_image_file(path: str | os.PathLike, where: str) -> None:
    """Fail before any compute on a missing or non-image file (reads only the header)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: no image file at {os.fspath(path)!r}")
    try:
        with PIL.Image.open(path):
            pass
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"{where}: cannot read image file {os.fspath(path)!r}: {error}") from error


def _check_text(text: str, where: str) -> str:
    if not text.strip():
        raise ValueError(f"{where} is an empty string")
    for token in _RESERVED_TOKENS:
        # These would be read as vision placeholders and break the image/token alignment.
        if token in text:
            raise ValueError(f"{where} contains the reserved token {token}; pass images as images")
    return text


def normalize_items(inputs: Any, argument_name: str = "inputs") -> list[MetaEmbedItem]:
    """Check a list of user items. Raises `TypeError` / `ValueError` / `FileNotFoundError` naming the item."""
    if isinstance(inputs, (str, dict, PIL.Image.Image)) or not isinstance(inputs, (list, tuple)):
        raise TypeError(
            f"{argument_name} must be a list of items (str, PIL.Image.Image or dict), got {_describe(inputs)}; "
            "wrap a single item in a list"
        )
    return [normalize_item(item, f"{argument_name}[{index}]") for index, item in enumerate(inputs)]


def load_image(image: ImageLike, where: str) -> PIL.Image.Image:
    """Open (if a path) and convert an image to RGB, resizing edges under 28 px up.

    Transparent images are composited on white, as the Qwen-VL processors do, so RGBA / LA / palette
    images give the same pixels whichever image processor backend runs.
    """
    if not isinstance(image, PIL.Image.Image):
        try:
            with PIL.Image.open(image) as opened:
                opened.load()
                image = opened.copy()
        except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
            raise ValueError(f"{where}: cannot read image file {os.fspath(image)!r}: {error}") from error
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"{where}: image has size {width}x{height}")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise ValueError(f"{where}: image aspect ratio {width}x{height} exceeds {MAX_ASPECT_RATIO}:1")
    if image.mode != "RGB":
        if image.mode == "P":
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA", "PA"):
            background = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = PIL.Image.alpha_composite(background, image.convert("RGBA"))
        image = image.convert("RGB")
    if min(width, height) < MIN_IMAGE_EDGE:
        scale = MIN_IMAGE_EDGE / min(width, height)
        image = image.resize((max(MIN_IMAGE_EDGE, round(width * scale)), max(MIN_IMAGE_EDGE, round(height * scale))))
    return image


class MetaEmbedProcessor(ProcessorMixin):
    r"""
    Formats MetaEmbed items with the reference prompts and tokenises them for a Qwen-VL backbone.

    Args:
        image_processor: a Qwen2-VL-style image processor (PIL or torchvision backend).
        tokenizer: the backbone's tokenizer.
        query_prefix (`str`, defaults to `"Query: "`): put before query content.
        candidate_prefix (`str`, defaults to `""`): put before candidate content.
        prompt_style (`"instruction"` or `"simple"`): the reference's "Summarize ... in one word." prompts,
            or its variant without instructions.
        max_text_tokens (`int`, defaults to 4096): an item's text is truncated to at most this many tokens;
            the prompt template, image tokens and Meta Tokens are never truncated.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        query_prefix: str = "Query: ",
        candidate_prefix: str = "",
        prompt_style: str = "instruction",
        max_text_tokens: int = 4096,
        **kwargs,
    ):
        if prompt_style not in PROMPT_TEMPLATES:
            raise ValueError(f"prompt_style must be one of {sorted(PROMPT_TEMPLATES)}, got {prompt_style!r}")
        check_positive_int(max_text_tokens, "max_text_tokens")
        self.query_prefix = query_prefix
        self.candidate_prefix = candidate_prefix
        self.prompt_style = prompt_style
        self.max_text_tokens = max_text_tokens
        super().__init__(image_processor, tokenizer, **kwargs)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token; MetaEmbed needs a Qwen-VL tokenizer")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token first")

    def format_prompt(self, item: MetaEmbedItem, task: Task, text: str | None = None) -> str:
        """The prompt string of `item` (image tokens not yet expanded); `text` overrides the item's text."""
        text = item.text if text is None else text
        kind = "image_text" if item.image is not None and text else "image" if item.image is not None else "text"
        prefix = self.query_prefix if task == "query" else self.candidate_prefix
        return PROMPT_TEMPLATES[self.prompt_style][kind].format(prefix=prefix, text=text or "")

    def __call__(self, text: str | list[str] | None = None, images: Any = None, **kwargs: Any) -> BatchFeature:
        """Candidate inputs for `text` and/or `images` (the transformers processor convention), so generic
        tools that call `processor(text=...)` / `processor(images=...)` get MetaEmbed's candidate prompts.

        Given both, item i is text[i] + images[i]. Returns the same fields as `process_items`. Options of the
        generic convention (`padding`, `truncation`, `return_tensors`, per-modality kwargs dicts) are accepted
        and fixed by MetaEmbed: left padding to the longest item, content truncation to `max_text_tokens`,
        PyTorch tensors.
        """
        self._check_call_options(kwargs)
        texts = [text] if isinstance(text, str) else text
        image_list = [images] if isinstance(images, (PIL.Image.Image, str, os.PathLike)) else images
        if texts is None and image_list is None:
            raise ValueError("pass text and/or images")
        if texts is not None and image_list is not None:
            if len(texts) != len(image_list):
                raise ValueError(f"got {len(texts)} texts and {len(image_list)} images; pair them one to one")
            raw_items: list[Any] = [{"text": t, "image": i} for t, i in zip(texts, image_list)]
        else:
            raw_items = list(texts if texts is not None else image_list)
            if image_list is not None:
                raw_items = [{"image": image} for image in raw_items]
            elif not all(isinstance(item, str) for item in raw_items):
                raise TypeError("text must be a str or a list of str")
        return self.process_items(normalize_items(raw_items), "candidate")

    @staticmethod
    def _check_call_options(options: dict[str, Any]) -> None:
        """Refuse options that would change the output, so none is silently ignored."""
        fixed = {
            "padding": (True, "longest"),
            "return_tensors": ("pt",),
            "truncation": (True, None, "longest_first"),  # content is always cut to max_text_tokens
        }
        for name, value in options.items():
            if name in ("text_kwargs", "images_kwargs", "audio_kwargs", "videos_kwargs", "common_kwargs"):
                MetaEmbedProcessor._check_call_options(value or {})
            elif name in fixed:
                if value not in fixed[name]:
                    raise ValueError(f"MetaEmbedProcessor does not support {name}={value!r}")
            elif name == "max_length":
                continue  # content is truncated by max_text_tokens; the Meta Tokens must never be cut
            else:
                raise TypeError(f"MetaEmbedProcessor got an unsupported option {name}={value!r}")

    def process_queries(self, inputs: list[Any]) -> BatchFeature:
        """Model inputs for a list of query items (see `process_items`)."""
        return self.process_items(normalize_items(inputs), "query")

    def process_candidates(self, inputs: list[Any]) -> BatchFeature:
        """Model inputs for a list of candidate items (see `process_items`)."""
        return self.process_items(normalize_items(inputs), "candidate")

    def process_items(
        self, items: list[MetaEmbedItem], task: Task, item_names: list[str] | None = None
    ) -> BatchFeature:
        """Tokenise checked items for `task`, left-padded.

        Returns a `BatchFeature` with `input_ids` and `attention_mask` [B, L], `mm_token_type_ids` [B, L]
        (1 at image tokens), and, when any item has an image, `pixel_values` [num_patches, C * T * P * P]
        and `image_grid_thw` [num_images, 3] in item order. `item_names` label items in errors.
        """
        if not items:
            raise ValueError("process_items needs at least one item")
        return self.process_checked_items(
            items, check_task(task), item_names or [f"inputs[{index}]" for index in range(len(items))]
        )

    def process_checked_items(self, items: list[MetaEmbedItem], task: Task, item_names: list[str]) -> BatchFeature:
        """`process_items` for callers that checked `task` already (e.g. `MetaEmbedModel.encode`)."""
        images = [load_image(item.image, f"{name}['image']") for item, name in zip(items, item_names) if item.image]
        image_inputs: dict[str, torch.Tensor] = {}
        image_token_counts: list[int] = []
        if images:
            image_inputs = dict(self.image_processor(images=images, return_tensors="pt"))
            merge = self.image_processor.merge_size
            image_token_counts = (image_inputs["image_grid_thw"].prod(-1) // (merge * merge)).tolist()

        counts = iter(image_token_counts)
        sequences = []
        for item in items:
            num_image_tokens = next(counts) if item.image is not None else 0
            sequences.append(self._tokenize_truncated(item, task, num_image_tokens))
        batch = self.tokenizer.pad(
            {"input_ids": sequences}, padding="longest", padding_side="left", return_tensors="pt"
        )
        input_ids = batch["input_ids"]
        return BatchFeature(
            {
                "input_ids": input_ids,
                "attention_mask": batch["attention_mask"],
                "mm_token_type_ids": (input_ids == self.image_token_id).int(),
                **image_inputs,
            }
        )

    def _tokenize_truncated(self, item: MetaEmbedItem, task: Task, num_image_tokens: int) -> list[int]:
        """Token ids of the full prompt, the item's text cut to `max_text_tokens` tokens if longer.

        The whole prompt is tokenised in one piece, as the reference does, so untruncated items match it
        token for token.
        """
        text = item.text
        if text:
            text_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(text_ids) > self.max_text_tokens:
                text = self.tokenizer.decode(text_ids[: self.max_text_tokens])
        prompt = self.format_prompt(item, task, text=text)
        if num_image_tokens:
            prompt = prompt.replace(IMAGE_TOKEN, IMAGE_TOKEN * num_image_tokens, 1)
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"]


MetaEmbedProcessor.register_for_auto_class()

__all__ = [
    "PROMPT_TEMPLATES",
    "TEMPLATE_TOKENS",
    "MetaEmbedItem",
    "MetaEmbedProcessor",
    "check_task",
    "load_image",
    "normalize_items",
]
