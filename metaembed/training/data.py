"""`MetaEmbedDataCollator`: `datasets` rows -> the query, candidate and hard-negative batches of items."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import PIL.Image

from processing_metaembed import normalize_items

from .loss import ItemBatch


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
    """Turns `datasets` rows into the three batches of checked items the MMR loss takes.

    Each row holds `query_column`, `positive_column` and optionally `negatives_column` (a list with the same
    number H of hard negatives in every row); each cell is a text, a PIL image, or a {"text", "image"} dict.
    A dataset item may also be a list of rows, a pre-built batch, which is flattened in order.
    Returns {"queries", "candidates"[, "hard_negatives"]}: `ItemBatch`es of B (and B x H) items, hard negatives
    query-major. The loss processes them (with the task of each column), one mini-batch of items at a time
    under `CachedMMRLoss`: a backbone family's processed image inputs cannot be cut into mini-batches, items can.
    """

    def __init__(
        self,
        query_column: str = "query",
        positive_column: str = "positive",
        negatives_column: str | None = "negatives",
    ) -> None:
        self.query_column = query_column
        self.positive_column = positive_column
        self.negatives_column = negatives_column

    def _items(self, cells: list[Any], name: str) -> ItemBatch:
        items = normalize_items([_row_item(cell, f"{name}[{index}]") for index, cell in enumerate(cells)], name)
        return ItemBatch(tuple(items), tuple(f"{name}[{index}]" for index in range(len(items))))

    def __call__(self, rows: list[Mapping[str, Any]] | list[list[Mapping[str, Any]]]) -> dict[str, Any]:
        # Items that are lists are pre-built batches (e.g. free of false negatives): flatten them.
        rows = [row for item in rows for row in (item if isinstance(item, (list, tuple)) else [item])]
        for column in (self.query_column, self.positive_column):
            missing = [index for index, row in enumerate(rows) if column not in row]
            if missing:
                raise KeyError(f"rows {missing[:5]} have no column {column!r}")
        batch = {
            "queries": self._items([row[self.query_column] for row in rows], "query"),
            "candidates": self._items([row[self.positive_column] for row in rows], "positive"),
        }
        negatives = [row.get(self.negatives_column) for row in rows] if self.negatives_column else [None]
        if any(value is not None for value in negatives):
            counts = {len(value or []) for value in negatives}
            if len(counts) != 1 or 0 in counts:
                raise ValueError(f"every row needs the same number of {self.negatives_column!r}, got {sorted(counts)}")
            flat = [negative for value in negatives for negative in value]
            batch["hard_negatives"] = self._items(flat, self.negatives_column)
        return batch
