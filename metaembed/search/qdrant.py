"""Serve MetaEmbed multi-vectors from Qdrant: one multivector collection, one named vector per candidate budget
r_c (MAX_SIM over dot products, which is exactly MetaEmbed's late interaction on its L2-normalised vectors).

Works with any `qdrant_client.QdrantClient`: local mode (`QdrantClient(path=...)` or `":memory:"`) for tests
and small collections, or a server / cluster (`QdrantClient(url="http://qdrant:6333", api_key=...)`), where
Qdrant shards and replicates the collection across nodes. Needs the `[search]` extra (qdrant-client).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch

from scoring_metaembed import MMR_BUDGETS, check_num_vectors

from .index import MetaEmbedIndex, SearchResults

__all__ = ["MetaEmbedQdrant", "point_id"]

ID_FIELD = "metaembed_id"


def point_id(identifier: str | int) -> int:
    """The Qdrant point id of a MetaEmbed id: a 63-bit hash, so the same id always maps to the same point
    (adding it again replaces it) and writers in different processes never collide."""
    digest = hashlib.blake2b(json.dumps(identifier).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def vector_name(num_candidate_vectors: int) -> str:
    """The named vector that holds each point's first `num_candidate_vectors` vectors."""
    return f"metaembed_rc{num_candidate_vectors}"


class MetaEmbedQdrant:
    """A Qdrant collection of MetaEmbed candidates, searchable at the budgets whose r_c it stores.

    Args:
        client: a `qdrant_client.QdrantClient` (local mode or a server / cluster).
        collection_name: the collection to create or use.
        candidate_vector_counts: the r_c values stored, one named vector each (default: the paper's 1, 4, 8,
            16, 64). Storage grows with their sum, so keep only the budgets you serve.
    """

    def __init__(
        self,
        client: Any,
        collection_name: str,
        candidate_vector_counts: Sequence[int] = tuple(sorted({r_c for _, r_c in MMR_BUDGETS})),
    ) -> None:
        counts = list(candidate_vector_counts)
        if not counts:
            raise ValueError("candidate_vector_counts must name at least one r_c")
        for count in counts:
            check_num_vectors(count, 2**31 - 1, "candidate_vector_counts")
        self.client, self.collection_name = client, collection_name
        self.candidate_vector_counts = sorted(set(counts))

    def create(self, dim: int, on_disk: bool = False) -> None:
        """Create the collection (error if it exists): one DOT / MAX_SIM multivector per stored r_c."""
        from qdrant_client import models

        multivector = models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM)
        self.client.create_collection(
            self.collection_name,
            vectors_config={
                vector_name(count): models.VectorParams(
                    size=dim, distance=models.Distance.DOT, multivector_config=multivector, on_disk=on_disk
                )
                for count in self.candidate_vector_counts
            },
        )

    def add(
        self,
        embeddings: torch.Tensor,
        ids: Sequence[Any] | None = None,
        metadata: Sequence[dict[str, Any]] | None = None,
        batch_size: int = 256,
    ) -> None:
        """Upload candidates `[n, R_c, D]` (R_c >= the largest stored r_c) with str / int ids (default: the
        next positions, counted in the collection) kept in the payload field "metaembed_id", and payload
        dicts. An id already in the collection is replaced (Qdrant upsert)."""
        from qdrant_client import models

        if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 3 or len(embeddings) == 0:
            raise ValueError("embeddings must be a non-empty tensor [n, R_c, D]")
        if embeddings.shape[1] < self.candidate_vector_counts[-1]:
            raise ValueError(
                f"embeddings have {embeddings.shape[1]} vectors per item, the collection stores up to "
                f"{self.candidate_vector_counts[-1]}"
            )
        count = len(embeddings)
        if ids is None:
            start = self.client.count(self.collection_name, exact=True).count
            ids = list(range(start, start + count))
        ids = list(ids)
        if len(ids) != count or (metadata is not None and len(metadata) != count):
            raise ValueError(f"ids and metadata must have one entry per embedding ({count})")
        first_positions: dict[Any, int] = {}
        for index, identifier in enumerate(ids):
            if isinstance(identifier, bool) or not isinstance(identifier, (str, int)):
                raise TypeError(f"ids[{index}] must be a str or int, got {type(identifier).__name__}")
            # One point per id: a repeat would silently replace the earlier candidate of this same call.
            if first_positions.setdefault(identifier, index) != index:
                raise ValueError(
                    f"ids[{index}] = {identifier!r} repeats ids[{first_positions[identifier]}]; ids in one add must be "
                    "unique (adding an id again in a later add replaces its point)"
                )
        for index, payload in enumerate(metadata or ()):
            if payload is not None and not isinstance(payload, dict):
                raise TypeError(f"metadata[{index}] must be a dict (a Qdrant payload), got {type(payload).__name__}")
        vectors = embeddings.detach().float().cpu()
        points = (
            models.PointStruct(
                id=point_id(ids[row]),
                vector={name: vectors[row, :count_r].tolist() for name, count_r in self._names()},
                payload={**((metadata[row] or {}) if metadata is not None else {}), ID_FIELD: ids[row]},
            )
            for row in range(count)
        )
        self.client.upload_points(self.collection_name, points, batch_size=batch_size, wait=True)

    def add_index(self, index: MetaEmbedIndex, batch_size: int = 256) -> None:
        """Upload every candidate of a `MetaEmbedIndex` (dequantised), with its ids and dict metadata."""
        block = max(1, 2**22 // (index.num_vectors * index.dim))
        all_ids = index.ids
        for start in range(0, len(index), block):
            positions = list(range(start, min(start + block, len(index))))
            metadata = [index.metadata(position) for position in positions] if index.has_metadata else None
            if metadata is not None:
                metadata = [value if isinstance(value, dict) else {"metadata": value} for value in metadata]
            self.add(
                index.get_embeddings(positions),
                [all_ids[position] for position in positions],
                metadata,
                batch_size=batch_size,
            )

    def _names(self) -> list[tuple[str, int]]:
        return [(vector_name(count), count) for count in self.candidate_vector_counts]

    def search(
        self,
        queries: torch.Tensor,
        num_query_vectors: int,
        num_candidate_vectors: int,
        top_k: int = 10,
        with_payload: bool = False,
    ) -> SearchResults | tuple[SearchResults, list[list[dict[str, Any]]]]:
        """The `top_k` best candidates per query at the budget (r_q, r_c); r_c must be a stored count.

        Returns:
            `SearchResults(scores [Q, k] float32, indices [Q, k] int64 Qdrant point ids (see `point_id`),
            ids)`, and with `with_payload` also the payloads, per query.
        """
        if num_candidate_vectors not in self.candidate_vector_counts:
            raise ValueError(
                f"num_candidate_vectors={num_candidate_vectors} is not stored in this collection; stored r_c: "
                f"{self.candidate_vector_counts}"
            )
        if not isinstance(queries, torch.Tensor) or queries.ndim != 3 or len(queries) == 0:
            raise ValueError("queries must be a non-empty tensor [Q, R_q, D]")
        num_query_vectors = check_num_vectors(num_query_vectors, queries.shape[1], "num_query_vectors")
        vectors = queries[:, :num_query_vectors].detach().float().cpu()
        scores, points, ids, payloads = [], [], [], []
        for query in vectors:
            response = self.client.query_points(
                self.collection_name,
                query=query.tolist(),
                using=vector_name(num_candidate_vectors),
                limit=top_k,
                with_payload=True,
            )
            scores.append([point.score for point in response.points])
            points.append([int(point.id) for point in response.points])
            ids.append([point.payload[ID_FIELD] for point in response.points])
            payloads.append([{k: v for k, v in point.payload.items() if k != ID_FIELD} for point in response.points])
        results = SearchResults(torch.tensor(scores, dtype=torch.float32), torch.tensor(points), ids)
        return (results, payloads) if with_payload else results
