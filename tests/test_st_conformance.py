"""sentence-transformers' generic MultiVectorEncoder test cases (output formats, feature dicts, prompts, save/load,
similarity, evaluators, multi-process encode, training with its losses), run against a tiny MetaEmbed folder,
plus the places where MetaEmbed must differ from a ColBERT-style model (vector size, token pooling, model card,
max_length)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import NUM_CANDIDATE_VECTORS, NUM_QUERY_VECTORS, make_model

sentence_transformers = pytest.importorskip("sentence_transformers")
from sentence_transformers import MultiVectorEncoder, SentenceTransformer  # noqa: E402
from sentence_transformers.base.model_card import generate_model_card  # noqa: E402
from sentence_transformers.multi_vector_encoder import (  # noqa: E402
    MultiVectorEncoderTrainer,
    MultiVectorEncoderTrainingArguments,
)
from sentence_transformers.multi_vector_encoder import losses as mve_losses  # noqa: E402
from sentence_transformers.multi_vector_encoder.evaluation import (  # noqa: E402
    MultiVectorInformationRetrievalEvaluator,
    MultiVectorTripletEvaluator,
)
from sentence_transformers.multi_vector_encoder.modules.token_pooling import (  # noqa: E402
    HierarchicalTokenPooling,
    LambdaTokenPooling,
)

TEXTS = ["a red circle in the top left corner", "a blue square", "quarterly financial report"]
DIM = 16


@pytest.fixture(scope="module")
def folder(backbone_dirs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("st-conformance") / "metaembed"
    make_model(backbone_dirs["qwen2_5_vl"]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def encoder(folder):
    return MultiVectorEncoder(str(folder), trust_remote_code=True, device="cpu")


def test_embedding_dimension_is_the_vector_size(folder, encoder):
    """Vector stores and mteb read the dimension here; it is the projection's size, not the backbone's."""
    assert encoder.get_embedding_dimension() == DIM == encoder.encode("x").shape[1]
    single_vector = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    assert single_vector.get_embedding_dimension() == DIM == single_vector.encode(["x"]).shape[1]


def test_output_formats(encoder):
    embeddings = encoder.encode(TEXTS)
    assert isinstance(embeddings, list) and len(embeddings) == 3
    assert all(isinstance(e, torch.Tensor) and e.shape == (NUM_CANDIDATE_VECTORS, DIM) for e in embeddings)
    assert all(e.device == encoder.device for e in embeddings)
    arrays = encoder.encode(TEXTS, convert_to_numpy=True)
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in arrays)
    assert all(np.array_equal(a, e.numpy()) for a, e in zip(arrays, embeddings))
    single = encoder.encode_query(TEXTS[0])
    assert isinstance(single, torch.Tensor) and single.shape == (NUM_QUERY_VECTORS, DIM)
    with pytest.raises(ValueError, match="convert_to_tensor"):
        encoder.encode(TEXTS, convert_to_tensor=True)
    assert encoder.encode([]) == []


def test_feature_dicts(encoder, images):
    """`output_value=None`: the raw module outputs per item, with the keys sentence-transformers' modules give."""
    items = [TEXTS[0], images["rgb"], {"text": "what is this?", "image": images["tall"]}]
    for item, modality in zip(items, ["text", "image", ("image", "text")]):
        (features,) = encoder.encode_document([item], output_value=None)
        assert features["modality"] == modality and features["task"] == "document"
        assert features["token_embeddings"].shape == (NUM_CANDIDATE_VECTORS, DIM)
        assert features["attention_mask"].shape == features["token_embeddings"].shape[:1]
        assert torch.equal(features["token_embeddings"], encoder.encode_document([item])[0])
    mixed = encoder.encode_query(items, output_value=None, batch_size=3)
    assert {features["modality"] for features in mixed} == {"message"}  # one mixed batch
    with pytest.raises(ValueError):
        encoder.encode(TEXTS, output_value="sentence_embedding")


def test_prompts(encoder):
    """A prompt is a task instruction inside MetaEmbed's template: it changes the vectors, deterministically."""
    plain = encoder.encode_query(TEXTS[:1])[0]
    prompted = encoder.encode_query(TEXTS[:1], prompt="Find the chart: ")[0]
    assert not torch.allclose(plain, prompted)
    assert torch.equal(prompted, encoder.encode_query(["Find the chart: " + TEXTS[0]])[0])


def test_similarity_functions(encoder):
    queries, documents = encoder.encode_query(TEXTS[:1]), encoder.encode_document(TEXTS[1:])
    scores = encoder.similarity(queries, documents)
    reference = torch.tensor([[float((q @ d.T).max(dim=1).values.sum()) for d in documents] for q in queries])
    assert scores.shape == (1, 2)
    torch.testing.assert_close(scores, reference, rtol=0, atol=1e-5)
    pairwise = encoder.similarity_pairwise(queries * 2, documents)
    torch.testing.assert_close(pairwise, scores[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(encoder.similarity(queries[0], documents), scores, rtol=0, atol=1e-6)
    torch.testing.assert_close(encoder.similarity(queries, documents, chunk_elements=64), scores, rtol=0, atol=1e-6)
    with pytest.raises(TypeError):
        encoder.similarity(queries, documents, chunk_size=1)


def test_save_and_load_round_trip(encoder, tmp_path):
    encoder.prompts["query"] = "Find: "
    encoder.max_seq_length = 7
    try:
        encoder.save(str(tmp_path / "saved"))
        reloaded = MultiVectorEncoder(str(tmp_path / "saved"), trust_remote_code=True, device="cpu")
        assert reloaded.prompts == encoder.prompts and reloaded.max_seq_length == 7
        assert torch.equal(torch.stack(reloaded.encode_query(TEXTS)), torch.stack(encoder.encode_query(TEXTS)))
    finally:
        encoder.prompts["query"] = ""
        encoder.max_seq_length = 4096
    assert type(reloaded).__name__ == "MetaEmbedMultiVectorEncoder"


def test_model_card_describes_metaembed(encoder):
    """The card sentence-transformers generates (after training, or for a new model) shows the text limit and
    no ColBERT tag."""
    card = generate_model_card(encoder)
    assert f"**Maximum Sequence Length:** {encoder.max_seq_length} tokens" in card
    assert "None tokens" not in card and "- colbert" not in card and "- metaembed" in card


def test_token_pooling_is_refused(encoder):
    """Merging MetaEmbed's ordered vectors would break the prefix budgets: refused, pointing at num_vectors."""
    for pooling in (HierarchicalTokenPooling(pool_factor=2), LambdaTokenPooling(lambda e: e[:1])):
        for call in (encoder.encode_document, encoder.encode_query, encoder.encode):
            with pytest.raises(ValueError, match="num_vectors"):
                call(TEXTS, token_pooling=pooling)
        with pytest.raises(ValueError, match="token_pooling"):
            encoder.encode(TEXTS, output_value=None, token_pooling=pooling)


def test_max_length_sets_the_content_truncation(encoder):
    """`preprocess(..., max_length=n)` (what the trainer's collator passes) cuts each text to n tokens for that
    call, as the processor's max_text_tokens does; the module's own limit is unchanged."""
    long_text = "word " * 40
    module = encoder[0]
    truncated = encoder.preprocess([long_text, "short"], task="document", max_length=5)
    processor = module.processor
    limit = processor.max_text_tokens
    processor.max_text_tokens = 5
    try:
        reference = processor.process_candidates([long_text, "short"])
    finally:
        processor.max_text_tokens = limit
    assert torch.equal(truncated["input_ids"], reference["input_ids"]) and processor.max_text_tokens == limit
    assert truncated["input_ids"].shape[1] < encoder.preprocess([long_text], task="document")["input_ids"].shape[1]
    with pytest.raises(ValueError, match="max_length"):
        encoder.preprocess(["x"], task="document", max_length=0)


def test_evaluators(encoder):
    """Evaluator scores equal the same metric computed from the model's own scores."""
    anchors, positives, negatives = TEXTS, ["red circle", "blue square", "financial report"], TEXTS[::-1]
    triplet = MultiVectorTripletEvaluator(anchors, positives, negatives, name="tiny")
    result = triplet(encoder)
    q = torch.stack(encoder.encode_query(anchors))
    p, n = torch.stack(encoder.encode_document(positives)), torch.stack(encoder.encode_document(negatives))
    reference = float(
        (torch.diag(q_score := encoder.similarity(list(q), list(p))) > torch.diag(encoder.similarity(list(q), list(n))))
        .float()
        .mean()
    )
    assert q_score.shape == (3, 3)
    assert result["tiny_maxsim_accuracy"] == pytest.approx(reference)

    corpus = {f"d{i}": text for i, text in enumerate([*positives, "noise one", "noise two"])}
    retrieval = MultiVectorInformationRetrievalEvaluator(
        {f"q{i}": text for i, text in enumerate(anchors)}, corpus, {f"q{i}": {f"d{i}"} for i in range(3)}, name="ir"
    )
    metrics = retrieval(encoder)
    scores = encoder.similarity(encoder.encode_query(anchors), encoder.encode_document(list(corpus.values())))
    accuracy_at_1 = float((scores.argmax(dim=1) == torch.arange(3)).float().mean())
    assert metrics["ir_maxsim_accuracy@1"] == pytest.approx(accuracy_at_1)
    assert all(0.0 <= value <= 1.0 for key, value in metrics.items() if "@" in key)


def test_multi_process_encode(encoder):
    expected = encoder.encode_document(TEXTS)
    pool = encoder.start_multi_process_pool(["cpu", "cpu"])
    try:
        embeddings = encoder.encode_document(TEXTS, pool=pool, chunk_size=2)
        features = encoder.encode_document(TEXTS, pool=pool, chunk_size=2, output_value=None)
    finally:
        encoder.stop_multi_process_pool(pool)
    for got, want, feature in zip(embeddings, expected, features):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        torch.testing.assert_close(feature["token_embeddings"], want, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("loss_name", "columns"),
    [
        ("MultiVectorMultipleNegativesRankingLoss", {}),
        ("CachedMultiVectorMultipleNegativesRankingLoss", {}),
        ("MultiVectorMarginMSELoss", {"label": [0.5, -0.2, 0.1]}),
    ],
)
def test_training_step_with_its_losses(folder, tmp_path, loss_name, columns):
    """One epoch over 3 rows with sentence-transformers' trainer and a multi-vector loss; `max_length` in the
    training arguments sets the content truncation; the weights move and the saved card is MetaEmbed's."""
    datasets = pytest.importorskip("datasets")
    model = MultiVectorEncoder(str(folder), trust_remote_code=True, device="cpu")
    data = {"query": TEXTS, "document": ["red circle", "blue square", "financial report"], **columns}
    if loss_name == "MultiVectorMarginMSELoss":
        data = {"query": TEXTS, "positive": data["document"], "negative": TEXTS[::-1], "label": columns["label"]}
    loss_class = getattr(mve_losses, loss_name)
    loss = loss_class(model, mini_batch_size=2) if loss_name.startswith("Cached") else loss_class(model)
    args = MultiVectorEncoderTrainingArguments(
        output_dir=str(tmp_path / "out"),
        num_train_epochs=1,
        per_device_train_batch_size=2,
        max_length=6,
        report_to=[],
        save_strategy="no",
        learning_rate=1e-2,
    )
    dataset = datasets.Dataset.from_dict(data)
    before = model[0].model.meta_tokens.detach().clone()
    trainer = MultiVectorEncoderTrainer(model=model, args=args, train_dataset=dataset, loss=loss)
    # The collator tokenises each column with max_length=6: MetaEmbed cuts the text, never the template.
    batch = trainer.data_collator([dataset[0], dataset[1]])
    expected = model.preprocess(TEXTS[:2], task="query", max_length=6)["input_ids"]
    assert torch.equal(batch["query_input_ids"], expected)
    assert expected.shape[1] < model.preprocess(TEXTS[:2], task="query")["input_ids"].shape[1]
    trainer.train()
    assert not torch.equal(model[0].model.meta_tokens.detach(), before)
    model.save(str(tmp_path / "trained"))
    card = (tmp_path / "trained" / "README.md").read_text()
    assert "**Maximum Sequence Length:** 4096 tokens" in card and "- colbert" not in card
