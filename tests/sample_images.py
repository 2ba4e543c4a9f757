"""Deterministic test images, importable without the checkout on sys.path (fresh-process tests need that)."""

from __future__ import annotations

import torch
from PIL import Image


def make_images() -> dict[str, Image.Image]:
    generator = torch.Generator().manual_seed(1)

    def noise(mode: str, size: tuple[int, int]) -> Image.Image:
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        array = torch.randint(0, 256, (size[1], size[0], channels), generator=generator, dtype=torch.uint8)
        return Image.fromarray(array.squeeze(-1).numpy() if channels == 1 else array.numpy(), mode=mode)

    return {
        "rgb": noise("RGB", (84, 56)),
        "tall": noise("RGB", (56, 140)),
        "gray": noise("L", (60, 60)),
        "rgba": noise("RGBA", (70, 50)),
        "tiny": noise("RGB", (5, 9)),
    }
