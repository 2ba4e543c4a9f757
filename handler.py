"""Hugging Face Inference Endpoints custom handler for a saved MetaEmbed folder.

Inference Endpoints imports `handler.py` from the model repository's root and calls
`EndpointHandler(path)(data)` with each request's JSON body. This handler only translates the wire format:
the model's `encode_queries` / `encode_candidates` and the package's item checks do the work.

Request::

    {"inputs": [item, ...], "parameters": {"task": "query" | "candidate", "num_vectors": int}}

An item is a string (text) or an object `{"text": str, "image": str}` with either key; "image" is a
base64-encoded image (PNG, JPEG, WebP, GIF, BMP or TIFF; a `data:image/...;base64,` prefix and line breaks
are allowed). A string is always text and an image string is always decoded as base64, never opened as a
path. "parameters" and each of its keys are optional: `task` defaults to "candidate", `num_vectors` to all of
that side's vectors.

Response: `{"embeddings": [[[float, ...], ...], ...]}` (items x vectors x dim, each vector L2-normalised), or
`{"error": "..."}`.

Error policy (the handler never raises into the serving worker):

- A malformed request (not a JSON object, missing or unknown keys, wrong types, bad base64, an image that does
  not decode or is over the size limits, a `num_vectors` out of range, ...) returns `{"error": message}` naming
  the problem and the item (`inputs[3]['image']: ...`). These are the handler's own checks plus the
  `TypeError` / `ValueError` / `FileNotFoundError` raised by the package's validation (`num_vectors` and `task`
  through `encode`, items through `processing_metaembed.normalize_items` and `load_image`), all of which run
  before any compute. They are logged at INFO level.
- Anything raised while computing the embeddings of a request that passed validation is not the client's
  fault: it is logged at ERROR level with its traceback, and the response is a generic
  `{"error": "internal error (ExceptionType) ..."}` that does not echo internal details. Running out of
  accelerator memory gets its own message (send fewer or smaller items).
"""

from __future__ import annotations

import base64
import binascii
import importlib
import importlib.util
import io
import logging
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from transformers import AutoModel

logger = logging.getLogger(__name__)

# A 40-megapixel photo is accepted; the Qwen-VL image processors scale anything above their max_pixels
# (12.8 MP by default) down anyway, so bigger images add memory and decode time but no information.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
# Encoded (compressed) size of one image after base64 decoding.
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
# Decoded pixels of all images of one request together: a highly compressible image can be tiny on the
# wire and large in memory, so the per-image limits alone do not bound a request (~300 MB as RGB).
DEFAULT_MAX_REQUEST_PIXELS = 100_000_000
DEFAULT_MAX_ITEMS = 1024
# Raster formats PIL decodes in-process. Formats such as EPS (which runs Ghostscript) are never tried.
DEFAULT_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

REQUEST_KEYS = ("inputs", "parameters")
PARAMETER_KEYS = ("task", "num_vectors")
INTERNAL_ERROR = "internal error ({}) while computing the embeddings; see the endpoint logs"
# Error messages may quote request values (an unknown task, unknown keys); they are cut to this length.
MAX_ERROR_CHARS = 1000


class RequestError(ValueError):
    """A malformed request; its message is returned to the client as `{"error": message}`."""


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
        max_image_bytes: largest encoded image, in bytes after base64 decoding.
        max_image_pixels: largest image, in pixels (width x height), checked from the image header before
            the pixels are decoded. PIL's own decompression-bomb limit also applies.
        max_request_pixels: most pixels of all images of one request together.
        image_formats: PIL format names an image may have; others are refused without being parsed.
        model_kwargs: extra keyword arguments for `AutoModel.from_pretrained` (`attn_implementation`,
            `revision`, ...). With `device_map` in them the model is not moved to `device` afterwards.
    """

    def __init__(
        self,
        path: str = "",
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int = 16,
        max_items: int = DEFAULT_MAX_ITEMS,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
        image_formats: tuple[str, ...] = DEFAULT_IMAGE_FORMATS,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        for name, value in (
            ("batch_size", batch_size),
            ("max_items", max_items),
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
        self._normalize_items = processing.normalize_items
        self._load_image = processing.load_image
        self.batch_size = batch_size
        self.max_items = max_items
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.max_request_pixels = max_request_pixels
        self.image_formats = tuple(name.upper() for name in image_formats)
        # Longest base64 text (padding included, whitespace removed) that can decode to max_image_bytes.
        self._max_base64_chars = 4 * -(-max_image_bytes // 3)

    def __call__(self, data: Any) -> dict[str, Any]:
        """Embed the request's items: `{"embeddings": [...]}` (items x vectors x dim) or `{"error": "..."}`."""
        try:
            items, task, num_vectors = self._parse_request(data)
        except RequestError as error:
            message = str(error)
            if len(message) > MAX_ERROR_CHARS:
                message = message[: MAX_ERROR_CHARS - 3] + "..."
            logger.info("rejected request: %s", message)
            return {"error": message}
        except Exception as error:  # a bug in the validation code, not the client's fault
            logger.exception("unexpected error while validating a request")
            return {"error": INTERNAL_ERROR.format(type(error).__name__)}
        try:
            embeddings = self.model.encode(items, task, num_vectors, batch_size=self.batch_size)
        except torch.cuda.OutOfMemoryError:
            logger.exception("out of memory embedding %d items", len(items))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return {"error": "out of memory while computing the embeddings; send fewer or smaller items"}
        except Exception as error:
            logger.exception("unexpected error embedding %d items", len(items))
            return {"error": INTERNAL_ERROR.format(type(error).__name__)}
        if not bool(torch.isfinite(embeddings).all()):
            logger.error("the model returned non-finite embeddings for %d items", len(items))
            return {"error": INTERNAL_ERROR.format("non-finite embeddings")}
        return {"embeddings": embeddings.tolist()}

    # ------------------------------------------------------------------------------------------------------
    # Request validation: everything below raises RequestError, before any compute.
    # ------------------------------------------------------------------------------------------------------

    def _parse_request(self, data: Any) -> tuple[list[Any], str, int | None]:
        """Check the request and return its items (images decoded), task and num_vectors."""
        if not isinstance(data, dict):
            raise RequestError(f"the request body must be a JSON object, got {_json_type(data)}")
        unknown = sorted(map(str, set(data) - set(REQUEST_KEYS)))
        if unknown:
            raise RequestError(f"unknown request keys {unknown}; expected {list(REQUEST_KEYS)}")
        if "inputs" not in data:
            raise RequestError("the request has no 'inputs'; send {\"inputs\": [item, ...]}")
        task, num_vectors = self._parse_parameters(data.get("parameters"))
        inputs = data["inputs"]
        if not isinstance(inputs, list):
            raise RequestError(
                f"'inputs' must be a list of items, got {_json_type(inputs)}; wrap a single item in a list"
            )
        if len(inputs) > self.max_items:
            raise RequestError(f"'inputs' holds {len(inputs)} items; at most {self.max_items} per request")
        for index, item in enumerate(inputs):
            where = f"inputs[{index}]"
            if not isinstance(item, (str, dict)):
                raise RequestError(
                    f"{where} is {_json_type(item)}; expected a string (text) or an object with 'text' "
                    "and/or 'image' (base64)"
                )
            image = item.get("image") if isinstance(item, dict) else None
            if image is not None and not isinstance(image, str):
                raise RequestError(f"{where}['image'] is {_json_type(image)}; expected a base64-encoded image string")
        # Text and structure: the package's checks (unknown keys, empty text, reserved tokens, ...), run with a
        # stand-in for each image so that a bad item late in the list fails before any image is decoded.
        try:
            self._normalize_items([_without_image(item) for item in inputs])
        except (TypeError, ValueError, FileNotFoundError) as error:
            raise RequestError(str(error)) from error
        items = []
        request_pixels = 0
        for index, item in enumerate(inputs):
            if isinstance(item, dict) and item.get("image") is not None:
                where = f"inputs[{index}]['image']"
                image = self._decode_image(item["image"], where, self.max_request_pixels - request_pixels)
                request_pixels += image.width * image.height
                try:
                    image = self._load_image(image, where)  # the package's checks and RGB conversion
                except (TypeError, ValueError) as error:
                    raise RequestError(str(error)) from error
                item = {**item, "image": image}
            items.append(item)
        return items, task, num_vectors

    def _parse_parameters(self, parameters: Any) -> tuple[str, int | None]:
        """`task` and `num_vectors` from the request's "parameters" (optional, as are both keys)."""
        if parameters is None:
            parameters = {}
        if not isinstance(parameters, dict):
            raise RequestError(f"'parameters' must be an object, got {_json_type(parameters)}")
        unknown = sorted(map(str, set(parameters) - set(PARAMETER_KEYS)))
        if unknown:
            raise RequestError(f"unknown parameters {unknown}; expected some of {list(PARAMETER_KEYS)}")
        task = parameters.get("task", "candidate")
        num_vectors = parameters.get("num_vectors")
        try:
            # encode checks task and num_vectors (against this model's R_q / R_c) before touching any item.
            self.model.encode([], task, num_vectors)
        except (TypeError, ValueError) as error:
            raise RequestError(f"parameters: {error}") from error
        return task, num_vectors

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
        width, height = image.size
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
        return f"a number ({value!r})"
    names = {str: "a string", list: "an array", dict: "an object"}
    return names.get(type(value), type(value).__name__)
