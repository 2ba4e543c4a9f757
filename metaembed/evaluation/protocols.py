"""Evaluation protocols: the rules of the reference implementation that publishes each leaderboard, so that the
numbers this package reports are the leaderboard's numbers on the same scores.

| rule | `mteb` (2.x) | `vidore-benchmark` (5.x) | `vlm2vec` (MMEB) |
|---|---|---|---|
| ViDoRe v1 repeated query text | every row's page relevant | the last row's page relevant | - |
| ViDoRe v1 page files with the same image bytes | one page | scored apart | - |
| queries judged only with grade 0 | counted (score 0) | counted (score 0) | - |
| empty-string query (ViDoRe v1) | dropped | kept (refused here: no text to encode) | - |
| negative scores | as they are | clamped to 0 (all but the first page) | as they are |
| ties | doc id descending (trec_eval) | doc id descending; MRR: corpus order | argmax: the positive wins |
| main score | nDCG@5 (ViDoRe v1/v2), nDCG@10 (v3, BEIR) | nDCG@5 | precision@1 |
| rounding of means | 5 decimals | 5 decimals | none |

Sources (read for these rules):
- mteb 2.26: `mteb/_evaluators/retrieval_metrics.py` (`calculate_retrieval_scores`, `mrr` sorting by
  `(score, doc id)` descending, means `round(..., 5)`), `mteb/abstasks/retrieval.py`
  (`_filter_queries_without_positives` drops only queries without any qrels row),
  `mteb/tasks/retrieval/eng/vidore_bench_retrieval.py` (ViDoRe v1 tasks read the
  `mteb/*_beir` copies: one query per distinct text, every row's page relevant, each page image once;
  `main_score="ndcg_at_5"`).
- vidore-benchmark 5.0 (illuin-tech/vidore-benchmark, pins mteb 1.16):
  `src/vidore_benchmark/evaluation/vidore_evaluators/vidore_evaluator_qa.py` lines 142-160 (`queries2filename`
  is a dict built over all rows: the last row wins; `max(results[query].get(filename, 0), score)` clamps every
  page but the first at 0), `src/vidore_benchmark/utils/data_utils.py` `deduplicate_dataset_rows` (drops only
  None: "" is kept), mteb 1.16.5 `mteb/evaluation/evaluators/utils.py` lines 71-74 (MRR sorts by score alone:
  ties keep the results' insertion order, the corpus order).
- VLM2Vec (TIGER-AI-Lab/VLM2Vec): `experiments/public/eval/image.yaml` (each MMEB dataset's parser),
  `src/data/eval_dataset/image_t2i_eval.py` lines 25-38 and `image_i2i_vg_dataset.py` (candidates get
  `tgt_inst`), `image_cls_dataset.py` / `image_qa_dataset.py` / `image_i2t_eval.py` line 26 (candidates are the
  bare `tgt_text`, no instruction, no image); precision@1 is `argmax == 0` (v1 `eval.py`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Protocol:
    """How one reference turns scores into its published numbers."""

    name: str
    reference: str  # the implementation and version whose numbers it reproduces
    formats: tuple[str, ...]
    repeated_queries: str  # ViDoRe v1: "all" rows' pages relevant, or the "last" row's
    keep_empty_queries: bool  # ViDoRe v1: an empty-string query is part of the set
    clamp_negative_scores: bool
    mrr_ties: str  # "id": doc id descending (trec_eval); "corpus": corpus order (a stable sort by score)
    ties: str  # what the report says about ties
    round_digits: int | None  # means rounded as the reference rounds them

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "reference": self.reference, "ties": self.ties, "round_digits": self.round_digits}


PROTOCOLS = {
    "mteb": Protocol(
        name="mteb",
        reference="mteb 2.26 (rules since 2.18.19)",
        formats=("vidore", "beir"),
        repeated_queries="all",
        keep_empty_queries=False,
        clamp_negative_scores=False,
        mrr_ties="id",
        ties="score, then doc id descending (trec_eval, mteb >= 2.18.19)",
        round_digits=5,
    ),
    "vidore-benchmark": Protocol(
        name="vidore-benchmark",
        reference="vidore-benchmark 5.0 (mteb 1.16)",
        formats=("vidore", "beir"),
        repeated_queries="last",
        keep_empty_queries=True,
        clamp_negative_scores=True,
        mrr_ties="corpus",
        ties="score, then doc id descending; MRR: corpus order",
        round_digits=5,
    ),
    "vlm2vec": Protocol(
        name="vlm2vec",
        reference="VLM2Vec (MMEB v1 eval, TIGER-AI-Lab/VLM2Vec)",
        formats=("mmeb",),
        repeated_queries="all",
        keep_empty_queries=False,
        clamp_negative_scores=False,
        mrr_ties="id",
        ties="argmax over the candidate list: a tie with the positive (entry 0) is a hit (VLM2Vec v1)",
        round_digits=None,
    ),
}
DEFAULT_PROTOCOLS = {"vidore": "mteb", "beir": "mteb", "mmeb": "vlm2vec"}

# MMEB datasets whose candidates VLM2Vec gives `tgt_inst` (parsers image_t2i and image_i2i_vg); the others
# (image_cls, image_qa, image_i2t) take the bare `tgt_text`. experiments/public/eval/image.yaml.
MMEB_INSTRUCTED_CANDIDATES = frozenset(
    {
        "VisDial", "MSCOCO_t2i", "VisualNews_t2i", "WebQA", "EDIS", "Wiki-SS-NQ",  # image_t2i
        "CIRR", "NIGHTS", "OVEN", "FashionIQ", "MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing",
    }
)  # fmt: skip
MMEB_TEXT_CANDIDATES = frozenset(
    {
        "ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "Place365", "ImageNet-A", "ImageNet-R",
        "ObjectNet", "Country211",  # image_cls
        "OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W", "ScienceQA", "VizWiz", "GQA",
        "TextVQA",  # image_qa
        "MSCOCO_i2t", "VisualNews_i2t",  # image_i2t
    }
)  # fmt: skip

# ViDoRe v3 (mteb's Vidore3* tasks, main score nDCG@10) and ViDoRe v1 BEIR copies / v2 (nDCG@5), by dataset name.
_VIDORE_V3 = re.compile(r"vidore_?v?3|vidore3", re.IGNORECASE)
_VIDORE_NDCG5 = re.compile(r"(_v2$|_test_subsampled_beir$|_test_beir$)", re.IGNORECASE)


def get_protocol(name: str | None, format: str) -> Protocol:
    """The protocol `name` (None: the format's default; mteb for a format of the user's own), checked to apply to
    `format` when it is one of the published formats."""
    name = DEFAULT_PROTOCOLS.get(format, "mteb") if name is None else name
    if not isinstance(name, str) or name not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {name!r}")
    protocol = PROTOCOLS[name]
    if format in DEFAULT_PROTOCOLS and format not in protocol.formats:
        raise ValueError(f"protocol {name!r} applies to the formats {list(protocol.formats)}, not {format!r}")
    return protocol


def main_metric(format: str, names: tuple[str | None, ...]) -> str:
    """The leaderboard's main score of a dataset of `format` known by `names` (Hub id, folder name): mteb's
    `main_score` of the matching task."""
    if format == "mmeb":
        return "precision@1"
    if format == "vidore":
        return "ndcg@5"
    tails = [name.rstrip("/\\").replace("\\", "/").split("/")[-1] for name in names if name]
    if any(_VIDORE_V3.search(tail) for tail in tails):
        return "ndcg@10"
    if any(_VIDORE_NDCG5.search(tail) for tail in tails):
        return "ndcg@5"
    return "ndcg@10"


__all__ = ["DEFAULT_PROTOCOLS", "PROTOCOLS", "Protocol", "get_protocol", "main_metric"]
