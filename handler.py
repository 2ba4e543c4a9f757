"""Hugging Face Inference Endpoints custom handler for a saved MetaEmbed folder.

The Inference Toolkit imports `handler.py` from the model repository's root, builds `EndpointHandler(path)` once
and calls it with each request's decoded body. This handler only translates the wire format: the model's
`encode_queries` / `encode_candidates` and the package's item checks do the work.

What the handler receives (the toolkit's conventions, see the README's "Serving" section):

- a JSON body, as a dict: `{"inputs": ..., "parameters": {...}}`, plus any other top-level keys the client sent
  (`InferenceClient.feature_extraction` sends `normalize`, `prompt_name`, `truncate`, `truncation_direction`,
  `dimensions`, `encoding_format` at the top level);
- an image body (`Content-Type: image/png`, ...), as `{"inputs": <PIL.Image in RGB>}`;
- URL query parameters (`?task=query&num_vectors=2`) as `"parameters"` when the body has none, with digit
  strings already turned into ints and "true" / "false" into booleans (other values stay strings).

`inputs` is one item or a list of items. An item is a string (text), a PIL image (the toolkit's decoded image
body), or an object `{"text": str, "image": str}` with either key, where "image" is a base64-encoded image (PNG,
JPEG, WebP, GIF, BMP or TIFF; a `data:image/...;base64,` prefix and line breaks are allowed). A string is always
text and an image string is always decoded as base64: the handler never opens a path or a URL.

`parameters` (optional): `task` ("candidate" by default, or "query") and `num_vectors` (default all of that
side's vectors; an int, or a string of decimal digits as query strings give).

Response: one item gives its vectors as a bare nested list `[num_vectors][dim]`; a list of items gives
`[items][num_vectors][dim]` (each vector L2-normalised float). This is the feature-extraction task's response
shape, which the Hub widget and `InferenceClient.feature_extraction` parse.

Errors: the toolkit answers HTTP 400 `{"error": str(exception)}` when the handler raises, so

- a malformed request (wrong types, unknown keys, bad base64, an image or text over the size limits, a
  `num_vectors` out of range, an option MetaEmbed cannot honour, ...) raises `RequestError` (a `ValueError`)
  whose message names the problem and the item (`inputs[3]['image']: ...`), before any compute; these are
  logged at INFO level;
- anything raised while computing the embeddings of a valid request is not the client's fault: it is logged
  at ERROR level with its traceback and re-raised as `InternalError` with a generic message that does not echo
  internal details (running out of accelerator memory gets its own message: send fewer or smaller items).
"""

from __future__ import annotations

import base64
import binascii
import importlib
import importlib.util
import io
import logging
import re
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from transformers import AutoModel

logger = logging.getLogger(__name__)

# A 40-megapixel photo is accepted; the backbones' image processors scale anything above their maximum size
# (12.8 MP by default) down anyway, so bigger images add memory and decode time but no information.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
# Encoded (compressed) size of one image after base64 decoding.
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
# Decoded pixels of all images of one request together: a highly compressible image can be tiny on the
# wire and large in memory, so the per-image limits alone do not bound a request (~300 MB as RGB).
DEFAULT_MAX_REQUEST_PIXELS = 100_000_000
# UTF-8 bytes of all texts of one request together, checked before anything is tokenised. The processor cuts
# each text to max_text_tokens (4,096 by default, a few tens of KB of text), so 4 MiB is ample for a full
# request of long items while one huge item cannot cost seconds of tokenisation and gigabytes of memory.
DEFAULT_MAX_TEXT_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_ITEMS = 1024
# Raster formats PIL decodes in-process. Formats such as EPS (which runs Ghostscript) are never tried.
DEFAULT_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

PARAMETER_KEYS = ("task", "num_vectors")
# Options of the text-embeddings wire format (InferenceClient.feature_extraction sends them at the top level).
# Each value MetaEmbed's output already satisfies is accepted (`None` = not set); any other value would ask for a
# different output, so it is refused rather than ignored. `dimensions` is checked against the model separately.
COMPATIBLE_OPTIONS: dict[str, tuple[Any, ...]] = {
    "normalize": (None, True),  # vectors are always L2-normalised
    "truncate": (None, True),  # an item's text is always cut to the processor's max_text_tokens
    "truncation_direction": (None, "right", "Right"),  # the start of the text is kept
    "encoding_format": (None, "float"),
    "prompt_name": (None,),  # MetaEmbed's prompts follow parameters.task
}
OPTION_HINTS = {
    "normalize": "MetaEmbed's vectors are always L2-normalised",
    "truncate": "MetaEmbed always cuts an item's text to the processor's max_text_tokens",
    "truncation_direction": "MetaEmbed keeps the start of a text that is too long",
    "encoding_format": "the response is always a nested list of floats",
    "prompt_name": "MetaEmbed's prompts are chosen by parameters.task ('query' or 'candidate')",
    "dimensions": "MetaEmbed's vectors have the model's dimension; keep a prefix of the vectors instead "
    "(parameters.num_vectors)",
}
REQUEST_KEYS = ("inputs", "parameters", *COMPATIBLE_OPTIONS, "dimensions")
INTERNAL_ERROR = "internal error ({}) while computing the embeddings; see the endpoint logs"
OUT_OF_MEMORY_ERROR = "out of memory while computing the embeddings; send fewer or smaller items"
# Error messages may quote request values (an unknown task, unknown keys); they are cut to this length.
MAX_ERROR_CHARS = 1000
_DECIMAL_DIGITS = re.compile(r"[0-9]+")


class RequestError(ValueError):
    """A malformed request: the toolkit answers HTTP 400 with this message, which names the problem and item."""

    def __init__(self, message: str) -> None:
        if len(message) > MAX_ERROR_CHARS:
            message = message[: MAX_ERROR_CHARS - 3] + "..."
        super().__init__(message)


class InternalError(RuntimeError):
    """A failure while computing the embeddings of a valid request; the message carries no internal details
    (they are in the server log)."""


class EndpointHandler:
    """
    Serve a saved MetaEmbed folder on Inference Endpoints (see the module docstring for the request format).

    Args:
        path: the model folder (Inference Endpoints passes the repository's local copy); empty means the
            folder this file is in.
        device: where the model runs; default CUDA if available, else CPU.
        dtype: the model's dtype; default bfloat16 on CUDA (float16 on GPUs without bfloat16), float32 on
            CPU. A `torch.dtype` or its name.
        batch_size: items per forward pass (passed to `encode`).
        max_items: most items one request may hold.
        max_text_bytes: most UTF-8 bytes of all texts of one request together, checked before tokenising.
        max_image_bytes: largest encoded image, in bytes after base64 decoding.
        max_image_pixels: largest image, in pixels (width x height), checked from the image header before
            the pixels are decoded. PIL's own decompression-bomb limit also applies.
        max_request_pixels: most pixels of all images of one request together.
        image_formats: PIL format names an image may have; others are refused without being parsed.
        model_kwargs: extra keyword arguments for `AutoModel.from_pretrained` (`attn_implementation`,
            `revision`, ...). With `device_map` in them (which needs the `accelerate` package) the model is not
            moved to `device` afterwards.
    """

    def __init__(
        self,
        path: str = "",
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int = 16,
        max_items: int = DEFAULT_MAX_ITEMS,
        max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
        image_formats: tuple[str, ...] = DEFAULT_IMAGE_FORMATS,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        for name, value in (
            ("batch_size", batch_size),
            ("max_items", max_items),
            ("max_text_bytes", max_text_bytes),
            ("max_image_bytes", max_image_bytes),
            ("max_image_pixels", max_image_pixels),
            ("max_request_pixels", max_request_pixels),
        ):
            _hub_module("scoring_metaembed").check_positive_int(value, name)
        if not image_formats:
            raise ValueError("image_formats must name at least one PIL format")
        path = path or str(Path(__file__).resolve().parent)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            # bfloat16 on GPUs that support it; float16 on older ones (e.g. T4).
            bfloat16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
            dtype = torch.float32 if device.type != "cuda" else torch.bfloat16 if bfloat16_ok else torch.float16
        elif isinstance(dtype, str):
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ValueError(f"dtype must be a torch dtype or its name (e.g. 'bfloat16'), got {dtype!r}")
            dtype = getattr(torch, dtype)
        model_kwargs = dict(model_kwargs or {})
        self.model = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=dtype, **model_kwargs)
        if "device_map" not in model_kwargs:
            self.model.to(device)
        self.model.eval()
        if self.model.processor is None:
            raise ValueError(f"{path} holds no MetaEmbed processor; the handler cannot prepare inputs")
        # The package's own item checks, from the same remote-code module the loaded model runs.
        processing = importlib.import_module(type(self.model.processor).__module__)
        self._processing = processing
        self.batch_size = batch_size
        self.max_items = max_items
        self.max_text_bytes = max_text_bytes
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.max_request_pixels = max_request_pixels
        self.image_formats = tuple(name.upper() for name in image_formats)
        # Longest base64 text (padding included, whitespace removed) that can decode to max_image_bytes.
        self._max_base64_chars = 4 * -(-max_image_bytes // 3)

    def __call__(self, data: Any) -> list[Any]:
        """Embed the request's items.

        Returns:
            `[num_vectors][dim]` nested float lists for a single item, `[items][num_vectors][dim]` for a list.

        Raises:
            RequestError: the request is malformed (the message names the problem and the item).
            InternalError: computing the embeddings failed (details in the log).
        """
        try:
            items, single, task, num_vectors = self._parse_request(data)
        except RequestError as error:
            logger.info("rejected request: %s", error)
            raise
        except Exception as error:  # a bug in the validation code, not the client's fault
            logger.exception("unexpected error while validating a request")
            raise InternalError(INTERNAL_ERROR.format(type(error).__name__)) from None
        try:
            embeddings = self.model.encode(items, task, num_vectors, batch_size=self.batch_size)
        except torch.cuda.OutOfMemoryError:
            logger.exception("out of memory embedding %d items", len(items))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise InternalError(OUT_OF_MEMORY_ERROR) from None
        except Exception as error:
            logger.exception("unexpected error embedding %d items", len(items))
            raise InternalError(INTERNAL_ERROR.format(type(error).__name__)) from None
        if not bool(torch.isfinite(embeddings).all()):
            logger.error("the model returned non-finite embeddings for %d items", len(items))
            raise InternalError(INTERNAL_ERROR.format("non-finite embeddings"))
        return embeddings[0].tolist() if single else embeddings.tolist()

    # ------------------------------------------------------------------------------------------------------
    # Request validation: everything below raises RequestError, before any compute.
    # ------------------------------------------------------------------------------------------------------

    def _parse_request(self, data: Any) -> tuple[list[Any], bool, str, int | None]:
        """Check the request; return its items (checked `MetaEmbedItem`s, images decoded and converted), whether it
        was a single item, the task and num_vectors."""
        if not isinstance(data, dict):
            raise RequestError(f"the request body must be a JSON object, got {_json_type(data)}")
        unknown = sorted(map(str, set(data) - set(REQUEST_KEYS)))
        if unknown:
            raise RequestError(f"unknown request keys {unknown}; expected some of {list(REQUEST_KEYS)}")
        if "inputs" not in data:
            raise RequestError('the request has no \'inputs\'; send {"inputs": item} or {"inputs": [item, ...]}')
        self._check_options(data, "")
        task, num_vectors = self._parse_parameters(data.get("parameters"))
        inputs = data["inputs"]
        single = not isinstance(inputs, list)
        if single:
            inputs, names = [inputs], ["inputs"]
        elif len(inputs) > self.max_items:
            raise RequestError(f"'inputs' holds {len(inputs)} items; at most {self.max_items} per request")
        else:
            names = [f"inputs[{index}]" for index in range(len(inputs))]
        text_bytes = 0
        for name, item in zip(names, inputs):
            if isinstance(item, str):
                text = item
            elif isinstance(item, dict):
                text = item.get("text")
                image = item.get("image")
                if image is not None and not isinstance(image, (str, PIL.Image.Image)):
                    raise RequestError(
                        f"{name}['image'] is {_json_type(image)}; expected a base64-encoded image string"
                    )
            elif isinstance(item, PIL.Image.Image):
                text = None
            else:
                raise RequestError(
                    f"{name} is {_json_type(item)}; expected a string (text), an object with 'text' and/or "
                    "'image' (base64), or a list of those"
                )
            if isinstance(text, str):
                # surrogatepass: a lone surrogate (valid JSON) is counted here and refused by the text checks.
                text_bytes += len(text.encode("utf-8", "surrogatepass"))
                if text_bytes > self.max_text_bytes:
                    raise RequestError(
                        f"{name}: the request's texts hold more than {self.max_text_bytes} bytes (UTF-8) together; "
                        "send shorter texts or fewer items per request"
                    )
        # Text and structure: the package's checks (unknown keys, empty text, reserved tokens, ...), run with a
        # stand-in for each image so that a bad item late in the list fails before any image is decoded.
        try:
            checked = self._processing.normalize_items([_without_image(item) for item in inputs])
        except (TypeError, ValueError, FileNotFoundError) as error:
            message = str(error)
            raise RequestError(message.replace("inputs[0]", "inputs", 1) if single else message) from error
        items = []
        request_pixels = 0
        for name, item, checked_item in zip(names, inputs, checked):
            image = item if isinstance(item, PIL.Image.Image) else item.get("image") if isinstance(item, dict) else None
            if image is None:
                items.append(checked_item)
                continue
            where = name if isinstance(item, PIL.Image.Image) else f"{name}['image']"
            if isinstance(image, str):
                image = self._decode_image(image, where, self.max_request_pixels - request_pixels)
            else:
                self._check_image_size(image.width, image.height, where, self.max_request_pixels - request_pixels)
            request_pixels += image.width * image.height
            try:
                # The package's checks and RGB conversion, once: encode takes the loaded item as it is.
                loaded = self._processing.load_item(self._processing.MetaEmbedItem(checked_item.text, image), where)
            except (TypeError, ValueError) as error:
                raise RequestError(str(error)) from error
            items.append(loaded)
        return items, single, task, num_vectors

    def _check_options(self, options: dict[str, Any], where: str) -> None:
        """Refuse text-embeddings options (top level or in parameters) that ask for an output MetaEmbed does not
        give; accept those its output already satisfies."""
        for name, accepted in COMPATIBLE_OPTIONS.items():
            value = options.get(name)
            if not any(value is choice or (isinstance(value, str) and value == choice) for choice in accepted):
                raise RequestError(f"{where}{name}={_short(value)} is not supported: {OPTION_HINTS[name]}")
        dimensions = options.get("dimensions")
        output_dim = self.model.config.output_dim
        if dimensions is not None and (type(dimensions) is not int or dimensions != output_dim):
            raise RequestError(
                f"{where}dimensions={_short(dimensions)} is not supported: {OPTION_HINTS['dimensions']} "
                f"(this model's dimension is {output_dim})"
            )

    def _parse_parameters(self, parameters: Any) -> tuple[str, int | None]:
        """`task` and `num_vectors` from the request's "parameters" (optional, as are both keys)."""
        if parameters is None:
            parameters = {}
        if not isinstance(parameters, dict):
            raise RequestError(f"'parameters' must be an object, got {_json_type(parameters)}")
        known = (*PARAMETER_KEYS, *COMPATIBLE_OPTIONS, "dimensions")
        unknown = sorted(map(str, set(parameters) - set(known)))
        if unknown:
            raise RequestError(f"unknown parameters {unknown}; expected some of {list(PARAMETER_KEYS)}")
        self._check_options(parameters, "parameters.")
        task = parameters.get("task", "candidate")
        if not isinstance(task, str):
            raise RequestError(f"parameters: task must be 'query' or 'candidate', got {_json_type(task)}")
        num_vectors = parameters.get("num_vectors")
        if isinstance(num_vectors, str):
            # URL query strings carry every value as text ("2"); the toolkit converts only some of them.
            if not _DECIMAL_DIGITS.fullmatch(num_vectors):
                raise RequestError(
                    f"parameters: num_vectors must be an int or a string of decimal digits, got {_short(num_vectors)}"
                )
            digits = num_vectors.lstrip("0") or "0"
            if len(digits) > 19:  # out of range anyway (and int() limits digit strings): quoted as sent
                raise RequestError(f"parameters: num_vectors is out of range, got {_short(num_vectors)}")
            num_vectors = int(digits)
        if isinstance(num_vectors, int) and not isinstance(num_vectors, bool) and num_vectors.bit_length() > 63:
            raise RequestError(f"parameters: num_vectors is out of range, got {_short(num_vectors)}")
        try:
            # encode checks task and num_vectors (against this model's R_q / R_c) before touching any item.
            self.model.encode([], task, num_vectors)
        except (TypeError, ValueError) as error:
            raise RequestError(f"parameters: {error}") from error
        return task, num_vectors

    def _check_image_size(self, width: int, height: int, where: str, pixels_left: int) -> None:
        """Refuse an image over the per-image or (with the request's earlier images) the per-request limit."""
        if width * height > self.max_image_pixels:
            raise RequestError(
                f"{where} is too large: {width}x{height} = {width * height} pixels, "
                f"at most {self.max_image_pixels} allowed"
            )
        if width * height > pixels_left:
            raise RequestError(
                f"{where}: the request's images hold more than {self.max_request_pixels} pixels together; "
                "send fewer or smaller images per request"
            )

    def _decode_image(self, value: str, where: str, pixels_left: int) -> PIL.Image.Image:
        """Decode one base64 image string, refusing oversize images before their pixels are decoded."""
        payload = value
        if payload.startswith("data:"):
            header, comma, payload = payload.partition(",")
            if not comma or not header.endswith(";base64"):
                raise RequestError(f"{where} is a data URL that is not base64 (expected 'data:<type>;base64,...')")
        payload = "".join(payload.split())  # line-wrapped base64 (e.g. the `base64` command's output)
        if not payload:
            raise RequestError(f"{where} is an empty string; expected a base64-encoded image")
        if len(payload) > self._max_base64_chars:
            raise RequestError(
                f"{where} is too large: about {len(payload) * 3 // 4} bytes, at most {self.max_image_bytes} allowed"
            )
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as error:
            raise RequestError(f"{where} is not valid base64: {error}") from error
        if len(raw) > self.max_image_bytes:
            raise RequestError(f"{where} is too large: {len(raw)} bytes, at most {self.max_image_bytes} allowed")
        try:
            # Reads only the header; the pixels are decoded by load() once the size is known to be acceptable.
            image = PIL.Image.open(io.BytesIO(raw), formats=list(self.image_formats))
        except PIL.Image.DecompressionBombError as error:
            raise RequestError(f"{where} is too large: {error}") from error
        except PIL.UnidentifiedImageError as error:
            raise RequestError(
                f"{where} is not a readable image (accepted formats: {', '.join(self.image_formats)})"
            ) from error
        except Exception as error:  # any failure to parse untrusted bytes is a bad image, whatever PIL raises
            raise RequestError(
                f"{where} is not a readable image (accepted formats: {', '.join(self.image_formats)}): "
                f"{type(error).__name__}: {error}"
            ) from error
        self._check_image_size(*image.size, where, pixels_left)
        try:
            image.load()
        except Exception as error:
            raise RequestError(f"{where} could not be decoded: {type(error).__name__}: {error}") from error
        return image


def _hub_module(name: str) -> Any:
    """A Hub-set module before any model is loaded: the copy beside this file (the saved folder is not a
    package, so it is imported by path), else the installed top-level module."""
    sibling = Path(__file__).with_name(f"{name}.py")
    if not sibling.is_file():
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(f"_metaembed_handler_{name}", sibling)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _without_image(item: Any) -> Any:
    """The item with its (not yet decoded) image replaced by a 1x1 stand-in, for the structure checks."""
    if isinstance(item, dict) and item.get("image") is not None:
        return {**item, "image": _PLACEHOLDER_IMAGE}
    return item


_PLACEHOLDER_IMAGE = PIL.Image.new("RGB", (1, 1))


def _json_type(value: Any) -> str:
    """The JSON name of a decoded JSON value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({_short(value)})"
    names = {str: "a string", list: "an array", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _short(value: Any, max_chars: int = 80) -> str:
    """`repr(value)` cut to `max_chars`, for quoting request values in error messages (an int too long for
    Python's int-to-text limit is described by its size)."""
    try:
        text = repr(value)
    except ValueError:
        return f"an int of {value.bit_length()} bits"
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."
