"""Tests of scoring_metaembed: late-interaction scores against a naive reference, and input validation."""

from __future__ import annotations

import itertools
import re

import pytest
import torch

import scoring_metaembed
from scoring_metaembed import TopKScores, check_num_vectors, late_interaction_scores

DIM = 8


def random_items(count: int, max_vectors: int, seed: int, *, ragged: bool = True) -> list[torch.Tensor]:
    """`count` items of L2-normalised vectors, each `[num_vectors, DIM]` with 1..max_vectors vectors."""
    generator = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(count):
        num_vectors = int(torch.randint(1, max_vectors + 1, (1,), generator=generator)) if ragged else max_vectors
        vectors = torch.randn(num_vectors, DIM, generator=generator)
        items.append(vectors / vectors.norm(dim=1, keepdim=True))
    return items


def pad(items: list[torch.Tensor], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded `[len(items), width, DIM]` tensor and its mask. The padding holds large random values, so any
    leak into a score shows."""
    width = width or max(len(item) for item in items)
    padded = torch.randn(len(items), width, DIM, generator=torch.Generator().manual_seed(99)) * 100
    mask = torch.zeros(len(items), width, dtype=torch.bool)
    for index, item in enumerate(items):
        padded[index, : len(item)] = item
        mask[index, : len(item)] = True
    return padded, mask


def reference_scores(
    queries: list[torch.Tensor],
    candidates: list[torch.Tensor],
    num_query_vectors: int | None = None,
    num_candidate_vectors: int | None = None,
) -> torch.Tensor:
    """Naive late interaction: Python loops over items and vectors, float64 arithmetic on the float32 values
    of the real vectors only."""
    query_lists = [item.float()[:num_query_vectors].tolist() for item in queries]
    candidate_lists = [item.float()[:num_candidate_vectors].tolist() for item in candidates]
    scores = torch.zeros(len(queries), len(candidates), dtype=torch.float64)
    for query_index, query in enumerate(query_lists):
        for candidate_index, candidate in enumerate(candidate_lists):
            total = 0.0
            for query_vector in query:
                best = -float("inf")
                for candidate_vector in candidate:
                    best = max(best, sum(a * b for a, b in zip(query_vector, candidate_vector)))
                total += best
            scores[query_index, candidate_index] = total
    return scores.float()


def assert_same_up_to_rounding(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """For the same computation split differently: a few float32 ulps at most."""
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


QUERIES = random_items(5, 4, seed=0)
CANDIDATES = random_items(7, 6, seed=1)
BUDGETS = [(None, None), (1, 1), (2, 3), (3, 6), (4, 2)]


# ------------------------------------------------------------------------------------------------------------
# Scores
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_query_vectors", "num_candidate_vectors"), BUDGETS)
def test_padded_without_mask_matches_reference(num_query_vectors, num_candidate_vectors):
    queries = random_items(5, 4, seed=2, ragged=False)
    candidates = random_items(7, 6, seed=3, ragged=False)
    scores = late_interaction_scores(
        torch.stack(queries), torch.stack(candidates), num_query_vectors, num_candidate_vectors
    )
    assert scores.shape == (5, 7)
    assert_close_to_reference(scores, reference_scores(queries, candidates, num_query_vectors, num_candidate_vectors))


@pytest.mark.parametrize(("num_query_vectors", "num_candidate_vectors"), BUDGETS)
def test_ragged_lists_match_reference(num_query_vectors, num_candidate_vectors):
    # Budgets larger than some items: those items use all the vectors they have.
    scores = late_interaction_scores(QUERIES, CANDIDATES, num_query_vectors, num_candidate_vectors)
    assert_close_to_reference(scores, reference_scores(QUERIES, CANDIDATES, num_query_vectors, num_candidate_vectors))


@pytest.mark.parametrize(("num_query_vectors", "num_candidate_vectors"), BUDGETS)
def test_padded_with_masks_equals_lists(num_query_vectors, num_candidate_vectors):
    padded_queries, query_mask = pad(QUERIES)
    padded_candidates, candidate_mask = pad(CANDIDATES)
    masked = late_interaction_scores(
        padded_queries,
        padded_candidates,
        num_query_vectors,
        num_candidate_vectors,
        query_mask=query_mask,
        candidate_mask=candidate_mask,
    )
    from_lists = late_interaction_scores(QUERIES, CANDIDATES, num_query_vectors, num_candidate_vectors)
    assert torch.equal(masked, from_lists)
    assert_close_to_reference(masked, reference_scores(QUERIES, CANDIDATES, num_query_vectors, num_candidate_vectors))


def test_tuple_input_and_integer_masks():
    padded_candidates, candidate_mask = pad(CANDIDATES)
    scores = late_interaction_scores(tuple(QUERIES), padded_candidates, candidate_mask=candidate_mask.long())
    assert_close_to_reference(scores, reference_scores(QUERIES, CANDIDATES))


def test_every_budget_of_a_small_model():
    queries, candidates = random_items(3, 4, seed=4, ragged=False), random_items(4, 5, seed=5, ragged=False)
    for num_query_vectors in range(1, 5):
        for num_candidate_vectors in range(1, 6):
            scores = late_interaction_scores(
                torch.stack(queries), torch.stack(candidates), num_query_vectors, num_candidate_vectors
            )
            assert_close_to_reference(
                scores, reference_scores(queries, candidates, num_query_vectors, num_candidate_vectors)
            )


@pytest.mark.parametrize("budget", [(1, 1), (2, 4), (4, 8), (8, 16), (16, 64)])
def test_metaembed_budgets(budget):
    # MetaEmbed's MMR groups on its real vector counts: 16 query and 64 candidate vectors.
    queries = torch.stack(random_items(3, 16, seed=6, ragged=False))
    candidates = torch.stack(random_items(4, 64, seed=7, ragged=False))
    scores = late_interaction_scores(queries, candidates, *budget)
    assert_close_to_reference(scores, reference_scores(list(queries), list(candidates), *budget))


def test_masks_with_holes_use_the_first_real_vectors():
    padded_candidates, _ = pad(CANDIDATES, width=8)
    candidate_mask = torch.zeros(len(CANDIDATES), 8, dtype=torch.bool)
    compacted = []
    generator = torch.Generator().manual_seed(8)
    for index, item in enumerate(CANDIDATES):
        # Scatter each item's vectors over random positions, in order.
        positions = torch.randperm(8, generator=generator)[: len(item)].sort().values
        padded_candidates[index, positions] = item
        candidate_mask[index, positions] = True
        compacted.append(item)
    padded_queries, query_mask = pad(QUERIES, width=6)
    query_mask = query_mask.roll(1, dims=1)  # real vectors at positions 1.., a padding slot first
    padded_queries = padded_queries.roll(1, dims=1)
    for budget in [(None, None), (1, 1), (2, 3), (4, 8)]:
        scores = late_interaction_scores(
            padded_queries, padded_candidates, *budget, query_mask=query_mask, candidate_mask=candidate_mask
        )
        assert_close_to_reference(scores, reference_scores(QUERIES, compacted, *budget))


def test_padding_never_leaks_into_scores():
    # Every real similarity is negative, so a zero (or any non-negative) padding vector would win the max.
    direction = torch.zeros(DIM)
    direction[0] = 1.0
    queries = [direction.repeat(2, 1), direction.repeat(1, 1)]
    candidates = [-(direction + 0.1 * torch.randn(count, DIM)) for count in (1, 3, 2)]
    expected = reference_scores(queries, candidates)
    assert bool((expected < 0).all())

    zero_padded_queries = torch.zeros(2, 3, DIM)
    zero_padded_candidates = torch.zeros(3, 4, DIM)
    for index, item in enumerate(queries):
        zero_padded_queries[index, : len(item)] = item
    for index, item in enumerate(candidates):
        zero_padded_candidates[index, : len(item)] = item
    query_mask = zero_padded_queries.abs().sum(-1) > 0
    candidate_mask = zero_padded_candidates.abs().sum(-1) > 0

    masked = late_interaction_scores(
        zero_padded_queries, zero_padded_candidates, query_mask=query_mask, candidate_mask=candidate_mask
    )
    assert_close_to_reference(masked, expected)
    assert_close_to_reference(late_interaction_scores(queries, candidates), expected)
    # Query padding filled with copies of real vectors must not count either.
    repeated_queries = zero_padded_queries.clone()
    repeated_queries[1, 1:] = direction
    masked = late_interaction_scores(
        repeated_queries, zero_padded_candidates, query_mask=query_mask, candidate_mask=candidate_mask
    )
    assert_close_to_reference(masked, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_are_scored_in_float32(dtype):
    queries = [item.to(dtype) for item in QUERIES]
    candidates = [item.to(dtype) for item in CANDIDATES]
    padded_candidates, candidate_mask = pad(candidates)
    expected = reference_scores(queries, candidates, 3, 4)  # from the same half-precision values
    assert_close_to_reference(late_interaction_scores(queries, candidates, 3, 4), expected)
    scores = late_interaction_scores(
        queries, padded_candidates.to(dtype), 3, 4, candidate_mask=candidate_mask, chunk_size=2
    )
    assert_close_to_reference(scores, expected)


def test_half_precision_sums_keep_nearby_scores_apart():
    # 16 query vectors: a bf16 accumulation would round these sums to a 0.125 grid.
    queries = torch.stack(random_items(2, 16, seed=9, ragged=False)).bfloat16()
    candidates = torch.stack(random_items(50, 8, seed=10, ragged=False)).bfloat16()
    scores = late_interaction_scores(queries, candidates)
    assert_close_to_reference(scores, reference_scores(list(queries), list(candidates)))
    assert len(scores[0].unique()) == 50


@pytest.mark.parametrize("chunk_size", [1, 3, 10**9])
def test_chunk_size_does_not_change_results(chunk_size):
    padded_candidates, candidate_mask = pad(CANDIDATES)
    for budget in [(None, None), (2, 3)]:
        default = late_interaction_scores(QUERIES, padded_candidates, *budget, candidate_mask=candidate_mask)
        chunked = late_interaction_scores(
            QUERIES, padded_candidates, *budget, candidate_mask=candidate_mask, chunk_size=chunk_size
        )
        # Equal up to float32 rounding: the BLAS may pick another kernel for another matrix shape.
        assert_same_up_to_rounding(chunked, default)
        from_lists = late_interaction_scores(QUERIES, CANDIDATES, *budget, chunk_size=chunk_size)
        assert torch.equal(from_lists, chunked)


def test_tiny_tile_budget_splits_queries_and_candidates(monkeypatch):
    padded_queries, query_mask = pad(QUERIES)
    default = late_interaction_scores(padded_queries, CANDIDATES, query_mask=query_mask)
    # 16 elements per tile: one query against one candidate per matmul, queries staged per tile.
    monkeypatch.setattr(scoring_metaembed, "_TILE_ELEMENTS_CPU", 16)
    for chunk_size in (None, 2):
        scores = late_interaction_scores(padded_queries, CANDIDATES, query_mask=query_mask, chunk_size=chunk_size)
        assert_same_up_to_rounding(scores, default)
        top = late_interaction_scores(padded_queries, CANDIDATES, query_mask=query_mask, chunk_size=chunk_size, top_k=3)
        assert torch.equal(top.scores, scores.topk(3, dim=1).values)
        assert torch.equal(top.indices, scores.topk(3, dim=1).indices)


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 10**9])
@pytest.mark.parametrize("k", [1, 4, 7, 100])
def test_top_k_equals_topk_of_full_scores(k, chunk_size):
    candidates = random_items(40, 6, seed=11)
    full = late_interaction_scores(QUERIES, candidates, 2, 3, chunk_size=chunk_size)
    top = late_interaction_scores(QUERIES, candidates, 2, 3, top_k=k, chunk_size=chunk_size)
    assert isinstance(top, TopKScores)
    expected = full.topk(min(k, 40), dim=1)
    assert top.scores.dtype == torch.float32 and top.indices.dtype == torch.int64
    assert torch.equal(top.scores, expected.values)
    assert torch.equal(top.indices, expected.indices)


def test_top_k_accepts_numpy_integers():
    numpy = pytest.importorskip("numpy")
    top = late_interaction_scores(QUERIES, CANDIDATES, top_k=numpy.int64(2))
    assert top.scores.shape == (5, 2)


def test_results_do_not_track_gradients():
    queries = torch.stack(random_items(2, 3, seed=12, ragged=False)).requires_grad_()
    scores = late_interaction_scores(queries, CANDIDATES)
    assert not scores.requires_grad


def test_device_argument_and_result_device():
    scores = late_interaction_scores(QUERIES, CANDIDATES, device="cpu")
    assert scores.device.type == "cpu"
    assert_close_to_reference(scores, reference_scores(QUERIES, CANDIDATES))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_matches_cpu():
    padded_candidates, candidate_mask = pad(CANDIDATES)
    expected = late_interaction_scores(QUERIES, padded_candidates, 2, 3, candidate_mask=candidate_mask)
    on_gpu = late_interaction_scores(
        [item.cuda() for item in QUERIES],
        padded_candidates.cuda(),
        2,
        3,
        candidate_mask=candidate_mask.cuda(),
    )
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), expected, rtol=1e-4, atol=1e-4)
    # CPU inputs, GPU compute: chunks move on their own.
    moved = late_interaction_scores(QUERIES, padded_candidates, 2, 3, candidate_mask=candidate_mask, device="cuda")
    torch.testing.assert_close(moved.cpu(), expected, rtol=1e-4, atol=1e-4)
    top = late_interaction_scores(QUERIES, CANDIDATES, top_k=3, device="cuda")
    assert top.indices.device.type == "cuda"
    full = late_interaction_scores(QUERIES, CANDIDATES)
    torch.testing.assert_close(top.scores.cpu(), full.topk(3, dim=1).values, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# Empty inputs
# ------------------------------------------------------------------------------------------------------------


def test_empty_inputs_give_empty_scores():
    assert late_interaction_scores([], CANDIDATES).shape == (0, 7)
    assert late_interaction_scores(QUERIES, []).shape == (5, 0)
    assert late_interaction_scores(torch.zeros(0, 4, DIM), torch.zeros(0, 6, DIM)).shape == (0, 0)
    assert late_interaction_scores(torch.zeros(0, 4, DIM), CANDIDATES, 2, 3).dtype == torch.float32
    top = late_interaction_scores(QUERIES, [], top_k=3)
    assert top.scores.shape == (5, 0) and top.indices.shape == (5, 0)
    top = late_interaction_scores([], CANDIDATES, top_k=3)
    assert top.scores.shape == (0, 3) and top.indices.dtype == torch.int64


def test_empty_inputs_still_check_vector_counts():
    with pytest.raises(ValueError, match="num_candidate_vectors"):
        late_interaction_scores([], torch.zeros(3, 4, DIM), None, 5)
    with pytest.raises(TypeError, match="num_query_vectors"):
        late_interaction_scores([], CANDIDATES, 1.5)


# ------------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------------


def test_non_tensor_items_are_named():
    with pytest.raises(TypeError, match=re.escape("candidates[3] is a str, expected a torch.Tensor of shape")):
        late_interaction_scores(QUERIES, [*CANDIDATES[:3], "text", CANDIDATES[4]])
    with pytest.raises(TypeError, match=re.escape("queries must be a torch.Tensor")):
        late_interaction_scores({"a": 1}, CANDIDATES)
    numpy = pytest.importorskip("numpy")
    with pytest.raises(TypeError, match="got ndarray"):
        late_interaction_scores(QUERIES, numpy.zeros((2, 3, DIM), dtype="float32"))


def test_wrong_number_of_dimensions():
    with pytest.raises(ValueError, match=r"queries must have shape \[num_items, num_vectors, dim\].*unsqueeze"):
        late_interaction_scores(QUERIES[0], CANDIDATES)
    with pytest.raises(ValueError, match=r"candidates must have shape .* \[2, 3, 4, 8\]"):
        late_interaction_scores(QUERIES, torch.zeros(2, 3, 4, DIM))
    with pytest.raises(ValueError, match=re.escape("candidates[1] must have shape [num_vectors, dim], got")):
        late_interaction_scores(QUERIES, [CANDIDATES[0], torch.zeros(DIM)])


def test_mismatched_dims():
    with pytest.raises(ValueError, match="8 for queries and 5 for candidates"):
        late_interaction_scores(QUERIES, torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match=re.escape("queries[2] has dim 4, but queries[0] has dim 8")):
        late_interaction_scores([QUERIES[0], QUERIES[1], torch.zeros(2, 4)], CANDIDATES)


def test_mask_errors():
    padded, mask = pad(CANDIDATES)
    with pytest.raises(ValueError, match=re.escape("candidate_mask must have shape [7, 6]")):
        late_interaction_scores(QUERIES, padded, candidate_mask=mask[:, :5])
    with pytest.raises(TypeError, match="candidate_mask must be a bool"):
        late_interaction_scores(QUERIES, padded, candidate_mask=mask.float())
    with pytest.raises(TypeError, match=re.escape("query_mask must be a bool torch.Tensor")):
        late_interaction_scores(torch.stack(QUERIES[:1]), padded, query_mask=[[True]])
    with pytest.raises(ValueError, match="query_mask only applies to a padded queries tensor"):
        late_interaction_scores(QUERIES, padded, query_mask=torch.ones(5, 4, dtype=torch.bool))
    mask[4] = False
    with pytest.raises(ValueError, match=re.escape("candidate_mask[4] is all False: candidates[4] has no vectors")):
        late_interaction_scores(QUERIES, padded, candidate_mask=mask)


def test_items_without_vectors():
    with pytest.raises(ValueError, match=re.escape("candidates[1] has no vectors")):
        late_interaction_scores(QUERIES, [CANDIDATES[0], torch.zeros(0, DIM)])
    with pytest.raises(ValueError, match="queries has no vectors per item"):
        late_interaction_scores(torch.zeros(2, 0, DIM), CANDIDATES)
    with pytest.raises(ValueError, match="dim 0"):
        late_interaction_scores(torch.zeros(2, 3, 0), torch.zeros(2, 3, 0))


def test_non_floating_dtypes():
    with pytest.raises(TypeError, match=r"candidates has dtype torch.int64, expected a floating dtype"):
        late_interaction_scores(QUERIES, torch.ones(2, 3, DIM, dtype=torch.long))
    with pytest.raises(TypeError, match=re.escape("queries[1] has dtype torch.bool")):
        late_interaction_scores([QUERIES[0], torch.ones(2, DIM, dtype=torch.bool)], CANDIDATES)


def test_vector_count_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"num_query_vectors must be between 1 and 4 \(inclusive\), got 5"):
        late_interaction_scores(QUERIES, CANDIDATES, 5)
    with pytest.raises(ValueError, match=r"num_candidate_vectors must be between 1 and 6 \(inclusive\), got 0"):
        late_interaction_scores(QUERIES, CANDIDATES, 1, 0)
    with pytest.raises(TypeError, match="num_candidate_vectors must be an int between 1 and 6 or None, got str"):
        late_interaction_scores(QUERIES, CANDIDATES, 1, "2")


@pytest.mark.parametrize(
    ("argument", "value", "error"),
    [
        ("top_k", 0, ValueError),
        ("top_k", -3, ValueError),
        ("top_k", 2.0, TypeError),
        ("top_k", True, TypeError),
        ("chunk_size", 0, ValueError),
        ("chunk_size", "8", TypeError),
    ],
)
def test_top_k_and_chunk_size_errors(argument, value, error):
    with pytest.raises(error, match=argument):
        late_interaction_scores(QUERIES, CANDIDATES, **{argument: value})


# ------------------------------------------------------------------------------------------------------------
# check_num_vectors
# ------------------------------------------------------------------------------------------------------------


def test_check_num_vectors_accepts_integers():
    numpy = pytest.importorskip("numpy")
    assert check_num_vectors(None, 64) == 64
    assert check_num_vectors(1, 64) == 1
    assert check_num_vectors(64, 64) == 64
    for value in (numpy.int64(3), numpy.int32(3), torch.tensor(3), torch.tensor(3, dtype=torch.int32)):
        result = check_num_vectors(value, 16)
        assert result == 3 and type(result) is int


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (2.5, "num_vectors must be an int between 1 and 64 or None, got float 2.5"),
        (True, "num_vectors must be an int between 1 and 64 or None, got bool True"),
        ("3", "num_vectors must be an int between 1 and 64 or None, got str '3'"),
        (torch.tensor(3.0), "got Tensor"),
        (torch.tensor(True), "got Tensor"),
        (torch.tensor([3]), "got Tensor"),
        ([3], "got list"),
    ],
)
def test_check_num_vectors_rejects_non_integers(value, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        check_num_vectors(value, 64)


@pytest.mark.parametrize("value", [0, -1, 65, 10**6])
def test_check_num_vectors_rejects_out_of_range(value):
    with pytest.raises(ValueError, match=re.escape(f"num_vectors must be between 1 and 64 (inclusive), got {value}")):
        check_num_vectors(value, 64)


def test_check_num_vectors_uses_argument_name():
    with pytest.raises(ValueError, match=re.escape("num_candidate_vectors must be between 1 and 16")):
        check_num_vectors(17, 16, "num_candidate_vectors")
    with pytest.raises(TypeError, match=r"^num_query_vectors must be an int"):
        check_num_vectors(1.0, 16, "num_query_vectors")
    with pytest.raises(ValueError, match="maximum"):
        check_num_vectors(1, 0)


@pytest.mark.parametrize("budget", [(1, 1), (4, 8), (16, 64)])
def test_one_query_and_a_wide_batch_use_either_layout_and_agree(budget):
    # One query at r_q <= 16 takes the [query vectors, candidate vectors] layout, 6 queries the other one.
    generator = torch.Generator().manual_seed(7)
    queries = torch.nn.functional.normalize(torch.randn(6, 16, 32, generator=generator), dim=-1)
    candidates = torch.nn.functional.normalize(torch.randn(50, 64, 32, generator=generator), dim=-1)
    expected = reference_scores(list(queries), list(candidates), *budget)
    batch = late_interaction_scores(queries, candidates, *budget)
    assert_close_to_reference(batch, expected)
    for row in (0, 3, 5):
        single = late_interaction_scores(queries[row : row + 1], candidates, *budget)
        assert_same_up_to_rounding(single, batch[row : row + 1])


def prefix_blocks(candidates: torch.Tensor, bounds: list[int], storage: str = "float32"):
    """`candidates` [N, R, D] split into consecutive blocks at `bounds` (as an index stores them), in float32,
    float16, int8 / int4 (per-vector scales) or "table4" (4-bit codes with per-vector scales, a table of code
    values and per-candidate offsets), and the float32 values those blocks hold, [N, R, D]."""
    blocks, scales, values = [], [], []
    code_values = offsets = None
    if storage == "table4":
        generator = torch.Generator().manual_seed(5)
        code_values = torch.randn(16, generator=generator).sort().values
        offsets = torch.randn(len(candidates), candidates.shape[2], generator=generator).half()
    for start, end in itertools.pairwise(bounds):
        part = candidates[:, start:end]
        if storage == "int8":
            scale = part.abs().amax(dim=-1) / 127.0
            codes = torch.round(part / scale.unsqueeze(-1)).to(torch.int8)
            blocks.append(codes)
            scales.append(scale)
            values.append(codes.float() * scale.unsqueeze(-1))
        elif storage == "int4":  # codes 1..15 (value + 8), two per byte: even element low, odd element high
            scale = part.abs().amax(dim=-1) / 7.0
            codes = (torch.round(part / scale.unsqueeze(-1)) + 8).to(torch.uint8)
            blocks.append(codes[..., 0::2] | (codes[..., 1::2] << 4))
            scales.append(scale)
            values.append((codes.float() - 8) * scale.unsqueeze(-1))
        elif storage == "table4":
            scale = part.abs().amax(dim=-1)
            codes = ((part / scale.unsqueeze(-1) + 1) * 7.5).round().to(torch.uint8)  # 0..15
            blocks.append(codes[..., 0::2] | (codes[..., 1::2] << 4))
            scales.append(scale)
            values.append(code_values[codes.long()] * scale.unsqueeze(-1) + offsets.float().unsqueeze(1))
        else:
            blocks.append(part.to(getattr(torch, storage)).contiguous())
            scales.append(None)
            values.append(blocks[-1].float())
    return scoring_metaembed.PrefixBlocks(blocks, scales, code_values, offsets), torch.cat(values, dim=1)


@pytest.mark.parametrize("storage", ["float32", "float16", "int8", "int4", "table4"])
@pytest.mark.parametrize("budget", [(1, 1), (2, 3), (4, 8), (5, 13), (16, 64)])
@pytest.mark.parametrize("num_queries", [1, 6])
def test_prefix_blocks_score_what_they_store_at_every_budget(storage, budget, num_queries):
    generator = torch.Generator().manual_seed(11)
    queries = torch.nn.functional.normalize(torch.randn(num_queries, 16, 32, generator=generator), dim=-1)
    candidates = torch.nn.functional.normalize(torch.randn(40, 64, 32, generator=generator), dim=-1)
    blocks, values = prefix_blocks(candidates, [0, 1, 2, 4, 8, 16, 32, 64], storage)
    expected = reference_scores(list(queries), list(values), *budget)
    assert_close_to_reference(late_interaction_scores(queries, blocks, *budget), expected)
    # The same float32 values stored whole give the same scores, up to rounding; so do tiny chunks and top-k.
    whole = late_interaction_scores(queries, values, *budget)
    assert_same_up_to_rounding(late_interaction_scores(queries, blocks, *budget), whole)
    assert_same_up_to_rounding(late_interaction_scores(queries, blocks, *budget, chunk_size=3), expected)
    top = late_interaction_scores(queries, blocks, *budget, top_k=5)
    torch.testing.assert_close(top.scores, expected.topk(5, dim=1).values, rtol=1e-5, atol=1e-5)


def test_prefix_blocks_read_only_the_blocks_a_budget_uses():
    # Later blocks hold NaN: a budget inside the first blocks must never touch them.
    generator = torch.Generator().manual_seed(3)
    queries = torch.nn.functional.normalize(torch.randn(2, 4, 8, generator=generator), dim=-1)
    first = torch.nn.functional.normalize(torch.randn(9, 4, 8, generator=generator), dim=-1)
    blocks = scoring_metaembed.PrefixBlocks([first[:, :1], first[:, 1:4], torch.full((9, 4, 8), float("nan"))])
    assert blocks.num_vectors == 8 and len(blocks) == 9
    for r_c in (1, 2, 4):
        expected = reference_scores(list(queries), list(first), 4, r_c)
        assert_close_to_reference(late_interaction_scores(queries, blocks, 4, r_c), expected)
    assert torch.isnan(late_interaction_scores(queries, blocks, 4, 5)).all()


def test_prefix_blocks_refuse_inconsistent_blocks():
    block = torch.zeros(3, 2, 8)
    with pytest.raises(ValueError, match=r"blocks\[1\] has shape \[4, 2, 8\]"):
        scoring_metaembed.PrefixBlocks([block, torch.zeros(4, 2, 8)])
    with pytest.raises(TypeError, match=r"blocks\[0\] is int8: scales\[0\] must be a float32"):
        scoring_metaembed.PrefixBlocks([block.to(torch.int8)])
    with pytest.raises(ValueError, match=r"scales\[0\] has shape \[3\]"):
        scoring_metaembed.PrefixBlocks([block.to(torch.int8)], [torch.ones(3)])
    with pytest.raises(ValueError, match=r"blocks\[0\] is torch.float32: scales\[0\] must be None"):
        scoring_metaembed.PrefixBlocks([block], [torch.ones(3, 2)])
    with pytest.raises(TypeError, match="blocks must be a non-empty list"):
        scoring_metaembed.PrefixBlocks([])
    codes, scales = torch.zeros(3, 2, 4, dtype=torch.uint8), [torch.ones(3, 2)]
    with pytest.raises(ValueError, match=r"code_values only apply to uint8 blocks"):
        scoring_metaembed.PrefixBlocks([block], None, torch.zeros(16))
    with pytest.raises(TypeError, match=r"code_values must be a float32 tensor \[16\], got torch.float64"):
        scoring_metaembed.PrefixBlocks([codes], scales, torch.zeros(16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"code_values must be \[16\] on cpu, got torch.float32 \[15\]"):
        scoring_metaembed.PrefixBlocks([codes], scales, torch.zeros(15))
    with pytest.raises(TypeError, match=r"offsets must be a floating tensor \[N, D\], got torch.int64"):
        scoring_metaembed.PrefixBlocks([block], None, None, torch.zeros(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"offsets must be \[3, 8\] on cpu, got torch.float32 \[3, 4\]"):
        scoring_metaembed.PrefixBlocks([codes], scales, None, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="candidate_mask does not apply to PrefixBlocks"):
        late_interaction_scores(
            torch.zeros(1, 1, 8), scoring_metaembed.PrefixBlocks([block]), candidate_mask=torch.ones(3, 2)
        )
    with pytest.raises(ValueError, match="num_candidate_vectors must be between 1 and 2"):
        late_interaction_scores(torch.zeros(1, 1, 8), scoring_metaembed.PrefixBlocks([block]), 1, 3)
