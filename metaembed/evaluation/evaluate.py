"""`evaluate`: quality, index size and scoring time of a MetaEmbed model at every budget, on any number of
datasets, from one encoding.

Every query and candidate is encoded once, with the largest budget's vector counts (`model.encode_*`: batched,
length-sorted, with progress bars); each budget then scores the prefixes (the first r_q / r_c vectors), which is
what encoding at that budget gives (attention is causal). Embeddings are kept in `MetaEmbedIndex` parts of
`chunk_size` items; with `cache_dir` each part is saved as soon as it is encoded and reopened memory-mapped, so
memory stays bounded at any corpus size, a rerun (other budgets, more queries) encodes nothing it already has and
an interrupted run resumes at the first missing part. Without `cache_dir` every embedding stays in memory.
Scoring runs over blocks of queries x candidates of bounded size.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from scoring_metaembed import MMR_BUDGETS, check_num_vectors, check_positive_int, late_interaction_scores

from ..fingerprint import items_digest, model_fingerprint
from ..search import MetaEmbedIndex
from .metrics import (
    LIST_METRICS,
    list_precision_at_1,
    metric_depth,
    parse_metric,
    ranking_metrics,
    scores_from_keys,
    top_k_by_rule,
)
from .protocols import DEFAULT_PROTOCOLS, Protocol, get_protocol
from .readers import LazyItems, RetrievalDataset

# float32 values of one block of candidate (or query) embeddings read at once while scoring (64 MiB).
_BLOCK_ELEMENTS = 2**24
# Scores of one (query block x candidate block) computed at once: 16 MiB of float32, plus twice that of int64
# ranking keys and positions (`metrics.top_k_by_rule`).
_SCORE_ELEMENTS = 2**22


@dataclass
class BudgetResult:
    """One dataset at one budget."""

    dataset: str
    budget: tuple[int, int]
    metrics: dict[str, float]
    main_metric: str
    index_bytes_per_candidate: int
    scoring_ms_per_query: float
    num_queries: int
    num_candidates: int
    # where the dataset came from (for model cards): Hub id (None for a local folder not in the Hub cache and
    # given no `dataset_id`: such results stay out of the card), config, split, revision, format
    dataset_id: str | None = None
    dataset_config: str | None = None
    dataset_split: str | None = None
    dataset_revision: str | None = None
    format: str | None = None
    protocol: str | None = None  # `protocols.PROTOCOLS` name
    reference: str | None = None  # the implementation and version whose numbers these are

    @property
    def main_value(self) -> float:
        return self.metrics[self.main_metric]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "budget": list(self.budget), "main_score": self.main_value}


def index_bytes_per_candidate(num_vectors: int, dim: int, storage: str) -> int:
    """Bytes one candidate takes in a `MetaEmbedIndex` of that storage (int8 keeps a float32 scale per vector)."""
    per_vector = {"float32": 4 * dim, "float16": 2 * dim, "int8": dim + 4}
    if storage not in per_vector:
        raise ValueError(f"storage must be one of {sorted(per_vector)}, got {storage!r}")
    return num_vectors * per_vector[storage]


class StoredEmbeddings:
    """A dataset side's embeddings `[n, num_vectors, D]` as `MetaEmbedIndex` parts of `chunk_size` items, in the
    order of `ids`; parts are saved under `folder` (if given) as soon as they are encoded and then held
    memory-mapped (without `folder`, in memory)."""

    def __init__(self, parts: list[MetaEmbedIndex]) -> None:
        self.parts = parts
        self.starts = [0]
        for part in parts:
            self.starts.append(self.starts[-1] + len(part))

    def __len__(self) -> int:
        return self.starts[-1]

    @classmethod
    def encode(
        cls,
        model: Any,
        items: Sequence[Any],
        ids: Sequence[str],
        task: str,
        num_vectors: int,
        *,
        folder: str | None,
        storage: str,
        chunk_size: int,
        batch_size: int,
        show_progress_bar: bool | None,
        description: str,
    ) -> StoredEmbeddings:
        parts = []
        dim = model.config.output_dim
        for start in range(0, len(ids), chunk_size):
            end = min(start + chunk_size, len(ids))
            # Named by the items' content: an edited item (same id) gets a new part, never the old vectors.
            # Lazily read datasets are hashed from their stored image bytes, not decoded just to be hashed.
            path = None
            if folder is not None:
                stored = items.stored_items(start, end) if isinstance(items, LazyItems) else items[start:end]
                path = os.path.join(folder, f"{task}-{start:09d}-{end:09d}-{items_digest(stored)[:16]}")
            part = _load_part(path, ids[start:end], num_vectors, dim, storage)
            if part is None:
                embeddings = _encode_range(
                    model, items, start, end, task, num_vectors, batch_size, show_progress_bar, description
                )
                part = MetaEmbedIndex(dim, num_vectors, storage, getattr(model, "name_or_path", None))
                part.add(embeddings, ids=list(ids[start:end]))
                del embeddings
                if path is not None:
                    part.save(path)
                    part = MetaEmbedIndex.load(path)  # memory-mapped: the vectors leave RAM
            parts.append(part)
        return cls(parts)

    def blocks(self, num_vectors: int, max_block: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(start position, float32 `[b, num_vectors, D]`) over all items, in blocks of at most
        `_BLOCK_ELEMENTS` values (and at most `max_block` items)."""
        for part, part_start in zip(self.parts, self.starts):
            size = max(1, min(_BLOCK_ELEMENTS // (num_vectors * part.dim), max_block or len(part)))
            for offset in range(0, len(part), size):
                positions = range(offset, min(offset + size, len(part)))
                yield part_start + offset, part.get_embeddings(positions, num_vectors)

    def gather(self, positions: torch.Tensor, num_vectors: int) -> torch.Tensor:
        """float32 `[len(positions), num_vectors, D]` in the order given."""
        owners = torch.searchsorted(torch.tensor(self.starts[1:]), positions, right=True)
        result = torch.empty(len(positions), num_vectors, self.parts[0].dim)
        for number in owners.unique().tolist():
            selected = (owners == number).nonzero().flatten()
            local = positions[selected] - self.starts[number]
            result[selected] = self.parts[number].get_embeddings(local, num_vectors)
        return result


def _encode_range(
    model: Any,
    items: Sequence[Any],
    start: int,
    end: int,
    task: str,
    num_vectors: int,
    batch_size: int,
    show_progress_bar: bool | None,
    description: str,
) -> torch.Tensor:
    """Embeddings of items `start..end-1`. Lazily read items (page images) are made and decoded one encode batch
    at a time, so at most `batch_size` decoded pages are alive at once whatever the part size; in-memory items go
    to `model.encode` in one call (it sorts them by length)."""
    step = batch_size if isinstance(items, LazyItems) else end - start
    batches = range(start, end, step)
    if step != end - start and (show_progress_bar or (show_progress_bar is None and sys.stderr.isatty())):
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"{description}: {task}s {start}..{end - 1}", unit="batch")
    results = []
    for first in batches:
        last = min(first + step, end)
        batch = items[first:last]  # made here: each image is decoded once
        try:
            results.append(
                model.encode(
                    batch,
                    task,
                    num_vectors=num_vectors,
                    batch_size=batch_size,
                    show_progress_bar=show_progress_bar if step == end - start else False,
                )
            )
        except ValueError as error:  # e.g. an unreadable image: say which dataset items
            raise ValueError(f"{description}: {task}s {first}..{last - 1}: {error}") from error
        del batch
    return torch.cat(results) if len(results) > 1 else results[0]


def _load_part(path: str | None, ids: Sequence[str], num_vectors: int, dim: int, storage: str) -> MetaEmbedIndex | None:
    """The saved part at `path` if it holds exactly these ids with enough vectors; None when it must be encoded
    (absent, cut short by an interrupted run, or made with other settings)."""
    if path is None or not os.path.isdir(path):
        return None
    try:
        part = MetaEmbedIndex.load(path)
    except (OSError, ValueError, KeyError):
        return None  # a part whose save did not finish: encode it again (saving replaces it)
    if part.ids != list(ids) or part.dim != dim or part.storage != storage or part.num_vectors < num_vectors:
        return None
    return part


def _cache_folder(cache_dir: str | None, dataset: RetrievalDataset, fingerprint: str) -> str | None:
    if cache_dir is None:
        return None
    identity = json.dumps(
        [dataset.source, dataset.format, dataset.config, dataset.split, dataset.name, dataset.notes], default=str
    )
    safe_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset.name)[:80]
    key = f"{safe_name}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"
    return os.path.join(cache_dir, key, fingerprint[:16])


def _query_block_size(num_query_vectors: int, dim: int) -> int:
    """Queries scored at once: their embeddings within `_BLOCK_ELEMENTS`, and at most 256 so that the candidate
    blocks against them stay large (each query block reads the candidates once)."""
    return max(1, min(256, _BLOCK_ELEMENTS // (num_query_vectors * dim)))


def check_budgets(budgets: Sequence[tuple[int, int]], model: Any) -> list[tuple[int, int]]:
    """The budgets as (r_q, r_c) int pairs within the model's vector counts."""
    if isinstance(budgets, (str, bytes)) or not len(budgets):
        raise ValueError(f"budgets must be a non-empty list of (r_q, r_c) pairs, got {budgets!r}")
    checked = []
    for number, budget in enumerate(budgets):
        if not isinstance(budget, Sequence) or len(budget) != 2:
            raise ValueError(f"budgets[{number}] must be a pair (r_q, r_c), got {budget!r}")
        checked.append(
            (
                check_num_vectors(budget[0], model.config.num_query_vectors, f"budgets[{number}] r_q"),
                check_num_vectors(budget[1], model.config.num_candidate_vectors, f"budgets[{number}] r_c"),
            )
        )
    return checked


def _check_metrics(metrics: Sequence[str], dataset: RetrievalDataset) -> tuple[str, ...]:
    """The metric names, checked before anything is encoded."""
    if isinstance(metrics, str) or not metrics:
        raise ValueError(f"metrics must be a non-empty list of names such as 'ndcg@10', got {metrics!r}")
    if dataset.candidate_lists is not None:
        if list(metrics) != list(LIST_METRICS):
            raise ValueError(f"{dataset.name}: a dataset of candidate lists (MMEB) gives {LIST_METRICS}, not {metrics}")
    else:
        for name in metrics:
            parse_metric(name)
    return tuple(metrics)


def evaluate(
    model: Any,
    data: RetrievalDataset | Sequence[RetrievalDataset],
    budgets: Sequence[tuple[int, int]] = MMR_BUDGETS,
    *,
    metrics: Sequence[str] | None = None,
    batch_size: int = 16,
    cache_dir: str | os.PathLike | None = None,
    storage: str = "float32",
    chunk_size: int = 1024,
    show_progress_bar: bool | None = None,
) -> list[BudgetResult]:
    """Evaluate `model` on every dataset at every budget, under each dataset's protocol
    (`metaembed.evaluation.protocols`: which queries count, score clamping, tie rules, rounding of means).

    Args:
        model: a `MetaEmbedModel` (its `encode` and config are used).
        data: one `RetrievalDataset` or several (see `metaembed.evaluation.readers`).
        budgets: (r_q, r_c) pairs; the default is the paper's five.
        metrics: metric names (`metrics.ranking_metrics`), the first the main score; default: each dataset's own
            (ViDoRe v1/v2: nDCG@5 first, ViDoRe v3 and BEIR: nDCG@10; MMEB: precision@1 over each query's
            candidate list). Checked, with every dataset, before anything is encoded.
        batch_size: items per forward pass.
        cache_dir: keep the embeddings there (one `MetaEmbedIndex` per `chunk_size` items, saved as encoded and
            reopened memory-mapped, so memory stays bounded); reruns reuse them and interrupted runs resume. A
            part is reused only for the same dataset (source, format, config, split, name, notes), the same
            model (`metaembed.fingerprint.model_fingerprint`: config, processor settings, every weight), the
            same ids and the same item content (`items_digest`: text and stored image bytes, or pixels); an
            edited item re-encodes its part. None: every embedding stays in memory (items x max r_c x D x 4 bytes
            for the candidates): give a `cache_dir` for large corpora.
        storage: the index storage, "float32" (scores exactly as `model.score`), "float16" or "int8".
        chunk_size: items per saved part.
        show_progress_bar: passed to `model.encode` (None: when stderr is a terminal).

    Returns:
        One `BudgetResult` per dataset and budget (datasets outer, budgets in the order given): the metrics, the
        index bytes per candidate at that r_c, the scoring time per query (late interaction over all
        candidates, or each query's list, and the top-k; encoding excluded; timed after an untimed warm-up run),
        and the protocol and reference the numbers follow.
    """
    datasets = [data] if isinstance(data, RetrievalDataset) else list(data)
    if not datasets or not all(isinstance(dataset, RetrievalDataset) for dataset in datasets):
        raise TypeError("data must be a RetrievalDataset or a non-empty list of them")
    for dataset in datasets:
        dataset.validate()
    budgets = check_budgets(budgets, model)
    batch_size = check_positive_int(batch_size, "batch_size")
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    index_bytes_per_candidate(1, 1, storage)  # checks storage before any encoding
    max_query_vectors = max(r_q for r_q, _ in budgets)
    max_candidate_vectors = max(r_c for _, r_c in budgets)
    fingerprint = model_fingerprint(model) if cache_dir is not None else ""
    wanted_metrics = {id(dataset): _check_metrics(metrics or dataset.metrics, dataset) for dataset in datasets}
    results = []
    for dataset in datasets:
        folder = _cache_folder(None if cache_dir is None else os.fspath(cache_dir), dataset, fingerprint)
        common = {
            "folder": folder,
            "storage": storage,
            "chunk_size": chunk_size,
            "batch_size": batch_size,
            "show_progress_bar": show_progress_bar,
            "description": dataset.name,
        }
        queries = StoredEmbeddings.encode(
            model, dataset.queries, dataset.query_ids, "query", max_query_vectors, **common
        )
        candidates = StoredEmbeddings.encode(
            model, dataset.candidates, dataset.candidate_ids, "candidate", max_candidate_vectors, **common
        )
        wanted = wanted_metrics[id(dataset)]
        protocol = _protocol_of(dataset)
        # A dataset of no published format and no named protocol (e.g. the demo's) is scored under mteb's rules
        # but reported unrounded and under no reference's name.
        published = dataset.protocol is not None or dataset.format in DEFAULT_PROTOCOLS
        digits = protocol.round_digits if published else None
        for budget in budgets:
            # Untimed warm-up: the same scoring once (first-touch of memory-mapped parts, kernel and thread pool
            # setup), then the timed run, whose results are reported.
            _score(queries, candidates, dataset, budget, wanted, protocol)
            start = time.perf_counter()
            scored = _score(queries, candidates, dataset, budget, wanted, protocol)
            seconds = time.perf_counter() - start
            if dataset.candidate_lists is not None:
                values = {"precision@1": list_precision_at_1(scored)}
            else:
                run, mrr_run = scored
                values = ranking_metrics(
                    dataset.qrels,
                    run,
                    wanted,
                    mrr_run=mrr_run,
                    round_digits=digits,
                )
            results.append(
                BudgetResult(
                    dataset=dataset.name,
                    budget=budget,
                    metrics=values,
                    main_metric=wanted[0],
                    index_bytes_per_candidate=index_bytes_per_candidate(budget[1], model.config.output_dim, storage),
                    scoring_ms_per_query=seconds * 1e3 / len(dataset.query_ids),
                    num_queries=len(dataset.query_ids),
                    num_candidates=len(dataset.candidate_ids),
                    dataset_id=dataset.hub_id,
                    dataset_config=dataset.config,
                    dataset_split=dataset.split,
                    dataset_revision=dataset.revision,
                    format=dataset.format,
                    protocol=protocol.name if published else None,
                    reference=protocol.reference if published else None,
                )
            )
    return results


def _protocol_of(dataset: RetrievalDataset) -> Protocol:
    return get_protocol(dataset.protocol, "mmeb" if dataset.candidate_lists is not None else dataset.format or "beir")


def _score(
    queries: StoredEmbeddings,
    candidates: StoredEmbeddings,
    dataset: RetrievalDataset,
    budget: tuple[int, int],
    metrics: Sequence[str],
    protocol: Protocol,
) -> Any:
    """Each query's list scores (candidate-list datasets), or (run, MRR run or None) for ranked datasets under the
    protocol's rules (score clamping; MRR ties in corpus order)."""
    if dataset.candidate_lists is not None:
        return score_candidate_lists(queries, candidates, dataset.candidate_lists, budget)
    ids = dataset.candidate_ids
    # trec_eval's tie rule: a greater id (string order) ranks first.
    by_id = torch.empty(len(ids), dtype=torch.long)
    by_id[torch.tensor(sorted(range(len(ids)), key=ids.__getitem__))] = torch.arange(len(ids))
    # vidore-benchmark: max(results.get(page, 0), score) clamps every page but the first one scored at 0.
    floor = torch.ones(len(ids), dtype=torch.bool) if protocol.clamp_negative_scores else None
    if floor is not None:
        floor[0] = False
    run = rank_candidates(queries, candidates, dataset.query_ids, ids, budget, metric_depth(metrics), by_id, floor)
    mrr_cutoffs = [parse_metric(name)[1] for name in metrics if parse_metric(name)[0] == "mrr"]
    mrr_run = None
    if protocol.mrr_ties == "corpus" and mrr_cutoffs:
        by_position = torch.arange(len(ids) - 1, -1, -1)  # the earlier candidate ranks first
        mrr_run = rank_candidates(
            queries, candidates, dataset.query_ids, ids, budget, max(mrr_cutoffs), by_position, floor
        )
    return run, mrr_run


def rank_candidates(
    queries: StoredEmbeddings,
    candidates: StoredEmbeddings,
    query_ids: Sequence[str],
    candidate_ids: Sequence[str],
    budget: tuple[int, int],
    depth: int,
    tie_ranks: torch.Tensor,
    floor_at_zero: torch.Tensor | None = None,
) -> dict[str, dict[str, float]]:
    """Each query's `depth` best candidates at `budget`, as a run {query id: {candidate id: score}} inserted best
    first. Equal scores rank by `tie_ranks` (int64 `[N]`, the greater first: see `metrics.order_keys`); where
    `floor_at_zero` (bool `[N]`) is set, negative scores count as 0. Scores are computed in blocks of at most
    `_SCORE_ELEMENTS` (queries x candidates)."""
    num_query_vectors, num_candidate_vectors = budget
    query_block = _query_block_size(num_query_vectors, queries.parts[0].dim)
    run: dict[str, dict[str, float]] = {}
    for query_start in range(0, len(query_ids), query_block):
        query_end = min(query_start + query_block, len(query_ids))
        block_queries = queries.gather(torch.arange(query_start, query_end), num_query_vectors)
        best = None
        max_block = max(1, _SCORE_ELEMENTS // len(block_queries))
        for start, block in candidates.blocks(num_candidate_vectors, max_block):
            scores = late_interaction_scores(block_queries, block, num_query_vectors, num_candidate_vectors)
            if floor_at_zero is not None:
                scores = torch.where(floor_at_zero[start : start + len(block)], scores.clamp_min(0.0), scores)
            best = top_k_by_rule(scores, tie_ranks[start : start + len(block)], depth, best, start)
        keys, positions = best
        for query, row_positions, row_scores in zip(
            query_ids[query_start:query_end], positions.tolist(), scores_from_keys(keys).tolist()
        ):
            run[query] = {candidate_ids[position]: score for position, score in zip(row_positions, row_scores)}
    return run


def _list_chunks(candidate_lists: Sequence[Sequence[int]]) -> Iterator[tuple[int, int]]:
    """(start, end) runs of queries whose score matrix [queries x union of their lists] stays within
    `_SCORE_ELEMENTS` (at least one query each)."""
    start, union = 0, set()
    for end, positions in enumerate(candidate_lists):
        grown = union | set(positions)
        if end > start and (end + 1 - start) * len(grown) > _SCORE_ELEMENTS:
            yield start, end
            start, grown = end, set(positions)
        union = grown
    yield start, len(candidate_lists)


def score_candidate_lists(
    queries: StoredEmbeddings,
    candidates: StoredEmbeddings,
    candidate_lists: Sequence[Sequence[int]],
    budget: tuple[int, int],
) -> list[torch.Tensor]:
    """Each query's scores against its own candidate list (positions into
    `candidates`), at `budget`."""
    num_query_vectors, num_candidate_vectors = budget
    query_block = _query_block_size(num_query_vectors, queries.parts[0].dim)
    result: list[torch.Tensor] = []
    for chunk_start, chunk_end in _list_chunks(candidate_lists):
        for start in range(chunk_start, chunk_end, query_block):
            lists = candidate_lists[start : min(start + query_block, chunk_end)]
            result.extend(_score_lists(queries, candidates, start, lists, num_query_vectors, num_candidate_vectors))
    return result


def _score_lists(
    queries: StoredEmbeddings,
    candidates: StoredEmbeddings,
    start: int,
    lists: Sequence[Sequence[int]],
    num_query_vectors: int,
    num_candidate_vectors: int,
) -> list[torch.Tensor]:
    """Queries `start..start+len(lists)-1` against their lists, via the scores against the union of the lists."""
    block_queries = queries.gather(torch.arange(start, start + len(lists)), num_query_vectors)
    union = torch.tensor(sorted({position for positions in lists for position in positions}))
    scores = torch.empty(len(lists), len(union))
    size = max(1, _BLOCK_ELEMENTS // (num_candidate_vectors * candidates.parts[0].dim))
    for offset in range(0, len(union), size):
        block = candidates.gather(union[offset : offset + size], num_candidate_vectors)
        scores[:, offset : offset + size] = late_interaction_scores(
            block_queries, block, num_query_vectors, num_candidate_vectors
        )
    columns = {position: column for column, position in enumerate(union.tolist())}
    return [row[torch.tensor([columns[position] for position in positions])] for row, positions in zip(scores, lists)]


__all__ = ["BudgetResult", "StoredEmbeddings", "evaluate", "index_bytes_per_candidate"]
