"""MetaEmbedIndex: exact search against a plain reference, storage dtypes, memory-mapped shards, two-stage
search, bad input, threads; the Qdrant adapter against the index."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from metaembed.search.index import MetaEmbedIndex
from metaembed.testing import run_concurrently
from scoring_metaembed import MMR_BUDGETS

DIM, NUM_VECTORS = 16, 64


def unit_vectors(*shape: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


def reference_top_k(queries, candidates, r_q, r_c, k):
    """Plain MaxSim: sum over the first r_q query vectors of the max over the first r_c candidate vectors."""
    scores = torch.einsum("qid,cjd->qcij", queries[:, :r_q].double(), candidates[:, :r_c].double())
    scores = scores.amax(dim=3).sum(dim=2)
    top = scores.topk(k, dim=1)
    return top.values, top.indices


@pytest.fixture(scope="module")
def candidates():
    return unit_vectors(700, NUM_VECTORS, DIM, seed=0)


@pytest.fixture(scope="module")
def queries():
    return unit_vectors(5, 16, DIM, seed=1)


def build(candidates, storage="float32", metadata=True):
    index = MetaEmbedIndex(DIM, NUM_VECTORS, storage=storage)
    ids = [f"doc-{i}" for i in range(len(candidates))]
    values = [{"n": i} for i in range(len(candidates))] if metadata else None
    split = len(candidates) * 3 // 7  # two adds: results must not depend on how the candidates were added
    for part in (slice(0, split), slice(split, None)):
        index.add(candidates[part], ids[part], None if values is None else values[part])
    return index


@pytest.mark.parametrize("budget", MMR_BUDGETS)
def test_exhaustive_search_matches_reference(candidates, queries, budget):
    index = build(candidates)
    r_q, r_c = budget
    results = index.search(queries, r_q, r_c, top_k=10)
    expected_scores, expected_indices = reference_top_k(queries, candidates, r_q, r_c, 10)
    assert results.scores.dtype == torch.float32 and results.indices.dtype == torch.int64
    assert results.scores.shape == (5, 10)
    torch.testing.assert_close(results.scores.double(), expected_scores, atol=1e-5, rtol=0)
    assert torch.equal(results.indices, expected_indices)
    assert results.ids == [[f"doc-{int(i)}" for i in row] for row in expected_indices]
    assert index.metadata(int(results.indices[0, 0])) == {"n": int(results.indices[0, 0])}


@pytest.mark.parametrize(
    ("storage", "tolerance"), [("float16", 1e-3), ("int8", 5e-3), ("int4", 0.07), ("residual4", 0.1)]
)
def test_storage_dtypes_dequantise_closely_and_search_what_is_stored(candidates, queries, storage, tolerance):
    index = build(candidates, storage)
    stored = index.get_embeddings(range(len(candidates)))
    assert stored.dtype == torch.float32
    assert (stored - candidates).abs().max() <= tolerance
    results = index.search(queries, 4, 8, top_k=10)
    expected_scores, expected_indices = reference_top_k(queries, stored, 4, 8, 10)
    torch.testing.assert_close(results.scores.double(), expected_scores, atol=1e-5, rtol=0)
    assert torch.equal(results.indices, expected_indices)


def test_int8_is_a_quarter_and_int4_an_eighth_of_float32_plus_scales(candidates, tmp_path):
    sizes = {}
    for storage in ("float32", "float16", "int8", "int4", "residual4"):
        build(candidates, storage).save(str(tmp_path / storage))
        folder = tmp_path / storage
        sizes[storage] = sum(os.path.getsize(path) for path in folder.rglob("*.safetensors"))
    payload = len(candidates) * NUM_VECTORS * DIM
    assert sizes["float32"] == pytest.approx(4 * payload, rel=0.01)
    assert sizes["float16"] == pytest.approx(2 * payload, rel=0.01)
    assert sizes["int8"] == pytest.approx(payload + 4 * len(candidates) * NUM_VECTORS, rel=0.01)
    assert sizes["int4"] == pytest.approx(payload / 2 + 4 * len(candidates) * NUM_VECTORS, rel=0.01)
    # residual4: int4's bytes plus one float16 mean vector per candidate.
    assert sizes["residual4"] == pytest.approx(sizes["int4"] + 2 * len(candidates) * DIM, rel=0.01)


# The 16 values of residual4's 4-bit codes: the Lloyd-Max quantiser of a standard normal variable.
LLOYD_MAX_LEVELS = [0.1284, 0.3881, 0.6568, 0.9424, 1.2562, 1.6181, 2.0690, 2.7326]


def reference_quantisation(candidates: torch.Tensor, storage: str) -> torch.Tensor:
    """What a quantised index stores, decoded, computed plainly: the nearest code per element (max-abs scale for
    int8 / int4; for residual4 the residual from the candidate's float16 mean at an RMS scale), then the
    least-squares scale for those codes."""
    offsets = torch.zeros(len(candidates), 1, DIM)
    if storage == "residual4":
        offsets = candidates.mean(dim=1, keepdim=True).half().float()
        residuals = candidates - offsets
        levels = torch.tensor([-value for value in reversed(LLOYD_MAX_LEVELS)] + LLOYD_MAX_LEVELS)
        spread = residuals.pow(2).mean(dim=-1, keepdim=True).sqrt()
        values = levels[(residuals / spread).unsqueeze(-1).sub(levels).abs().argmin(dim=-1)]
    else:
        residuals = candidates
        levels = 127 if storage == "int8" else 7
        values = torch.round(candidates / (candidates.abs().amax(dim=-1, keepdim=True) / levels))
    scales = (residuals * values).sum(dim=-1, keepdim=True) / values.pow(2).sum(dim=-1, keepdim=True)
    return offsets + values * scales


@pytest.mark.parametrize("storage", ["int8", "int4", "residual4"])
def test_quantised_storage_decodes_to_the_plain_reference_and_searches_it(candidates, queries, storage):
    index = build(candidates, storage)
    expected = reference_quantisation(candidates, storage)
    stored = index.get_embeddings(range(len(candidates)))
    torch.testing.assert_close(stored, expected, atol=1e-6, rtol=0)
    # The least-squares scale: each vector's decoding error is orthogonal to what is decoded (for residual4,
    # to the decoded residual), so a query along the vector sees it only to second order.
    offsets = 0 if storage != "residual4" else candidates.mean(dim=1, keepdim=True).half().float()
    assert ((candidates - stored) * (stored - offsets)).sum(dim=-1).abs().max() < 1e-6
    for budget in ((1, 1), (4, 8), (16, 64)):
        results = index.search(queries, *budget, top_k=10)
        expected_scores, expected_indices = reference_top_k(queries, expected, *budget, 10)
        torch.testing.assert_close(results.scores.double(), expected_scores, atol=1e-5, rtol=0)
        assert torch.equal(results.indices, expected_indices)


@pytest.mark.parametrize("storage", ["int4", "residual4"])
def test_four_bit_storage_needs_an_even_dim(storage):
    with pytest.raises(ValueError, match=f"{storage} storage packs two values per byte: dim must be even"):
        MetaEmbedIndex(7, 4, storage=storage)


@pytest.mark.parametrize("storage", ["float32", "float16", "int8", "int4", "residual4"])
def test_save_load_round_trip_is_exact_and_memory_mapped(candidates, queries, tmp_path, storage):
    index = build(candidates, storage)
    index.save(str(tmp_path), max_shard_candidates=256)
    shard_files = sorted(tmp_path.rglob("*.safetensors"))
    # Each add is split on its own: 300 -> 256 + 44, 400 -> 256 + 144.
    assert [path.name for path in shard_files] == [f"shard-0000{i}-of-00004.safetensors" for i in range(4)]
    loaded = MetaEmbedIndex.load(str(tmp_path))
    assert len(loaded) == len(index) and loaded.ids == index.ids and loaded.storage == storage
    assert torch.equal(loaded.get_embeddings(range(len(index))), index.get_embeddings(range(len(index))))
    # Prefix blocks (vectors 0, 1, 2-3, 4-7, ...), each a view into a mapping of the whole file, not a copy.
    blocks = loaded._shards[0].blocks
    assert [block.shape[1] for block in blocks] == [1, 1, 2, 4, 8, 16, 32]
    assert all(block.untyped_storage().nbytes() == os.path.getsize(shard_files[0]) for block in blocks)
    for r_q, r_c in ((1, 1), (16, 64)):
        before, after = index.search(queries, r_q, r_c, top_k=7), loaded.search(queries, r_q, r_c, top_k=7)
        assert torch.equal(before.scores, after.scores) and torch.equal(before.indices, after.indices)
    assert loaded.metadata(5) == {"n": 5} and loaded.position("doc-650") == 650
    not_mapped = MetaEmbedIndex.load(str(tmp_path), mmap=False)
    assert torch.equal(not_mapped.get_embeddings([0, 699]), index.get_embeddings([0, 699]))


def test_load_refuses_missing_shards_and_foreign_folders(candidates, tmp_path):
    build(candidates).save(str(tmp_path), max_shard_candidates=300)
    (missing,) = tmp_path.glob("gen-*/shard-00001-of-00003.safetensors")
    os.remove(missing)
    with pytest.raises(FileNotFoundError, match=rf"{missing} is missing"):
        MetaEmbedIndex.load(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"no index\.json"):
        MetaEmbedIndex.load(str(tmp_path / "nowhere"))


def test_two_stage_search_reranks_the_ann_shortlist_exactly(candidates, queries):
    index = build(candidates)
    index.build_ann()
    # A shortlist of everything is the exhaustive search.
    full = index.search(queries, 16, 64, top_k=10, shortlist_size=len(candidates))
    exhaustive = index.search(queries, 16, 64, top_k=10, shortlist_size=None)
    assert torch.equal(full.indices, exhaustive.indices)
    torch.testing.assert_close(full.scores, exhaustive.scores, atol=1e-5, rtol=0)
    # A short list: the first stage finds the first vectors nearest the query's first vector ...
    shortlists = index.ann_search(queries, 50)
    first_vector_scores = queries[:, 0] @ candidates[:, 0].T
    for shortlist, scores in zip(shortlists, first_vector_scores):
        assert len(shortlist) == 50 == len(set(shortlist.tolist()))
        brute_force = set(scores.topk(50).indices.tolist())
        assert len(brute_force & set(shortlist.tolist())) >= 45  # approximate, but close on 700 points
    # ... and the second stage scores those exactly, keeping the best.
    results = index.search(queries, 16, 64, top_k=10, shortlist_size=50, ann_query_vectors=1)
    for row, shortlist in enumerate(shortlists):
        expected_scores, expected_positions = reference_top_k(queries[row : row + 1], candidates[shortlist], 16, 64, 10)
        assert torch.equal(results.indices[row], shortlist[expected_positions[0]])
        torch.testing.assert_close(results.scores[row].double(), expected_scores[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("storage", ["float16", "int8", "int4", "residual4"])
def test_two_stage_reranks_the_stored_vectors_of_every_storage_across_shards(candidates, queries, storage):
    index = build(candidates, storage)  # two shards: a shortlist spans both
    index.build_ann(kind="flat")
    stored = index.get_embeddings(range(len(candidates)))
    shortlists = index.ann_search(queries, 60)
    results = index.search(queries, 16, 64, top_k=10, shortlist_size=60, ann_query_vectors=1)
    for row, shortlist in enumerate(shortlists):
        assert {int(position) >= 300 for position in shortlist} == {False, True}
        expected_scores, expected_positions = reference_top_k(queries[row : row + 1], stored[shortlist], 16, 64, 10)
        assert torch.equal(results.indices[row], shortlist[expected_positions[0]])
        torch.testing.assert_close(results.scores[row].double(), expected_scores[0], atol=1e-5, rtol=0)


def test_flat_first_stage_is_the_exact_union_over_query_and_candidate_vectors(candidates, queries, tmp_path):
    index = build(candidates)
    index.build_ann(num_vectors=4, kind="flat")
    shortlists = index.ann_search(queries, 40, num_query_vectors=2)
    # Reference: per query vector, the 40 best of all first-4 candidate vectors; their owners, each once.
    similarities = torch.einsum("qmd,cvd->qmcv", queries[:, :2], candidates[:, :4]).flatten(2)
    for shortlist, per_query in zip(shortlists, similarities):
        owners = {int(vector) // 4 for vector_scores in per_query for vector in vector_scores.topk(40).indices}
        assert len(shortlist) == len(set(shortlist.tolist())) == len(owners)
        assert set(shortlist.tolist()) == owners
    index.save(str(tmp_path))
    loaded = MetaEmbedIndex.load(str(tmp_path))
    assert loaded._ann_settings["num_vectors"] == 4 and loaded._ann is not None
    reloaded = loaded.ann_search(queries, 40, num_query_vectors=2)
    assert [s.tolist() for s in reloaded] == [s.tolist() for s in shortlists]
    results = loaded.search(queries, 16, 64, top_k=10, shortlist_size=40, ann_query_vectors=2)
    for row, shortlist in enumerate(shortlists):
        _, expected = reference_top_k(queries[row : row + 1], candidates[shortlist], 16, 64, 10)
        assert torch.equal(results.indices[row], shortlist[expected[0]])


def test_two_stage_pads_when_the_shortlist_has_fewer_candidates_than_top_k(queries):
    # One candidate owns all 64 vectors nearest the query: 5 neighbours are 1 candidate.
    candidates = unit_vectors(30, NUM_VECTORS, DIM, seed=3)
    candidates[7] = queries[0, 0]
    index = MetaEmbedIndex(DIM, NUM_VECTORS)
    index.add(candidates)
    index.build_ann(num_vectors=NUM_VECTORS, kind="flat")
    results = index.search(queries[:1], 1, 64, top_k=5, shortlist_size=5)
    assert results.indices[0].tolist() == [7, -1, -1, -1, -1] and results.ids[0] == [7, None, None, None, None]
    assert torch.isinf(results.scores[0, 1:]).all() and results.scores[0, 0] == pytest.approx(1.0)


def test_bad_input_names_the_problem_and_adds_nothing(candidates, queries):
    index = build(candidates[:10], metadata=False)
    cases = [
        (lambda: index.add(candidates[:2, :, :8]), ValueError, "dim 8"),
        (lambda: index.add(candidates[:2, :4]), ValueError, "4 vectors per item"),
        (lambda: index.add(candidates[:2], ids=["a", "doc-3"]), ValueError, r"ids\[1\] = 'doc-3' is already"),
        (lambda: index.add(candidates[:2], ids=["a", "a"]), ValueError, r"ids\[1\] = 'a'"),
        (lambda: index.add(candidates[:2], ids=["a", 1.5]), TypeError, r"ids\[1\]"),
        (lambda: index.add(candidates[:2], ids=["a"]), ValueError, "1 ids for 2"),
        (lambda: index.add(candidates[:2], metadata=[{}, {"x": object()}]), TypeError, r"metadata\[1\]"),
        (lambda: index.add(torch.cat([candidates[:1], torch.full((1, 64, 16), float("nan"))])), ValueError, r"\[1\]"),
        (lambda: index.add(candidates[:0]), ValueError, "empty"),
        (lambda: index.add("vectors"), TypeError, "float tensor"),
        (lambda: index.search(queries[0]), ValueError, "unsqueeze"),
        (lambda: index.search(queries, 17, 8), ValueError, "num_query_vectors"),
        (lambda: index.search(queries, 1, 65), ValueError, "num_candidate_vectors"),
        (lambda: index.search(queries, 1, 1, top_k=0), ValueError, "top_k"),
        (lambda: index.search(queries, 1, 1, top_k=10, shortlist_size=5), ValueError, "at least top_k"),
        (lambda: index.search(queries, 2, 4, shortlist_size=20, ann_query_vectors=3), ValueError, "ann_query_vectors"),
        (lambda: index.build_ann(kind="ivf"), ValueError, "kind"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    assert len(index) == 10 and index.ids == [f"doc-{i}" for i in range(10)]
    with pytest.raises(ValueError, match="empty"):
        MetaEmbedIndex(DIM, NUM_VECTORS).search(queries)
    with pytest.raises(ValueError, match="storage"):
        MetaEmbedIndex(DIM, NUM_VECTORS, storage="bfloat8")


def test_concurrent_searches_equal_sequential(candidates, queries):
    index = build(candidates, "int8")
    index.build_ann()
    settings = [(1, 1, None), (4, 8, None), (16, 64, 40), (2, 4, 100)] * 3
    expected = [index.search(queries, r_q, r_c, 5, shortlist) for r_q, r_c, shortlist in settings]
    results = run_concurrently(
        [lambda setting=setting: index.search(queries, *setting[:2], 5, setting[2]) for setting in settings]
    )
    for got, want in zip(results, expected):
        assert torch.equal(got.indices, want.indices) and torch.equal(got.scores, want.scores)


def test_saved_index_files_are_json_and_safetensors_only(candidates, tmp_path):
    index = MetaEmbedIndex(DIM, NUM_VECTORS)
    index.add(candidates[:10])
    index.add(candidates[10:20])
    index.build_ann()
    index.save(str(tmp_path))
    (generation,) = (name for name in os.listdir(tmp_path) if name.startswith("gen-"))
    assert sorted(os.listdir(tmp_path)) == [generation, "index.json", "index.lock"]
    shards = [f"shard-0000{i}-of-00002.{extension}" for i in range(2) for extension in ("json", "safetensors")]
    assert sorted(os.listdir(tmp_path / generation)) == ["ann.faiss", *shards]
    manifest = json.loads((tmp_path / "index.json").read_text())
    assert manifest["dim"] == DIM and manifest["num_vectors"] == NUM_VECTORS and manifest["storage"] == "float32"
    assert manifest["generation"] == generation and [entry["name"] for entry in manifest["shards"]] == [
        "shard-00000-of-00002",
        "shard-00001-of-00002",
    ]


# ------------------------------------------------------------------------------------------------------------
# Qdrant
# ------------------------------------------------------------------------------------------------------------


def test_qdrant_local_mode_returns_the_index_results(candidates, queries):
    import qdrant_client  # in the [test] extra: a missing install fails here, not skips

    from metaembed.search.qdrant import MetaEmbedQdrant

    index = build(candidates[:200])
    store = MetaEmbedQdrant(qdrant_client.QdrantClient(":memory:"), "metaembed")
    store.create(DIM)
    store.add_index(index)
    for r_q, r_c in MMR_BUDGETS:
        expected = index.search(queries, r_q, r_c, top_k=10)
        got, payloads = store.search(queries, r_q, r_c, top_k=10, with_payload=True)
        assert got.ids == expected.ids
        torch.testing.assert_close(got.scores, expected.scores, atol=1e-5, rtol=0)
        assert payloads[0][0] == {"n": int(expected.indices[0, 0])}
    with pytest.raises(ValueError, match="not stored"):
        store.search(queries, 1, 2)
    with pytest.raises(ValueError, match="up to 64"):
        store.add(candidates[:2, :8])


def test_add_copies_the_callers_memory(candidates, queries):
    source = candidates[:20].clone()
    index = MetaEmbedIndex(DIM, NUM_VECTORS)
    index.add(source)
    array = candidates[20:30].clone().numpy()
    index.add(array)
    before = index.search(queries, 4, 8, top_k=5)
    source.zero_()  # the caller reuses its buffers
    array[:] = float("nan")
    assert torch.equal(index.get_embeddings(range(30)), candidates[:30])
    after = index.search(queries, 4, 8, top_k=5)
    assert torch.equal(before.indices, after.indices) and torch.equal(before.scores, after.scores)


def test_int8_search_over_several_dequantised_blocks(candidates, queries, monkeypatch):
    import scoring_metaembed

    whole = build(candidates, "int8").search(queries, 16, 64, top_k=10)
    monkeypatch.setattr(scoring_metaembed, "_STAGING_ELEMENTS_CPU", 64 * DIM * 50)  # chunks of 50 candidates
    blocked = build(candidates, "int8").search(queries, 16, 64, top_k=10)
    assert torch.equal(blocked.indices, whole.indices)
    torch.testing.assert_close(blocked.scores, whole.scores, atol=1e-5, rtol=0)


def test_save_checks_its_argument_and_keeps_the_old_index_on_failure(candidates, tmp_path, monkeypatch):
    from metaembed.search import storage

    index = build(candidates)
    index.save(str(tmp_path))
    for bad in (-1, 0, 2.5, True):
        with pytest.raises(ValueError, match="max_shard_candidates"):
            index.save(str(tmp_path), max_shard_candidates=bad)

    def failing_write(*arguments, **options):
        raise OSError("disk full")

    monkeypatch.setattr(storage, "write_shard", failing_write)
    with pytest.raises(OSError, match="disk full"):
        build(candidates[:10]).save(str(tmp_path))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="empty"):
        MetaEmbedIndex(DIM, NUM_VECTORS).save(str(tmp_path))
    loaded = MetaEmbedIndex.load(str(tmp_path))
    assert loaded.ids == index.ids
    # Saving a memory-mapped index over its own files works, and removes the failed save's leftovers.
    loaded.save(str(tmp_path), max_shard_candidates=500)
    assert torch.equal(MetaEmbedIndex.load(str(tmp_path)).get_embeddings([0, 699]), index.get_embeddings([0, 699]))
    assert len(list(tmp_path.glob("gen-*"))) == 1


def test_ann_settings_survive_save_load_and_add(candidates, queries, tmp_path):
    index = build(candidates)
    index.build_ann(num_vectors=4, kind="flat")
    index.save(str(tmp_path))
    loaded = MetaEmbedIndex.load(str(tmp_path))
    assert loaded._ann_settings == {"num_vectors": 4, "kind": "flat", "hnsw_neighbors": 32, "ef_search": None}
    loaded.add(unit_vectors(3, NUM_VECTORS, DIM, seed=9), ids=["x", "y", "z"])
    assert loaded._ann is None  # dropped by add, rebuilt on first use with the same settings
    loaded.ann_search(queries, 10)
    assert loaded._ann.ntotal == 703 * 4 and type(loaded._ann).__name__ == "IndexFlatIP"


def test_queries_with_nan_are_refused(candidates, queries):
    index = build(candidates[:20], metadata=False)
    bad = queries.clone()
    bad[3, 2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"queries\[3\] contains NaN"):
        index.search(bad)
    with pytest.raises(ValueError, match=r"queries\[3\] contains NaN"):
        index.search(bad, 2, 4, top_k=2, shortlist_size=5)


def test_first_use_builds_the_ann_once_under_concurrent_searches(candidates, queries, monkeypatch):
    index = build(candidates)
    expected = build(candidates).search(queries, 4, 8, 5, shortlist_size=50)
    builds = []
    original = MetaEmbedIndex.build_ann

    def counting_build(self, *arguments, **options):
        builds.append(1)
        return original(self, *arguments, **options)

    monkeypatch.setattr(MetaEmbedIndex, "build_ann", counting_build)
    results = run_concurrently([lambda: index.search(queries, 4, 8, 5, shortlist_size=50)] * 6)
    assert len(builds) == 1
    for result in results:
        assert torch.equal(result.indices, expected.indices)


def test_memory_map_refuses_a_truncated_shard(candidates, tmp_path):
    build(candidates[:10], metadata=False).save(str(tmp_path))
    shard = next(tmp_path.glob("gen-*/shard-00000-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"{shard} has \d+ bytes, index.json records"):
        MetaEmbedIndex.load(str(tmp_path))


def test_qdrant_collection_reopened_by_another_writer_keeps_existing_points(candidates, queries):
    import qdrant_client  # in the [test] extra: a missing install fails here, not skips

    from metaembed.search.qdrant import MetaEmbedQdrant

    client = qdrant_client.QdrantClient(":memory:")
    first = MetaEmbedQdrant(client, "shared", candidate_vector_counts=[8])
    first.create(DIM)
    first.add(candidates[:3], ids=["a0", "a1", "a2"])
    second = MetaEmbedQdrant(client, "shared", candidate_vector_counts=[8])  # e.g. another process
    second.add(candidates[3:5], ids=["b0", "b1"])
    second.add(candidates[5:6])  # default id: the next position, 5
    assert client.count("shared").count == 6
    index = MetaEmbedIndex(DIM, NUM_VECTORS)
    index.add(candidates[:6], ids=["a0", "a1", "a2", "b0", "b1", 5])
    assert second.search(queries, 2, 8, top_k=6).ids == index.search(queries, 2, 8, top_k=6).ids
    second.add(candidates[6:7], ids=["a1"])  # the same id again replaces that point
    assert client.count("shared").count == 6


def test_saved_files_get_the_usual_file_mode(candidates, tmp_path):
    # safetensors' writer leaves 0600; a shared index must stay readable as any new file under the umask is.
    build(candidates, "int8").save(str(tmp_path / "index"))
    (tmp_path / "probe").touch()
    usual = os.stat(tmp_path / "probe").st_mode & 0o777
    modes = {path.name: os.stat(path).st_mode & 0o777 for path in (tmp_path / "index").rglob("*") if path.is_file()}
    assert modes and set(modes.values()) == {usual}, modes


# ------------------------------------------------------------------------------------------------------------
# The on-disk format: old layout, foreign files, a second writer, files that lie
# ------------------------------------------------------------------------------------------------------------


def to_whole_tensors(shard_path):
    """Rewrite a shard in the tensor layout of versions 1 and 2: one "embeddings" [n, R, D] (and "scales" [n, R])
    instead of prefix blocks."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(shard_path))
    count = sum(name.startswith("embeddings.") for name in tensors)
    whole = {"embeddings": torch.cat([tensors[f"embeddings.{number}"] for number in range(count)], dim=1)}
    if "scales.0" in tensors:
        whole["scales"] = torch.cat([tensors[f"scales.{number}"] for number in range(count)], dim=1)
    save_file(whole, str(shard_path))


def to_version_2(folder):
    """Rewrite a saved folder as a version 2 save wrote it: whole-candidate tensors, their records updated."""
    manifest = json.loads((folder / "index.json").read_text())
    for entry in manifest["shards"]:
        path = folder / manifest["generation"] / (entry["name"] + ".safetensors")
        to_whole_tensors(path)
        entry["safetensors"] = {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (folder / "index.json").write_text(json.dumps({**manifest, "version": 2}))


def to_version_1(folder):
    """Rewrite a saved folder in the version 1 layout (shards beside index.json, no generation, no records,
    whole-candidate tensors)."""
    manifest = json.loads((folder / "index.json").read_text())
    for entry in manifest["shards"]:
        to_whole_tensors(folder / manifest["generation"] / (entry["name"] + ".safetensors"))
    for path in (folder / manifest.pop("generation")).iterdir():
        os.replace(path, folder / path.name)
    for key in ("version", "shards", "ann_file"):
        manifest.pop(key)
    (folder / "index.json").write_text(json.dumps({**manifest, "version": 1}))


@pytest.mark.parametrize("storage", ["float32", "int8"])
def test_version_2_folders_load_search_the_same_and_the_next_save_writes_prefix_blocks(
    candidates, queries, tmp_path, storage
):
    index = build(candidates[:60], storage)
    index.build_ann(kind="flat")
    index.save(str(tmp_path), max_shard_candidates=25)
    to_version_2(tmp_path)
    loaded = MetaEmbedIndex.load(str(tmp_path))
    assert [len(shard.blocks) for shard in loaded._shards] == [1, 1, 1]  # whole-candidate tensors, as saved
    assert loaded._ann is not None  # the ANN file is tied to the same vectors
    assert torch.equal(loaded.get_embeddings(range(60)), index.get_embeddings(range(60)))
    for budget in ((1, 1), (4, 8), (16, 64)):
        for shortlist in (None, "auto"):
            before = index.search(queries, *budget, top_k=5, shortlist_size=shortlist)
            after = loaded.search(queries, *budget, top_k=5, shortlist_size=shortlist)
            assert torch.equal(before.indices, after.indices)
            torch.testing.assert_close(before.scores, after.scores, rtol=1e-6, atol=1e-6)
    # Shards of both layouts in one index (version 2 shards, then an add): two stages rerank across them exactly.
    mixed = MetaEmbedIndex.load(str(tmp_path))
    mixed.add(candidates[60:70])
    assert [len(shard.blocks) for shard in mixed._shards] == [1, 1, 1, 7]
    everything = mixed.search(queries, 16, 64, top_k=5, shortlist_size=70, ann_query_vectors=1)
    exhaustive = mixed.search(queries, 16, 64, top_k=5, shortlist_size=None)
    assert torch.equal(everything.indices, exhaustive.indices)
    torch.testing.assert_close(everything.scores, exhaustive.scores, rtol=1e-6, atol=1e-6)
    loaded.save(str(tmp_path))
    assert json.loads((tmp_path / "index.json").read_text())["version"] == 3
    again = MetaEmbedIndex.load(str(tmp_path), mmap=False)
    assert [len(shard.blocks) for shard in again._shards] == [7, 7, 7]
    assert torch.equal(again.get_embeddings(range(60)), index.get_embeddings(range(60)))


def test_version_1_folders_load_and_the_next_save_replaces_only_their_files(candidates, queries, tmp_path):
    index = build(candidates[:50])
    index.build_ann(kind="flat")
    index.save(str(tmp_path), max_shard_candidates=20)
    to_version_1(tmp_path)
    (tmp_path / "shard-notes.txt").write_text("mine")
    (tmp_path / "sources").mkdir()
    loaded = MetaEmbedIndex.load(str(tmp_path))
    assert loaded.ids == index.ids and torch.equal(loaded.get_embeddings(range(50)), index.get_embeddings(range(50)))
    assert loaded._ann is None  # nothing ties a version 1 ann.faiss to its shards: rebuilt on first use
    loaded.save(str(tmp_path))
    generation = json.loads((tmp_path / "index.json").read_text())["generation"]
    expected = [generation, "index.json", "index.lock", "shard-notes.txt", "sources"]
    assert sorted(os.listdir(tmp_path)) == sorted(expected)
    assert MetaEmbedIndex.load(str(tmp_path)).ids == index.ids


def test_save_never_replaces_an_index_json_that_is_not_an_index(candidates, tmp_path):
    (tmp_path / "index.json").write_text('{"name": "my-app"}')
    with pytest.raises(ValueError, match=r"index\.json is not a MetaEmbed index manifest"):
        build(candidates[:10]).save(str(tmp_path))
    assert os.listdir(tmp_path) == ["index.json"] and (tmp_path / "index.json").read_text() == '{"name": "my-app"}'


def test_save_deletes_only_files_of_the_index_format(candidates, tmp_path):
    build(candidates[:30]).save(str(tmp_path))
    (old_generation,) = tmp_path.glob("gen-*")
    foreign = [tmp_path / "shard-notes.txt", tmp_path / "ann-ideas.faiss", old_generation / "my-notes.txt"]
    for path in foreign:
        path.write_text("keep me")
    build(candidates[30:60]).save(str(tmp_path))
    assert all(path.read_text() == "keep me" for path in foreign)
    # The old generation's own files are gone; the folder stays only because it holds a file of the user's.
    assert os.listdir(old_generation) == ["my-notes.txt"]
    assert MetaEmbedIndex.load(str(tmp_path)).ids == [f"doc-{i}" for i in range(30)]


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(candidates, tmp_path):
    from metaembed.search import storage

    build(candidates[:10]).save(str(tmp_path))
    with storage.write_lock(str(tmp_path)):
        # Another process: flock locks belong to the open file, so a fresh process contends like another writer.
        script = (
            "import sys, torch; from metaembed.search.index import MetaEmbedIndex\n"
            "index = MetaEmbedIndex(4, 1); index.add(torch.ones(1, 1, 4))\n"
            "try:\n    index.save(sys.argv[1])\nexcept OSError as error:\n    print(type(error).__name__, error)\n"
        )
        environment = {**os.environ, "PYTHONPATH": os.getcwd()}
        result = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=environment
        )
    assert "IndexLockedError" in result.stdout and "being written by another process" in result.stdout
    assert MetaEmbedIndex.load(str(tmp_path)).ids == [f"doc-{i}" for i in range(10)]


def write_raw_safetensors(path, header, data: bytes, header_size: int | None = None):
    encoded = json.dumps(header).encode()
    path.write_bytes((header_size or len(encoded)).to_bytes(8, "little") + encoded + data)


def _corrupt(kind, shard, sidecar):
    header_size = int.from_bytes(shard.read_bytes()[:8], "little")
    header = json.loads(shard.read_bytes()[8 : 8 + header_size])
    data = shard.read_bytes()[8 + header_size :]
    entry = header["embeddings"]
    if kind == "offsets into the header":
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = [begin - 64, end - 64]
        write_raw_safetensors(shard, header, data[:-64])
    elif kind == "overlapping tensors":
        header["extra"] = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
        write_raw_safetensors(shard, header, data)
    elif kind == "size not dtype x shape":
        entry["shape"] = [entry["shape"][0] + 1, *entry["shape"][1:]]
        write_raw_safetensors(shard, header, data)
    elif kind == "random bytes":
        shard.write_bytes(random.Random(0).randbytes(5000))
    elif kind == "header not JSON":
        write_raw_safetensors(shard, header, data, header_size=5)
    elif kind == "fewer metadata than ids":
        content = json.loads(sidecar.read_text())
        sidecar.write_text(json.dumps({**content, "metadata": content["metadata"][:-1]}))
    elif kind == "sidecar not an object":
        sidecar.write_text("[1, 2, 3]")


@pytest.mark.parametrize(
    "kind",
    [
        "offsets into the header",
        "overlapping tensors",
        "size not dtype x shape",
        "random bytes",
        "header not JSON",
        "fewer metadata than ids",
        "sidecar not an object",
    ],
)
def test_load_validates_every_file_and_names_it(candidates, tmp_path, kind):
    build(candidates[:10]).save(str(tmp_path))
    to_version_1(tmp_path)  # no sizes or hashes recorded: the structure alone must catch each of these
    shard, sidecar = tmp_path / "shard-00000-of-00002.safetensors", tmp_path / "shard-00000-of-00002.json"
    _corrupt(kind, shard, sidecar)
    broken = sidecar if "metadata" in kind or "sidecar" in kind else shard
    with pytest.raises(ValueError, match=re.escape(str(broken))):
        MetaEmbedIndex.load(str(tmp_path))
    with pytest.raises(ValueError, match=re.escape(str(broken))):
        MetaEmbedIndex.load(str(tmp_path), mmap=False)


def rewrite_first_shard(folder, change):
    """Apply `change` to the tensors of a saved folder's first shard and record the new file in index.json, so
    only the structural checks can catch what changed."""
    from safetensors.torch import load_file, save_file

    manifest = json.loads((folder / "index.json").read_text())
    entry = manifest["shards"][0]
    path = folder / manifest["generation"] / (entry["name"] + ".safetensors")
    tensors = load_file(str(path))
    change(tensors)
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(path))
    entry["safetensors"] = {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (folder / "index.json").write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize(
    ("storage", "change", "message"),
    [
        ("residual4", lambda tensors: tensors.pop("offsets"), r"has offsets none: residual4 storage needs float16"),
        ("residual4", lambda tensors: tensors.update(offsets=tensors["offsets"].float()), "'offsets' must be float16"),
        ("residual4", lambda tensors: tensors.update(offsets=tensors["offsets"][:-1]), r"float16 \[30, D\]"),
        ("residual4", lambda tensors: tensors.update(offsets=tensors["offsets"][:, :8]), r"has offsets \[30, 8\]"),
        ("residual4", lambda tensors: tensors.pop("scales.2"), "need float32 scales"),
        ("int4", lambda tensors: tensors.update(offsets=torch.zeros(30, DIM).half()), "int4 storage needs none"),
    ],
)
def test_load_checks_the_offsets_and_scales_of_4_bit_shards(candidates, tmp_path, storage, change, message):
    build(candidates[:70], storage).save(str(tmp_path))
    path = rewrite_first_shard(tmp_path, change)
    for mmap in (True, False):
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
            MetaEmbedIndex.load(str(tmp_path), mmap=mmap)


def test_load_checks_files_against_the_manifest_and_ties_the_ann_to_its_vectors(candidates, tmp_path):
    first, second = build(candidates[:40]), build(candidates[40:80])
    for index, folder in ((first, tmp_path / "first"), (second, tmp_path / "second")):
        index.build_ann(kind="flat")
        index.save(str(folder))
    (ann,) = (tmp_path / "first").glob("gen-*/ann.faiss")
    (other_ann,) = (tmp_path / "second").glob("gen-*/ann.faiss")
    ann.write_bytes(other_ann.read_bytes())  # same count, other vectors
    with pytest.raises(ValueError, match=re.escape(f"{ann} does not match the sha256")):
        MetaEmbedIndex.load(str(tmp_path / "first"))
    # Same size, other content: caught when the file is read whole (mmap=False reads it anyway).
    (sidecar,) = (tmp_path / "second").glob("gen-*/shard-00000-of-00002.json")
    sidecar.write_text(sidecar.read_text().replace("doc-1", "doc-X"))
    with pytest.raises(ValueError, match=re.escape(f"{sidecar} does not match the sha256")):
        MetaEmbedIndex.load(str(tmp_path / "second"))


def test_a_shard_whose_data_is_not_aligned_loads_by_copy(candidates, tmp_path):
    index = build(candidates[:10])
    index.save(str(tmp_path))
    to_version_1(tmp_path)  # no recorded sizes: the shard is rewritten by "another tool"
    shard = tmp_path / "shard-00000-of-00002.safetensors"
    header_size = int.from_bytes(shard.read_bytes()[:8], "little")
    header = shard.read_bytes()[8 : 8 + header_size].rstrip()
    header += b" " * ((-(8 + len(header)) % 8) + 2)  # data starts 2 bytes past a float32 boundary
    shard.write_bytes(len(header).to_bytes(8, "little") + header + shard.read_bytes()[8 + header_size :])
    loaded = MetaEmbedIndex.load(str(tmp_path))
    assert torch.equal(loaded.get_embeddings(range(10)), index.get_embeddings(range(10)))


def test_save_into_a_folder_without_an_index_keeps_files_named_like_version_1_ones(candidates, tmp_path):
    # Version 1 names are removed only when the index being replaced was a version 1 index that owned them.
    mine = {"ann.faiss": b"my faiss experiment", "shard-00000-of-00001.json": b'{"my": "notes"}'}
    mine["shard-00000-of-00001.safetensors"] = b"my tensors"
    for name, content in mine.items():
        (tmp_path / name).write_bytes(content)
    index = build(candidates[:10])
    index.save(str(tmp_path))
    index.save(str(tmp_path))  # over a version 2 index too
    assert {name: (tmp_path / name).read_bytes() for name in mine} == mine
    assert MetaEmbedIndex.load(str(tmp_path)).ids == index.ids


def test_a_shard_removed_between_open_and_memory_map_loads_the_old_or_the_new_index(candidates, tmp_path, monkeypatch):
    from metaembed.search import storage

    old, new = build(candidates[:10]), build(candidates[10:30])
    old.save(str(tmp_path))
    parse_header = storage._parse_header

    def writer_commits_meanwhile(*arguments):
        # A writer commits a new version and removes the old generation while the reader has a shard open.
        monkeypatch.setattr(storage, "_parse_header", parse_header)
        new.save(str(tmp_path))
        return parse_header(*arguments)

    monkeypatch.setattr(storage, "_parse_header", writer_commits_meanwhile)
    loaded = MetaEmbedIndex.load(str(tmp_path))
    assert storage._parse_header is parse_header  # the race did happen
    expected = old if len(loaded) == len(old) else new
    assert loaded.ids == expected.ids
    assert torch.equal(loaded.get_embeddings(range(len(loaded))), expected.get_embeddings(range(len(expected))))


def test_an_ann_index_of_other_vectors_is_refused_at_load(candidates, tmp_path):
    first, stale = build(candidates[:40]), build(candidates[:40])
    first.build_ann(kind="flat")
    stale.build_ann(kind="flat")
    # A stale ANN index in memory: the vectors changed under it (same count, same ids). It is saved with what it
    # was built from, and caught at load.
    stale._shards = build(candidates[40:80])._shards
    stale.save(str(tmp_path / "stale"))
    (ann,) = (tmp_path / "stale").glob("gen-*/ann.faiss")
    message = re.escape(f"{ann} was built from other vectors than the shards index.json lists")
    with pytest.raises(ValueError, match=message):
        MetaEmbedIndex.load(str(tmp_path / "stale"))
    # Shards replaced on disk with their records updated to match (a tool that rewrote them): the ANN file and
    # its record are intact, only what it was built from tells it apart.
    first.save(str(tmp_path / "first"))
    folder = tmp_path / "first"
    manifest = json.loads((folder / "index.json").read_text())
    second_index = MetaEmbedIndex(DIM, NUM_VECTORS)
    second_index.add(candidates[80:120], [f"doc-{i}" for i in range(40)], [{"n": i} for i in range(40)])
    second_index.save(str(tmp_path / "other"), max_shard_candidates=17)
    other = json.loads((tmp_path / "other" / "index.json").read_text())
    for entry in other["shards"]:
        for suffix in (".safetensors", ".json"):
            name = entry["name"] + suffix
            (folder / manifest["generation"] / name).write_bytes(
                (tmp_path / "other" / other["generation"] / name).read_bytes()
            )
    for entry in manifest["shards"]:
        for suffix in (".safetensors", ".json"):
            os.remove(folder / manifest["generation"] / (entry["name"] + suffix))
    (folder / "index.json").write_text(json.dumps({**manifest, "shards": other["shards"]}))
    (ann,) = folder.glob("gen-*/ann.faiss")
    for mmap in (True, False):
        with pytest.raises(ValueError, match=re.escape(f"{ann} was built from other vectors")):
            MetaEmbedIndex.load(str(folder), mmap=mmap)
    # The same files with the ANN index built from them load, and search with it.
    first.save(str(tmp_path / "fresh"))
    assert MetaEmbedIndex.load(str(tmp_path / "fresh"))._ann is not None


def test_default_search_is_two_stage_exactly_when_the_index_has_an_ann(candidates, queries, tmp_path):
    index = build(candidates)
    # Queries for targets 3, 300, 600 whose first vector says nothing about them; vectors 1-3 are the target's
    # first vector, slightly perturbed: a first stage with one query vector misses them, the default's four find them.
    targets = torch.tensor([3, 300, 600])
    hard = unit_vectors(3, 16, DIM, seed=5)
    hard[:, 1:4] = F.normalize(candidates[targets, :1] + 0.05 * unit_vectors(3, 3, DIM, seed=6), dim=-1)
    exhaustive = index.search(hard, 4, 64, top_k=10, shortlist_size=None)
    assert torch.equal(exhaustive.indices[:, 0], targets)
    assert index.search_plan(10, 4) == (None, 4)
    assert torch.equal(index.search(hard, 4, 64, top_k=10).indices, exhaustive.indices)
    index.build_ann(kind="flat")
    assert index.search_plan(10, 16) == (100, 4) and index.search_plan(30, 2) == (300, 2)
    default = index.search(hard, 4, 64, top_k=10)
    explicit = index.search(hard, 4, 64, top_k=10, shortlist_size=100, ann_query_vectors=4)
    assert torch.equal(default.indices, explicit.indices) and torch.equal(default.scores, explicit.scores)
    assert torch.equal(default.indices[:, 0], targets)
    one_vector = index.search(hard, 4, 64, top_k=10, shortlist_size=10, ann_query_vectors=1)
    assert not torch.equal(one_vector.indices[:, 0], targets)
    # Saved and loaded with its ANN index: still two stages; `add` drops the ANN index: exhaustive again.
    index.save(str(tmp_path))
    loaded = MetaEmbedIndex.load(str(tmp_path))
    assert loaded.search_plan(10, 16) == (100, 4)
    loaded.add(candidates[:1], ids=["extra"])
    assert loaded.search_plan(10, 16) == (None, 4)
    with pytest.raises(ValueError, match="shortlist_size must be 'auto', None or a positive int"):
        index.search(queries, 16, 64, shortlist_size="fast")
    with pytest.raises(ValueError, match=r"shortlist_size \(5\) must be at least top_k \(10\)"):
        index.search(queries, 16, 64, shortlist_size=5)


@pytest.mark.parametrize("storage", ["float32", "int8"])
def test_tied_candidates_rank_by_position_whatever_the_shards_and_the_search(queries, storage):
    # 12 distinct candidates, each stored 5 times in shuffled order: tied scores everywhere. The results must
    # not depend on how the candidates were added (shards), nor on exhaustive vs two-stage search.
    distinct = unit_vectors(12, NUM_VECTORS, DIM, seed=8)
    order = torch.randperm(60, generator=torch.Generator().manual_seed(2))
    candidates = distinct[order % 12]
    results = []
    for splits in ([60], [7, 53], [25, 1, 34], [13] * 4 + [8]):
        index = MetaEmbedIndex(DIM, NUM_VECTORS, storage=storage)
        for part in torch.split(candidates, splits):
            index.add(part)
        index.build_ann(num_vectors=2, kind="flat")
        for shortlist_size in (None, 60):
            found = index.search(queries, 4, 16, top_k=12, shortlist_size=shortlist_size)
            results.append(found.indices)
    # The reference: scores of the 12 distinct candidates, ranked by score, then by position.
    stored = MetaEmbedIndex(DIM, NUM_VECTORS, storage=storage)
    stored.add(distinct)
    distinct_scores = stored.search(queries, 4, 16, top_k=12, shortlist_size=None)
    score_of = {}
    for row in range(len(queries)):
        for score, position in zip(distinct_scores.scores[row].tolist(), distinct_scores.indices[row].tolist()):
            score_of[row, position] = score
    expected = torch.tensor(
        [
            sorted(range(60), key=lambda position, row=row: (-score_of[row, int(order[position]) % 12], position))[:12]
            for row in range(len(queries))
        ]
    )
    for indices in results:
        assert torch.equal(indices, expected)
