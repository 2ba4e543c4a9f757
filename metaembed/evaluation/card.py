"""Evaluation results in a model folder's card: README.md's `model-index` metadata in the Hub's format
(huggingface_hub's `EvalResult`), one entry per dataset, budget and metric, so the Hub lists them."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from typing import Any

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


FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)^---[ \t]*$", re.DOTALL | re.MULTILINE)
# The top-level `model-index:` key and its indented block, through comment or blank lines inside it (also comments
# at column 0) up to its last indented line (comment or blank lines after it stay outside).
MODEL_INDEX_BLOCK = re.compile(r"^model-index:.*\n(?:(?:(?:[ \t]*|#.*)\n)*[ \t-].*\n)*", re.MULTILINE)
LOCK_NAME = ".metaembed-card.lock"  # created beside the card, never removed (a lock file must outlive writers)


def read_card_metadata(folder: str | os.PathLike) -> tuple[str, str, dict[str, Any]]:
    """(README path, its text, its front matter as a dict) of a model folder; a ValueError naming the file for a
    missing card or a front matter that is not a YAML mapping (call it before a long evaluation)."""
    import yaml

    path = os.path.join(os.fspath(folder), "README.md")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: save the model there first (save_pretrained writes it)")
    with open(path, encoding="utf-8") as file:
        text = file.read()
    match = FRONT_MATTER.match(text)
    if match is None:
        return path, text, {}
    try:
        metadata = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: the front matter is not valid YAML: {error}") from error
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: the front matter is not a YAML mapping")
    index = metadata.get("model-index")
    entries_ok = isinstance(index, list) and all(
        isinstance(entry, dict) and isinstance(entry.get("results", []), list) for entry in index
    )
    if index is not None and not entries_ok:
        raise ValueError(f"{path}: model-index must be a list of {{name, results}} entries")
    return path, text, metadata


def _group_key(result: dict[str, Any]) -> tuple:
    task, dataset = result.get("task") or {}, result.get("dataset") or {}
    return (
        task.get("type"),
        dataset.get("type"),
        dataset.get("config"),
        dataset.get("split"),
        dataset.get("revision"),
    )


def _metric_key(metric: dict[str, Any]) -> tuple:
    return metric.get("type"), metric.get("config")


def merge_model_index(index: list[dict[str, Any]], name: str, new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`index` with the `new` results (model-index `results` entries) in the entry called `name` (added if
    absent): a metric of the same task, dataset, split, revision, type and budget is updated in place (its other
    fields kept), others are appended. Entries of other names and every field the user added stay as they are."""
    index = [dict(entry) for entry in index]
    target = next((entry for entry in index if entry.get("name") == name), None)
    if target is None:
        target = {"name": name, "results": []}
        index.append(target)
    results = target.setdefault("results", [])
    for group in new:
        existing = next((result for result in results if _group_key(result) == _group_key(group)), None)
        if existing is None:
            results.append(group)
            continue
        metrics = existing.setdefault("metrics", [])
        for metric in group["metrics"]:
            old = next((entry for entry in metrics if _metric_key(entry) == _metric_key(metric)), None)
            if old is None:
                metrics.append(metric)
            else:
                old.update(metric)
    return index


def _with_model_index(text: str, index: list[dict[str, Any]]) -> str:
    """`text` with only the front matter's `model-index` block replaced (or added): every other line, comments
    included, stays byte for byte."""
    import yaml

    block = yaml.safe_dump({"model-index": index}, sort_keys=False, allow_unicode=True, width=1000)
    match = FRONT_MATTER.match(text)
    if match is None:
        return f"---\n{block}---\n{text}"
    front = match.group(1)
    found = MODEL_INDEX_BLOCK.search(front)
    front = front[: found.start()] + block + front[found.end() :] if found else front + block
    return text[: match.start(1)] + front + text[match.end(1) :]


def writable_card(folder: str | os.PathLike) -> str:
    """The file a card update writes: `folder`/README.md (its front matter checked), followed through symlinks.
    A Hugging Face cache snapshot's README links to a blob that every revision with the same bytes shares and that
    is named by its hash: editing it would change other revisions and break the cache, so it is refused."""
    path, _, _ = read_card_metadata(folder)
    target = os.path.realpath(path)
    blobs = os.path.dirname(target)
    if os.path.basename(blobs) == "blobs" and os.path.basename(os.path.dirname(blobs)).startswith("models--"):
        raise ValueError(
            f"{path} is a file of the Hugging Face cache ({target}), shared by its snapshots: copy the model folder "
            "(e.g. huggingface_hub.snapshot_download(repo_id, local_dir=...)) and write the card there"
        )
    return target


def write_card_results(
    folder: str | os.PathLike, results: Sequence[BudgetResult], model_name: str | None = None
) -> str:
    """Add `results` to the `model-index` of `folder`/README.md (a saved MetaEmbed folder's card): the entry named
    `model_name` (default: the card's first entry, else the folder name) gets them, replacing earlier values for
    the same dataset, split, metric and budget and keeping all else: other entries, custom fields, the rest of the
    front matter and its comments (comments inside the model-index block are not kept). Writers are serialised
    by a lock file (`LOCK_NAME`) and the card is written whole or not at all; a symlinked README is updated
    where it points, with its file mode kept. Returns the README path."""
    import fcntl

    from huggingface_hub.repocard_data import eval_results_to_model_index

    target = writable_card(folder)  # a symlinked card stays a symlink
    new = eval_results(results)
    # The lock sits beside the file written, so folders whose cards link to one file share it.
    with open(os.path.join(os.path.dirname(target), LOCK_NAME), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        path, text, metadata = read_card_metadata(folder)  # read again under the lock: no lost update
        if not new:
            return path
        index = metadata.get("model-index") or []
        name = model_name or next((entry.get("name") for entry in index if entry.get("name")), None)
        name = name or os.path.basename(os.path.abspath(folder))
        groups = eval_results_to_model_index(name, new)[0]["results"]
        content = _with_model_index(text, merge_model_index(index, name, groups))
        mode = os.stat(target).st_mode & 0o7777

        def write(temporary: str) -> None:
            with open(temporary, "w", encoding="utf-8") as file:
                file.write(content)

        write_file_atomically(target, write)  # the old card stays whole if anything fails
        os.chmod(target, mode)
    return path


__all__ = [
    "budget_config",
    "eval_results",
    "merge_model_index",
    "read_card_metadata",
    "writable_card",
    "write_card_results",
]
