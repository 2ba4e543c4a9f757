"""The one-query kernel (metaembed/search/single_query.py, numba): the same scores as the torch kernel for every
stored type and budget, whatever the thread split, from memory-mapped shards and from several threads at once;
and the index uses it for one query."""

from __future__ import annotations

import re

import numpy
import pytest
import torch
import torch.nn.functional as F

from metaembed.search import single_query
from metaembed.search.index import MetaEmbedIndex
from metaembed.search.storage import code_values, prefix_blocks, quantize
from metaembed.testing import run_concurrently
from scoring_metaembed import MMR_BUDGETS, PrefixBlocks, late_interaction_scores, merge_top_k

pytest.importorskip("numba")

DIM, NUM_VECTORS = 32, 64
STORAGES = ["float32", "float16", "int8", "int4", "residual4"]


def unit_vectors(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.fixture(autouse=True)
def outer_product_everywhere(monkeypatch):
    # Machines without AVX-512 keep the dots along D; the outer product gives the same scores there too.
    monkeypatch.setattr(single_query, "_has_512_bit_vectors", lambda: True)


@pytest.fixture(scope="module")
def candidates():
    vectors = unit_vectors(300, NUM_VECTORS, DIM, seed=0)
    # Components float16 stores as subnormals or zeros (|x| < 6.1e-5), of both signs, in the first vectors.
    vectors[0, 0, :6] = torch.tensor([3e-5, -2e-6, 0.0, -0.0, 6e-8, -5e-5])
    vectors[1, :2, :DIM:2] = 1e-7
    return vectors


@pytest.fixture(scope="module")
def query():
    return unit_vectors(16, DIM, seed=1)


def stored_blocks(candidates, storage):
    stored = quantize(candidates, storage)
    blocks, scales = prefix_blocks(stored.embeddings, stored.scales)
    return PrefixBlocks(blocks, scales, code_values(storage), stored.offsets)


def saved_two_shard_index(candidates, storage, path):
    index = MetaEmbedIndex(DIM, NUM_VECTORS, storage=storage)
    index.add(candidates[:170])
    index.add(candidates[170:])  # two shards
    index.save(str(path))
    return MetaEmbedIndex.load(str(path))  # memory-mapped, read-only arrays


def on_three_threads(monkeypatch, call):
    """`call()` with the candidates split across three threads (each part's last candidate has no next one to read
    ahead)."""
    monkeypatch.setattr(single_query, "_MIN_VECTORS_PER_THREAD", 1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        return call()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("num_query_vectors", [1, 3, 4, 8, 11, 14, 16])
def test_scores_equal_the_torch_kernel_for_every_storage_and_budget(candidates, query, storage, num_query_vectors):
    # The thresholds as shipped: float32 at r_q 1 takes the dots along D, the rest the outer product (3, 11, 14:
    # empty slots); r_c 9, 12 and 33 leave vectors for a padded last group (after blocks of 8
    # and 16, read in place for float32), r_c 1, 3, 4 and 5 share steps between candidates.
    blocks = stored_blocks(candidates, storage)
    for num_candidate_vectors in sorted({budget[1] for budget in MMR_BUDGETS} | {3, 5, 9, 12, 33}):
        scores = single_query.single_query_scores(query[:num_query_vectors], blocks, num_candidate_vectors)
        expected = late_interaction_scores(query[None, :num_query_vectors], blocks, None, num_candidate_vectors)[0]
        assert scores.dtype == torch.float32 and scores.shape == (len(candidates),)
        torch.testing.assert_close(scores, expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize("kernel", ["outer product", "batch", "dots along D"])
def test_float16_bits_are_decoded_exactly_subnormals_included(candidates, monkeypatch, kernel):
    # One-hot queries read single stored elements back: every float16 value, subnormal or signed zero, exactly,
    # through each decoder (vcvtph2ps in the outer products, the bit trick and a scaled query along D).
    if kernel == "dots along D":
        monkeypatch.setattr(single_query, "_has_512_bit_vectors", lambda: False)
    blocks = stored_blocks(candidates, "float16")
    halves = blocks.blocks[0][:, 0].float()  # [N, D] the first vector of each candidate, as stored
    for element in (0, 1, 2, 3, 4, 5, 7):
        one_hot = torch.zeros(1, DIM)
        one_hot[0, element] = 1.0
        if kernel == "batch":
            scores = single_query.batch_scores(torch.stack([one_hot, one_hot]), blocks, 1)[1]
        else:
            scores = single_query.single_query_scores(one_hot, blocks, 1)
        assert torch.equal(scores, halves[:, element])


@pytest.mark.parametrize("storage, num_query_vectors", [("int8", 4), ("int8", 16), ("float32", 16)])
def test_thread_split_gives_identical_scores(candidates, query, monkeypatch, storage, num_query_vectors):
    # Each part's last candidate has no next one to read ahead: the same scores all the same.
    blocks = stored_blocks(candidates, storage)
    alone = single_query.single_query_scores(query[:num_query_vectors], blocks, 64)
    split = on_three_threads(
        monkeypatch, lambda: single_query.single_query_scores(query[:num_query_vectors], blocks, 64)
    )
    assert torch.equal(split, alone)


@pytest.mark.parametrize("storage", STORAGES)
def test_index_uses_the_kernel_for_one_query_and_torch_otherwise(candidates, query, storage, monkeypatch, tmp_path):
    loaded = saved_two_shard_index(candidates, storage, tmp_path)
    calls = []
    kernel = single_query.single_query_scores

    def counting(*arguments):
        calls.append(arguments[2])
        return kernel(*arguments)

    monkeypatch.setattr(single_query, "single_query_scores", counting)
    for r_q, r_c in MMR_BUDGETS:
        calls.clear()
        found = loaded.search(query[None], r_q, r_c, top_k=7, shortlist_size=None)
        assert calls == ([] if storage == "float32" and r_c == 1 else [r_c, r_c])
        monkeypatch.setenv("METAEMBED_NUMBA", "0")
        reference = loaded.search(query[None], r_q, r_c, top_k=7, shortlist_size=None)
        monkeypatch.delenv("METAEMBED_NUMBA")
        assert torch.equal(found.indices, reference.indices) and found.ids == reference.ids
        torch.testing.assert_close(found.scores, reference.scores, atol=2e-6, rtol=0)
    calls.clear()
    loaded.search(torch.stack([query, query]), 2, 4, shortlist_size=None)  # a batch: not the one-query kernel
    assert calls == []


def test_concurrent_single_query_searches_equal_sequential(candidates, query):
    index = MetaEmbedIndex(DIM, NUM_VECTORS, storage="int4")
    index.add(candidates)
    queries = [unit_vectors(1, 16, DIM, seed=seed) for seed in range(12)]
    budgets = [MMR_BUDGETS[slot % len(MMR_BUDGETS)] for slot in range(len(queries))]
    expected = [index.search(q, *budget, top_k=5, shortlist_size=None) for q, budget in zip(queries, budgets)]
    results = run_concurrently(
        [
            lambda query=query, budget=budget: index.search(query, *budget, top_k=5, shortlist_size=None)
            for query, budget in zip(queries, budgets)
        ]
    )
    for got, want in zip(results, expected):
        assert torch.equal(got.indices, want.indices) and torch.equal(got.scores, want.scores)


def test_supports_only_what_it_was_made_and_measured_for(candidates):
    assert single_query.supports(stored_blocks(candidates, "float16"), 16, 1)
    assert single_query.supports(stored_blocks(candidates, "int4"), 16, 64)
    assert single_query.supports(stored_blocks(candidates, "float32"), 16, 2)
    assert not single_query.supports(stored_blocks(candidates, "float32"), 1, 1)  # torch's matrix-vector product
    assert not single_query.supports(stored_blocks(candidates, "float32"), 17, 64)
    assert not single_query.supports(PrefixBlocks([candidates.to(torch.bfloat16)]), 1, 1)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("num_query_vectors", [5, 16])
def test_rows_are_scored_in_place_as_the_same_rows_of_all(candidates, query, storage, num_query_vectors):
    blocks = stored_blocks(candidates, storage)
    everything = single_query.single_query_scores(query[:num_query_vectors], blocks, 16)
    rows = torch.tensor([299, 0, 7, 7, 150, 1])  # any order, repeats allowed
    found = single_query.single_query_scores(query[:num_query_vectors], blocks, 16, rows)
    assert torch.equal(found, everything[rows])


def test_outer_product_compiles_to_512_bit_multiply_adds_fed_by_broadcast_loads(candidates, query, monkeypatch):
    # numba / LLVM internals (metaembed/search/_numba_codegen.py): LLVM vector code, 512-bit vectors legal.
    llvmlite_binding = pytest.importorskip("llvmlite.binding")
    if "+avx512f" not in llvmlite_binding.get_host_cpu_features().flatten():
        pytest.skip("no AVX-512 on this machine")
    monkeypatch.setattr(single_query, "_LANES_MIN_QUERY_VECTORS", dict.fromkeys(single_query._STORED_TYPES, 1))
    single_query.single_query_scores(query, stored_blocks(candidates, "float32"), 64)
    kernel = single_query._kernels().float32_lanes
    code = "\n".join(kernel.inspect_asm(signature) for signature in kernel.signatures)
    zmm_fma = r"vfmadd\w*ps\s+%zmm\d+, %zmm\d+, %zmm\d+"
    # G = 1: the element broadcast inside the multiply-add; G = 2, 4, 8: a broadcast load into the register it
    # feeds (on the load ports: no shuffles or element inserts per step); G = 16: a plain load.
    assert re.search(r"vfmadd\w*ps\s+[^\n]*\{1to16\}[^\n]*%zmm", code)
    for broadcast in (r"vbroadcastsd", r"vbroadcastf32x4", r"vbroadcastf(32x8|64x4)"):
        assert re.search(rf"{broadcast}\s+[^\n]*\((%\w+)?(,%\w+)*(,\d)?\), (%zmm\d+)\n(.*\n){{0,3}}.*{zmm_fma}", code)
    assert not re.search(r"vfmadd\w*ss|vinsertps", code)  # no scalar sums, no elements inserted one by one
    # float16: sixteen halves widened by one instruction (`widen_halves`), not the bit trick's shifts and masks.
    single_query.single_query_scores(query, stored_blocks(candidates, "float16"), 64)
    kernel = single_query._kernels().float16_lanes
    code = "\n".join(kernel.inspect_asm(signature) for signature in kernel.signatures)
    assert re.search(r"vcvtph2psx?\s+[^\n]*, %zmm\d+", code) and not re.search(r"vpslld\s+\$13", code)
    # 4-bit: sixteen codes looked up at once in the code values held in a register (`widen_nibbles`): vpermps, or
    # vpermd, the same lookup in the integer domain; residual4's float16 offsets widened by vcvtph2ps too.
    for storage in ("int4", "residual4"):
        single_query.single_query_scores(query, stored_blocks(candidates, storage), 64)
    kernel = single_query._kernels().four_bit_lanes
    code = "\n".join(kernel.inspect_asm(signature) for signature in kernel.signatures)
    assert re.search(r"vperm(ps|d)\s+[^\n]*%zmm\d+, %zmm\d+, %zmm\d+", code)
    assert re.search(r"vcvtph2psx?\s+[^\n]*, %zmm\d+", code) and not re.search(r"vpslld\s+\$13", code)
    # A batch's two groups per step: each broadcast element feeds both (in a register, not a memory operand).
    single_query.batch_scores(torch.stack([query, query]), stored_blocks(candidates, "float32"), 64)
    groups_step_max = single_query._kernels().groups_step_max
    code = "\n".join(groups_step_max.inspect_asm(signature) for signature in groups_step_max.signatures)
    assert re.search(r"vbroadcastss[^\n]*%zmm", code) and re.search(r"vfmadd\w*ps\s+%zmm", code)
    assert not re.search(r"vfmadd\w*ss", code)


@pytest.fixture
def outer_product_for_every_query(monkeypatch):
    monkeypatch.setattr(single_query, "_LANES_MIN_QUERY_VECTORS", dict.fromkeys(single_query._STORED_TYPES, 1))


@pytest.mark.usefixtures("outer_product_for_every_query")
@pytest.mark.parametrize("storage", STORAGES)
def test_every_lane_grouping_and_candidates_per_step_equal_the_torch_kernel(candidates, query, storage):
    # r_q 1..16: slots P = 1, 2, 4, 8, 16 of G = 16, 8, 4, 2, 1 lanes; r_c 1, 2, 3, 4, 5: 8, 4, 2, 2, 1
    # candidates per step (3 padded to 4, 5 to 8); 300 candidates: the last step holds fewer candidates.
    blocks = stored_blocks(candidates, storage)
    for num_query_vectors in range(1, 17):
        for num_candidate_vectors in (1, 2, 3, 4, 5, 7, 8, 12, 64):
            scores = single_query.single_query_scores(query[:num_query_vectors], blocks, num_candidate_vectors)
            expected = late_interaction_scores(query[None, :num_query_vectors], blocks, None, num_candidate_vectors)
            torch.testing.assert_close(scores, expected[0], atol=2e-6, rtol=0)


@pytest.mark.usefixtures("outer_product_for_every_query")
@pytest.mark.parametrize("storage", ["float32", "float16", "int4", "residual4"])
@pytest.mark.parametrize("dim", [20, 40])
def test_lane_groups_narrow_and_decoders_finish_one_by_one_where_sixteen_do_not_divide(storage, dim):
    # D = 20: G = 16 and 8 do not divide it, so one query vector takes 4 lanes (P = 4 slots, three empty). A
    # vector's D halves or D / 2 bytes of 4-bit codes are decoded sixteen at a time, then one by one (D 40: both).
    candidates = unit_vectors(40, 8, dim, seed=5)
    assert single_query._query_lanes(numpy.ones((1, 20), dtype=numpy.float32)).shape == (5, 16)
    blocks = stored_blocks(candidates, storage)
    for num_query_vectors, num_candidate_vectors in [(1, 1), (1, 8), (2, 4), (5, 3), (8, 8), (16, 5)]:
        query = unit_vectors(num_query_vectors, dim, seed=6)
        scores = single_query.single_query_scores(query, blocks, num_candidate_vectors)
        expected = late_interaction_scores(query[None], blocks, None, num_candidate_vectors)[0]
        torch.testing.assert_close(scores, expected, atol=2e-6, rtol=0)
        batch = torch.stack([query, query.flip(0)])
        scores = single_query.batch_scores(batch, blocks, num_candidate_vectors)
        expected = late_interaction_scores(batch, blocks, None, num_candidate_vectors)
        torch.testing.assert_close(scores, expected, atol=2e-6, rtol=0)


def test_query_lanes_hold_each_slots_consecutive_elements():
    query = numpy.arange(3 * 32, dtype=numpy.float32).reshape(3, 32)
    lanes = single_query._query_lanes(query)  # r_q 3: P = 4 slots of G = 4 lanes
    assert lanes.shape == (8, 16)
    for row, slot, offset in [(0, 0, 0), (2, 1, 3), (7, 2, 1)]:
        assert lanes[row, slot * 4 + offset] == query[slot, row * 4 + offset]
    assert not lanes[:, 12:].any()  # the fourth slot: a zero vector


@pytest.mark.usefixtures("outer_product_for_every_query")
@pytest.mark.parametrize("storage", ["float32", "float16", "int8", "residual4"])
@pytest.mark.parametrize("num_query_vectors, num_candidate_vectors", [(1, 1), (2, 4), (3, 3), (8, 2), (4, 16)])
def test_rows_and_thread_split_with_several_candidates_per_step(
    candidates, query, monkeypatch, storage, num_query_vectors, num_candidate_vectors
):
    # Shortlists of any length and order share steps as the whole collection does; each part of a thread split
    # ends with a step of fewer candidates.
    blocks = stored_blocks(candidates, storage)
    everything = single_query.single_query_scores(query[:num_query_vectors], blocks, num_candidate_vectors)
    for rows in (torch.tensor([299, 0, 7, 7, 150, 1, 3, 3, 200, 9, 11]), torch.tensor([5]), torch.arange(299, 0, -2)):
        found = single_query.single_query_scores(query[:num_query_vectors], blocks, num_candidate_vectors, rows)
        assert torch.equal(found, everything[rows])
    # Parts of 100 candidates: 12 steps of 8 and one of 4 at r_c 1.
    split = on_three_threads(
        monkeypatch, lambda: single_query.single_query_scores(query[:num_query_vectors], blocks, num_candidate_vectors)
    )
    assert torch.equal(split, everything)


@pytest.mark.parametrize("storage", ["float16", "residual4"])
def test_two_stage_reranks_in_place_as_torch_does(candidates, storage, monkeypatch):
    pytest.importorskip("faiss")
    index = MetaEmbedIndex(DIM, NUM_VECTORS, storage=storage)
    for part in torch.split(candidates, [90, 10, 200]):
        index.add(part)
    index.build_ann(num_vectors=2, kind="flat")
    queries = unit_vectors(6, 16, DIM, seed=4)
    calls = []
    kernel = single_query.single_query_scores
    monkeypatch.setattr(single_query, "single_query_scores", lambda *arguments: calls.append(1) or kernel(*arguments))
    for r_q, r_c in MMR_BUDGETS:
        calls.clear()
        found = index.search(queries, r_q, r_c, top_k=8, shortlist_size=30)
        assert calls  # the shortlist was scored by the one-query kernel
        monkeypatch.setenv("METAEMBED_NUMBA", "0")
        reference = index.search(queries, r_q, r_c, top_k=8, shortlist_size=30)
        monkeypatch.delenv("METAEMBED_NUMBA")
        assert torch.equal(found.indices, reference.indices)
        torch.testing.assert_close(found.scores, reference.scores, atol=2e-6, rtol=0)


@pytest.mark.parametrize("k", [1, 3, 10, 50])
def test_top_k_columns_is_the_merge_order_ties_included(k):
    generator = torch.Generator().manual_seed(k)
    # Few distinct values: ties everywhere, at the k-th place too; -inf, the lowest score, among them.
    scores = torch.randint(0, 6, (50,), generator=generator).float() / 4
    scores[torch.randperm(50, generator=generator)[:3]] = float("-inf")
    expected_scores, expected_columns = merge_top_k(None, None, scores.unsqueeze(0), 0, k)
    found_scores, found_columns = single_query.top_k_columns(scores, k)
    assert found_columns.dtype == torch.int64 and found_scores.dtype == torch.float32
    assert torch.equal(found_columns, expected_columns[0]) and torch.equal(found_scores, expected_scores[0])
    # A plain reference: sort by (score descending, column ascending).
    reference = sorted(range(50), key=lambda column: (-float(scores[column]), column))[:k]
    assert found_columns.tolist() == reference


@pytest.mark.parametrize("k", [1, 2, 5, 100])
def test_top_k_columns_ranks_nan_first_as_torch_does_and_checks_k(k):
    # NaN (from an overflow) anywhere, the first columns included, above every number as in torch's top-k, and
    # NaNs among themselves by the lower column; k = 100 takes torch's top-k (above 64), whose NaNs tie arbitrarily.
    scores = torch.tensor([1.0, float("nan"), 3.0, 3.0, float("nan"), -2.0, 0.5] * 20)
    found_scores, found_columns = single_query.top_k_columns(scores, k)
    reference = sorted(range(140), key=lambda c: (not scores[c].isnan(), -float(scores[c].nan_to_num()), c))[:k]
    numbers = [column for column in reference if not scores[column].isnan()]
    if k <= single_query._MAX_ONE_PASS_TOP_K:
        assert found_columns.tolist() == reference
    else:
        assert sorted(found_columns[:40].tolist()) == reference[:40] and found_columns[40:].tolist() == numbers
    torch.testing.assert_close(found_scores, scores[found_columns], equal_nan=True, atol=0, rtol=0)
    for bad in (0, 141):
        with pytest.raises(ValueError, match=r"k must lie in 1\.\.140"):
            single_query.top_k_columns(scores, bad)


# Batches: every query's vectors side by side in the lanes of the outer product (single_query.batch_scores).


@pytest.fixture(scope="module")
def queries():
    return unit_vectors(32, 16, DIM, seed=5)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("num_queries", [1, 2, 3, 17, 32])
def test_batch_scores_equal_the_torch_kernel_and_each_query_alone(candidates, queries, storage, num_queries):
    # r_q * Q lanes: groups of sixteen shared by several queries (r_q 3), a query across two groups (r_q 11), an
    # odd number of groups (padded with an empty one); r_c 1, 2 and 4 share a step of eight vectors among
    # candidates (3 is padded to 4), 9 and 33 are padded after blocks of 8 and 16; tiles end part-filled.
    blocks = stored_blocks(candidates, storage)
    budgets = [(1, 1), (5, 2), (7, 3), (2, 4), (3, 9), (4, 8), (8, 16), (11, 33), (16, 64)]
    batch = queries[:num_queries]
    for r_q, r_c in budgets:
        scores = single_query.batch_scores(batch[:, :r_q], blocks, r_c)
        expected = late_interaction_scores(batch[:, :r_q], blocks, None, r_c)
        assert scores.dtype == torch.float32 and scores.shape == (num_queries, len(candidates))
        torch.testing.assert_close(scores, expected, atol=2e-6, rtol=0)
        for row in {0, num_queries // 2, num_queries - 1}:
            alone = single_query.batch_scores(batch[row : row + 1, :r_q], blocks, r_c)
            assert torch.equal(scores[row], alone[0])


@pytest.mark.parametrize("storage", STORAGES)
def test_a_query_in_a_batch_scores_as_the_one_query_kernel_from_nine_query_vectors(candidates, queries, storage):
    # From r_q 9 one query takes one lane per query vector (G = 1), as a batch does: the same dots, maxima and
    # sums in the same order, so a search's scores do not depend on how many queries came with it. (Below 9 the
    # one-query kernel folds G lanes per query vector: equal to float32 rounding.)
    blocks = stored_blocks(candidates, storage)
    for r_q in (9, 12, 16):
        for r_c in (4, 8, 16, 64):
            batch = single_query.batch_scores(queries[:3, :r_q], blocks, r_c)
            for row in range(3):
                assert torch.equal(batch[row], single_query.single_query_scores(queries[row, :r_q], blocks, r_c))


@pytest.mark.parametrize("storage", STORAGES)
def test_machines_without_avx512_take_the_dots_along_d_with_the_same_scores(candidates, query, storage, monkeypatch):
    monkeypatch.setattr(single_query, "_has_512_bit_vectors", lambda: False)
    blocks = stored_blocks(candidates, storage)
    assert not single_query.batch_supports(blocks, 32, 64)
    for r_q, r_c in [(1, 1), (2, 4), (5, 3), (8, 16), (16, 64)]:
        scores = single_query.single_query_scores(query[:r_q], blocks, r_c)
        expected = late_interaction_scores(query[None, :r_q], blocks, None, r_c)[0]
        torch.testing.assert_close(scores, expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize("storage", ["float32", "int4"])
def test_batch_thread_split_and_rows_give_identical_scores(candidates, queries, monkeypatch, storage):
    blocks = stored_blocks(candidates, storage)
    alone = single_query.batch_scores(queries[:5, :7], blocks, 16)
    rows = torch.tensor([299, 0, 7, 7, 150, 1])  # any order, repeats allowed
    assert torch.equal(single_query.batch_scores(queries[:5, :7], blocks, 16, rows), alone[:, rows])
    split = on_three_threads(monkeypatch, lambda: single_query.batch_scores(queries[:5, :7], blocks, 16))
    assert torch.equal(split, alone)


def test_batch_supports_only_what_was_measured_faster(candidates):
    assert single_query.batch_supports(stored_blocks(candidates, "int8"), 32, 8)
    assert single_query.batch_supports(stored_blocks(candidates, "residual4"), 2, 64)
    assert single_query.batch_supports(stored_blocks(candidates, "int4"), 32, 2)
    assert single_query.batch_supports(stored_blocks(candidates, "float32"), 32, 24)
    assert not single_query.batch_supports(stored_blocks(candidates, "float16"), 32, 4)  # as fast as torch's GEMM
    for padded in (1, 3, 5, 9, 33):  # torch's GEMM: no padded vectors
        assert not single_query.batch_supports(stored_blocks(candidates, "int8"), 32, padded)
    assert not single_query.batch_supports(stored_blocks(candidates, "float32"), 1, 64)  # the one-query kernel
    assert not single_query.batch_supports(PrefixBlocks([candidates.to(torch.bfloat16)]), 32, 64)


@pytest.mark.parametrize("storage", STORAGES)
def test_index_searches_batches_with_the_kernel_as_torch_does(candidates, queries, storage, monkeypatch, tmp_path):
    loaded = saved_two_shard_index(candidates, storage, tmp_path)
    # Chunks of 3 * 17 scores: candidates tied across chunk and shard borders still rank lower index first.
    monkeypatch.setattr("metaembed.search.index._BATCH_CHUNK_SCORES", 3 * 17)
    batch = torch.cat([queries[:16], queries[:1]])  # the last query repeats the first: the same results
    calls = []
    kernel = single_query.batch_scores
    monkeypatch.setattr(single_query, "batch_scores", lambda *arguments: calls.append(1) or kernel(*arguments))
    for r_q, r_c in MMR_BUDGETS:
        calls.clear()
        found = loaded.search(batch, r_q, r_c, top_k=7, shortlist_size=None)
        kernel_used = r_c >= 8 or (r_c > 1 and storage not in ("float32", "float16"))
        assert len(calls) == (-(-170 // 3) + -(-130 // 3) if kernel_used else 0)
        monkeypatch.setenv("METAEMBED_NUMBA", "0")
        reference = loaded.search(batch, r_q, r_c, top_k=7, shortlist_size=None)
        monkeypatch.delenv("METAEMBED_NUMBA")
        assert torch.equal(found.indices, reference.indices) and found.ids == reference.ids
        torch.testing.assert_close(found.scores, reference.scores, atol=2e-6, rtol=0)
        assert torch.equal(found.scores[-1], found.scores[0]) and torch.equal(found.indices[-1], found.indices[0])


def test_concurrent_batch_searches_equal_sequential(candidates):
    index = MetaEmbedIndex(DIM, NUM_VECTORS, storage="int8")
    index.add(candidates)
    batches = [unit_vectors(3 + seed, 16, DIM, seed=seed) for seed in range(8)]
    budgets = [(4, 8), (8, 16), (16, 64), (11, 33)]
    expected = [
        index.search(batch, *budgets[slot % 4], top_k=5, shortlist_size=None) for slot, batch in enumerate(batches)
    ]
    results = run_concurrently(
        [
            lambda batch=batch, budget=budgets[slot % 4]: index.search(batch, *budget, top_k=5, shortlist_size=None)
            for slot, batch in enumerate(batches)
        ]
    )
    for got, want in zip(results, expected):
        assert torch.equal(got.indices, want.indices) and torch.equal(got.scores, want.scores)


def test_threads_split_by_candidate_vectors_so_a_short_rerank_at_a_large_budget_is_shared(
    candidates, query, monkeypatch
):
    # 300 candidates: below 2,048 candidates, but at r_c 64 19,200 vectors, worth two threads; at r_c 1 not.
    submitted = []
    executor = single_query._executor()

    class CountingExecutor:
        def submit(self, function, *arguments):
            submitted.append(arguments[-3:-1])  # (start, end)
            return executor.submit(function, *arguments)

    monkeypatch.setattr(single_query, "_executor", CountingExecutor)
    blocks = stored_blocks(candidates, "float16")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        alone = single_query.single_query_scores(query, blocks, 64)
        assert submitted == [(0, 150), (150, 300)]
        submitted.clear()
        single_query.single_query_scores(query, blocks, 1)
        assert submitted == []
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(alone, late_interaction_scores(query[None], blocks, None, 64)[0], atol=2e-6, rtol=0)
