"""Turns MetaEmbed items (text, images, text + image) into backbone inputs.

The processor owns everything about an item before the network: checking it, loading its image safely,
formatting the reference prompt, truncating the content and padding on the left. Meta Tokens are not added
here: the model appends exactly the ones a call needs.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Literal

import PIL.ExifTags
import PIL.Image
import PIL.ImageChops
import torch
from transformers import BatchFeature, ProcessorMixin

try:
    from .backbones_metaembed import IMAGE_FIELD, BackboneAdapter, get_backbone_adapter
    from .scoring_metaembed import check_positive_int
except ImportError:  # a checkout or an installed package: plain top-level modules
    from backbones_metaembed import IMAGE_FIELD, BackboneAdapter, get_backbone_adapter
    from scoring_metaembed import check_positive_int

DEFAULT_BACKBONE_MODEL_TYPE = "qwen2_5_vl"
"""The backbone family of processors saved before the family was recorded (all were Qwen-VL)."""
PROMPT_TEMPLATES: dict[str, dict[str, str]] = get_backbone_adapter(DEFAULT_BACKBONE_MODEL_TYPE).prompt_templates
"""The reference prompt layout (facebookresearch/MetaEmbed) on Qwen-VL backbones; other families' are in their
adapters (`backbones_metaembed.py`). `{image}` is where the image's tokens go."""
# Image-processor settings that are sizes: 0 or a negative value would fail deep inside the first image call.
_POSITIVE_IMAGE_SETTINGS = ("patch_size", "merge_size", "temporal_patch_size", "max_image_tiles", "image_seq_length")
# Outputs of a family processor that depend on the text: MetaEmbed computes these over the whole prompt.
_TEXT_ALIGNED_OUTPUTS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "cross_attention_mask")
# Truncating a long text tokenises only a prefix of it: `(max_text_tokens + _CUT_GUARD_TOKENS) * 8` characters (BPE
# vocabularies average about 4 characters per token on English, 1-2 on CJK text) plus the longest vocabulary entry,
# doubled while that is too short, up to `max_text_characters`.
_PREFIX_CHARACTERS_PER_TOKEN = 8
# The prefix's first `max_text_tokens` tokens are those of the whole text when they end at least one vocabulary entry
# before the cut (no token crossing the cut can reach them) and this many tokens follow them (BPE never merges across
# pre-tokens, so the cut only changes the tokens of its last, cut word).
_CUT_GUARD_TOKENS = 256
# The reference resizes images whose shorter edge is under one merged patch (28 px) up to it.
MIN_IMAGE_EDGE = 28
MAX_ASPECT_RATIO = 200  # the Qwen-VL image processors refuse more

Task = Literal["query", "candidate"]
ImageLike = PIL.Image.Image | str | os.PathLike


@dataclass(frozen=True)
class MetaEmbedItem:
    """One checked input item (made by `normalize_item`). `image` is a PIL image or a path that has not been
    opened yet; `image_loaded` says it is `load_image`'s output already (see `load_item`)."""

    text: str | None
    image: ImageLike | None
    image_loaded: bool = False


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
    "text" and/or "image" (a PIL image or a file path). A `MetaEmbedItem` was checked here already and is
    returned as it is, so each item is checked once however many layers pass it on.
    """
    if isinstance(item, MetaEmbedItem):
        return item
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
            text = None if image is not None and (not text or text.isspace()) else _check_text(text, f"{where}['text']")
        if image is not None:
            if isinstance(image, (str, os.PathLike)):
                _check_image_file(image, f"{where}['image']")
            elif not isinstance(image, PIL.Image.Image):
                raise TypeError(f"{where}['image'] is {_describe(image)}, expected a PIL.Image.Image or a file path")
        return MetaEmbedItem(text=text, image=image)
    raise TypeError(
        f"{where} is {_describe(item)}; expected a str (text), a PIL.Image.Image, or a dict with 'text' and/or 'image'"
    )


def load_item(item: MetaEmbedItem, where: str) -> MetaEmbedItem:
    """`item` with its image through `load_image` (`where` names the image in errors). An item whose image is
    loaded already is returned as it is: each image is decoded and converted once per call."""
    if item.image is None or item.image_loaded:
        return item
    return MetaEmbedItem(text=item.text, image=load_image(item.image, where), image_loaded=True)


def _check_image_file(path: str | os.PathLike, where: str) -> None:
    """Fail before any compute on a missing or non-image file (reads only the header)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: no image file at {os.fspath(path)!r}")
    try:
        with PIL.Image.open(path) as image:
            _check_pixel_count(image.size)
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise ValueError(f"{where}: cannot read image file {os.fspath(path)!r}: {error}") from error


def _check_pixel_count(size: tuple[int, int]) -> None:
    """PIL only warns between `MAX_IMAGE_PIXELS` and twice that: a decompression bomb there is refused too."""
    limit = PIL.Image.MAX_IMAGE_PIXELS
    if limit and size[0] * size[1] > limit:
        raise PIL.Image.DecompressionBombError(
            f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels exceeds the limit of {limit} (a decompression bomb?)"
        )


# A lone surrogate is valid in JSON and in a Python str, but is no text: it cannot be encoded.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_text(text: str, where: str) -> str:
    if not text or text.isspace():
        raise ValueError(f"{where} is an empty string")
    surrogate = _SURROGATE.search(text)  # no copy of the text, which may be large
    if surrogate:
        raise ValueError(
            f"{where} contains a lone surrogate {surrogate.group()!r} at character {surrogate.start()}: "
            "not valid Unicode text"
        )
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
    """Open (if a path) and convert an image to 8-bit RGB, resizing edges under 28 px up.

    - The EXIF orientation is applied, as browsers and transformers' `load_image` do; an EXIF block that does not
      parse means no orientation (it is metadata, not pixels). The result carries no EXIF, so converting it
      again changes nothing.
    - Transparent images (RGBA, LA, La, RGBa, PA, palette with transparency) are composited on white, as the
      Qwen-VL processors do, so they give the same pixels whichever image processor backend runs.
    - 16-bit and 32-bit integer images ("I;16*", "I") are scaled from the 16-bit range (what 16-bit PNG and TIFF
      files hold: 65535 -> 255); "I" images with values outside 0..65535 and float ("F") images outside 0..1 are
      scaled from their own minimum and maximum; "F" images within 0..1 from that range. A plain conversion
      would clip them to 0 / 255.

    Raises `ValueError` naming the item (`where`) for anything that cannot be read or converted.
    """
    if not isinstance(image, PIL.Image.Image):
        try:
            with PIL.Image.open(image) as opened:
                _check_pixel_count(opened.size)
                opened.load()
                image = opened.copy()
        except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
            raise ValueError(f"{where}: cannot read image file {os.fspath(image)!r}: {error}") from error
    try:
        image = _to_rgb(_apply_exif_orientation(image))
    except (OSError, SyntaxError, ValueError, AttributeError, TypeError) as error:
        # e.g. a lazily opened image whose file was closed, or a mode PIL cannot convert.
        raise ValueError(f"{where}: cannot read {image.mode} image: {error or type(error).__name__}") from error
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"{where}: image has size {width}x{height}")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise ValueError(f"{where}: image aspect ratio {width}x{height} exceeds {MAX_ASPECT_RATIO}:1")
    if min(width, height) < MIN_IMAGE_EDGE:
        scale = MIN_IMAGE_EDGE / min(width, height)
        image = image.resize((max(MIN_IMAGE_EDGE, round(width * scale)), max(MIN_IMAGE_EDGE, round(height * scale))))
    return image


_ORIENTATION_TRANSPOSES = {
    2: PIL.Image.Transpose.FLIP_LEFT_RIGHT,
    3: PIL.Image.Transpose.ROTATE_180,
    4: PIL.Image.Transpose.FLIP_TOP_BOTTOM,
    5: PIL.Image.Transpose.TRANSPOSE,
    6: PIL.Image.Transpose.ROTATE_270,
    7: PIL.Image.Transpose.TRANSVERSE,
    8: PIL.Image.Transpose.ROTATE_90,
}
# Metadata that can hold an orientation (EXIF, as PNG text, XMP); dropped once the orientation is applied.
_ORIENTATION_INFO_KEYS = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")


def _apply_exif_orientation(image: PIL.Image.Image) -> PIL.Image.Image:
    """`image` turned upright by its EXIF (or XMP) orientation, without orientation metadata; `image` itself
    (never modified) when it has no orientation or its EXIF block does not parse."""
    image.load()
    try:
        orientation = image.getexif().get(PIL.ExifTags.Base.Orientation, 1)
    except Exception:  # PIL raises SyntaxError, struct.error, ... on a corrupt EXIF block
        orientation = 1
    transpose = _ORIENTATION_TRANSPOSES.get(orientation)
    if transpose is None:
        return image
    upright = image.transpose(transpose)  # a new image with a copy of `info`
    for key in _ORIENTATION_INFO_KEYS:
        upright.info.pop(key, None)
    return upright


def _to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """8-bit RGB pixels of any PIL mode (see `load_image`)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        image = image.convert("F") if image.mode == "F" else image.convert("I")
        low, high = image.getextrema()
        if image.mode == "I" and low >= 0 and high <= 65535:
            low, high = 0, 65535
        elif image.mode == "F" and low >= 0.0 and high <= 1.0:
            low, high = 0.0, 1.0
        scale = 255.0 / (high - low) if high > low else 0.0
        # Rounded to the nearest 8-bit value, then clipped by the conversion to "L".
        return image.point(lambda value: value * scale - low * scale + 0.5).convert("L").convert("RGB")
    if image.mode == "La":  # premultiplied alpha, which PIL cannot convert: over white is L + (255 - alpha)
        luminance, alpha = image.split()
        return PIL.ImageChops.add(luminance, PIL.ImageChops.invert(alpha)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        background = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


class MetaEmbedProcessor(ProcessorMixin):
    r"""
    Formats MetaEmbed items with the reference prompts and tokenises them for a vision-language backbone of any
    supported family (`backbones_metaembed.SUPPORTED_MODEL_TYPES`).

    Images go through the family's own processor (its image processor, image-token expansion, tiling and masks);
    the prompt around them is rendered by the family's adapter from fixed strings. The user's text (and the
    prefixes) is always tokenised as plain text: a text holding `<|im_end|>`, an image token or any other special
    token of the tokenizer gets the ids of those characters, never the special token.

    Args:
        image_processor: the backbone's image processor (a PIL or torchvision backend).
        tokenizer: the backbone's tokenizer.
        query_prefix (`str`, defaults to `"Query: "`): put before query content.
        candidate_prefix (`str`, defaults to `""`): put before candidate content.
        prompt_style (`"instruction"` or `"simple"`): the reference's "Summarize ... in one word." prompts,
            or its variant without instructions.
        max_text_tokens (`int`, defaults to 4096): an item's text is truncated to at most this many tokens; only
            a prefix a few times that long is tokenised (never more than `max_text_characters`), so the work per
            item is bounded. The prompt template, image tokens and Meta Tokens are never truncated.
        backbone_model_type (`str`, defaults to `"qwen2_5_vl"`): the backbone's `model_type`, which picks its adapter.
        backbone_processor_kwargs (`dict`, *optional*): options of the family's processor (from the backbone's
            processor_config.json, e.g. Idefics3's `image_seq_len`).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        query_prefix: str = "Query: ",
        candidate_prefix: str = "",
        prompt_style: str = "instruction",
        max_text_tokens: int = 4096,
        backbone_model_type: str = DEFAULT_BACKBONE_MODEL_TYPE,
        backbone_processor_kwargs: dict[str, Any] | None = None,
        **kwargs,
    ):
        self.adapter: BackboneAdapter = get_backbone_adapter(backbone_model_type)
        if prompt_style not in self.adapter.prompt_templates:
            raise ValueError(
                f"prompt_style must be one of {sorted(self.adapter.prompt_templates)}, got {prompt_style!r}"
            )
        check_positive_int(max_text_tokens, "max_text_tokens")
        self.query_prefix = query_prefix
        self.candidate_prefix = candidate_prefix
        self.prompt_style = prompt_style
        self.max_text_tokens = max_text_tokens
        self.backbone_model_type = backbone_model_type
        self.backbone_processor_kwargs = dict(backbone_processor_kwargs or {})
        super().__init__(image_processor, tokenizer, **kwargs)
        missing = missing_tokens(tokenizer, (*self.adapter.template_tokens, self.adapter.image_token))
        if missing:
            raise ValueError(
                f"the tokenizer lacks the {self.adapter.name} prompt tokens {missing}; is it the backbone's tokenizer?"
            )
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token first")
        # The tokenizer's special tokens and the family's prompt and image tokens (ordinary added words may appear).
        control = {str(added) for added in tokenizer.added_tokens_decoder.values() if added.special}
        control = sorted(control | set(self._control_tokens()), key=len, reverse=True)
        for name in ("query_prefix", "candidate_prefix"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a str, got {type(value).__name__}")
            reserved = next((token for token in control if token and token in value), None)
            if reserved is not None:
                raise ValueError(f"{name} {value!r} contains the reserved token {reserved}")
        for name in _POSITIVE_IMAGE_SETTINGS:
            value = getattr(image_processor, name, None)
            if isinstance(value, (dict, list, tuple)) or value is None:  # per-axis sizes are the family's to check
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"the image processor's {name} must be a positive int, got {value!r}")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.adapter.image_token)
        self._span_token_ids = {tokenizer.convert_tokens_to_ids(token) for token in self.adapter.image_span_tokens}
        # The family's processor, for images only (no video processor: that needs torchvision).
        self.backbone_processor = self.adapter.build_processor(
            image_processor, tokenizer, self.backbone_processor_kwargs
        )
        self._plain_encoder = _plain_text_encoder(tokenizer, self._control_tokens())
        # No token covers more characters than its vocabulary entry has symbols (one per byte for byte-level
        # BPE), so `max_text_tokens` tokens never need more than this many characters per token.
        self._max_token_characters = max(map(len, tokenizer.get_vocab()))

    def __getstate__(self) -> dict[str, Any]:
        # The family processor's class is made at run time (no video processor) and cannot be pickled by name:
        # rebuilt on unpickling, as the plain-text encoder (e.g. for multi-process encoding).
        state = self.__dict__.copy()
        state.pop("backbone_processor", None)
        state.pop("_plain_encoder", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.backbone_processor = self.adapter.build_processor(
            self.image_processor, self.tokenizer, self.backbone_processor_kwargs
        )
        self._plain_encoder = _plain_text_encoder(self.tokenizer, self._control_tokens())

    def _control_tokens(self) -> tuple[str, ...]:
        """The family's prompt and image tokens, which user text never becomes (special or not)."""
        adapter = self.adapter
        return (*adapter.template_tokens, adapter.image_token, *adapter.image_span_tokens)

    @property
    def max_text_characters(self) -> int:
        """The most characters of a text ever tokenised (`max_text_tokens` tokens never span more): a huge text
        costs no more than one of this length, usually far less (see `truncate_text`)."""
        return self.max_text_tokens * self._max_token_characters

    def encode_plain_text(self, text: str) -> list[int]:
        """Token ids of `text` as plain text: special-token strings in it are tokenised as ordinary characters.
        For text without them, exactly the ids the tokenizer gives."""
        if self._plain_encoder is not None:
            return self._plain_encoder.encode(text, add_special_tokens=False).ids
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def _prompt_kind(self, item: MetaEmbedItem, text: str | None) -> str:
        return "image_text" if item.image is not None and text else "image" if item.image is not None else "text"

    def format_prompt(self, item: MetaEmbedItem, task: Task, text: str | None = None) -> str:
        """The prompt string of `item` (image tokens not yet expanded); `text` overrides the item's text. The
        user's text in it is encoded as plain text (see `process_items`)."""
        text = item.text if text is None else text
        prefix = self.query_prefix if task == "query" else self.candidate_prefix
        return self.adapter.prompt_string(self._prompt_kind(item, text), self.prompt_style, prefix, text or "")

    def __call__(self, text: str | list[str] | None = None, images: Any = None, **kwargs: Any) -> BatchFeature:
        """Candidate inputs for `text` and/or `images` (the transformers processor convention), so generic
        tools that call `processor(text=...)` / `processor(images=...)` get MetaEmbed's candidate prompts.

        Given both, item i is text[i] + images[i]. Returns the same fields as `process_items`. Options of the
        generic convention (`padding`, `truncation`, `return_tensors`, per-modality kwargs dicts) are accepted
        and fixed by MetaEmbed: left padding to the longest item, content truncation, PyTorch tensors;
        `max_length` is the most tokens of an item's text for this call (`max_text_tokens` otherwise).
        """
        max_length = self._check_call_options(kwargs)
        processor = self
        if max_length is not None and max_length != self.max_text_tokens:
            processor = copy.copy(self)  # this call only: the processor may be shared between threads
            processor.max_text_tokens = max_length
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
        return processor.process_items(normalize_items(raw_items), "candidate")

    @staticmethod
    def _check_call_options(options: dict[str, Any]) -> int | None:
        """Refuse options that would change the output, so none is silently ignored. Returns the `max_length`
        asked for (the most tokens of an item's text; the Meta Tokens and the prompt are never cut), if any."""
        fixed = {
            "padding": (True, "longest"),
            "return_tensors": ("pt",),
            "truncation": (True, None, "longest_first"),  # content is always cut to max_text_tokens
        }
        max_lengths = set()
        for name, value in options.items():
            if name in ("text_kwargs", "images_kwargs", "audio_kwargs", "videos_kwargs", "common_kwargs"):
                max_lengths.add(MetaEmbedProcessor._check_call_options(value or {}))
            elif name in fixed:
                if value not in fixed[name]:
                    raise ValueError(f"MetaEmbedProcessor does not support {name}={value!r}")
            elif name == "max_length":
                max_lengths.add(None if value is None else check_positive_int(value, "max_length"))
            else:
                raise TypeError(f"MetaEmbedProcessor got an unsupported option {name}={value!r}")
        max_lengths.discard(None)
        if len(max_lengths) > 1:
            raise ValueError(f"MetaEmbedProcessor got different max_length values {sorted(max_lengths)}")
        return max_lengths.pop() if max_lengths else None

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

        Returns a `BatchFeature` with `input_ids` and `attention_mask` [B, L] and the family's other inputs
        (`adapter.extra_input_names`): Qwen-VL `mm_token_type_ids` [B, L] (1 at image tokens) and, when any item
        has an image, `pixel_values` [num_patches, C * T * P * P] and `image_grid_thw` [num_images, 3] in item
        order; Gemma 3 / PaliGemma `token_type_ids` [B, L]; Mllama `cross_attention_mask` [B, L, 1, tiles]; the
        image tensors of the family's processor (`pixel_attention_mask`, `image_sizes`, ...) as it makes them,
        for the items with an image, in item order. `item_names` label items in errors.
        """
        if not items:
            raise ValueError("process_items needs at least one item")
        return self.process_checked_items(
            items, check_task(task), item_names or [f"inputs[{index}]" for index in range(len(items))]
        )

    def process_checked_items(self, items: list[MetaEmbedItem], task: Task, item_names: list[str]) -> BatchFeature:
        """`process_items` for callers that checked `task` already (e.g. `MetaEmbedModel.encode`)."""
        items = [load_item(item, f"{name}['image']") for item, name in zip(items, item_names)]
        image_inputs, image_pieces, image_tile_masks = self._process_images([item.image for item in items])
        pieces = iter(image_pieces)
        sequences = [
            self._tokenize_truncated(item, task, next(pieces) if item.image is not None else []) for item in items
        ]
        batch = self.tokenizer.pad(
            {"input_ids": sequences}, padding="longest", padding_side="left", return_tensors="pt"
        )
        input_ids = batch["input_ids"]
        is_image_token = input_ids == self.image_token_id
        features: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": batch["attention_mask"]}
        if self.adapter.rope == "mrope":
            features["mm_token_type_ids"] = is_image_token.int()
        if self.adapter.token_type_ids == "image":
            features["token_type_ids"] = is_image_token.long()
        elif self.adapter.token_type_ids == "prefix":
            features["token_type_ids"] = torch.zeros_like(input_ids)
        if self.adapter.cross_attention:
            # Each text position from its image's token on attends to that image's tiles (Mllama's rule).
            shape = (*input_ids.shape, *(image_tile_masks[0].shape if image_tile_masks else (1, 1)))
            cross_attention_mask = torch.zeros(shape, dtype=torch.long)
            masks = iter(image_tile_masks)
            for row, item in enumerate(items):
                if item.image is not None:
                    first = int(is_image_token[row].nonzero()[0, 0])
                    cross_attention_mask[row, first:] = next(masks)
            features["cross_attention_mask"] = cross_attention_mask
        return BatchFeature({**features, **image_inputs})

    def _process_images(
        self, images: list[PIL.Image.Image | None]
    ) -> tuple[dict[str, torch.Tensor], list[list[int]], list[torch.Tensor]]:
        """The family processor's image inputs for the items' images (in item order), each image's token ids (its
        expansion of the placeholder) and, for cross-attention families, each image's tile mask."""
        present = [image for image in images if image is not None]
        if not present:
            return {}, [], []
        output = self.backbone_processor(
            text=[self.adapter.image_placeholder] * len(present),
            images=[[image] for image in present] if self.adapter.nested_images else present,
            padding=True,
            add_special_tokens=False,
            return_tensors="pt",
        )
        pieces, tile_masks = [], []
        for row in range(len(present)):
            ids = output["input_ids"][row][output["attention_mask"][row].bool()]
            where = torch.isin(ids, torch.tensor(sorted(self._span_token_ids))).nonzero()[:, 0]
            if where.numel() == 0:
                raise ValueError(
                    f"the {self.adapter.name} processor did not expand {self.adapter.image_placeholder!r} into "
                    "image tokens"
                )
            pieces.append(ids[int(where[0]) : int(where[-1]) + 1].tolist())
            if self.adapter.cross_attention:
                position = int((output["input_ids"][row] == self.image_token_id).nonzero()[0, 0])
                tile_masks.append(output["cross_attention_mask"][row, position])
        image_inputs = {
            key: value
            for key, value in output.items()
            if key not in _TEXT_ALIGNED_OUTPUTS and key in self.adapter.extra_input_names
        }
        return image_inputs, pieces, tile_masks

    def _tokenize_truncated(self, item: MetaEmbedItem, task: Task, image_ids: list[int]) -> list[int]:
        """Token ids of the full prompt, the item's text cut to `max_text_tokens` tokens if longer, `image_ids` in
        place of the image.

        Template tokens are looked up by name; the runs of plain text between them (prefix, the user's text and the
        template's words) are tokenised as plain text in one piece each, as the reference tokenises its whole
        prompt, so untruncated items of ordinary text match it token for token.
        """
        text = self.truncate_text(item.text) if item.text else item.text
        prefix = self.query_prefix if task == "query" else self.candidate_prefix
        ids: list[int] = []
        for string, plain in self.adapter.render_prompt(
            self._prompt_kind(item, text), self.prompt_style, prefix, text or ""
        ):
            if plain:
                ids += self.encode_plain_text(string)
            elif string == IMAGE_FIELD:
                ids += image_ids
            else:
                ids.append(self.tokenizer.convert_tokens_to_ids(string))
        return ids

    def truncate_text(self, text: str) -> str:
        """`text`, or the decoded first `max_text_tokens` tokens of it if it has more.

        Only a prefix is tokenised, `(max_text_tokens + 256) * 8` characters plus the longest vocabulary entry at
        first, doubled until its first `max_text_tokens` tokens are those of the whole text (see
        `_CUT_GUARD_TOKENS`), at most `max_text_characters` (then exactly as if that prefix were the text).
        """
        kept, needed = self.max_text_tokens, self.max_text_tokens + _CUT_GUARD_TOKENS
        length = needed * _PREFIX_CHARACTERS_PER_TOKEN + self._max_token_characters
        while True:
            length = min(length, self.max_text_characters)
            prefix = text[:length]
            ids = self.encode_plain_text(prefix)
            final = len(prefix) == len(text) or length == self.max_text_characters
            if len(ids) <= kept:
                if final:
                    return prefix
            else:
                truncated = self.tokenizer.decode(ids[:kept])
                cut_is_far = len(ids) >= needed and len(prefix) - len(truncated) >= self._max_token_characters
                if final or cut_is_far:
                    return truncated
            length *= 2

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", *self.adapter.extra_input_names]


def missing_tokens(tokenizer: Any, tokens: tuple[str, ...]) -> list[str]:
    """The `tokens` the tokenizer has no id of its own for. A token whose id is the unknown token's is missing
    unless it is the unknown token itself (`Qwen2Tokenizer`'s default `unk_token` is `<|endoftext|>`)."""
    missing = []
    for token in tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
            missing.append(token)
    return missing


def _plain_text_encoder(tokenizer: Any, control_tokens: tuple[str, ...]) -> Any:
    """A copy of the tokenizer's fast backend that tokenises the text of its special tokens and of `control_tokens`
    (the family's prompt and image tokens, special or not: `<|im_end|>`, `<image>`, ...) as ordinary characters:
    user text never becomes control tokens. Other added words stay words. Built once; encoding with it changes no
    shared state, so concurrent calls are safe (toggling `split_special_tokens` on the tokenizer per call is not).
    `None` without a fast backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    import tokenizers

    description = json.loads(backend.to_str())
    for added in description.get("added_tokens") or []:
        if added.get("content") in control_tokens:
            added["special"] = True  # encode_special_tokens only reaches special added tokens
    encoder = tokenizers.Tokenizer.from_str(json.dumps(description))
    encoder.encode_special_tokens = True
    encoder.no_truncation()
    encoder.no_padding()
    return encoder


MetaEmbedProcessor.register_for_auto_class()

__all__ = [
    "DEFAULT_BACKBONE_MODEL_TYPE",
    "PROMPT_TEMPLATES",
    "MetaEmbedItem",
    "MetaEmbedProcessor",
    "check_task",
    "load_image",
    "load_item",
    "missing_tokens",
    "normalize_item",
    "normalize_items",
]
