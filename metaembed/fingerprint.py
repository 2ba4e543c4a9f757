"""Content hashes that decide whether stored embeddings may be reused: of a model (everything that decides its
vectors) and of items (their text and image content). One place for both, used by `metaembed index` and by the
evaluation cache, so neither reuses vectors of an edited item or of another model."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import PIL.Image
import torch


def model_fingerprint(model: Any) -> str:
    """sha256 of a model's config, its processor's settings (prompts, prefixes, text length, image processor) and
    every weight: vectors stored under another fingerprint were made by another model or setting."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    processor = getattr(model, "processor", None)
    if processor is not None:
        settings = {key: value for key, value in vars(processor).items() if isinstance(value, (str, int, float))}
        digest.update(json.dumps(settings, sort_keys=True).encode())
        digest.update(processor.image_processor.to_json_string().encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {list(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def items_digest(items: Sequence[Any]) -> str:
    """sha256 of items' content, in order: each item's text and its image (a file's bytes, a PIL image's mode,
    size and pixels, or raw bytes). Items are what `encode_*` takes: str, PIL image, or {"text", "image"}."""
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
    if isinstance(image, (bytes, bytearray)):
        return hashlib.sha256(image).digest()
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as file:
            return hashlib.sha256(file.read()).digest()
    raise TypeError(f"cannot hash an image of type {type(image).__name__}")


__all__ = ["items_digest", "model_fingerprint", "records_digest"]
