"""transformers pipelines (feature-extraction, image-feature-extraction) and the Hub widget metadata."""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
from conftest import NUM_QUERY_VECTORS, make_model
from huggingface_hub import ModelCard, metadata_load
from PIL import Image
from transformers import AutoConfig, AutoModel, pipeline


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


def test_no_task_means_feature_extraction(saved_folder, loaded):
    """`pipeline(model=folder)` infers the task only from a single custom_pipelines entry; the image task is
    still served by the same class (PipelineTasks answers for it)."""
    assert list(json.loads((saved_folder / "config.json").read_text())["custom_pipelines"]) == ["feature-extraction"]
    extractor = pipeline(model=saved_folder, trust_remote_code=True)
    assert type(extractor).__name__ == "MetaEmbedPipeline" and extractor.task == "feature-extraction"
    assert torch.equal(as_tensor(extractor("short")), loaded.encode_candidates(["short"])[0])
    assert type(pipeline("image-feature-extraction", model=saved_folder, trust_remote_code=True)).__name__ == (
        "MetaEmbedPipeline"
    )
    # A config saved with both task names (earlier versions) loads with the one entry.
    config = json.loads((saved_folder / "config.json").read_text())
    entry = config["custom_pipelines"]["feature-extraction"]
    config["custom_pipelines"] = {"feature-extraction": entry, "image-feature-extraction": entry}
    loaded_config = type(loaded.config).from_dict(config)
    assert list(loaded_config.custom_pipelines) == ["feature-extraction"]
    assert loaded_config.custom_pipelines["image-feature-extraction"] == entry
    assert (
        "image-feature-extraction" in AutoConfig.from_pretrained(saved_folder, trust_remote_code=True).custom_pipelines
    )


def test_batching_goes_through_the_model_encode(saved_folder, loaded, mixed_items):
    extractor = pipeline("feature-extraction", model=saved_folder, trust_remote_code=True)
    one_by_one = torch.stack([as_tensor(extractor(item)) for item in mixed_items])
    for batch_size in (2, 3, 8):
        batched = torch.tensor(extractor(mixed_items, batch_size=batch_size))
        chunks = [mixed_items[start : start + batch_size] for start in range(0, len(mixed_items), batch_size)]
        assert torch.equal(
            batched, torch.cat([loaded.encode_candidates(chunk, batch_size=batch_size) for chunk in chunks])
        )
        # Same vectors as one by one, up to float rounding of batched matrix products.
        torch.testing.assert_close(batched, one_by_one, rtol=0, atol=1e-6)
    queries = extractor(mixed_items[:4], batch_size=4, task="query", num_vectors=2)
    assert torch.equal(torch.tensor(queries), loaded.encode_queries(mixed_items[:4], num_vectors=2))
    streamed = extractor((item for item in mixed_items[:3]), batch_size=2)  # generators stream lazily
    expected = torch.cat([loaded.encode_candidates(mixed_items[:2]), loaded.encode_candidates(mixed_items[2:3])])
    assert torch.equal(torch.stack([as_tensor(output) for output in streamed]), expected)
    assert extractor([]) == []
    with pytest.raises(TypeError, match=r"inputs\[1\] is int"):
        extractor(["ok", 3, "ok"], batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        extractor(["ok"], batch_size=0)


def test_transformers_feature_extraction_parameters(saved_folder, loaded):
    """The keyword arguments transformers' feature-extraction pipelines take (the Inference Toolkit passes
    framework="pt"): accepted where MetaEmbed already gives what they ask for, refused otherwise."""
    expected = loaded.encode_candidates(["short"])[0]
    extractor = pipeline("feature-extraction", model=saved_folder, trust_remote_code=True, framework="pt")
    accepted = {"truncation": True, "tokenize_kwargs": {"truncation": True, "padding": True}, "pool": False}
    assert torch.equal(as_tensor(extractor("short", **accepted)), expected)
    # max_length: what the processor cuts to already (accepted), or another length, which encode would not apply.
    max_text_tokens = loaded.processor.max_text_tokens
    assert torch.equal(as_tensor(extractor("short", tokenize_kwargs={"max_length": max_text_tokens})), expected)
    with pytest.raises(ValueError, match=r"max_length=5 differs from the processor's max_text_tokens \(\d+\)"):
        extractor("short", tokenize_kwargs={"max_length": 5})
    assert torch.equal(as_tensor(extractor("short", image_processor_kwargs={})), expected)
    refused = [
        ({"truncation": False}, ValueError, "truncation=False"),
        ({"tokenize_kwargs": {"padding": "max_length"}}, ValueError, "padding='max_length'"),
        ({"tokenize_kwargs": {"add_special_tokens": False}}, TypeError, "add_special_tokens"),
        ({"framework": "tf"}, ValueError, "PyTorch only"),
        ({"pool": True}, ValueError, "num_vectors=1"),
        ({"image_processor_kwargs": {"size": 4}}, ValueError, "size"),
        ({"normalize": False}, TypeError, "unexpected MetaEmbed pipeline parameters"),
    ]
    for parameters, error, fragment in refused:
        with pytest.raises(error, match=fragment):
            extractor("short", **parameters)


@pytest.mark.parametrize("task", ["feature-extraction", "image-feature-extraction"])
def test_inference_toolkit_default_path(saved_folder, loaded, images, task):
    """No handler.py, HF_TASK set: the toolkit builds the pipeline with these arguments and calls it with the
    request's inputs and parameters (a raw image body arrives as a PIL image)."""
    extractor = pipeline(
        task=task,
        model=str(saved_folder),
        device=-1,
        tokenizer=str(saved_folder),
        framework="pt",
        trust_remote_code=True,
    )
    image = images["rgb"].convert("RGB")
    assert torch.equal(as_tensor(extractor(image)), loaded.encode_candidates([image])[0])
    tall = images["tall"].convert("RGB")
    outputs = extractor([image, tall], **{"task": "query", "num_vectors": 2})  # one item per forward pass
    expected = [loaded.encode_queries([item], num_vectors=2)[0] for item in (image, tall)]
    assert torch.equal(torch.tensor(outputs), torch.stack(expected))


@pytest.fixture
def image_url(images):
    """An http URL on 127.0.0.1 serving a PNG, and the image it decodes to."""
    buffer = io.BytesIO()
    images["rgb"].save(buffer, format="PNG")
    payload = buffer.getvalue()

    class Route(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/scene.png":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Route)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", Image.open(io.BytesIO(payload)).convert("RGB")
    server.shutdown()
    server.server_close()
    thread.join()


def test_image_task_loads_urls(saved_folder, loaded, image_url):
    base, image = image_url
    extractor = pipeline("image-feature-extraction", model=saved_folder, trust_remote_code=True)
    expected = loaded.encode_candidates([image])[0]
    assert torch.equal(as_tensor(extractor(f"{base}/scene.png", timeout=10)), expected)
    batched = extractor([f"{base}/scene.png"] * 2, batch_size=2)
    assert torch.equal(torch.tensor(batched), loaded.encode_candidates([image, image]))
    with pytest.raises(ValueError, match=r"inputs\[1\]: cannot load image"):
        extractor([f"{base}/scene.png", f"{base}/missing.png"], batch_size=2)
    # For feature-extraction a string stays text: no URL is fetched.
    text = pipeline("feature-extraction", model=saved_folder, trust_remote_code=True)(f"{base}/scene.png")
    assert torch.equal(as_tensor(text), loaded.encode_candidates([f"{base}/scene.png"])[0])


def test_an_image_url_answering_an_error_status_says_so(saved_folder, image_url):
    base, _ = image_url
    extractor = pipeline("image-feature-extraction", model=saved_folder, trust_remote_code=True)
    with pytest.raises(ValueError, match=r"inputs: cannot load image '.*/missing\.png': .*HTTP 404 Not Found"):
        extractor(f"{base}/missing.png", timeout=10)
    with pytest.raises(ValueError, match=r"inputs\[1\]: .*HTTP 404 Not Found"):
        extractor([f"{base}/scene.png", f"{base}/missing.png"], batch_size=2)
    with pytest.raises(ValueError, match=r"cannot load image .*the request failed"):
        extractor("http://127.0.0.1:9/scene.png", timeout=10)  # the discard port: nothing listens


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
