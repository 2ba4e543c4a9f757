"""Saving a complete Hub folder and loading it back: locally, through Auto classes, and by repo id offline."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import ROOT, make_model, publish_to_offline_cache, run_in_fresh_process
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoProcessor

from modeling_metaembed import HUB_FILES

REMOTE_CODE_FILES = {
    "configuration_metaembed.py",
    "modeling_metaembed.py",
    "processing_metaembed.py",
    "scoring_metaembed.py",
}


@pytest.fixture(scope="module")
def saved(backbone_dirs, tmp_path_factory):
    model = make_model(backbone_dirs["qwen2_5_vl"])
    folder = tmp_path_factory.mktemp("saved") / "metaembed-tiny"
    model.save_pretrained(folder)
    return model, folder


def test_saved_folder_is_complete(saved):
    _, folder = saved
    files = set(os.listdir(folder))
    assert files >= REMOTE_CODE_FILES
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "README.md"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_metaembed.MetaEmbedConfig",
        "AutoModel": "modeling_metaembed.MetaEmbedModel",
    }
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_metaembed.MetaEmbedProcessor"
    assert "meta_tokens" in load_file(folder / "model.safetensors")


def test_saved_folder_carries_exactly_the_declared_hub_set(saved):
    """`HUB_FILES` is the one list of what travels: a module that modeling imports (transformers copies relative
    imports) but that is not declared, or a declared file that is not written, fails here."""
    _, folder = saved
    files = set(os.listdir(folder))
    assert {name for name in files if name.endswith(".py")} == {name for name in HUB_FILES if name.endswith(".py")}
    assert set(HUB_FILES) <= files
    for name in HUB_FILES:
        assert (folder / name).read_bytes() == (ROOT / name).read_bytes(), name


def test_model_card_rendered_with_valid_metadata(saved):
    model, folder = saved
    text = (folder / "README.md").read_text()
    assert "$" not in text
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "feature-extraction"
    assert "metaembed" in card.data.tags
    assert card.data.get("base_model") is None  # built from a local folder: no repo id to name
    assert f"{model.config.num_candidate_vectors} per candidate" in text


def test_round_trip_auto_classes_bit_identical(saved, mixed_items):
    model, folder = saved
    loaded = AutoModel.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(loaded).__name__ == "MetaEmbedModel" and type(processor).__name__ == "MetaEmbedProcessor"
    assert type(loaded.processor).__name__ == "MetaEmbedProcessor"
    for task in ("query", "candidate"):
        assert torch.equal(loaded.encode(mixed_items, task), model.encode(mixed_items, task))
    features = processor.process_candidates(mixed_items)
    expected = model.processor.process_candidates(mixed_items)
    assert features.keys() == expected.keys()
    assert all(torch.equal(features[key], expected[key]) for key in features)
    assert loaded.vlm.config._attn_implementation == "sdpa"


def test_resave_from_loaded_model(saved, tmp_path, mixed_items):
    model, folder = saved
    loaded = AutoModel.from_pretrained(folder, trust_remote_code=True)
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "README.md").is_file()
    assert (tmp_path / "again" / "handler.py").read_text() == (folder / "handler.py").read_text()
    again = AutoModel.from_pretrained(tmp_path / "again", trust_remote_code=True)
    assert torch.equal(again.encode_queries(mixed_items), model.encode_queries(mixed_items))


def test_missing_weights_fail_loudly(saved, tmp_path):
    _, folder = saved
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["meta_tokens"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="meta_tokens"):
        AutoModel.from_pretrained(broken, trust_remote_code=True)


def test_load_by_repo_id_from_offline_cache(saved, tmp_path, mixed_items):
    model, folder = saved
    environment = publish_to_offline_cache(folder, tmp_path / "hf", "metaembed-tests/tiny")
    embeddings = run_in_fresh_process(
        """
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained("metaembed-tests/tiny", trust_remote_code=True)
        AutoProcessor.from_pretrained("metaembed-tests/tiny", trust_remote_code=True)
        outputs = {"q": model.encode_queries(items), "c": model.encode_candidates(items)}
        """,
        environment,
        tmp_path,
    )
    items = [mixed_items[0], mixed_items[1], mixed_items[7]]
    assert torch.equal(embeddings["q"], model.encode_queries(items))
    assert torch.equal(embeddings["c"], model.encode_candidates(items))


def test_push_to_hub_refused_rather_than_publishing_an_incomplete_repo(saved, tmp_path):
    model, _ = saved
    with pytest.raises(ValueError, match="upload_folder"):
        model.save_pretrained(tmp_path / "pushed", push_to_hub=True)
    assert not (tmp_path / "pushed").exists()
