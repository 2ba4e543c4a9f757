"""Callers' edges: mteb_model where users look for it, transformers' stock pipeline around a loaded model, the
model card's sentence-transformers tag (image URLs answering an error status: test_pipelines.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model
from huggingface_hub import metadata_load
from transformers import AutoModel, pipeline


@pytest.fixture(scope="module")
def saved_folder(backbone_dirs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("edges") / "metaembed"
    make_model(backbone_dirs["qwen2_5_vl"]).save_pretrained(folder)
    return folder


def test_mteb_model_is_exported_by_the_evaluation_package():
    from metaembed import evaluation
    from metaembed.evaluation import mteb_bridge, mteb_model

    assert mteb_model is mteb_bridge.mteb_model and "mteb_model" in evaluation.__all__


@pytest.mark.parametrize("loading", ["installed", "remote_code"])
def test_stock_pipeline_around_a_loaded_model_is_refused_and_metaembeds_pipeline_is_right(saved_folder, model, loading):
    from pipeline_metaembed import MetaEmbedPipeline

    loaded = model if loading == "installed" else AutoModel.from_pretrained(saved_folder, trust_remote_code=True)
    stock = pipeline("feature-extraction", model=loaded, tokenizer=loaded.processor.tokenizer)
    assert type(stock).__name__ == "FeatureExtractionPipeline"  # transformers ignores custom_pipelines here
    with pytest.raises(ValueError, match=r"input_ids\[0\] is not a MetaEmbed prompt.*MetaEmbedPipeline"):
        stock("a red circle")
    texts = ["a red circle", "short"]
    folder_pipeline = pipeline("feature-extraction", model=saved_folder, trust_remote_code=True)
    pipeline_class = MetaEmbedPipeline if loading == "installed" else type(folder_pipeline)
    extractor = pipeline("feature-extraction", model=loaded, pipeline_class=pipeline_class)
    for text, vectors in zip(texts, extractor(texts)):
        assert torch.equal(torch.tensor(vectors), loaded.encode_candidates([text])[0])
    assert torch.equal(torch.tensor(MetaEmbedPipeline(model=loaded)(texts[0])), loaded.encode_candidates(texts[:1])[0])


def test_processed_batches_still_reach_the_model(model):
    features = model.processor.process_queries(["a red circle", "a much longer query about a blue square"])
    assert torch.equal(
        model(**features, task="query").embeddings,
        model.encode_queries(["a red circle", "a much longer query about a blue square"]),
    )


def test_model_card_carries_the_sentence_transformers_tag(saved_folder):
    metadata = metadata_load(saved_folder / "README.md")
    assert "sentence-transformers" in metadata["tags"] and metadata["library_name"] == "transformers"
