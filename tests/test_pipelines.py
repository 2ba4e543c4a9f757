"""transformers pipelines (feature-extraction, image-feature-extraction) and the Hub widget metadata."""

from __future__ import annotations

import pytest
import torch
from conftest import NUM_QUERY_VECTORS, make_model
from huggingface_hub import ModelCard, metadata_load
from transformers import AutoModel, pipeline


@pytest.fixture(scope="module")
def saved_folder(backbone_dirs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipelines") / "metaembed"
    make_model(backbone_dirs["qwen2_5_vl"]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(saved_folder):
    return AutoModel.from_pretrained(saved_folder, trust_remote_code=True)


def as_tensor(output) -> torch.Tensor:
    return torch.tensor(output, dtype=torch.float32)


def test_feature_extraction_equals_encode_candidates(saved_folder, loaded, mixed_items):
    extractor = pipeline("feature-extraction", model=saved_folder, trust_remote_code=True)
    assert type(extractor).__name__ == "MetaEmbedPipeline"
    for item in mixed_items[:4]:
        assert torch.equal(as_tensor(extractor(item)), loaded.encode_candidates([item])[0])
    outputs = extractor(["a red circle", "short"], task="query", num_vectors=2)
    for output, text in zip(outputs, ["a red circle", "short"]):
        assert torch.equal(as_tensor(output), loaded.encode_queries([text], num_vectors=2)[0])
    tensor = extractor("short", return_tensors=True)
    assert tensor.dtype == torch.float32 and tensor.shape == (loaded.config.num_candidate_vectors, 16)


def test_image_feature_extraction_equals_encode_candidates(saved_folder, loaded, images, tmp_path):
    extractor = pipeline("image-feature-extraction", model=saved_folder, trust_remote_code=True)
    path = tmp_path / "image.png"
    images["rgb"].save(path)
    expected = loaded.encode_candidates([images["rgb"]])[0]
    assert torch.equal(as_tensor(extractor(images["rgb"])), expected)
    assert torch.equal(as_tensor(extractor(str(path))), expected)  # a string is an image path here


def test_pipeline_parameter_errors(saved_folder):
    extractor = pipeline("feature-extraction", model=saved_folder, trust_remote_code=True)
    with pytest.raises(ValueError, match="num_vectors"):
        extractor("text", task="query", num_vectors=NUM_QUERY_VECTORS + 1)
    with pytest.raises(ValueError, match="task"):
        extractor("text", task="document")
    with pytest.raises(TypeError, match="inputs is int"):
        extractor(3)


def test_model_card_metadata_for_widgets(saved_folder):
    metadata = metadata_load(saved_folder / "README.md")
    assert metadata["pipeline_tag"] == "feature-extraction"
    assert metadata["library_name"] == "transformers"
    assert all(isinstance(tag, str) for tag in metadata["tags"])
    assert all(isinstance(example["text"], str) for example in metadata["widget"])
    card = ModelCard.load(saved_folder / "README.md")
    assert card.data.to_dict()["pipeline_tag"] == "feature-extraction"
