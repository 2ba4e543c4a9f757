"""The package as users get it: a wheel, installed without the checkout, saves the same complete Hub folder as the
checkout, and that folder loads in a process that cannot import the package at all."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import ROOT, make_model, run_in_fresh_process
from huggingface_hub import ModelCard
from packaging.requirements import Requirement
from safetensors.torch import load_file

from modeling_metaembed import HUB_FILES

# Imported by neither process below: a meta-path finder that refuses them stands in for "not installed".
BLOCK_PACKAGE = """
import importlib.abc, sys
class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top == "metaembed" or top.endswith("_metaembed"):
            raise ModuleNotFoundError(f"{name} is not importable in this process")
        return None
sys.meta_path.insert(0, _Refuse())
"""

# The saving process: the installed wheel first on sys.path, the checkout nowhere.
SAVE_WITH_INSTALL = """
import sys
sys.path[:] = [{target!r}] + [entry for entry in sys.path if entry not in ("", ".", {root!r})]
import torch
import metaembed, modeling_metaembed
assert metaembed.__file__.startswith({target!r}), metaembed.__file__
assert modeling_metaembed.__file__.startswith({target!r}), modeling_metaembed.__file__
from metaembed import MetaEmbedModel
torch.manual_seed(0)
model = MetaEmbedModel.from_backbone({backbone!r}, 4, 8, embedding_dim=16)
with torch.no_grad():
    model.meta_tokens.normal_(0.0, 1.0)
model.save_pretrained({folder!r})
sys.path.append({tests_dir!r})
from safetensors.torch import save_file
from sample_images import make_images
images = make_images()
items = ["a red circle in the top left corner", images["rgb"], {{"text": "tiny", "image": images["tiny"]}}]
save_file({{"q": model.encode_queries(items, 2), "c": model.encode_candidates(items)}}, {outputs!r})
"""


def build_wheel(tmp_path: Path) -> Path:
    """A wheel of the repository built from a copy of its files (the checkout stays clean), offline."""
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "outputs")
    shutil.copytree(ROOT, source, ignore=ignore)
    wheels = tmp_path / "wheels"
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)]
    result = subprocess.run([*command, str(source)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = wheels.glob("metaembed-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory, backbone_dirs) -> dict[str, Path]:
    """The wheel, its install target, and the folders saved from the install and from the checkout."""
    root = tmp_path_factory.mktemp("install")
    wheel = build_wheel(root)
    target = root / "target"
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target)]
    result = subprocess.run([*command, str(wheel)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    from_install = root / "saved-from-install"
    script = SAVE_WITH_INSTALL.format(
        target=str(target),
        root=str(ROOT),
        backbone=backbone_dirs["qwen2_5_vl"],
        folder=str(from_install),
        tests_dir=str(ROOT / "tests"),
        outputs=str(root / "saving-process.safetensors"),
    )
    environment = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not found" not in result.stderr, result.stderr[-3000:]  # no "incomplete folder" warning
    from_checkout = root / "saved-from-checkout"
    make_model(backbone_dirs["qwen2_5_vl"]).save_pretrained(from_checkout)
    return {
        "wheel": wheel,
        "target": target,
        "from_install": from_install,
        "from_checkout": from_checkout,
        "saving_process": root / "saving-process.safetensors",
    }


def test_wheel_installs_no_generic_top_level_module(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level, names
    assert all("metaembed" in name for name in top_level), sorted(top_level)
    assert {"handler.py", "model_card.md", "requirements.txt"} <= {
        name.rsplit("/", 1)[-1] for name in names if name.startswith("metaembed/hub_files/")
    }
    # The Hub modules are installed under their own names (remote code imports them so).
    assert {name for name in HUB_FILES if name.endswith("_metaembed.py")} <= top_level


def test_installed_package_saves_the_same_complete_folder(installed):
    from_install, from_checkout = installed["from_install"], installed["from_checkout"]
    assert sorted(os.listdir(from_install)) == sorted(os.listdir(from_checkout))
    assert set(HUB_FILES) <= set(os.listdir(from_install))
    for name in HUB_FILES:
        assert (from_install / name).read_bytes() == (ROOT / name).read_bytes(), name
    assert {"handler.py", "README.md", "requirements.txt"} <= set(os.listdir(from_install))
    card = ModelCard.load(from_install / "README.md")
    assert card.data.pipeline_tag == "feature-extraction" and "metaembed" in card.data.tags
    assert (from_install / "README.md").read_text() == (from_checkout / "README.md").read_text()
    # Same weights: the same seed on the same backbone in both processes.
    install_weights, checkout_weights = (
        load_file(folder / "model.safetensors") for folder in (from_install, from_checkout)
    )
    assert install_weights.keys() == checkout_weights.keys()
    assert all(torch.equal(install_weights[key], checkout_weights[key]) for key in install_weights)


def test_requirements_name_the_runtime_dependencies(installed):
    lines = (installed["from_install"] / "requirements.txt").read_text().splitlines()
    requirements = [line for line in lines if line and not line.startswith("#")]
    names = {line.split(">")[0].split("=")[0].split("<")[0].strip() for line in requirements}
    assert names == {"torch", "transformers", "huggingface-hub", "safetensors", "sentence-transformers", "pillow"}
    assert all(any(operator in line for operator in (">=", "==")) for line in requirements), requirements
    metadata = zipfile.ZipFile(installed["wheel"])
    (metadata_name,) = [name for name in metadata.namelist() if name.endswith(".dist-info/METADATA")]
    requires = [line for line in metadata.read(metadata_name).decode().splitlines() if line.startswith("Requires-Dist")]
    declared = {str(Requirement(line.split(": ", 1)[1])) for line in requires if "extra ==" not in line}
    assert declared == {str(Requirement(line)) for line in requirements}


def test_saved_folder_loads_where_the_package_cannot_be_imported(installed, tmp_path):
    folder = installed["from_install"]
    body = BLOCK_PACKAGE + textwrap.dedent(
        f"""
        import importlib.util, json
        from transformers import AutoModel, AutoProcessor
        from sentence_transformers import MultiVectorEncoder
        folder = {str(folder)!r}
        for name in ("metaembed", "modeling_metaembed"):
            try:
                __import__(name)
            except ModuleNotFoundError:
                pass
            else:
                raise AssertionError(name + " is importable")
        model = AutoModel.from_pretrained(folder, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        assert type(processor).__name__ == "MetaEmbedProcessor"
        encoder = MultiVectorEncoder(folder, trust_remote_code=True, device="cpu")
        spec = importlib.util.spec_from_file_location("handler", folder + "/handler.py")
        handler_module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(handler_module)
        handler = handler_module.EndpointHandler(folder, device="cpu")
        response = handler({{"inputs": [items[0]], "parameters": {{"task": "query", "num_vectors": 2}}}})
        outputs = {{
            "q": model.encode_queries(items, 2),
            "c": model.encode_candidates(items),
            "st_q": torch.stack(encoder.encode_query(items, num_vectors=2)),
            "st_c": torch.stack(encoder.encode_document(items)),
            "q_first": model.encode_queries(items[:1], 2),
            "handler_q": torch.tensor(response["embeddings"] if isinstance(response, dict) else response),
        }}
        """
    )
    environment = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    outputs = run_in_fresh_process(body, environment, tmp_path)
    # Embeddings of the process that saved the folder (the installed package, model in memory).
    saving_process = load_file(installed["saving_process"])
    assert torch.equal(outputs["q"], saving_process["q"])
    assert torch.equal(outputs["c"], saving_process["c"])
    # The handler runs the same model on the same one-item batch; sentence-transformers batches its own way.
    assert torch.equal(outputs["handler_q"].reshape(1, 2, -1), outputs["q_first"])
    torch.testing.assert_close(outputs["st_q"], saving_process["q"], rtol=0, atol=1e-6)
    torch.testing.assert_close(outputs["st_c"], saving_process["c"], rtol=0, atol=1e-6)


# Search from the installed wheel, the checkout off sys.path: the one-query and batch kernels (numba) and torch's
# kernel.
SEARCH_WITH_INSTALL = """
import itertools, os, sys
sys.path[:] = [{target!r}] + [entry for entry in sys.path if entry not in ("", ".", {root!r})]
import torch
from safetensors.torch import save_file
from metaembed.search import single_query
from metaembed.search.index import MetaEmbedIndex
assert single_query.__file__.startswith({target!r}), single_query.__file__
assert single_query.available()
generator = torch.Generator().manual_seed(0)
candidates = torch.nn.functional.normalize(torch.randn(300, 16, 32, generator=generator), dim=-1)
queries = torch.nn.functional.normalize(torch.randn(3, 16, 32, generator=generator), dim=-1)
outputs = {{}}
for storage in ("float16", "int8", "residual4"):
    index = MetaEmbedIndex(32, 16, storage=storage)
    index.add(candidates[:120])
    index.add(candidates[120:])
    index.build_ann(num_vectors=2, kind="flat")
    index.save(os.path.join({folder!r}, storage))
    loaded = MetaEmbedIndex.load(os.path.join({folder!r}, storage))
    for kernel in ("1", "0"):
        os.environ["METAEMBED_NUMBA"] = kernel
        # On AVX-512 machines, the numba internals of both kernels: one query in lane groups of G = 2 (r_q 8) and
        # G = 1 (r_q 16); three queries exhaustively through the batch kernel (two-stage reranks each alone).
        for count, num_query_vectors in itertools.product((1, 3), (8, 16)):
            for name, shortlist in (("exhaustive", None), ("two_stage", 40)):
                found = loaded.search(queries[:count], num_query_vectors, 16, top_k=10, shortlist_size=shortlist)
                key = f"{{storage}}_{{name}}_{{count}}_{{num_query_vectors}}_{{kernel}}"
                outputs[key + "_indices"] = found.indices
                outputs[key + "_scores"] = found.scores
save_file(outputs, {outputs!r})
"""


def test_installed_package_searches_with_the_numba_kernels_as_with_torch(installed, tmp_path):
    pytest.importorskip("numba")
    pytest.importorskip("faiss")
    script = SEARCH_WITH_INSTALL.format(
        target=str(installed["target"]),
        root=str(ROOT),
        folder=str(tmp_path),
        outputs=str(tmp_path / "found.safetensors"),
    )
    environment = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = load_file(tmp_path / "found.safetensors")
    assert len(found) == 96
    for storage, name, count, num_query_vectors in itertools.product(
        ("float16", "int8", "residual4"), ("exhaustive", "two_stage"), (1, 3), (8, 16)
    ):
        numba_run, torch_run = (f"{storage}_{name}_{count}_{num_query_vectors}_{kernel}" for kernel in ("1", "0"))
        assert found[f"{numba_run}_indices"].shape == (count, 10)
        assert torch.equal(found[f"{numba_run}_indices"], found[f"{torch_run}_indices"]), (storage, name, count)
        torch.testing.assert_close(found[f"{numba_run}_scores"], found[f"{torch_run}_scores"], atol=2e-6, rtol=0)
