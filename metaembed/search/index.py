"""`MetaEmbedIndex`: a multi-vector index of MetaEmbed candidates, stored as memory-mapped safetensors shards,
searched exhaustively at any budget or in two stages (approximate nearest neighbours over the first vector,
then exact budgeted late-interaction rerank of the shortlist).

The folder layout is `storage`'s (the module that owns the file format).
"""

from __future__ import annotations

import errno
import hashlib
import numbers
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch

from scoring_metaembed import (
    PrefixBlocks,
    check_num_vectors,
    check_positive_int,
    late_interaction_scores,
    merge_top_k,
)

from . import single_query, storage
from .storage import FOUR_BIT_STORAGE, INDEX_FORMAT, STORAGE_DTYPES, code_values, dequantize, prefix_blocks, quantize

__all__ = ["MetaEmbedIndex", "SearchResults"]

# The default two-stage search ("auto"): nearest indexed vectors fetched per query vector, and query vectors
# sent to the first stage (see `MetaEmbedIndex.search_plan`).
AUTO_SHORTLIST = 100
AUTO_ANN_QUERY_VECTORS = 4
# Candidate vectors dequantised at a time for the ANN index: bounds its extra memory.
_ANN_BLOCK_ELEMENTS = 2**24
# Scores of a batch through the outer-product kernel held at once (8 MiB), as torch's kernel chunks.
_BATCH_CHUNK_SCORES = 2**21


class SearchResults(NamedTuple):
    """The `k` best candidates per query, best first."""

    scores: torch.Tensor
    """float32 `[num_queries, k]`."""
    indices: torch.Tensor
    """int64 `[num_queries, k]`: positions in the index (0 .. len(index) - 1)."""
    ids: list[list[Any]]
    """the candidates' ids, `num_queries` lists of `k`."""


class _Shard(NamedTuple):
    # Prefix blocks [n, R_b, D] in the storage dtype (memory-mapped once saved and loaded), together R_c vectors:
    # `storage.prefix_block_bounds`, or one block for a shard of an index saved before that layout.
    blocks: tuple[torch.Tensor, ...]
    scales: tuple[torch.Tensor | None, ...]  # [n, R_b] float32 per block, quantised storage only
    ids: list[Any]
    metadata: list[Any] | None
    offsets: torch.Tensor | None  # [n, D] float16: residual4's candidate means
    code_values: torch.Tensor | None  # [16] float32: residual4's 4-bit code values

    def candidates(self) -> PrefixBlocks:
        return PrefixBlocks(self.blocks, self.scales, self.code_values, self.offsets)

    def gathered(
        self, rows: torch.Tensor, num_vectors: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None], torch.Tensor | None]:
        """The blocks holding the first `num_vectors` vectors of the candidates at `rows` (int64 positions in
        the shard), copied contiguous in the storage type (no upcast: fewer bytes to move), with their scales
        and offsets."""
        offsets = None if self.offsets is None else torch.index_select(self.offsets, 0, rows)
        blocks, scales, start = [], [], 0
        for block, block_scales in zip(self.blocks, self.scales):
            if start == num_vectors:
                break
            width = min(block.shape[1], num_vectors - start)
            blocks.append(torch.index_select(block[:, :width], 0, rows))
            scales.append(None if block_scales is None else torch.index_select(block_scales[:, :width], 0, rows))
            start += width
        return blocks, scales, offsets

    def dequantized(
        self, rows: torch.Tensor | slice, num_vectors: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """float32 `[len(rows), num_vectors, D]`: the first `num_vectors` stored vectors of the candidates at
        `rows` (ascending int64 positions in the shard, or a slice), written into `out` if given."""
        first = self.blocks[0][rows] if isinstance(rows, slice) else None
        count = len(first) if first is not None else len(rows)
        if out is None:
            out = torch.empty(count, num_vectors, self.candidates().dim)
        offsets = self.offsets
        if offsets is not None:
            offsets = offsets[rows] if isinstance(rows, slice) else torch.index_select(offsets, 0, rows)
        start = 0
        for block, scales in zip(self.blocks, self.scales):
            if start == num_vectors:
                break
            end = min(start + block.shape[1], num_vectors)
            block, scales = block[:, : end - start], None if scales is None else scales[:, : end - start]
            if isinstance(rows, slice):
                stored, scales = block[rows], None if scales is None else scales[rows]
            elif block.dtype == torch.float32:
                torch.index_select(block, 0, rows, out=out[:, start:end])
                start = end
                continue
            else:
                stored = torch.index_select(block, 0, rows)
                scales = None if scales is None else torch.index_select(scales, 0, rows)
            out[:, start:end] = dequantize(stored, scales, self.code_values, offsets)
            start = end
        return out


class MetaEmbedIndex:
    """Candidate multi-vectors with ids and optional metadata; search at any budget (r_q, r_c).

    Args:
        dim: vector dimension D.
        num_vectors: vectors stored per candidate (R_c, or fewer: a budget's r_c cannot exceed it).
        storage: "float32", "float16" (half the bytes, same ranking in practice), "int8" (a quarter, one
            float32 scale per vector: `vector = int8 * scale`), "int4" (an eighth plus the scale: 4-bit codes,
            68 bytes per 128-dim vector) or "residual4" (the compact one: each candidate's mean vector in float16
            plus 4-bit codes of each vector's residual from it with a scale: 4,608 bytes per 64 x 128 candidate,
            below PLAID's, with PLAID's ranking quality or better; int4 and residual4 rank coarser than int8: see
            the README). Scores are always computed in float32.
        model_name_or_path: recorded in `index.json`, so `metaembed search` knows which model encodes queries.

    Example:
        >>> index = MetaEmbedIndex(dim=128, num_vectors=64, storage="float16")
        >>> index.add(model.encode_candidates(images), ids=paths)
        >>> results = index.search(model.encode_queries(["a red car"]), 4, 8, top_k=10)
    """

    def __init__(
        self,
        dim: int,
        num_vectors: int,
        storage: str = "float32",
        model_name_or_path: str | None = None,
    ) -> None:
        if storage not in STORAGE_DTYPES:
            raise ValueError(f"storage must be one of {sorted(STORAGE_DTYPES)}, got {storage!r}")
        self.dim, self.num_vectors = check_positive_int(dim, "dim"), check_positive_int(num_vectors, "num_vectors")
        if storage in FOUR_BIT_STORAGE and self.dim % 2:
            raise ValueError(f"{storage} storage packs two values per byte: dim must be even, got {self.dim}")
        self.storage = storage
        self._code_values = code_values(storage)
        self.model_name_or_path = model_name_or_path
        self._shards: list[_Shard] = []
        self._id_positions: dict[Any, int] = {}
        self._ann: Any = None
        # sha256 of the float32 vectors the ANN index was built from (`_ann_vectors`), taken when it was built:
        # saved with it and checked against the shards at load, so an ANN of other vectors is never used.
        self._ann_vectors_sha256: str | None = None
        # How the ANN index is (re)built: kept across add (which drops a built index) and save / load.
        self._ann_settings: dict[str, Any] = {"num_vectors": 1, "kind": "hnsw", "hnsw_neighbors": 32, "ef_search": None}
        # Searches may run from several threads; only building the ANN index on first use needs a lock.
        # add / save / build_ann themselves must not run while other threads search.
        self._ann_lock = threading.Lock()

    # -- adding --------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return sum(len(shard.ids) for shard in self._shards)

    @property
    def has_metadata(self) -> bool:
        return any(shard.metadata is not None for shard in self._shards)

    def add(
        self,
        embeddings: torch.Tensor | Any,
        ids: Sequence[Any] | None = None,
        metadata: Sequence[Any] | None = None,
    ) -> None:
        """Append candidates.

        Args:
            embeddings: float `[n, R, D]` (tensor or numpy array) with R >= `num_vectors`; the first
                `num_vectors` are kept. Convert from the model's output unchanged (L2-normalised).
            ids: `n` unique str or int ids (default: the positions `len(index) ... len(index) + n - 1`).
            metadata: `n` JSON-serialisable values returned with results (e.g. file paths, captions).

        Nothing is added if any argument is invalid. An ANN index built before is dropped (rebuild it).
        """
        if not isinstance(embeddings, torch.Tensor):
            try:
                embeddings = torch.as_tensor(embeddings)
            except (TypeError, ValueError, RuntimeError) as error:
                raise TypeError(
                    f"embeddings must be a float tensor or array [n, R, D], got {type(embeddings).__name__}"
                ) from error
        if embeddings.ndim != 3 or not embeddings.dtype.is_floating_point:
            raise ValueError(
                f"embeddings must be a float tensor of shape [n, R, D], got {embeddings.dtype} {list(embeddings.shape)}"
            )
        count, width, dim = embeddings.shape
        if dim != self.dim:
            raise ValueError(f"embeddings have dim {dim}, the index holds dim {self.dim}")
        if width < self.num_vectors:
            raise ValueError(f"embeddings have {width} vectors per item, the index stores {self.num_vectors}")
        if count == 0:
            raise ValueError("embeddings is empty: nothing to add")
        if not bool(torch.isfinite(embeddings).all()):
            row = int((~torch.isfinite(embeddings)).flatten(1).any(1).nonzero()[0, 0])
            raise ValueError(f"embeddings[{row}] contains NaN or infinite values")
        ids = self._check_ids(ids, count)
        if metadata is not None:
            metadata = list(metadata)
            if len(metadata) != count:
                raise ValueError(f"got {len(metadata)} metadata values for {count} embeddings")
            for index, value in enumerate(metadata):
                storage.check_strict_json(value, f"metadata[{index}]")
        stored = quantize(embeddings[:, : self.num_vectors].detach().cpu(), self.storage)
        storage.check_storable(stored, ids, self.storage)
        blocks, block_scales = prefix_blocks(stored.embeddings, stored.scales)
        # Never keep the caller's memory: later writes to it would change the index.
        blocks = [
            block.clone() if block.untyped_storage().data_ptr() == embeddings.untyped_storage().data_ptr() else block
            for block in blocks
        ]
        start = len(self)
        shard = _Shard(tuple(blocks), tuple(block_scales), ids, metadata, stored.offsets, self._code_values)
        self._shards.append(shard)
        self._id_positions.update((identifier, start + offset) for offset, identifier in enumerate(ids))
        self._ann = None

    def _check_ids(self, ids: Sequence[Any] | None, count: int) -> list[Any]:
        start = len(self)
        default_ids = ids is None
        if default_ids:
            ids = list(range(start, start + count))
        else:
            if isinstance(ids, (str, bytes)):
                raise TypeError("ids must be a sequence of str or int, got a single string")
            ids = list(ids)
            if len(ids) != count:
                raise ValueError(f"got {len(ids)} ids for {count} embeddings")
        seen = set()
        for index, identifier in enumerate(ids):
            if isinstance(identifier, bool) or not isinstance(identifier, (str, numbers.Integral)):
                raise TypeError(f"ids[{index}] must be a str or int, got {type(identifier).__name__}")
            if identifier in seen or identifier in self._id_positions:
                given = "the default id (the position)" if default_ids else f"ids[{index}] ="
                raise ValueError(f"{given} {identifier!r} is already in the index; pass unique ids")
            seen.add(identifier)
        return [identifier if isinstance(identifier, str) else int(identifier) for identifier in ids]

    # -- reading -------------------------------------------------------------------------------------------

    @property
    def ids(self) -> list[Any]:
        return [identifier for shard in self._shards for identifier in shard.ids]

    def _ids_at(self, positions: torch.Tensor) -> list[list[Any]]:
        """The ids at int64 positions `[Q, k]` (None where a position is -1), without listing every id."""
        shard_numbers, local = self._split_positions(positions.clamp(min=0))
        return [
            [self._shards[number].ids[offset] if position >= 0 else None for number, offset, position in zip(*row)]
            for row in zip(shard_numbers.tolist(), local.tolist(), positions.tolist())
        ]

    def _split_positions(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shard number, position within the shard) of each of the valid int64 `positions`."""
        if len(self._shards) == 1:  # the common case, spared the lookup on every search
            return torch.zeros_like(positions), positions
        sizes = torch.tensor([len(shard.ids) for shard in self._shards])
        ends = sizes.cumsum(0)
        shard_numbers = torch.searchsorted(ends, positions, right=True)
        return shard_numbers, positions - (ends - sizes)[shard_numbers]

    def metadata(self, position: int) -> Any:
        """The metadata of the candidate at `position` (None if it has none)."""
        shard, local = self._locate(position)
        return None if shard.metadata is None else shard.metadata[local]

    def position(self, identifier: Any) -> int:
        """The position of the candidate with id `identifier`."""
        if identifier not in self._id_positions:
            raise KeyError(f"id {identifier!r} is not in the index")
        return self._id_positions[identifier]

    def get_embeddings(self, positions: Sequence[int] | torch.Tensor, num_vectors: int | None = None) -> torch.Tensor:
        """float32 `[len(positions), num_vectors, D]`: stored candidates (dequantised), in the order given."""
        num_vectors = check_num_vectors(num_vectors, self.num_vectors, "num_vectors")
        positions = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= len(self)):
            raise IndexError(f"positions must lie in 0..{len(self) - 1}")
        order = torch.argsort(positions, stable=True)
        gathered = self._gather_sorted(positions[order], num_vectors)
        if bool((order[1:] > order[:-1]).all()):
            return gathered  # already in ascending order: no reordering copy
        return torch.empty_like(gathered).index_copy_(0, order, gathered)

    def _gather_sorted(self, positions: torch.Tensor, num_vectors: int) -> torch.Tensor:
        """float32 `[n, num_vectors, D]` for ascending positions: each shard's candidates are one contiguous
        run of the output, gathered straight into it (one pass over memory for float32 storage)."""
        result = torch.empty(len(positions), num_vectors, self.dim)
        shard_numbers, local = self._split_positions(positions)
        bounds = torch.searchsorted(shard_numbers, torch.arange(len(self._shards) + 1)).tolist()
        for shard, start, end in zip(self._shards, bounds[:-1], bounds[1:]):
            if start != end:
                shard.dequantized(local[start:end], num_vectors, out=result[start:end])
        return result

    def _gather_stored(self, positions: torch.Tensor, num_vectors: int) -> PrefixBlocks | torch.Tensor:
        """The candidates at ascending `positions` for the kernel: their stored blocks, gathered in the storage
        type (the kernel upcasts an 8 MiB chunk at a time), or float32 `[n, num_vectors, D]` where shards of
        different layouts (an index saved before prefix blocks, then added to) are involved."""
        shard_numbers, local = self._split_positions(positions)
        bounds = torch.searchsorted(shard_numbers, torch.arange(len(self._shards) + 1)).tolist()
        parts = [
            shard.gathered(local[start:end], num_vectors)
            for shard, start, end in zip(self._shards, bounds[:-1], bounds[1:])
            if start != end
        ]
        if any([block.shape[1] for block in part[0]] != [block.shape[1] for block in parts[0][0]] for part in parts):
            return self._gather_sorted(positions, num_vectors)
        if len(parts) == 1:
            blocks, scales, offsets = parts[0]
            return PrefixBlocks(blocks, scales, self._code_values, offsets)
        blocks = [torch.cat([part[0][number] for part in parts]) for number in range(len(parts[0][0]))]
        scales = [
            None if parts[0][1][number] is None else torch.cat([part[1][number] for part in parts])
            for number in range(len(parts[0][0]))
        ]
        offsets = None if parts[0][2] is None else torch.cat([part[2] for part in parts])
        return PrefixBlocks(blocks, scales, self._code_values, offsets)

    def _locate(self, position: int) -> tuple[_Shard, int]:
        if isinstance(position, bool) or not isinstance(position, numbers.Integral) or not 0 <= position < len(self):
            raise IndexError(f"position {position!r} is out of range for an index of {len(self)} candidates")
        shard_number, local = self._split_positions(torch.tensor([int(position)]))
        return self._shards[int(shard_number)], int(local)

    # -- search --------------------------------------------------------------------------------------------

    def search(
        self,
        queries: torch.Tensor,
        num_query_vectors: int | None = None,
        num_candidate_vectors: int | None = None,
        top_k: int = 10,
        shortlist_size: int | str | None = "auto",
        ann_query_vectors: int | None = None,
    ) -> SearchResults:
        """The `top_k` best candidates per query at the budget (r_q, r_c).

        Args:
            queries: float `[Q, R_q, D]` query embeddings (e.g. `model.encode_queries(texts)`).
            num_query_vectors / num_candidate_vectors: the budget; `None` uses all vectors.
            top_k: results per query (clipped to the index size).
            shortlist_size: "auto" (default): two stages when the index has an ANN index (built with `build_ann`
                or loaded with the index), with the shortlist `search_plan` names, else every candidate. `None`
                scores every candidate (exact). An int S runs two stages: each of the query's first
                `ann_query_vectors` vectors fetches its S nearest indexed vectors from the ANN index (`build_ann`,
                an HNSW over first vectors built on first use), and only their owners are scored exactly at the
                budget. Rows get -inf / -1 / None past the last candidate found.
            ann_query_vectors: query vectors sent to the first stage (more: better recall, more to rerank);
                default: the first `AUTO_ANN_QUERY_VECTORS` of the budget's r_q.

        Returns:
            `SearchResults(scores [Q, k] float32, indices [Q, k] int64, ids)`, best first.
        """
        if len(self) == 0:
            raise ValueError("the index is empty: add candidates before searching")
        queries = _check_queries(queries, self.dim)
        num_candidate_vectors = check_num_vectors(num_candidate_vectors, self.num_vectors, "num_candidate_vectors")
        num_query_vectors = check_num_vectors(num_query_vectors, queries.shape[1], "num_query_vectors")
        top_k = min(check_positive_int(top_k, "top_k"), len(self))
        queries = queries[:, :num_query_vectors].float()
        shortlist_size, ann_query_vectors = self.search_plan(
            top_k, num_query_vectors, shortlist_size, ann_query_vectors
        )
        if shortlist_size is None:
            scores, indices = self._search_exhaustive(queries, num_candidate_vectors, top_k)
        else:
            scores, indices = self._search_two_stage(
                queries, num_candidate_vectors, top_k, shortlist_size, ann_query_vectors
            )
        return SearchResults(scores, indices, self._ids_at(indices))

    def search_plan(
        self,
        top_k: int = 10,
        num_query_vectors: int = 1,
        shortlist_size: int | str | None = "auto",
        ann_query_vectors: int | None = None,
    ) -> tuple[int | None, int]:
        """(shortlist size per first-stage query vector, or None for exhaustive; first-stage query vectors) that
        `search` uses for these arguments. "auto" means two stages exactly when the index has an ANN index, with
        a shortlist of `max(AUTO_SHORTLIST, 10 * top_k)` per query vector and the first
        `min(AUTO_ANN_QUERY_VECTORS, num_query_vectors)` query vectors: on the benchmark's queries (a third
        whose first vector says nothing about the target), recall@10 against exhaustive search was 1.000
        there and 0.67 with one query vector."""
        if ann_query_vectors is None:
            ann_query_vectors = min(AUTO_ANN_QUERY_VECTORS, num_query_vectors)
        ann_query_vectors = check_num_vectors(ann_query_vectors, num_query_vectors, "ann_query_vectors")
        if isinstance(shortlist_size, str):
            if shortlist_size != "auto":
                raise ValueError(f"shortlist_size must be 'auto', None or a positive int, got {shortlist_size!r}")
            if self._ann is None:
                return None, ann_query_vectors
            return max(AUTO_SHORTLIST, 10 * top_k), ann_query_vectors
        if shortlist_size is None:
            return None, ann_query_vectors
        shortlist_size = check_positive_int(shortlist_size, "shortlist_size", none_allowed=True)
        if shortlist_size < top_k:
            raise ValueError(f"shortlist_size ({shortlist_size}) must be at least top_k ({top_k})")
        return shortlist_size, ann_query_vectors

    def _search_exhaustive(
        self, queries: torch.Tensor, num_candidate_vectors: int, top_k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The kernel reads each shard's prefix blocks as stored (only those r_c reaches), upcasting or
        # dequantising an 8 MiB chunk at a time for all queries at once. One query (the serving case) is a thin
        # product that torch's BLAS reads slowly: with numba installed, a kernel made for it reads each stored
        # vector once in its own type (see single_query.py). A batch goes through the batch outer product (each
        # candidate decoded once for all queries) where `single_query.batch_supports` measured it faster, a chunk
        # of candidates at a time so that its scores stay within `_BATCH_CHUNK_SCORES`.
        best_scores = best_indices = None
        start = 0
        for shard in self._shards:
            for top_scores, positions in self._shard_top_k(queries, shard.candidates(), num_candidate_vectors, top_k):
                top_indices = positions + start
                if best_scores is None:  # the first top-k is already in merge order
                    best_scores, best_indices = top_scores, top_indices
                else:
                    best_scores, best_indices = merge_top_k(best_scores, best_indices, top_scores, top_indices, top_k)
            start += len(shard.ids)
        return best_scores, best_indices

    @staticmethod
    def _shard_top_k(
        queries: torch.Tensor, candidates: PrefixBlocks, num_candidate_vectors: int, top_k: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One shard's best `[Q, <= top_k]` (scores, positions in the shard), in merge order, block by block."""
        numba = single_query.available()
        if numba and len(queries) == 1 and single_query.supports(candidates, queries.shape[1], num_candidate_vectors):
            scores = single_query.single_query_scores(queries[0], candidates, num_candidate_vectors)
            top_scores, top_columns = single_query.top_k_columns(scores, min(top_k, len(scores)))
            yield top_scores.unsqueeze(0), top_columns.unsqueeze(0)
        elif numba and single_query.batch_supports(candidates, len(queries), num_candidate_vectors):
            chunk = max(1, _BATCH_CHUNK_SCORES // len(queries))
            for first in range(0, len(candidates), chunk):
                rows = torch.arange(first, min(first + chunk, len(candidates)))
                scores = single_query.batch_scores(queries, candidates, num_candidate_vectors, rows)
                yield merge_top_k(None, None, scores, first, top_k)
        else:
            top = late_interaction_scores(queries, candidates, None, num_candidate_vectors, top_k=top_k)
            yield top.scores, top.indices

    def _search_two_stage(
        self,
        queries: torch.Tensor,
        num_candidate_vectors: int,
        top_k: int,
        shortlist_size: int,
        ann_query_vectors: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Ascending positions: gathers walk each shard forwards, and a shard's run lands in one slice.
        shortlists = [
            shortlist.sort().values for shortlist in self.ann_search(queries, shortlist_size, ann_query_vectors)
        ]
        scores = torch.full((len(queries), top_k), float("-inf"))
        indices = torch.full((len(queries), top_k), -1, dtype=torch.long)
        # Each query reranks its own shortlist: with numba, the one-query kernel reads the shortlisted rows where
        # they are stored; otherwise they are gathered (in the storage type) for torch's kernel.
        shard_candidates = [shard.candidates() for shard in self._shards]
        in_place = single_query.available() and all(
            single_query.supports(candidates, queries.shape[1], num_candidate_vectors)
            for candidates in shard_candidates
        )
        for row, shortlist in enumerate(shortlists):
            if len(shortlist) == 0:
                continue  # nothing found: the row stays padded
            if in_place:
                shortlist_scores = self._score_rows(queries[row], shard_candidates, shortlist, num_candidate_vectors)
                # The shortlist ascends, so its lower columns are its lower positions (ties: merge order).
                top_scores, top_columns = single_query.top_k_columns(shortlist_scores, min(top_k, len(shortlist)))
                found = len(top_scores)
                scores[row, :found], indices[row, :found] = top_scores, shortlist[top_columns]
                continue
            candidates = self._gather_stored(shortlist, num_candidate_vectors)
            top = late_interaction_scores(queries[row : row + 1], candidates, top_k=min(top_k, len(shortlist)))
            found = top.scores.shape[1]
            scores[row, :found], indices[row, :found] = top.scores[0], shortlist[top.indices[0]]
        return scores, indices

    def _score_rows(
        self,
        query: torch.Tensor,
        shard_candidates: list[PrefixBlocks],
        positions: torch.Tensor,
        num_candidate_vectors: int,
    ) -> torch.Tensor:
        """float32 scores of one query `[r_q, D]` against the candidates at ascending `positions`, read in place by
        the one-query kernel, shard by shard (`shard_candidates`: each shard's `candidates()`)."""
        shard_numbers, local = self._split_positions(positions)
        bounds = torch.searchsorted(shard_numbers, torch.arange(len(self._shards) + 1)).tolist()
        return torch.cat(
            [
                single_query.single_query_scores(query, candidates, num_candidate_vectors, local[start:end])
                for candidates, start, end in zip(shard_candidates, bounds[:-1], bounds[1:])
                if start != end
            ]
        )

    # -- first stage: approximate nearest neighbours -------------------------------------------------------

    def build_ann(
        self, num_vectors: int = 1, kind: str = "hnsw", hnsw_neighbors: int = 32, ef_search: int | None = None
    ) -> None:
        """Build the first-stage index over each candidate's first `num_vectors` vectors (1 = the (1,1) MMR
        vector; more vectors recall better and cost a larger index), with faiss (the `[search]` extra).

        Args:
            num_vectors: leading vectors per candidate put into the ANN index.
            kind: "hnsw" (faiss IndexHNSWFlat, inner product: sub-linear, approximate) or "flat" (IndexFlatIP:
                exact brute force over the first vectors; fine up to a few million small vectors).
            hnsw_neighbors / ef_search: HNSW graph degree M and the least efSearch (default: the number of
                neighbours asked for).
        """
        faiss = _import_faiss()
        num_vectors = check_num_vectors(num_vectors, self.num_vectors, "num_vectors")
        if kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, hnsw_neighbors, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = max(40, 2 * hnsw_neighbors)
        elif kind == "flat":
            index = faiss.IndexFlatIP(self.dim)
        else:
            raise ValueError(f"kind must be 'hnsw' or 'flat', got {kind!r}")
        digest = hashlib.sha256()
        for vectors in self._ann_vectors(num_vectors):
            digest.update(vectors.tobytes())
            index.add(vectors)
        self._ann, self._ann_vectors_sha256 = index, digest.hexdigest()
        self._ann_settings = {
            "num_vectors": num_vectors,
            "kind": kind,
            "hnsw_neighbors": hnsw_neighbors,
            "ef_search": ef_search,
        }

    def _ann_vectors(self, num_vectors: int) -> Iterator[Any]:
        """The vectors an ANN index over each candidate's first `num_vectors` holds, in order: float32 numpy
        blocks `[n * num_vectors, D]`."""
        block = max(1, _ANN_BLOCK_ELEMENTS // (num_vectors * self.dim))
        for shard in self._shards:
            for offset in range(0, len(shard.ids), block):
                vectors = shard.dequantized(slice(offset, offset + block), num_vectors)
                yield vectors.reshape(-1, self.dim).numpy()

    def _ann_vectors_digest(self, num_vectors: int) -> str:
        digest = hashlib.sha256()
        for vectors in self._ann_vectors(num_vectors):
            digest.update(vectors.tobytes())
        return digest.hexdigest()

    def ann_search(self, queries: torch.Tensor, shortlist_size: int, num_query_vectors: int = 1) -> list[torch.Tensor]:
        """First stage: per query, the candidates (int64 positions, each once, best first) owning the
        `shortlist_size` indexed vectors nearest (inner product) to each of the query's first
        `num_query_vectors` vectors: at most `num_query_vectors * shortlist_size` candidates. Builds the ANN
        index on first use, with the settings of the last `build_ann` (default: HNSW over first vectors)."""
        faiss = _import_faiss()
        with self._ann_lock:
            if self._ann is None:
                self.build_ann(**self._ann_settings)
        queries = _check_queries(queries, self.dim)
        num_query_vectors = check_num_vectors(num_query_vectors, queries.shape[1], "ann_query_vectors")
        neighbours = min(shortlist_size, self._ann.ntotal)
        vectors = queries[:, :num_query_vectors].float().reshape(-1, self.dim).contiguous().numpy()
        if isinstance(self._ann, faiss.IndexHNSW):
            # Search parameters per call, not set on the shared index: concurrent searches stay independent.
            parameters = faiss.SearchParametersHNSW(efSearch=max(self._ann_settings["ef_search"] or 0, neighbours))
            _, vector_ids = self._ann.search(vectors, neighbours, params=parameters)
        else:
            _, vector_ids = self._ann.search(vectors, neighbours)
        # [Q, rank, query vector]: owners in order of rank across the query's vectors, each once.
        vector_ids = torch.from_numpy(vector_ids).view(len(queries), num_query_vectors, neighbours).transpose(1, 2)
        shortlists = []
        for row in vector_ids:
            row = row.flatten()
            # -1 marks fewer hits than asked for.
            owners = dict.fromkeys((row[row >= 0] // self._ann_settings["num_vectors"]).tolist())
            shortlists.append(torch.tensor(list(owners), dtype=torch.long))
        return shortlists

    # -- persistence ---------------------------------------------------------------------------------------

    def save(self, folder: str, max_shard_candidates: int | None = None) -> None:
        """Write the index as safetensors shards + JSON (see `storage`) and the ANN index, if built.

        The new version is written beside the one already in `folder` and switched in with one atomic rename of
        index.json: a crash at any moment leaves the old or the new index whole. Files of older versions are
        removed afterwards; nothing that is not part of an index is touched. A second process saving into the
        same folder at the same time gets `storage.IndexLockedError`.

        Args:
            folder: created if missing; an index already there is replaced.
            max_shard_candidates: split into shards of at most this many candidates (default: one per `add`).
        """
        if max_shard_candidates is not None:
            check_positive_int(max_shard_candidates, "max_shard_candidates", none_allowed=True)
        if len(self) == 0:
            raise ValueError("the index is empty: nothing to save")
        storage.read_manifest(folder)  # raises if an index.json there is not an index's: it is never replaced
        with storage.write_lock(folder):
            generation = storage.new_generation()
            try:
                path = storage.generation_folder(folder, generation)
                pieces = [piece for piece in self._pieces(max_shard_candidates) if len(piece[2])]
                for number, (embeddings, scales, ids, metadata, offsets) in enumerate(pieces):
                    storage.write_shard(path, number, len(pieces), embeddings, scales, ids, metadata, None, offsets)
                if self._ann is not None:
                    faiss = _import_faiss()
                    ann_path = os.path.join(path, storage.ANN_FILE)
                    storage.write_file_atomically(ann_path, lambda temporary: _write_faiss(faiss, self._ann, temporary))
                ann_vectors_sha256 = None if self._ann is None else self._ann_vectors_sha256
                storage.commit(folder, generation, self.manifest(), len(pieces), ann_vectors_sha256)
            except BaseException:
                storage.discard_generation(folder, generation)  # the old index stays; nothing half-written with it
                raise

    def _pieces(self, max_shard_candidates: int | None) -> Iterator[tuple[Any, ...]]:
        for shard in self._shards:
            size = max_shard_candidates or len(shard.ids)
            for offset in range(0, len(shard.ids), size):
                end = offset + size
                if len(shard.blocks) == 1:  # an index saved before the prefix-block layout: split on save
                    blocks, scales = prefix_blocks(shard.blocks[0][offset:end], _slice(shard.scales[0], offset, end))
                else:
                    blocks = [block[offset:end] for block in shard.blocks]
                    scales = [_slice(block_scales, offset, end) for block_scales in shard.scales]
                yield (
                    blocks,
                    scales,
                    shard.ids[offset:end],
                    None if shard.metadata is None else shard.metadata[offset:end],
                    _slice(shard.offsets, offset, end),
                )

    def manifest(self, corpus: dict[str, Any] | None = None) -> dict[str, Any]:
        """The settings part of `index.json`; `corpus` records how the shards were made (`metaembed index`)."""
        return {
            "format": INDEX_FORMAT,
            "dim": self.dim,
            "num_vectors": self.num_vectors,
            "storage": self.storage,
            "model_name_or_path": self.model_name_or_path,
            "ann": self._ann_settings,
            "corpus": corpus,
        }

    @classmethod
    def load(cls, folder: str, mmap: bool = True) -> MetaEmbedIndex:
        """Open a saved index. With `mmap` (default) the shards are memory-mapped: opening is instant and
        only the pages a search touches are read (a budget's first r_c vectors). Every file is checked against
        the sizes index.json records and against its own structure (without `mmap`, also against its sha256);
        a saved ANN index is used only if the vectors it was built from are the shards' (their first vectors
        are read to check it). Errors name the file."""
        for attempt in range(3):
            manifest = storage.read_manifest(folder)
            if manifest is None:
                raise FileNotFoundError(f"{folder} is not a MetaEmbed index (no index.json)")
            try:
                return cls._load(folder, manifest, mmap)
            except FileNotFoundError:
                # A writer committed a new version and removed this one's files meanwhile: open the new one.
                if attempt == 2 or storage.read_manifest(folder) == manifest:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _load(cls, folder: str, manifest: dict[str, Any], mmap: bool) -> MetaEmbedIndex:
        index = cls(manifest["dim"], manifest["num_vectors"], manifest["storage"], manifest.get("model_name_or_path"))
        shards, ann_path = storage.index_files(folder, manifest)
        for shard in shards:
            blocks, scales, ids, metadata, offsets = storage.read_shard(shard, mmap)
            widths = [block.shape[1] for block in blocks]
            expected = [index.num_vectors] if len(blocks) == 1 else storage.prefix_block_widths(index.num_vectors)
            if (
                widths != expected
                or blocks[0].shape[2] != storage.stored_dim(index.dim, index.storage)
                or any(block.dtype != STORAGE_DTYPES[index.storage] for block in blocks)
            ):
                found = ", ".join(f"{block.dtype} {list(block.shape)}" for block in blocks)
                raise ValueError(
                    f"{shard.tensors} holds {found}, expected {index.storage} [n, R_b, {index.dim}] with R_b "
                    f"{expected} ({index.num_vectors} vectors)"
                )
            if (offsets is not None) != (index.storage == "residual4") or (
                offsets is not None and offsets.shape[1] != index.dim
            ):
                found = "none" if offsets is None else f"{list(offsets.shape)}"
                raise ValueError(
                    f"{shard.tensors} has offsets {found}: {index.storage} storage needs "
                    + (f"float16 [n, {index.dim}] (each candidate's mean)" if index.storage == "residual4" else "none")
                )
            start = len(index)
            index._shards.append(_Shard(tuple(blocks), tuple(scales), ids, metadata, offsets, index._code_values))
            for offset, identifier in enumerate(ids):
                if isinstance(identifier, bool) or not isinstance(identifier, (str, int)):
                    raise ValueError(f"{shard.sidecar}: id {identifier!r} is not a str or int")
                if identifier in index._id_positions:
                    raise ValueError(f"{shard.sidecar}: id {identifier!r} appears more than once in the index")
                index._id_positions[identifier] = start + offset
        index._ann_settings.update(manifest.get("ann") or {})
        if ann_path is not None:
            import numpy

            content, vectors_sha256 = storage.read_ann(ann_path, manifest)
            if vectors_sha256 != index._ann_vectors_digest(index._ann_settings["num_vectors"]):
                raise ValueError(
                    f"{ann_path} was built from other vectors than the shards {storage.MANIFEST_FILE} lists"
                )
            ann = _import_faiss().deserialize_index(numpy.frombuffer(content, dtype=numpy.uint8))
            if ann.ntotal != len(index) * index._ann_settings["num_vectors"]:
                raise ValueError(f"{ann_path} holds {ann.ntotal} vectors, the shards {len(index)} candidates")
            index._ann, index._ann_vectors_sha256 = ann, vectors_sha256
        return index


def _slice(tensor: torch.Tensor | None, start: int, end: int) -> torch.Tensor | None:
    return None if tensor is None else tensor[start:end]


def _check_queries(queries: Any, dim: int) -> torch.Tensor:
    if not isinstance(queries, torch.Tensor):
        raise TypeError(f"queries must be a float tensor [Q, R_q, D], got {type(queries).__name__}")
    if queries.ndim == 2:
        raise ValueError(
            f"queries must have shape [Q, R_q, D]; for one query use queries.unsqueeze(0), got {list(queries.shape)}"
        )
    if queries.ndim != 3 or not queries.dtype.is_floating_point or queries.shape[0] == 0:
        raise ValueError(
            f"queries must be a non-empty float tensor [Q, R_q, D], got {queries.dtype} {list(queries.shape)}"
        )
    if queries.shape[2] != dim:
        raise ValueError(f"queries have dim {queries.shape[2]}, the index holds dim {dim}")
    queries = queries.detach().cpu()
    if not bool(torch.isfinite(queries).all()):
        row = int((~torch.isfinite(queries)).flatten(1).any(1).nonzero()[0, 0])
        raise ValueError(f"queries[{row}] contains NaN or infinite values")
    return queries


def _write_faiss(faiss: Any, ann: Any, path: str) -> None:
    """`faiss.write_index`, whose I/O failures are `RuntimeError`s: raised as an `OSError`."""
    try:
        faiss.write_index(ann, path)
    except RuntimeError as error:
        raise OSError(errno.EIO, f"faiss could not write the ANN index ({str(error).strip()})") from error


def _import_faiss() -> Any:
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            "two-stage search needs faiss: pip install 'metaembed[search]' (or faiss-cpu / faiss-gpu)"
        ) from error
    return faiss
