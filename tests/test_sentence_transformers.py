"""sentence-transformers: a saved folder loads as a MultiVectorEncoder whose embeddings and scores are the model's."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from conftest import (
    NUM_CANDIDATE_VECTORS,
    NUM_QUERY_VECTORS,
    ROOT,
    make_model,
    publish_to_offline_cache,
    run_in_fresh_process,
)
from safetensors.torch import load_file

from sentence_transformers_metaembed import MODULE_CONFIG_FILE, MetaEmbedModule

sentence_transformers = pytest.importorskip("sentence_transformers")
MultiVectorEncoder = sentence_transformers.MultiVectorEncoder
SentenceTransformer = sentence_transformers.SentenceTransformer


@pytest.fixture(scope="module")
def saved(backbone_dirs, tmp_path_factory):
    """The in-memory model, its saved folder, and the folder loaded as a MultiVectorEncoder."""
    model = make_model(backbone_dirs["qwen2_5_vl"])
    folder = tmp_path_factory.mktemp("st") / "metaembed-st"
    model.save_pretrained(folder)
    encoder = MultiVectorEncoder(str(folder), trust_remote_code=True, device="cpu")
    return model, folder, encoder


def stacked(embeddings: list[torch.Tensor]) -> torch.Tensor:
    """MultiVectorEncoder's list of [r, D] tensors as one [N, r, D] tensor, like MetaEmbedModel.encode_*."""
    return torch.stack(embeddings)


def test_saved_folder_loads_as_multi_vector_encoder(saved):
    _, folder, encoder = saved
    assert (folder / "sentence_transformers_metaembed.py").is_file()
    modules = json.loads((folder / "modules.json").read_text())
    assert modules == [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers_metaembed.MetaEmbedModule"}]
    model_config = json.loads((folder / "config_sentence_transformers.json").read_text())
    assert model_config["model_type"] == "MultiVectorEncoder"
    assert model_config["prompts"] == {"query": "", "document": ""}
    assert model_config["similarity_fn_name"] == "maxsim"
    assert json.loads((folder / MODULE_CONFIG_FILE).read_text()) == {
        "query_num_vectors": None,
        "document_num_vectors": None,
    }
    assert len(encoder) == 1 and type(encoder[0]).__name__ == "MetaEmbedModule"
    assert encoder.similarity_fn_name == "maxsim"
    assert encoder.get_embedding_dimension() == 16


@pytest.mark.parametrize("num_vectors", [None, 1, 3])
def test_encode_query_and_document_equal_the_model(saved, mixed_items, num_vectors):
    model, _, encoder = saved
    queries = encoder.encode_query(mixed_items, num_vectors=num_vectors)
    documents = encoder.encode_document(mixed_items, num_vectors=num_vectors)
    assert torch.equal(stacked(queries), model.encode_queries(mixed_items, num_vectors=num_vectors))
    assert torch.equal(stacked(documents), model.encode_candidates(mixed_items, num_vectors=num_vectors))
    assert queries[0].shape == (num_vectors or NUM_QUERY_VECTORS, 16)
    assert documents[0].shape == (num_vectors or NUM_CANDIDATE_VECTORS, 16)


def test_plain_encode_embeds_candidates(saved, mixed_items):
    model, _, encoder = saved
    assert torch.equal(stacked(encoder.encode(mixed_items, num_vectors=2)), model.encode_candidates(mixed_items, 2))
    # A single item comes back unwrapped, as sentence-transformers does for one input.
    single = encoder.encode(mixed_items[2])
    assert torch.allclose(single, model.encode_candidates([mixed_items[2]])[0], atol=1e-6)


def test_results_do_not_depend_on_batching(saved, mixed_items):
    model, _, encoder = saved
    # Other batches pad differently, which moves float32 rounding only.
    for batch_size in (1, 3):
        documents = stacked(encoder.encode_document(mixed_items, batch_size=batch_size))
        torch.testing.assert_close(documents, model.encode_candidates(mixed_items), rtol=0, atol=1e-6)


def test_similarity_equals_model_score(saved, mixed_items):
    model, _, encoder = saved
    queries = encoder.encode_query(mixed_items[:5], num_vectors=3)
    documents = encoder.encode_document(mixed_items, num_vectors=5)
    expected = model.score(model.encode_queries(mixed_items[:5], 3), model.encode_candidates(mixed_items, 5))
    torch.testing.assert_close(encoder.similarity(queries, documents), expected, rtol=0, atol=1e-6)
    pairwise = encoder.similarity_pairwise(queries, documents[:5])
    torch.testing.assert_close(pairwise, expected.diagonal(), rtol=0, atol=1e-6)


def test_prompt_is_an_instruction_inside_the_template(saved, images):
    model, _, encoder = saved
    items = ["a red circle", images["rgb"], {"text": "what is this?", "image": images["tall"]}]
    # The instruction goes before the item's text; the processor still adds "Query: " and the template once.
    as_text = [
        {"text": "Find: a red circle"},
        {"text": "Find: ", "image": images["rgb"]},
        {"text": "Find: what is this?", "image": images["tall"]},
    ]
    assert torch.equal(stacked(encoder.encode_query(items, prompt="Find: ")), model.encode_queries(as_text))
    with pytest.raises(ValueError, match="already puts before every query"):
        encoder.encode_query(items, prompt="Query: find")
    # A prompt is text like the item's: special-token strings in it are plain text, never control tokens.
    assert torch.equal(
        stacked(encoder.encode_query(items, prompt="<|image_pad|>Find: ")),
        model.encode_queries([{**item, "text": "<|image_pad|>" + item["text"]} for item in as_text]),
    )


def test_task_routing_cannot_be_dropped(saved, mixed_items):
    model, _, encoder = saved
    features = encoder.preprocess(mixed_items, task="query")
    assert features["task"] == "query"
    with torch.inference_mode():
        # No task at forward time: the one the inputs were formatted for applies.
        embeddings = encoder(dict(features))["token_embeddings"]
        with pytest.raises(ValueError, match="preprocessed for task 'query'"):
            encoder(dict(features), task="document")
    assert torch.equal(embeddings, model.encode_queries(mixed_items))
    with pytest.raises(ValueError, match="task must be 'query', 'document' or None"):
        encoder.encode(mixed_items, task="candidate")


@pytest.mark.parametrize(
    ("num_vectors", "error"),
    [(0, ValueError), (NUM_QUERY_VECTORS + 1, ValueError), (1.5, TypeError), (True, TypeError)],
)
def test_num_vectors_errors(saved, num_vectors, error):
    _, _, encoder = saved
    with pytest.raises(error, match="num_vectors must be"):
        encoder.encode_query(["a query"], num_vectors=num_vectors)


def test_bad_items_and_options_are_refused(saved, images):
    _, _, encoder = saved
    with pytest.raises(TypeError, match=r"batch\[\d\] is int"):
        encoder.encode_document(["text", 3])
    with pytest.raises(ValueError, match="unknown keys"):  # chat messages pass the modality check, not this one
        encoder.encode_document([images["rgb"], {"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="processing_kwargs"):
        encoder.encode_document(["text"], processing_kwargs={"text": {"max_length": 4}})


def test_save_and_reload_keeps_prompts_and_vector_counts(saved, tmp_path, mixed_items):
    model, folder, _ = saved
    encoder = MultiVectorEncoder(str(folder), trust_remote_code=True, device="cpu", prompts={"query": "Find: "})
    encoder[0].query_num_vectors = 2
    encoder[0].document_num_vectors = 5
    encoder.save(str(tmp_path / "resaved"))
    assert json.loads((tmp_path / "resaved" / MODULE_CONFIG_FILE).read_text()) == {
        "query_num_vectors": 2,
        "document_num_vectors": 5,
    }
    reloaded = MultiVectorEncoder(str(tmp_path / "resaved"), trust_remote_code=True, device="cpu")
    assert reloaded.prompts == {"query": "Find: ", "document": ""}
    queries = stacked(reloaded.encode_query(["a red circle"]))
    assert torch.equal(queries, model.encode_queries(["Find: a red circle"], num_vectors=2))
    assert torch.equal(stacked(reloaded.encode_document(mixed_items)), model.encode_candidates(mixed_items, 5))
    # The re-saved folder is still a complete MetaEmbed folder for transformers, and still declares its
    # modalities where mteb reads them (as save_pretrained does).
    assert "meta_tokens" in load_file(tmp_path / "resaved" / "model.safetensors")
    for saved_folder in (folder, tmp_path / "resaved"):
        declaration = json.loads((saved_folder / "sentence_bert_config.json").read_text())
        assert sorted(declaration["modality_config"]) == ["image", "text"]


def test_module_from_an_in_memory_model(saved, tmp_path, mixed_items):
    model, _, _ = saved
    encoder = MultiVectorEncoder(modules=[MetaEmbedModule(model, query_num_vectors=1)], device="cpu")
    assert torch.equal(stacked(encoder.encode_query(mixed_items)), model.encode_queries(mixed_items, 1))
    encoder.save(str(tmp_path / "built"))
    assert (tmp_path / "built" / "sentence_transformers_metaembed.py").is_file()
    reloaded = MultiVectorEncoder(str(tmp_path / "built"), trust_remote_code=True, device="cpu")
    assert torch.equal(stacked(reloaded.encode_query(mixed_items)), model.encode_queries(mixed_items, 1))


def test_vector_count_defaults_are_checked(saved):
    model, _, _ = saved
    with pytest.raises(ValueError, match="query_num_vectors must be between 1 and 4"):
        MetaEmbedModule(model, query_num_vectors=NUM_QUERY_VECTORS + 1)
    with pytest.raises(TypeError, match="document_num_vectors must be an int"):
        MetaEmbedModule(model, document_num_vectors="all")


def test_save_pretrained_works_without_sentence_transformers(saved, tmp_path, monkeypatch):
    """The file travels with every model and save_pretrained imports it: it must import without the package."""
    for name in [name for name in sys.modules if name.split(".")[0] == "sentence_transformers"]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import sentence_transformers...` fail
    spec = importlib.util.spec_from_file_location(
        "sentence_transformers_metaembed", ROOT / "sentence_transformers_metaembed.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.InputModule is torch.nn.Module
    module.save_sentence_transformers_config(tmp_path)
    _, folder, _ = saved
    for file_name in ("modules.json", "config_sentence_transformers.json", MODULE_CONFIG_FILE):
        assert (tmp_path / file_name).read_text() == (folder / file_name).read_text()


def test_remote_code_must_be_trusted(saved):
    _, folder, _ = saved
    with pytest.raises(ValueError, match="trust_remote_code"):
        MultiVectorEncoder(str(folder), device="cpu")


def test_sentence_transformer_gives_the_single_vector_budget(saved, images):
    """`SentenceTransformer(folder)` wraps the transformers model (sentence-transformers' conversion path for a
    "MultiVectorEncoder" folder) and calls its CLIP-style `get_text_features` / `get_image_features`: one
    L2-normalised vector per item, exactly the (1, 1) candidate budget, so cosine similarity works."""
    model, folder, _ = saved
    single_vector = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    texts = ["a red circle in the top left corner", "short", "a longer piece of text " * 6]
    pictures = [images["rgb"], images["gray"], images["tiny"]]
    for batch in (texts, pictures):
        expected = model.encode_candidates(batch, num_vectors=1)[:, 0]
        embeddings = single_vector.encode(batch, convert_to_tensor=True, batch_size=2)
        torch.testing.assert_close(embeddings, expected, atol=1e-6, rtol=0)  # batching differs: rounding only
        # encode_query gets no task through this path: it is the same candidate-side vector, by design.
        query_side = single_vector.encode_query(batch, convert_to_tensor=True, batch_size=2)
        torch.testing.assert_close(query_side, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        single_vector.similarity(embeddings, embeddings).diagonal(), torch.ones(3), atol=1e-6, rtol=0
    )
    # Mixed or text+image items cannot go through the single-modality methods: a clear error, no vectors.
    for batch in ([{"text": "x", "image": images["rgb"]}], ["text", images["rgb"]]):
        with pytest.raises(ValueError, match="modalit"):
            single_vector.encode(batch)


def test_load_by_repo_id_without_the_checkout(saved, tmp_path, mixed_items):
    """From the Hub cache, with this repository not importable: the module file must come from the folder."""
    model, folder, encoder = saved
    environment = publish_to_offline_cache(folder, tmp_path / "hf", "metaembed-tests/tiny-st")
    embeddings = run_in_fresh_process(
        """
        from sentence_transformers import MultiVectorEncoder
        assert "modeling_metaembed" not in sys.modules
        encoder = MultiVectorEncoder("metaembed-tests/tiny-st", trust_remote_code=True, device="cpu")
        assert type(encoder[0]).__module__.startswith("transformers_modules."), type(encoder[0]).__module__
        queries = torch.stack(encoder.encode_query(items, num_vectors=2))
        documents = torch.stack(encoder.encode_document(items))
        outputs = {"q": queries, "c": documents, "s": encoder.similarity(queries, documents)}
        """,
        environment,
        tmp_path,
    )
    items = [mixed_items[0], mixed_items[1], mixed_items[7]]
    # Bit-identical to the same encoder loaded here (same code path and batches) ...
    assert torch.equal(embeddings["q"], stacked(encoder.encode_query(items, num_vectors=2)))
    assert torch.equal(embeddings["c"], stacked(encoder.encode_document(items)))
    # ... and to the model's own encode up to float rounding: sentence-transformers orders a batch by text length,
    # encode_* by estimated tokens, and row order within a batch may change the last bit on some CPUs.
    queries, candidates = model.encode_queries(items, 2), model.encode_candidates(items)
    torch.testing.assert_close(embeddings["q"], queries, rtol=0, atol=1e-6)
    torch.testing.assert_close(embeddings["c"], candidates, rtol=0, atol=1e-6)
    torch.testing.assert_close(embeddings["s"], model.score(queries, candidates), rtol=0, atol=1e-6)
