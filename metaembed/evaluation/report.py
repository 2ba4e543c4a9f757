"""Reports of `evaluate` results: a table in the shape of the paper's (datasets x budgets, with an average row),
JSON, and a PNG plot of quality against budget."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..search.storage import write_file_atomically, write_json_atomically
from .evaluate import BudgetResult
from .protocols import PROTOCOLS

METRIC_LABELS = {
    "ndcg": "nDCG",
    "recall": "recall",
    "precision": "P",
    "map": "MAP",
    "mrr": "MRR",
    "recall_cap": "R_cap",
}


def metric_label(name: str) -> str:
    """ "nDCG@5" for "ndcg@5"."""
    kind, _, cutoff = name.partition("@")
    return f"{METRIC_LABELS.get(kind, kind)}@{cutoff}"


def _grid(
    results: Sequence[BudgetResult],
) -> tuple[list[str], list[tuple[int, int]], dict[tuple[str, tuple], BudgetResult]]:
    if not results:
        raise ValueError("no results to report")
    datasets = list(dict.fromkeys(result.dataset for result in results))
    budgets = list(dict.fromkeys(result.budget for result in results))
    return datasets, budgets, {(result.dataset, result.budget): result for result in results}


def format_table(results: Sequence[BudgetResult]) -> str:
    """Markdown: one row per dataset with its main metric x 100 at each budget, the average over datasets (each
    dataset's own main metric, as the paper averages MMEB's precision@1 and ViDoRe's nDCG@5), then the index bytes
    per candidate and the scoring time per query (mean over datasets) at each budget."""
    datasets, budgets, cells = _grid(results)
    header = ["dataset (metric x 100)"] + [f"({r_q}, {r_c})" for r_q, r_c in budgets]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for dataset in datasets:
        metric = next(result.main_metric for result in results if result.dataset == dataset)
        values = [
            f"{100 * cells[dataset, budget].main_value:.1f}" if (dataset, budget) in cells else "-"
            for budget in budgets
        ]
        lines.append(f"| {dataset} ({metric_label(metric)}) | " + " | ".join(values) + " |")

    def mean_over(budget: tuple[int, int], value) -> float:
        present = [value(cells[dataset, budget]) for dataset in datasets if (dataset, budget) in cells]
        return sum(present) / len(present)

    rows = [
        ("**average**", lambda budget: f"**{100 * mean_over(budget, lambda result: result.main_value):.1f}**"),
        (
            "index bytes / candidate",
            lambda budget: str(next(cells[key].index_bytes_per_candidate for key in cells if key[1] == budget)),
        ),
        ("scoring ms / query", lambda budget: f"{mean_over(budget, lambda result: result.scoring_ms_per_query):.3f}"),
    ]
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(budget) for budget in budgets) + " |")
    for name in dict.fromkeys(result.protocol for result in results if result.protocol):
        protocol = PROTOCOLS[name]
        lines.append(f"\nprotocol {name}: the numbers of {protocol.reference}; ties: {protocol.ties}")
    return "\n".join(lines)


def results_to_json(results: Sequence[BudgetResult], **extra: Any) -> dict[str, Any]:
    """{"protocols": {name: its reference, ties, rounding}, "results": [...], **extra}: every metric of every
    dataset and budget, each with its protocol, reference and main score."""
    names = dict.fromkeys(result.protocol for result in results if result.protocol)
    protocols = {name: PROTOCOLS[name].describe() for name in names}
    return {**extra, "protocols": protocols, "results": [result.to_dict() for result in results]}


def json_writer(results: Sequence[BudgetResult], **extra: Any) -> Callable[[str], None]:
    """A `write(path)` of `results_to_json` (for `write_output` / `storage.write_file_atomically`)."""
    content = json.dumps(results_to_json(results, **extra), indent=2) + "\n"

    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(content)

    return write


def save_json(results: Sequence[BudgetResult], path: str | os.PathLike, **extra: Any) -> None:
    """Write `results_to_json` to `path`, whole or not at all (`storage.write_file_atomically`)."""
    write_file_atomically(os.fspath(path), json_writer(results, **extra))


def load_results(path: str | os.PathLike) -> list[BudgetResult]:
    """The results of a `save_json` file."""
    with open(path, encoding="utf-8") as file:
        rows = json.load(file)["results"]
    return [
        BudgetResult(
            **{**{key: value for key, value in row.items() if key != "main_score"}, "budget": tuple(row["budget"])}
        )
        for row in rows
    ]


def plotting_available() -> bool:
    """Whether matplotlib (optional) is installed: check it before a run, and skip the plot if not."""
    return importlib.util.find_spec("matplotlib") is not None


MANIFEST = ".metaembed-evaluation.json"  # {file name: sha256} of what this package wrote in an output folder


def _sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as file:
            return hashlib.file_digest(file, "sha256").hexdigest()
    except FileNotFoundError:
        return None


def write_output(folder: str, name: str, write: Callable[[str], None]) -> tuple[str, str | None]:
    """Write `name` in the output `folder` through `write(temporary path)` (atomically), never over a file this
    package did not write there (or that was changed since): that file is kept and the output goes to a
    run-specific name. Returns (the path written, a note saying so or None)."""
    manifest_path = os.path.join(folder, MANIFEST)
    try:
        with open(manifest_path, encoding="utf-8") as file:
            manifest = json.load(file)
        manifest = manifest if isinstance(manifest, dict) else {}
    except (FileNotFoundError, ValueError):
        manifest = {}
    path, note = os.path.join(folder, name), None
    current = _sha256(path)
    if current is not None and manifest.get(name) != current:
        stem, extension = os.path.splitext(name)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        number = 0
        while os.path.lexists(path):
            number += 1
            path = os.path.join(folder, f"{stem}-{stamp}{f'-{number}' if number > 1 else ''}{extension}")
        note = f"{os.path.join(folder, name)} was not written by metaembed: kept; this run's is {path}"
    write_file_atomically(path, write)
    manifest[os.path.basename(path)] = _sha256(path)
    write_json_atomically(manifest_path, manifest)
    return path, note


def save_plot(
    results: Sequence[BudgetResult], path: str | os.PathLike, title: str = "MetaEmbed: quality vs budget"
) -> None:
    """PNG: each dataset's main metric (and the average, bold) against the budget (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets, budgets, cells = _grid(results)
    labels = [f"({r_q},{r_c})" for r_q, r_c in budgets]
    figure, axis = plt.subplots(figsize=(6.5, 4))
    averages = []
    for budget in budgets:
        present = [cells[dataset, budget].main_value for dataset in datasets if (dataset, budget) in cells]
        averages.append(sum(present) / len(present))
    if len(datasets) > 1:
        for dataset in datasets:
            axis.plot(
                labels,
                [
                    cells[dataset, budget].main_value if (dataset, budget) in cells else float("nan")
                    for budget in budgets
                ],
                marker="o",
                alpha=0.6,
                label=dataset,
            )
    axis.plot(labels, averages, marker="s", color="black", linewidth=2.5, label="average")
    axis.set_xlabel("budget (r_q, r_c)")
    axis.set_ylabel("main metric (per dataset)")
    axis.set_title(title)
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120, format="png")  # a temporary name has no .png suffix
    plt.close(figure)


__all__ = [
    "format_table",
    "json_writer",
    "load_results",
    "metric_label",
    "plotting_available",
    "results_to_json",
    "save_json",
    "save_plot",
    "write_output",
]
