"""`MetaEmbedDataCollator`: `datasets` rows -> the processed query, candidate and hard-negative batches."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import PIL.Image

from processing_metaembed import normalize_items


def _row_item(value: Any, where: str) -> Any:
    """A dataset cell as an item. `datasets` fills absent dict keys with None ({"text": None, "image": x} is an
    image) and may hand nested images over in its storage form {"bytes": ..., "path": ...}."""
    if isinstance(value, Mapping):
        value = {key: item for key, item in value.items() if item is not None}
        if not value:
            raise ValueError(f"{where} has neither text nor image")
        image = value.get("image")
        if isinstance(image, Mapping):
            if image.get("bytes") is not None:
                value["image"] = PIL.Image.open(io.BytesIO(image["bytes"]))
            elif image.get("path") is not None:
                value["image"] = image["path"]
            else:
                raise ValueError(f"{where}['image'] holds neither bytes nor a path")
    return value


class MetaEmbedDataCollator:
    """Turns `datasets` rows into the three processed batches the MMR loss takes.

    Each row holds `query_column`, `positive_column` and optionally `negatives_column` (a list with the same
    number H of hard negatives in every row); each cell is a text, a PIL image, or a {"text", "image"} dict.
    A dataset item may also be a list of rows, a pre-built batch, which is flattened in order.
    Returns {"query_features", "candidate_features"[, "hard_negative_features"]} with B (and B x H) items,
    hard negatives query-major.
    """

    def __init__(
        self,
        processor: Any,
        query_column: str = "query",
        positive_column: str = "positive",
        negatives_column: str | None = "negatives",
    ) -> None:
        self.processor = processor
        self.query_column = query_column
        self.positive_column = positive_column
        self.negatives_column = negatives_column

    def _process(self, cells: list[Any], task: str, name: str) -> Any:
        items = normalize_items([_row_item(cell, f"{name}[{index}]") for index, cell in enumerate(cells)], name)
        return self.processor.process_items(items, task, item_names=[f"{name}[{index}]" for index in range(len(items))])

    def __call__(self, rows: list[Mapping[str, Any]] | list[list[Mapping[str, Any]]]) -> dict[str, Any]:
        # Items that are lists are pre-built batches (e.g. free of false negatives): flatten them.
        rows = [row for item in rows for row in (item if isinstance(item, (list, tuple)) else [item])]
        for column in (self.query_column, self.positive_column):
            missing = [index for index, row in enumerate(rows) if column not in row]
            if missing:
                raise KeyError(f"rows {missing[:5]} have no column {column!r}")
        batch = {
            "query_features": self._process([row[self.query_column] for row in rows], "query", "query"),
            "candidate_features": self._process([row[self.positive_column] for row in rows], "candidate", "positive"),
        }
        negatives = [row.get(self.negatives_column) for row in rows] if self.negatives_column else [None]
        if any(value is not None for value in negatives):
            counts = {len(value or []) for value in negatives}
            if len(counts) != 1 or 0 in counts:
                raise ValueError(f"every row needs the same number of {self.negatives_column!r}, got {sorted(counts)}")
            flat = [negative for value in negatives for negative in value]
            batch["hard_negative_features"] = self._process(flat, "candidate", self.negatives_column)
        return batch
