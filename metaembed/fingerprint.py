"""Content hashes that decide whether stored embeddings may be reused: of a model (everything that decides its
vectors) and of items (their text and image content). One place for both, used by `metaembed index` and by the
evaluation cache, so neither reuses vectors of an edited item or of another model."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import PIL.Image
import torch

# Per model object: (weights stamp, weights digest). Hashing every weight of a 7B model takes tens of seconds; the
# stamp (each tensor's address and in-place version counter) changes whenever a weight is replaced or modified
# in place (an optimizer step, load_state_dict), so a cached digest is never served for changed weights.
_WEIGHT_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_WEIGHT_DIGESTS_LOCK = threading.Lock()


def model_fingerprint(model: Any) -> str:
    """sha256 of a model's config, its processor's settings (prompts, prefixes, text length, image processor), its
    tokenizer's vocabulary and special tokens, and every weight: vectors stored under another fingerprint were
    made by another model or setting.

    The weights' hash is computed once per model object and reused while no weight tensor is replaced or changed
    in place (checked on every call from each tensor's address and version counter, without reading the weights);
    config and processor settings are hashed on every call."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    processor = getattr(model, "processor", None)
    if processor is not None:
        settings = {key: value for key, value in vars(processor).items() if isinstance(value, (str, int, float))}
        digest.update(json.dumps(settings, sort_keys=True).encode())
        digest.update(processor.image_processor.to_json_string().encode())
        tokenizer = processor.tokenizer  # the same weights read other token ids with another vocabulary
        vocabulary = {"vocab": tokenizer.get_vocab(), "special": sorted(map(str, tokenizer.all_special_tokens))}
        digest.update(json.dumps(vocabulary, sort_keys=True).encode())
    digest.update(_weights_digest(model))
    return digest.hexdigest()


def _weights_digest(model: Any) -> bytes:
    state = sorted(model.state_dict().items())
    stamp = tuple(
        (name, tensor.data_ptr(), tensor._version, tensor.dtype, tuple(tensor.shape)) for name, tensor in state
    )
    try:
        with _WEIGHT_DIGESTS_LOCK:
            cached = _WEIGHT_DIGESTS.get(model)
    except TypeError:  # an object that cannot be weakly referenced: never cached
        cached = None
    if cached is not None and cached[0] == stamp:
        return cached[1]
    digest = hashlib.sha256()
    for name, tensor in state:
        digest.update(f"{name} {tensor.dtype} {list(tensor.shape)}".encode())
        digest.update(_tensor_bytes(tensor))
    try:
        with _WEIGHT_DIGESTS_LOCK:
            _WEIGHT_DIGESTS[model] = (stamp, digest.digest())
    except TypeError:
        pass
    return digest.digest()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().cpu().contiguous()
    return tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""


def items_digest(items: Sequence[Any]) -> str:
    """sha256 of items' content, in order: each item's text and its image (a file's bytes, a PIL image's mode,
    size and pixels, raw bytes, or a stored `datasets` image cell {"bytes", "path"}: its bytes, else its file's),
    read without decoding wherever the image is not already a PIL image. Items are what `encode_*` takes (str,
    PIL image, or {"text", "image"}), or the same with stored image cells."""
    digest = hashlib.sha256()
    for item in items:
        if isinstance(item, Mapping):
            text, image = item.get("text"), item.get("image")
        elif isinstance(item, PIL.Image.Image):
            text, image = None, item
        else:
            text, image = item, None
        digest.update(json.dumps(text).encode())
        digest.update(_image_digest(image))
    return digest.hexdigest()


def records_digest(ids: Sequence[Any], metadata: Sequence[Any] | None) -> str:
    """sha256 of the ids and metadata stored beside vectors (JSON, keys sorted): an edited one is not reused."""
    return hashlib.sha256(json.dumps([list(ids), metadata], sort_keys=True).encode()).hexdigest()


def _image_digest(image: Any) -> bytes:
    if image is None:
        return b"\0no image"
    if isinstance(image, PIL.Image.Image):
        header = f"{image.mode} {image.size}".encode()
        return hashlib.sha256(header + image.tobytes()).digest()
    if isinstance(image, Mapping) and set(image) <= {"bytes", "path"}:  # a datasets Image(decode=False) cell
        if image.get("bytes") is not None:
            return _image_digest(image["bytes"])
        if image.get("path"):
            return _image_digest(image["path"])
        raise ValueError(f"an image cell with neither bytes nor path: {image!r}")
    if isinstance(image, (bytes, bytearray)):
        return hashlib.sha256(image).digest()
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as file:
            return hashlib.sha256(file.read()).digest()
    raise TypeError(f"cannot hash an image of type {type(image).__name__}")


__all__ = ["items_digest", "model_fingerprint", "records_digest"]
