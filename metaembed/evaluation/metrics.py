"""Retrieval metrics: ranking metrics from pytrec_eval (trec_eval's definitions, as mteb and BEIR use), plus the
two the field computes by hand: precision@1 over a per-query candidate list (MMEB) and capped recall (BEIR's
R_cap@k).

Ties. A ranking orders candidates by score, highest first, and equal scores by candidate id, the greater string
first. That is trec_eval's own rule (pytrec_eval sorts a run by score, then docid descending by `strcmp`), so the
top-k lists built here (`top_k_by_rule`) hold exactly the candidates pytrec_eval would rank first in the full run,
and every metric equals pytrec_eval's on the full run. MMEB's precision@1 follows VLM2Vec's `argmax`: on a tie
the earlier entry of the candidate list wins, and the positive is entry 0.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Mapping[str, float]]

METRIC_PATTERN = re.compile(r"^(ndcg|recall|precision|map|mrr|recall_cap)@([1-9][0-9]*)$")
# our name -> pytrec_eval measure (trec_eval names); mrr and recall_cap are handled apart.
PYTREC_MEASURES = {"ndcg": "ndcg_cut", "recall": "recall", "precision": "P", "map": "map_cut"}
LIST_METRICS = ("precision@1",)  # the metric of per-query candidate lists (MMEB)
MAX_CUTOFF = 1_000_000  # trec_eval reads cutoffs as C longs; no ranking reads deeper


def parse_metric(name: str) -> tuple[str, int]:
    """("ndcg", 10) for "ndcg@10"; raises for names this module does not compute."""
    match = METRIC_PATTERN.match(name) if isinstance(name, str) else None
    if match is None or len(match.group(2)) > 7 or int(match.group(2)) > MAX_CUTOFF:
        raise ValueError(
            f"unknown metric {name!r}: expected ndcg@k, recall@k, precision@k, map@k, mrr@k or recall_cap@k "
            f"with 1 <= k <= {MAX_CUTOFF}"
        )
    return match.group(1), int(match.group(2))


def metric_depth(metrics: Sequence[str]) -> int:
    """How many ranked candidates per query the metrics read (the largest cutoff)."""
    return max(parse_metric(name)[1] for name in metrics)


def import_pytrec_eval():
    """The pytrec_eval module, or an ImportError saying which extra installs it (call it before long work)."""
    try:
        import pytrec_eval
    except ImportError as error:  # an optional dependency
        raise ImportError(
            "ranking metrics need pytrec_eval: pip install 'metaembed[eval]' (or [train] for `metaembed demo`; "
            "the package is pytrec-eval-terrier)"
        ) from error
    return pytrec_eval


def per_query_metrics(
    qrels: Qrels, run: Run, metrics: Sequence[str], *, mrr_run: Run | None = None
) -> dict[str, dict[str, float]]:
    """Each metric of each query of `qrels` that has any judgement (also those judged only with grade 0: they
    score 0, as in mteb and vidore-benchmark).

    Args:
        qrels: {query id: {candidate id: graded relevance (int)}}; relevance >= 1 counts as relevant, and nDCG uses
            the grade as its gain (trec_eval's linear gain).
        run: {query id: {candidate id: score}}, e.g. each query's `top_k_by_rule` list; a query missing from the
            run counts 0.
        metrics: names such as "ndcg@5", "recall@100", "mrr@10" (reciprocal rank within the top 10),
            "precision@1", "map@100", "recall_cap@10" (relevant in the top k / min(k, relevant), BEIR's R_cap;
            queries without a relevant candidate count 0).
        mrr_run: the run MRR reads, ranked in its insertion order on ties (a stable sort by score: mteb 1.x, which
            vidore-benchmark uses); None: `run` under the tie rule of this module (mteb 2.x).

    Returns:
        {metric name: {query id: value}}.
    """
    parsed = {name: parse_metric(name) for name in metrics}
    queries = [query for query, relevance in qrels.items() if relevance]
    if not queries:
        raise ValueError("no query has a judged candidate in the qrels: nothing to evaluate")
    qrels = {
        query: {doc: check_grade(grade, f"qrels[{query!r}][{doc!r}]") for doc, grade in qrels[query].items()}
        for query in queries
    }
    run = {query: dict(run.get(query, {})) for query in queries}
    pytrec_eval = import_pytrec_eval()
    measures = {f"{PYTREC_MEASURES[kind]}.{k}" for kind, k in parsed.values() if kind in PYTREC_MEASURES}
    scored = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run) if measures else {}
    results: dict[str, dict[str, float]] = {}
    for name, (kind, k) in parsed.items():
        values = {}
        for query in queries:
            relevant = {doc for doc, grade in qrels[query].items() if grade >= 1}
            if kind in PYTREC_MEASURES:
                values[query] = scored[query][f"{PYTREC_MEASURES[kind]}_{k}"] if query in scored else 0.0
            elif kind == "mrr":
                if mrr_run is None:
                    ranked = [doc for doc, _ in ranked_ids(run[query])[:k]]
                else:  # stable: equal scores keep the run's order
                    ranked = sorted(mrr_run.get(query, {}), key=mrr_run.get(query, {}).get, reverse=True)[:k]
                values[query] = next((1 / (rank + 1) for rank, doc in enumerate(ranked) if doc in relevant), 0.0)
            else:  # recall_cap: not a trec_eval measure
                top = {doc for doc, _ in ranked_ids(run[query])[:k]}
                values[query] = len(relevant & top) / min(k, len(relevant)) if relevant else 0.0
        results[name] = values
    return results


def ranking_metrics(
    qrels: Qrels, run: Run, metrics: Sequence[str], *, mrr_run: Run | None = None, round_digits: int | None = None
) -> dict[str, float]:
    """Mean of each metric over the judged queries (`per_query_metrics`), rounded to `round_digits` decimals as
    the reference rounds (mteb: 5) or not at all (None)."""
    per_query = per_query_metrics(qrels, run, metrics, mrr_run=mrr_run)
    means = {name: sum(values.values()) / len(values) for name, values in per_query.items()}
    return means if round_digits is None else {name: round(value, round_digits) for name, value in means.items()}


# trec_eval allocates memory per grade level (a grade of 3e9 takes ~24 GB; 1e300 overflows): grades are bounded.
MAX_GRADE = 1000


def check_grade(grade: object, where: str) -> int:
    """A relevance grade as an int within +-`MAX_GRADE`; an error naming `where` for anything else."""
    if isinstance(grade, bool) or not isinstance(grade, (int, float)):
        raise ValueError(f"{where}: {grade!r} is not an integer grade")
    if not -MAX_GRADE <= grade <= MAX_GRADE or not float(grade).is_integer():
        raise ValueError(f"{where}: {grade!r} is not an integer grade within -{MAX_GRADE}..{MAX_GRADE}")
    return int(grade)


def ranked_ids(scores: Mapping[str, float]) -> list[tuple[str, float]]:
    """(candidate id, score) pairs in trec_eval's order: score descending, then id descending (as strings)."""
    return sorted(scores.items(), key=lambda pair: (pair[1], pair[0]), reverse=True)


def order_keys(scores: torch.Tensor, id_ranks: torch.Tensor) -> torch.Tensor:
    """int64 keys that sort like (score, id) under the tie rule: the float32 score's bits mapped to an int that
    orders like the float, shifted up, plus the candidate id's rank among all ids in string order.

    Args:
        scores: float32 `[Q, N]`.
        id_ranks: int64 `[N]`, 0 for the smallest id (string order).
    """
    scores = scores.float() + 0.0  # -0.0 -> +0.0: they tie, as in trec_eval
    bits = scores.view(torch.int32).to(torch.int64)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # negative floats: larger magnitude sorts lower
    return ordered * (1 << 32) + id_ranks


def top_k_by_rule(
    scores: torch.Tensor,
    id_ranks: torch.Tensor,
    k: int,
    best: tuple[torch.Tensor, torch.Tensor] | None = None,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` best of `[Q, N]` scores under the tie rule, merged with `best` from earlier blocks.

    Args:
        scores: float32 `[Q, N]` of one block of candidates.
        id_ranks: int64 `[N]` string-order ranks of those candidates' ids among all ids (see `order_keys`).
        k: how many to keep per query.
        best: (keys `[Q, k']`, positions `[Q, k']`) returned for earlier blocks, or None.
        offset: the position of the block's first candidate.

    Returns:
        (keys `[Q, min(k, seen)]`, positions `[Q, min(k, seen)]`), best first; `scores_from_keys` gives the scores.
    """
    keys = order_keys(scores, id_ranks)
    positions = torch.arange(offset, offset + scores.shape[1]).expand_as(keys)
    if best is not None:
        keys, positions = torch.cat([best[0], keys], 1), torch.cat([best[1], positions], 1)
    top = torch.topk(keys, min(k, keys.shape[1]), dim=1)  # keys are unique per row: no ties left
    return top.values, positions.gather(1, top.indices)


def scores_from_keys(keys: torch.Tensor) -> torch.Tensor:
    """float32 scores of `order_keys` output."""
    ordered = torch.div(keys, 1 << 32, rounding_mode="floor")
    bits = torch.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF).to(torch.int32)
    return bits.view(torch.float32)


def list_precision_at_1(scores: Sequence[torch.Tensor]) -> float:
    """MMEB's metric: the share of queries whose positive (entry 0 of its candidate list) scores highest; on a
    tie the earlier entry wins (`argmax`, as VLM2Vec), so a tie with the positive counts as a hit.

    Args:
        scores: one float tensor `[len(candidate list)]` per query.
    """
    if not scores:
        raise ValueError("no queries: nothing to evaluate")
    return sum(int(torch.argmax(row)) == 0 for row in scores) / len(scores)


__all__ = [
    "LIST_METRICS",
    "MAX_GRADE",
    "check_grade",
    "import_pytrec_eval",
    "list_precision_at_1",
    "metric_depth",
    "parse_metric",
    "per_query_metrics",
    "ranked_ids",
    "ranking_metrics",
    "scores_from_keys",
    "top_k_by_rule",
]
