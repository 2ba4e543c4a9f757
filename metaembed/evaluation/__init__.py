"""Evaluation on the published benchmarks (ViDoRe v1, BEIR-format collections such as ViDoRe v2, MMEB) at every
budget, with the field's metrics (pytrec_eval), reports, model-card results and an mteb bridge.

Needs the `[eval]` extra (pytrec-eval-terrier, datasets, mteb for the bridge, matplotlib for plots); those are
imported only where used.
"""

from .evaluate import BudgetResult, evaluate, index_bytes_per_candidate
from .mteb_bridge import mteb_model
from .readers import RetrievalDataset, read_beir, read_datasets, read_mmeb, read_vidore

__all__ = [
    "BudgetResult",
    "RetrievalDataset",
    "evaluate",
    "index_bytes_per_candidate",
    "mteb_model",
    "read_beir",
    "read_datasets",
    "read_mmeb",
    "read_vidore",
]
