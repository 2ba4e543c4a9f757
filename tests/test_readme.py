"""Every ```python block of README.md runs as written, with the model ids swapped for tiny local ones."""

from __future__ import annotations

import os
import re

import pytest
from conftest import ROOT, make_model

# Names the README uses for things that cannot exist offline, and what stands in for them here.
STAND_INS = {
    '"Qwen/Qwen2.5-VL-3B-Instruct"': "BACKBONE_DIR",
    'device_map="cuda"': 'device_map="cpu"',
    "max_steps=2000": "max_steps=1",
    "bf16=True": "bf16=False",  # the Trainer refuses bf16 on a CPU-only machine
}


def python_snippets(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def readme_snippets() -> list[str]:
    return python_snippets((ROOT / "README.md").read_text(encoding="utf-8"))


def test_readme_has_snippets():
    assert len(readme_snippets()) >= 1


def test_readme_snippets_run(backbone_dirs, images, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("q.png", "page.png", "scene.png", "photo.jpg"):
        images["rgb"].save(name)
    namespace = {"BACKBONE_DIR": backbone_dirs["qwen2_5_vl"]}
    for index, snippet in enumerate(readme_snippets()):
        for original, stand_in in STAND_INS.items():
            snippet = snippet.replace(original, stand_in)
        try:
            exec(compile(snippet, f"README.md snippet {index}", "exec"), namespace)
        except Exception as error:  # name the snippet that broke
            pytest.fail(f"README snippet {index} failed: {type(error).__name__}: {error}\n{snippet}")
    assert os.path.isdir(tmp_path / "my-metaembed")


def test_model_card_snippets_run(backbone_dirs, images, tmp_path, monkeypatch):
    """The usage in the README.md that save_pretrained renders into every model folder."""
    monkeypatch.chdir(tmp_path)
    for name in ("scene.png", "photo.jpg"):
        images["rgb"].save(name)
    make_model(backbone_dirs["qwen2_5_vl"]).save_pretrained(tmp_path / "model")
    snippets = python_snippets((tmp_path / "model" / "README.md").read_text(encoding="utf-8"))
    assert len(snippets) >= 2
    for index, snippet in enumerate(snippets):
        snippet = snippet.replace('"path/or/repo-id"', repr(str(tmp_path / "model")))
        exec(compile(snippet, f"model card snippet {index}", "exec"), {})
