"""Synthetic MetaEmbed-like multi-vectors for the search benchmarks: clustered candidates whose first vector
summarises them, queries made from one target candidate's vectors, a third of them "hard" (a first vector that
says nothing about the target), so the first stage of a two-stage search is not flattered."""

from __future__ import annotations

import torch


def make_collection(
    num_candidates: int,
    num_queries: int,
    candidate_vectors: int = 64,
    query_vectors: int = 16,
    dim: int = 128,
    num_topics: int = 500,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(candidates float32 [N, R_c, D], queries float32 [Q, R_q, D], targets int64 [Q]), all L2-normalised.

    A candidate draws a topic (one of `num_topics` cluster centres, so many candidates look alike), its own
    direction near that topic, and vectors mixing the two with fresh noise; its first vector leans most on the
    shared topic, later ones on what is its own. A query picks a target candidate and perturbs random vectors of
    it; every third query replaces its first vector with an unrelated one (hard for a first-vector shortlist).
    """
    generator = torch.Generator().manual_seed(seed)

    def unit(*shape: int) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.randn(*shape, dim, generator=generator), dim=-1)

    topics = unit(num_topics)
    candidates = torch.empty(num_candidates, candidate_vectors, dim)
    topic_weight = torch.linspace(1.0, 0.3, candidate_vectors).view(1, -1, 1)
    block = 4096
    for start in range(0, num_candidates, block):
        count = min(block, num_candidates - start)
        topic = topics[torch.randint(num_topics, (count,), generator=generator)].unsqueeze(1)
        own = torch.nn.functional.normalize(topic.squeeze(1) + 0.8 * unit(count), dim=-1).unsqueeze(1)
        vectors = topic_weight * topic + (1.2 - topic_weight) * own + 0.5 * unit(count, candidate_vectors)
        candidates[start : start + count] = torch.nn.functional.normalize(vectors, dim=-1)
    targets = torch.randint(num_candidates, (num_queries,), generator=generator)
    picks = torch.randint(candidate_vectors, (num_queries, query_vectors), generator=generator)
    picked = candidates[targets.unsqueeze(1), picks]
    queries = torch.nn.functional.normalize(picked + 0.6 * unit(num_queries, query_vectors), dim=-1)
    queries[:, 0] = torch.nn.functional.normalize(candidates[targets, 0] + 0.6 * unit(num_queries), dim=-1)
    hard = torch.arange(num_queries) % 3 == 2
    queries[hard, 0] = unit(int(hard.sum()))
    return candidates, queries, targets
