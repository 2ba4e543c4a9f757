"""Evaluation results in a model folder's card: README.md's `model-index` metadata in the Hub's format
(huggingface_hub's `EvalResult`), one entry per dataset, budget and metric, so the Hub lists them."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

from ..search.storage import write_file_atomically
from .evaluate import BudgetResult
from .report import metric_label


def budget_config(budget: tuple[int, int]) -> str:
    """The `metric_config` that tells budgets apart: "r_q=2,r_c=4"."""
    return f"r_q={budget[0]},r_c={budget[1]}"


def eval_results(results: Sequence[BudgetResult]) -> list:
    """`huggingface_hub.EvalResult`s for every metric of every result (metric type as mteb names them, e.g.
    "ndcg_at_5"; the budget in `metric_config` and `metric_name`). Only results with a Hub dataset id are
    included (the card is published: a local path must not be); the others are left out with a warning."""
    from huggingface_hub import EvalResult

    entries = []
    unnamed = sorted({result.dataset for result in results if not result.dataset_id})
    if unnamed:
        warnings.warn(
            f"left out of the model card: {unnamed} (read from local folders, not from the Hub cache); give the "
            "readers' dataset_id (the Hub id of the snapshot) to include them",
            stacklevel=2,
        )
    for result in results:
        if not result.dataset_id:
            continue
        for metric, value in result.metrics.items():
            entries.append(
                EvalResult(
                    task_type="retrieval",
                    task_name=f"{result.format or 'retrieval'} retrieval".strip(),
                    dataset_type=result.dataset_id,
                    dataset_name=result.dataset,
                    dataset_config=result.dataset_config,
                    dataset_split=result.dataset_split,
                    dataset_revision=result.dataset_revision,
                    metric_type=metric.replace("@", "_at_"),
                    metric_value=round(float(value), 5),
                    metric_name=f"{metric_label(metric)} at budget {result.budget}",
                    metric_config=budget_config(result.budget),
                )
            )
    return entries


def _key(entry) -> tuple:
    return (entry.dataset_type, entry.dataset_config, entry.dataset_split, entry.metric_type, entry.metric_config)


def write_card_results(
    folder: str | os.PathLike, results: Sequence[BudgetResult], model_name: str | None = None
) -> str:
    """Add `results` to the `model-index` of `folder`/README.md (a saved MetaEmbed folder's card), replacing
    earlier entries for the same dataset, split, metric and budget and keeping all others. The card is written
    whole or not at all. Returns the README path."""
    from huggingface_hub import ModelCard

    path = os.path.join(os.fspath(folder), "README.md")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: save the model there first (save_pretrained writes it)")
    card = ModelCard.load(path)
    new = eval_results(results)
    replaced = {_key(entry) for entry in new}
    kept = [entry for entry in card.data.eval_results or [] if _key(entry) not in replaced]
    card.data.eval_results = (kept + new) or None
    card.data.model_name = card.data.model_name or model_name or os.path.basename(os.path.abspath(folder))
    write_file_atomically(path, card.save)  # the old card stays whole if anything fails
    return path


__all__ = ["budget_config", "eval_results", "write_card_results"]
