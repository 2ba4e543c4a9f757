"""`MetaEmbedDataCollator`: `datasets` rows -> the query, candidate and hard-negative batches of items."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import PIL.Image

from processing_metaembed import normalize_item, normalize_items

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


def check_training_row(
    row: Any,
    where: str,
    query_column: str = "query",
    positive_column: str = "positive",
    negatives_column: str | None = "negatives",
) -> int:
    """Check one training row (`where` names it in errors, e.g. `train.jsonl:4` or `row 4`): a mapping with a
    query and a positive item and optionally a list of negative items (each a text, a PIL image or a
    {"text", "image"} dict; image files are opened to read their header). Returns its number of negatives (0 when
    it has none). A string or a dict where the list of negatives belongs is refused, not read as characters or keys.
    """
    if not isinstance(row, Mapping):
        raise ValueError(f"{where} must be an object with {query_column!r} and {positive_column!r}, got {_kind(row)}")
    for column in (query_column, positive_column):
        if row.get(column) is None:
            raise ValueError(f"{where} has no {column!r}")
        normalize_item(_row_item(row[column], f"{where}: {column!r}"), f"{where}: {column!r}")
    negatives = row.get(negatives_column) if negatives_column else None
    if negatives is None:
        return 0
    if not isinstance(negatives, (list, tuple)):
        raise ValueError(
            f'{where}: {negatives_column!r} must be a list of items (e.g. ["a text", {{"image": "page.png"}}]), '
            f"got {_kind(negatives)}"
        )
    if not negatives:
        raise ValueError(
            f"{where}: {negatives_column!r} is an empty list; leave it out or give every row the same number (>= 1)"
        )
    for number, negative in enumerate(negatives):
        name = f"{where}: {negatives_column!r}[{number}]"
        normalize_item(_row_item(negative, name), name)
    return len(negatives)


def _kind(value: Any) -> str:
    return f"{type(value).__name__} {value!r:.60}"


def validate_training_rows(
    rows: Iterable[Any],
    query_column: str = "query",
    positive_column: str = "positive",
    negatives_column: str | None = "negatives",
    row_names: Iterable[str] | None = None,
) -> None:
    """Check every row of a training set before the first step (see `check_training_row`): errors name the row
    (`row_names`, default `row <index>`; a row that is a pre-built batch names its rows `row 3[1]`) and the field.
    Every row must have the same number of negatives, as the loss compares each query with the same count."""
    names = iter(row_names) if row_names is not None else (f"row {index}" for index in range(2**63))
    first: tuple[str, int] | None = None
    for row, name in zip(rows, names):
        for part, where in (
            [(item, f"{name}[{offset}]") for offset, item in enumerate(row)] if isinstance(row, list) else [(row, name)]
        ):
            count = check_training_row(part, where, query_column, positive_column, negatives_column)
            if first is None:
                first = (where, count)
            elif count != first[1]:
                raise ValueError(
                    f"{where} has {count} {negatives_column!r}, {first[0]} has {first[1]}: every row needs the same "
                    "number of negatives"
                )
    if first is None:
        raise ValueError("the training set holds no rows")


def read_training_jsonl(path: str, allow_absolute_image_paths: bool = False) -> list[dict[str, Any]]:
    """Training rows from a JSONL file, each checked (`validate_training_rows`), errors naming `file:line` and the
    field: {"query": ..., "positive": ..., "negatives": [...]}, each item a text or {"text": ..., "image": "path"}.

    Image paths are relative to the file's folder and must stay inside it (`../x.png` is refused), so a data file
    reads only the images shipped with it; `allow_absolute_image_paths` also allows absolute paths and paths that
    leave the folder.
    """
    folder = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    rows, names = [], []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where} is not valid JSON: {error}") from error
            if isinstance(row, dict):
                row = {
                    key: _resolve_image_paths(value, folder, f"{where}: {key!r}", allow_absolute_image_paths)
                    for key, value in row.items()
                }
            rows.append(row)
            names.append(where)
    if not rows:
        raise ValueError(f"{path} holds no rows")
    validate_training_rows(rows, row_names=names)
    return rows


def _resolve_image_paths(value: Any, folder: str, where: str, allow_absolute: bool) -> Any:
    """`value` with each {"image": path} relative to `folder` made absolute, refusing paths that are absolute or
    leave `folder` (symbolic links followed) unless `allow_absolute`."""
    if isinstance(value, list):
        return [
            _resolve_image_paths(item, folder, f"{where}[{index}]", allow_absolute) for index, item in enumerate(value)
        ]
    if not isinstance(value, dict) or value.get("image") is None:
        return value
    if not isinstance(value["image"], str):
        # JSON has no images, and a {"path": ...} object would escape the folder check.
        raise ValueError(
            f"{where}['image'] is {type(value['image']).__name__}; in a JSONL file an image is a path string, "
            "relative to the data file's folder"
        )
    image = value["image"]
    resolved = os.path.join(folder, image)
    if not allow_absolute:
        if os.path.isabs(image):
            raise ValueError(
                f"{where}['image'] is an absolute path ({image!r}); image paths are relative to the data file's "
                "folder (--allow-absolute-image-paths / allow_absolute_image_paths=True to allow it)"
            )
        if os.path.commonpath([folder, os.path.realpath(resolved)]) != folder:
            raise ValueError(
                f"{where}['image'] {image!r} leads outside the data file's folder {folder}; keep images beside the "
                "data (--allow-absolute-image-paths / allow_absolute_image_paths=True to allow it)"
            )
    return {**value, "image": resolved}


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
