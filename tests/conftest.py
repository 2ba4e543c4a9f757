"""Shared fixtures: tiny random Qwen-VL backbones written to disk once per session, offline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sample_images import make_images  # noqa: E402

from metaembed.testing import BACKBONE_FAMILIES, save_tiny_backbone  # noqa: E402
from modeling_metaembed import MetaEmbedModel  # noqa: E402

NUM_QUERY_VECTORS = 4
NUM_CANDIDATE_VECTORS = 8


@pytest.fixture(scope="session")
def backbone_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("backbones")
    return {family: save_tiny_backbone(root / family, family) for family in BACKBONE_FAMILIES}


@pytest.fixture(scope="session")
def family_backbone_dir(tmp_path_factory, backbone_dirs):
    """`family_backbone_dir(family)`: the tiny backbone folder of any family in SUPPORTED_FAMILIES or
    UNSUPPORTED_FAMILIES, built on first use and shared by the whole session (the Qwen ones are `backbone_dirs`')."""
    root = tmp_path_factory.mktemp("family_backbones")
    built = dict(backbone_dirs)

    def get(family: str) -> str:
        if family not in built:
            built[family] = save_tiny_backbone(root / family, family)
        return built[family]

    return get


@pytest.fixture
def num2words_stand_in(monkeypatch):
    """SmolVLMProcessor refuses to build without `num2words` (not installed here), which it only uses to describe
    videos: a stand-in for tests that build SmolVLM processors."""
    from transformers.models.smolvlm import processing_smolvlm

    if processing_smolvlm.num2words is None:
        monkeypatch.setattr(processing_smolvlm, "num2words", str)


def make_model(backbone_dir: str, embedding_dim: int | None = 16, **kwargs) -> MetaEmbedModel:
    torch.manual_seed(0)
    model = MetaEmbedModel.from_backbone(
        backbone_dir, NUM_QUERY_VECTORS, NUM_CANDIDATE_VECTORS, embedding_dim=embedding_dim, **kwargs
    )
    # Meta Tokens at the scale of real rows, so they matter in every test.
    with torch.no_grad():
        model.meta_tokens.normal_(0.0, 1.0)
    return model.eval()


@pytest.fixture(scope="session")
def model(backbone_dirs) -> MetaEmbedModel:
    return make_model(backbone_dirs["qwen2_5_vl"])


@pytest.fixture(scope="session")
def images() -> dict[str, Image.Image]:
    return make_images()


@pytest.fixture(scope="session")
def mixed_items(images) -> list:
    return [
        "a red circle in the top left corner",
        images["rgb"],
        {"text": "what is in this picture?", "image": images["tall"]},
        "short",
        {"image": images["gray"]},
        {"text": "a longer piece of text " * 6},
        images["rgba"],
        {"text": "tiny", "image": images["tiny"]},
    ]


def publish_to_offline_cache(folder: Path, hf_home: Path, repo_id: str) -> dict[str, str]:
    """Lay `folder` out as the Hub cache entry of `repo_id` under `hf_home`; returns the environment of a
    fresh offline process that resolves `repo_id` there (HF_HOME is read at import, hence a subprocess)."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    return {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}


OFFLINE_SCRIPT_HEADER = """
import sys, torch
sys.path.insert(0, {tests_dir!r})
from sample_images import make_images  # tests/ only: the checkout itself stays off sys.path
from safetensors.torch import save_file
images = make_images()
items = ["a red circle in the top left corner", images["rgb"], {{"text": "tiny", "image": images["tiny"]}}]
"""


def run_in_fresh_process(body: str, environment: dict[str, str], tmp_path: Path) -> dict:
    """Run `body` in a new Python process (e.g. with the environment of `publish_to_offline_cache`). The body
    sees `items` (mixed_items 0, 1 and 7) and must set `outputs`, a dict of tensors, which is returned."""
    script = OFFLINE_SCRIPT_HEADER.format(tests_dir=str(ROOT / "tests")) + textwrap.dedent(body)
    script += "\nsave_file(outputs, sys.argv[1])\n"
    output = tmp_path / "outputs.safetensors"
    result = subprocess.run(
        [sys.executable, "-c", script, str(output)], env=environment, capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from safetensors.torch import load_file

    return load_file(output)
