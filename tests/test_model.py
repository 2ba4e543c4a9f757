"""MetaEmbedModel: layout parity with the reference, prefix exactness, batch invariance, dtypes, errors."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from conftest import NUM_CANDIDATE_VECTORS, NUM_QUERY_VECTORS, make_model

from modeling_metaembed import MetaEmbedModel

ATOL = 1e-5


def reference_embeddings(model: MetaEmbedModel, items: list, task: str) -> torch.Tensor:
    """The reference layout, written out plainly: append all R_q + R_c Meta Tokens to every input, put the
    table rows into the embedding output, run the backbone, read the query rows or the candidate rows."""
    config = model.config
    processor = model.processor
    features = processor.process_queries(items) if task == "query" else processor.process_candidates(items)
    num_meta = config.num_query_vectors + config.num_candidate_vectors
    batch_size = features["input_ids"].shape[0]
    dummy_id = 0  # any ordinary id: its embedding is overwritten below
    input_ids = torch.cat([features["input_ids"], torch.full((batch_size, num_meta), dummy_id)], dim=1)
    attention_mask = torch.cat([features["attention_mask"], torch.ones(batch_size, num_meta, dtype=torch.long)], 1)
    mm_token_type_ids = torch.cat(
        [features["mm_token_type_ids"], torch.zeros(batch_size, num_meta, dtype=torch.int)], 1
    )
    image_grid_thw = features.get("image_grid_thw")
    position_ids, _ = model.vlm.get_rope_index(
        input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask
    )
    inputs_embeds = model.vlm.get_input_embeddings()(input_ids)
    inputs_embeds[:, -num_meta:] = model.meta_tokens
    with torch.no_grad():
        hidden = model.vlm(
            input_ids=input_ids,  # Qwen2.5-VL accepts ids beside embeddings: they locate the image tokens
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            pixel_values=features.get("pixel_values"),
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            use_cache=False,
        ).last_hidden_state
    rows = (
        hidden[:, -num_meta : -config.num_candidate_vectors]
        if task == "query"
        else hidden[:, -config.num_candidate_vectors :]
    )
    if model.projection is not None:
        rows = model.projection(rows)
    return F.normalize(rows.float(), dim=-1)


@pytest.mark.parametrize("task", ["query", "candidate"])
def test_layout_parity_with_reference(model, mixed_items, task):
    expected = reference_embeddings(model, mixed_items, task)
    actual = model.encode(mixed_items, task, batch_size=len(mixed_items))
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def test_meta_tokens_are_one_table_parameter(model):
    names = dict(model.named_parameters())
    assert names["meta_tokens"].shape == (NUM_QUERY_VECTORS + NUM_CANDIDATE_VECTORS, model.config.hidden_size)
    assert model.vlm.get_input_embeddings().weight.shape[0] == model.config.vlm_config.text_config.vocab_size


@pytest.mark.parametrize("task,maximum", [("query", NUM_QUERY_VECTORS), ("candidate", NUM_CANDIDATE_VECTORS)])
def test_prefix_exactness_and_only_needed_tokens_run(model, mixed_items, task, maximum):
    full = model.encode(mixed_items, task)
    assert full.shape == (len(mixed_items), maximum, 16)
    content_length = model.processor.process_items(
        [__import__("processing_metaembed").normalize_item(mixed_items[0], "x")], task
    )["input_ids"].shape[1]
    lengths = []
    hook = model.vlm.get_input_embeddings().register_forward_hook(lambda m, a, o: lengths.append(a[0].shape[1]))
    try:
        for num_vectors in range(1, maximum + 1):
            lengths.clear()
            prefix = model.encode(mixed_items[:1], task, num_vectors=num_vectors)
            torch.testing.assert_close(prefix, full[:1, :num_vectors], atol=ATOL, rtol=0)
            expected_appended = num_vectors if task == "query" else NUM_QUERY_VECTORS + num_vectors
            assert lengths == [content_length + expected_appended]
    finally:
        hook.remove()


def test_shared_meta_tokens_layout(backbone_dirs, mixed_items):
    model = make_model(backbone_dirs["qwen2_5_vl"], shared_meta_tokens=True)
    assert model.meta_tokens.shape[0] == max(NUM_QUERY_VECTORS, NUM_CANDIDATE_VECTORS)
    queries = model.encode_queries(mixed_items[:3])
    candidates = model.encode_candidates(mixed_items[:3])
    # One table, no query block before the candidate rows: a query is the candidate prefix with another prompt,
    # so with equal prompts the first vectors agree.
    model.processor.query_prefix = ""
    try:
        torch.testing.assert_close(
            model.encode_queries(mixed_items[:3]), candidates[:, :NUM_QUERY_VECTORS], atol=ATOL, rtol=0
        )
    finally:
        model.processor.query_prefix = "Query: "
    assert not torch.allclose(queries, candidates[:, :NUM_QUERY_VECTORS], atol=1e-3)


def test_batch_invariance(model, mixed_items):
    together = model.encode_candidates(mixed_items, batch_size=len(mixed_items))
    one_by_one = torch.cat([model.encode_candidates([item]) for item in mixed_items])
    torch.testing.assert_close(one_by_one, together, atol=ATOL, rtol=0)
    for batch_size in (2, 3, 5):
        torch.testing.assert_close(
            model.encode_candidates(mixed_items, batch_size=batch_size), together, atol=ATOL, rtol=0
        )
    # Other neighbours, other order, text-only vs mixed batches.
    reordered = [mixed_items[index] for index in (7, 3, 0, 5)]
    torch.testing.assert_close(model.encode_candidates(reordered), together[[7, 3, 0, 5]], atol=ATOL, rtol=0)
    with_padding = ["x " * 40, *mixed_items[:2]]
    torch.testing.assert_close(model.encode_candidates(with_padding)[1:], together[:2], atol=ATOL, rtol=0)


def test_padding_side_does_not_matter(model, mixed_items):
    features = model.processor.process_candidates(mixed_items)
    left = model(**features).embeddings
    # Re-pad on the right by hand: the same tokens moved to the start of each row.
    input_ids, attention_mask = features["input_ids"].clone(), features["attention_mask"].clone()
    mm_token_type_ids = features["mm_token_type_ids"].clone()
    for row in range(input_ids.shape[0]):
        length = int(attention_mask[row].sum())
        for tensor, pad in (
            (input_ids, model.processor.tokenizer.pad_token_id),
            (attention_mask, 0),
            (mm_token_type_ids, 0),
        ):
            content = tensor[row, -length:].clone()
            tensor[row] = pad
            tensor[row, :length] = content
    right = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        mm_token_type_ids=mm_token_type_ids,
        pixel_values=features["pixel_values"],
        image_grid_thw=features["image_grid_thw"],
    ).embeddings
    torch.testing.assert_close(right, left, atol=ATOL, rtol=0)


def test_concurrent_encode_matches_sequential(model, mixed_items):
    calls = [(mixed_items[index:] + mixed_items[:index], task) for index in range(4) for task in ("query", "candidate")]
    sequential = [model.encode(items, task, num_vectors=3, batch_size=3) for items, task in calls]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda call: model.encode(call[0], call[1], num_vectors=3, batch_size=3), calls))
    for expected, actual in zip(sequential, concurrent):
        torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def test_long_text_truncated_in_content_not_meta_tokens(model):
    processor = model.processor
    original = processor.max_text_tokens
    processor.max_text_tokens = 20
    try:
        long_text = "abcdefghij" * 10  # byte-level tokenizer: 100 tokens
        features = processor.process_queries([long_text])
        short_features = processor.process_queries([long_text[:20]])
        assert torch.equal(features["input_ids"], short_features["input_ids"])
        end = processor.tokenizer("<|im_end|><|endoftext|>", add_special_tokens=False)["input_ids"]
        assert features["input_ids"][0, -2:].tolist() == end
        torch.testing.assert_close(
            model.encode_queries([long_text]), model.encode_queries([long_text[:20]]), atol=0, rtol=0
        )
        assert model.encode_queries([long_text]).shape == (1, NUM_QUERY_VECTORS, 16)
    finally:
        processor.max_text_tokens = original


def test_embeddings_are_normalised_float32_and_numpy(model, mixed_items):
    embeddings = model.encode_queries(mixed_items, num_vectors=2)
    assert embeddings.dtype == torch.float32 and embeddings.device.type == "cpu"
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(len(mixed_items), 2), atol=1e-6, rtol=0)
    array = model.encode_queries(mixed_items[:2], num_vectors=2, convert_to_numpy=True)
    assert array.shape == (2, 2, 16) and str(array.dtype) == "float32"


def test_empty_input_returns_empty_tensor(model):
    assert model.encode_queries([], num_vectors=3).shape == (0, 3, 16)
    assert model.encode_candidates([]).shape == (0, NUM_CANDIDATE_VECTORS, 16)


@pytest.mark.parametrize(
    "num_vectors,error",
    [
        (0, ValueError),
        (NUM_QUERY_VECTORS + 1, ValueError),
        (-1, ValueError),
        (2.0, TypeError),
        ("2", TypeError),
        (True, TypeError),
    ],
)
def test_bad_num_vectors(model, num_vectors, error):
    with pytest.raises(error, match="num_vectors"):
        model.encode_queries(["text"], num_vectors=num_vectors)


def test_score_matches_plain_maxsim(model, mixed_items):
    queries = model.encode_queries(mixed_items[:3], num_vectors=2)
    candidates = model.encode_candidates(mixed_items, num_vectors=5)
    expected = torch.einsum("qid,cjd->qcij", queries, candidates).amax(-1).sum(-1)
    scores = model.score(queries, candidates)
    assert scores.dtype == torch.float32 and scores.shape == (3, len(mixed_items))
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        model.score(queries, candidates, 1, 2),
        torch.einsum("qid,cjd->qcij", queries[:, :1], candidates[:, :2]).amax(-1).sum(-1),
    )


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_backbones_fp32_bf16_and_attention(backbone_dirs, mixed_items, family):
    fp32 = make_model(backbone_dirs[family])
    reference = fp32.encode_candidates(mixed_items, num_vectors=3)
    assert fp32.vlm.config._attn_implementation == "sdpa"
    eager = make_model(backbone_dirs[family], attn_implementation="eager")
    assert eager.vlm.config.get_text_config()._attn_implementation == "eager"
    torch.testing.assert_close(eager.encode_candidates(mixed_items, num_vectors=3), reference, atol=ATOL, rtol=0)
    bf16 = make_model(backbone_dirs[family], dtype=torch.bfloat16, device_map="cpu")
    assert bf16.meta_tokens.dtype == torch.bfloat16 and bf16.vlm.get_input_embeddings().weight.dtype == torch.bfloat16
    with torch.no_grad():
        bf16.meta_tokens.copy_(fp32.meta_tokens)
    low_precision = bf16.encode_candidates(mixed_items, num_vectors=3)
    assert low_precision.dtype == torch.float32
    cosine = (low_precision * reference).sum(-1)
    assert cosine.min() > 0.95, cosine
    # Prefix exactness holds in bf16 too (same kernels, same rows).
    torch.testing.assert_close(
        bf16.encode_candidates(mixed_items, num_vectors=1), low_precision[:, :1], atol=1e-2, rtol=0
    )


def test_flash_attention_falls_back_to_sdpa(backbone_dirs):
    with pytest.warns(UserWarning, match="sdpa"):
        model = make_model(backbone_dirs["qwen2_5_vl"], attn_implementation="flash_attention_2")
    assert model.vlm.config._attn_implementation == "sdpa"


def test_no_projection_uses_hidden_size(backbone_dirs, mixed_items):
    model = make_model(backbone_dirs["qwen2_vl"], embedding_dim=None)
    assert model.projection is None
    assert model.encode_queries(mixed_items[:2]).shape == (2, NUM_QUERY_VECTORS, model.config.hidden_size)


def test_content_ending_with_placeholder_is_refused(model):
    features = model.processor.process_queries(["hello"])
    features["input_ids"][0, -1] = model.config.meta_token_id
    with pytest.raises(ValueError, match="placeholder"):
        model(**features, task="query")
