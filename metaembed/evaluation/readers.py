"""Readers for the published retrieval benchmark formats, each returning a `RetrievalDataset`.

Every reader takes a dataset as the Hub publishes it, from any of three places, through one code path:
- a local folder laid out as the Hub snapshot (`huggingface_hub.snapshot_download`: parquet files plus the
  README.md that declares the configs), read by `datasets.load_dataset(folder, config, split=...)`;
- a Hub dataset id (online), read by the same `datasets.load_dataset` call;
- a `datasets.save_to_disk` folder (one per config, as `<folder>/<config>` where the format has configs), read by
  `datasets.load_from_disk`.

Formats:
- ViDoRe v1 (`vidore/docvqa_test_subsampled`, ...): one table with `query`, `image`, `image_filename`; the corpus
  is the distinct `image_filename`s (a row may repeat an image or have no query); a query's relevant page is its
  own row's image; repeated query texts are kept once (the first), as the ViDoRe benchmark does.
- BEIR (ViDoRe v2 and later, `vidore/esg_reports_v2`, ..., and text collections): configs `corpus`
  (`corpus-id` or `_id`; `text` with optional `title`, and/or `image`), `queries` (`query-id` or `_id`; `query` or
  `text`) and `qrels` (`query-id`, `corpus-id`, `score`, graded relevance kept).
- MMEB eval subsets (`TIGER-Lab/MMEB-eval`, one config per subset): `qry_text`, `qry_img_path`, `tgt_text` (list),
  `tgt_img_path` (list), and optionally `qry_inst` / `tgt_inst` (the instruct variant); image paths are relative to
  an image folder. Each query is ranked against its own candidate list, whose first entry is the positive.

Images are decoded only when an item is encoded, so a corpus of page images is never held in memory at once.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from .metrics import check_grade

FORMATS = ("vidore", "beir", "mmeb")
# Each format's metrics; the first is the benchmark's own (the one of the paper's tables).
DEFAULT_METRICS = {
    "vidore": ("ndcg@5", "ndcg@10", "recall@100", "mrr@10"),
    "beir": ("ndcg@10", "recall@100", "mrr@10", "ndcg@5"),
    "mmeb": ("precision@1",),
}
IMAGE_PLACEHOLDER = re.compile(r"<\|image_\d+\|>")
SNAPSHOT_PATH = re.compile(r"datasets--([^/\\]+)--([^/\\]+)[/\\]snapshots[/\\]([0-9a-f]{40})")


class LazyItems(Sequence):
    """A sequence of model items (str, PIL image or {"text", "image"} dict) made on access, so images are
    decoded only for the slice being encoded.

    `stored(position)`, if given, returns the item as stored, images left as `datasets` cells {"bytes", "path"}:
    what `metaembed.fingerprint.items_digest` hashes without decoding (see `stored_items`)."""

    def __init__(self, make: Callable[[int], Any], count: int, stored: Callable[[int], Any] | None = None) -> None:
        self._make, self._count, self._stored = make, count, stored

    def stored_items(self, start: int, end: int) -> list[Any]:
        """Items `start..end-1` as stored (undecoded images), or made (decoded) when there is no stored form."""
        make = self._stored or self._make
        return [make(position) for position in range(*slice(start, end).indices(self._count))]

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self._make(position) for position in range(*index.indices(self._count))]
        if not -self._count <= index < self._count:
            raise IndexError(f"item {index} out of range for {self._count} items")
        return self._make(index % self._count)


@dataclass
class RetrievalDataset:
    """One evaluation set: queries, candidates, and what is relevant.

    Either `qrels` ({query id: {candidate id: grade}}, ranked over all candidates) or `candidate_lists` (MMEB: per
    query, positions into `candidates`, entry 0 the positive) is set. Items are those `MetaEmbedModel.encode_*`
    takes; `queries` / `candidates` may be lists or `LazyItems`.
    """

    name: str
    query_ids: list[str]
    queries: Sequence[Any]
    candidate_ids: list[str]
    candidates: Sequence[Any]
    qrels: dict[str, dict[str, int]] | None = None
    candidate_lists: list[list[int]] | None = None
    metrics: tuple[str, ...] = DEFAULT_METRICS["beir"]
    source: str | None = None  # the folder or Hub id read
    format: str | None = None
    config: str | None = None
    split: str = "test"
    hub_id: str | None = None  # the Hub dataset id, when known (for the model card)
    revision: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.qrels is None) == (self.candidate_lists is None):
            raise ValueError(f"{self.name}: give exactly one of qrels and candidate_lists")
        for kind, ids, items in (
            ("query", self.query_ids, self.queries),
            ("candidate", self.candidate_ids, self.candidates),
        ):
            if len(ids) != len(items):
                raise ValueError(f"{self.name}: {len(ids)} {kind} ids for {len(items)} {kind} items")
            if not ids:
                raise ValueError(f"{self.name}: no {kind}s")
            check_unique(ids, lambda position, kind=kind: f"{self.name}: {kind}_ids[{position}]")
        if self.candidate_lists is not None and len(self.candidate_lists) != len(self.query_ids):
            raise ValueError(
                f"{self.name}: {len(self.candidate_lists)} candidate lists for {len(self.query_ids)} queries"
            )

    @property
    def main_metric(self) -> str:
        return self.metrics[0]


# -- loading tables -------------------------------------------------------------------------------------------


def _is_saved_dataset(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in ("dataset_dict.json", "state.json"))


@dataclass
class Split:
    """A split as read: its `datasets.Dataset` and what error messages call it and its rows."""

    data: Any
    where: str  # "<source> [<config>/<split>]"
    # (parquet file, the split's row at which it starts) for a local snapshot; empty when unknown
    files: list[tuple[str, int]] = field(default_factory=list)

    def at(self, row: int, column: str | None = None) -> str:
        """Where row `row` of the split is: "<where> <file> row <k>" (the parquet file and the row within it,
        for a local snapshot), else "<where> row <n>" counted over the whole split; plus the column."""
        place = f"{self.where} row {row}"
        if self.files:
            path, start = next((path, start) for path, start in reversed(self.files) if start <= row)
            place = f"{self.where} {path} row {row - start}"
        return f"{place}, column {column!r}" if column else place


def load_split(
    source: str, config: str | None, split: str, cache_dir: str | None = None, *, only_split: bool = False
) -> Split:
    """The split `split` of `<source>/<config>` (or `source`) saved with `save_to_disk`, else of the Hub snapshot
    folder or Hub id `source` through `datasets.load_dataset(source, config, split=split)`. With `only_split`, a
    config without that split but with exactly one other (BEIR's `corpus` / `queries` splits) gives that one."""
    import datasets

    saved = os.path.join(source, config) if config else source
    if os.path.isdir(saved) and _is_saved_dataset(saved):
        loaded = datasets.load_from_disk(saved)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded and only_split and len(loaded) == 1:
                split = next(iter(loaded))
            if split not in loaded:
                raise ValueError(f"{saved} holds the splits {sorted(loaded)}, not {split!r}")
            loaded = loaded[split]
        return Split(loaded, _where(source, config, split))
    if os.path.exists(source) and not os.path.isdir(source):
        raise ValueError(f"{source} is a file; expected a dataset folder (Hub snapshot or save_to_disk) or a Hub id")
    if config and os.path.isdir(source) and (names := _saved_configs(source)):
        raise ValueError(f"{source} holds the saved configs {names}, not {config!r}")
    try:
        try:
            data = datasets.load_dataset(source, config, split=split, cache_dir=cache_dir)
        except ValueError:
            names = datasets.get_dataset_split_names(source, config) if only_split else []
            if len(names) != 1 or names[0] == split:
                raise
            split = names[0]
            data = datasets.load_dataset(source, config, split=split, cache_dir=cache_dir)
    except (ValueError, FileNotFoundError) as error:
        where = f"config {config!r}, " if config else ""
        raise ValueError(f"cannot read {source} ({where}split {split!r}): {error}") from error
    return Split(data, _where(source, config, split), _parquet_files(source, config, split, len(data)))


def _where(source: str, config: str | None, split: str) -> str:
    return f"{source} [{config}/{split}]" if config else f"{source} [{split}]"


def _parquet_files(source: str, config: str | None, split: str, num_rows: int) -> list[tuple[str, int]]:
    """(file relative to `source`, first row) of a local snapshot's parquet files for the split, in the order
    `datasets` concatenates them; empty for a Hub id or when the files do not add up to the split."""
    if not os.path.isdir(source):
        return []
    import datasets
    import pyarrow.parquet

    files = [str(path) for path in datasets.load_dataset_builder(source, config).config.data_files.get(split, [])]
    if not files or not all(path.endswith(".parquet") for path in files):
        return []
    result, start = [], 0
    for path in files:
        result.append((os.path.relpath(path, source), start))
        start += pyarrow.parquet.ParquetFile(path).metadata.num_rows
    return result if start == num_rows else []


def _saved_configs(folder: str) -> list[str]:
    """The saved subfolders of a folder laid out as save_to_disk folders per config (no README.md)."""
    if os.path.isfile(os.path.join(folder, "README.md")):
        return []
    return sorted(name for name in os.listdir(folder) if _is_saved_dataset(os.path.join(folder, name)))


def config_names(source: str) -> list[str]:
    """The configs (e.g. MMEB subsets) of a save_to_disk folder (its saved subfolders), a snapshot folder or a Hub
    id (both as declared in its README.md)."""
    if os.path.isdir(source) and (names := _saved_configs(source)):
        return names
    import datasets

    return list(datasets.get_dataset_config_names(source))


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _hub_origin(source: str, dataset_id: str | None = None) -> tuple[str | None, str | None]:
    """(Hub id, revision) of a Hub id, of a folder in the Hub cache layout, or of a folder whose Hub id the user
    states (`dataset_id`); (None, None) for other folders: a local path is never taken for a Hub id."""
    if dataset_id is not None:
        if not isinstance(dataset_id, str) or not HUB_ID.match(dataset_id):
            raise ValueError(
                f"dataset_id must be a Hub dataset id such as 'vidore/docvqa_test_subsampled', got {dataset_id!r}"
            )
        match = SNAPSHOT_PATH.search(os.path.abspath(source)) if os.path.exists(source) else None
        return dataset_id, match.group(3) if match else None
    if not os.path.exists(source):
        return (source, None) if HUB_ID.match(source) else (None, None)
    match = SNAPSHOT_PATH.search(os.path.abspath(source))
    return (f"{match.group(1)}/{match.group(2)}", match.group(3)) if match else (None, None)


def _display_name(source: str) -> str:
    hub_id, _ = _hub_origin(source)
    return (hub_id or os.path.abspath(source)).rstrip("/\\").replace("\\", "/").split("/")[-1]


def _provenance(source: str, format: str, split: str, dataset_id: str | None = None) -> dict[str, Any]:
    """The `RetrievalDataset` fields saying where a dataset came from, and its format's metrics."""
    hub_id, revision = _hub_origin(source, dataset_id)
    return {
        "metrics": DEFAULT_METRICS[format],
        "source": source,
        "format": format,
        "split": split,
        "hub_id": hub_id,
        "revision": revision,
    }


def _check_columns(
    table, required: Sequence[str], where: str, alternatives: dict[str, Sequence[str]] | None = None
) -> dict[str, str]:
    """{role: column} for the required columns (a role may be filled by one of its alternatives)."""
    present = list(table.column_names)
    chosen = {}
    for role in required:
        names = (alternatives or {}).get(role, (role,))
        found = next((name for name in names if name in present), None)
        if found is None:
            raise ValueError(f"{where}: missing column {' or '.join(map(repr, names))} (columns: {present})")
        chosen[role] = found
    return chosen


def _open_image(value: Any, where: str) -> Image.Image:
    """A PIL image from a datasets Image cell (decoded or {"bytes", "path"}), loaded now so errors name the cell."""
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            image = Image.open(value["path"])
        else:
            raise ValueError("no image")
        image.load()
    except Exception as error:  # PIL raises many kinds; all mean the same to the user
        raise ValueError(f"{where}: cannot read the image ({error})") from error
    return image


def _undecoded(table, column: str):
    """The table with `column` left as {"bytes", "path"} (decoded per item, with errors naming the row)."""
    import datasets

    if isinstance(table.features.get(column), datasets.Image):
        return table.cast_column(column, datasets.Image(decode=False))
    return table


# BEIR tables: the config names they are published under, in the order tried (the Hub's BEIR collections name
# the qrels config `qrels` (ViDoRe v2) or `default` (mteb's copies)).
BEIR_CONFIGS = {"corpus": ("corpus",), "queries": ("queries",), "qrels": ("qrels", "default")}


def _load_beir_config(source: str, role: str, split: str, cache_dir: str | None) -> Split:
    """A BEIR table: the first of its config names that reads; `split`, or the config's only split (BEIR puts
    the corpus and queries in splits named `corpus` / `queries`)."""
    errors = []
    for config in BEIR_CONFIGS[role]:
        try:
            return load_split(source, config, split, cache_dir, only_split=True)
        except ValueError as error:
            errors.append(str(error))
    raise ValueError(f"{source}: no {role} table (tried configs {list(BEIR_CONFIGS[role])}): {'; '.join(errors)}")


# -- ViDoRe v1 ------------------------------------------------------------------------------------------------


def read_vidore(
    source: str, split: str = "test", cache_dir: str | None = None, dataset_id: str | None = None
) -> RetrievalDataset:
    """A ViDoRe v1 dataset (one table: `query`, `image`, `image_filename`); see the module docstring.
    `dataset_id`: the Hub id of a local snapshot outside the Hub cache (for the model card)."""
    loaded = load_split(source, None, split, cache_dir)
    table, where, at = loaded.data, loaded.where, loaded.at
    columns = _check_columns(table, ("query", "image", "image_filename"), where)
    queries_column, names = table[columns["query"]], table[columns["image_filename"]]
    first_row: dict[str, int] = {}
    for row, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise ValueError(f"{at(row, 'image_filename')}: expected a file name, got {name!r}")
        first_row.setdefault(name, row)
    query_rows: dict[str, int] = {}
    for row, text in enumerate(queries_column):
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{at(row, 'query')}: expected a string or None, got {type(text).__name__}")
        if text and text.strip():
            query_rows.setdefault(text, row)
    if not query_rows:
        raise ValueError(f"{where}: no row has a query")
    images = _undecoded(table.select_columns([columns["image"]]), columns["image"])
    candidate_ids = list(first_row)
    candidate_rows = list(first_row.values())

    def stored_candidate(position: int) -> dict[str, Any]:
        return {"image": images[candidate_rows[position]][columns["image"]]}

    def candidate(position: int) -> dict[str, Any]:
        row = candidate_rows[position]
        return {"image": _open_image(stored_candidate(position)["image"], f"{at(row, 'image')}")}

    query_ids = [str(row) for row in query_rows.values()]
    return RetrievalDataset(
        name=_display_name(source),
        query_ids=query_ids,
        queries=list(query_rows),
        candidate_ids=candidate_ids,
        candidates=LazyItems(candidate, len(candidate_ids), stored_candidate),
        qrels={str(row): {names[row]: 1} for row in query_rows.values()},
        **_provenance(source, "vidore", split, dataset_id),
    )


# -- BEIR -----------------------------------------------------------------------------------------------------


def _text_of(row: dict[str, Any], columns: Sequence[str]) -> str | None:
    parts = [row[name] for name in columns if isinstance(row.get(name), str) and row[name].strip()]
    return " ".join(parts) if parts else None


def read_beir(
    source: str, split: str = "test", cache_dir: str | None = None, dataset_id: str | None = None
) -> RetrievalDataset:
    """A BEIR-format dataset (configs `corpus`, `queries`, `qrels`); see the module docstring.
    `dataset_id`: the Hub id of a local snapshot outside the Hub cache (for the model card)."""
    tables = {role: _load_beir_config(source, role, split, cache_dir) for role in BEIR_CONFIGS}
    where = {role: loaded.where for role, loaded in tables.items()}
    corpus = tables["corpus"].data
    id_column = _check_columns(corpus, ("id",), where["corpus"], {"id": ("corpus-id", "_id")})["id"]
    text_columns = [name for name in ("title", "text") if name in corpus.column_names]
    has_image = "image" in corpus.column_names
    if not text_columns and not has_image:
        raise ValueError(f"{where['corpus']}: no 'text' or 'image' column (columns: {corpus.column_names})")
    candidate_ids = [str(identifier) for identifier in corpus[id_column]]
    check_unique(candidate_ids, lambda row: tables["corpus"].at(row, id_column))
    texts = corpus.select_columns(text_columns) if text_columns else None
    images = _undecoded(corpus.select_columns(["image"]), "image") if has_image else None

    def stored_candidate(row: int) -> dict[str, Any]:
        item: dict[str, Any] = {}
        if texts is not None and (text := _text_of(texts[row], text_columns)) is not None:
            item["text"] = text
        if images is not None and images[row]["image"] is not None:
            item["image"] = images[row]["image"]
        if not item:
            raise ValueError(f"{tables['corpus'].at(row)}: neither text nor image")
        return item

    def candidate(row: int) -> dict[str, Any]:
        item = stored_candidate(row)
        if "image" in item:
            item["image"] = _open_image(item["image"], f"{tables['corpus'].at(row, 'image')}")
        return item

    queries = tables["queries"].data
    query_columns = _check_columns(
        queries, ("id", "text"), where["queries"], {"id": ("query-id", "_id"), "text": ("query", "text")}
    )
    query_ids = [str(identifier) for identifier in queries[query_columns["id"]]]
    check_unique(query_ids, lambda row: tables["queries"].at(row, query_columns["id"]))
    query_texts = list(queries[query_columns["text"]])
    for row, text in enumerate(query_texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{tables['queries'].at(row, query_columns['text'])}: empty or not a string")

    qrels_table = tables["qrels"].data
    _check_columns(qrels_table, ("query-id", "corpus-id", "score"), where["qrels"])
    known_queries, known_candidates = set(query_ids), set(candidate_ids)
    qrels: dict[str, dict[str, int]] = {}
    for row, (query, doc, score) in enumerate(
        zip(qrels_table["query-id"], qrels_table["corpus-id"], qrels_table["score"])
    ):
        query, doc = str(query), str(doc)
        if query not in known_queries:
            raise ValueError(f"{tables['qrels'].at(row, 'query-id')}: {query!r} is not in the queries")
        if doc not in known_candidates:
            raise ValueError(f"{tables['qrels'].at(row, 'corpus-id')}: {doc!r} is not in the corpus")
        qrels.setdefault(query, {})[doc] = check_grade(score, f"{tables['qrels'].at(row, 'score')}")
    # Queries without a relevant candidate are not scored (as in mteb and BEIR): not encoded either.
    kept = [row for row, query in enumerate(query_ids) if any(grade >= 1 for grade in qrels.get(query, {}).values())]
    if not kept:
        raise ValueError(f"{where['qrels']}: no query has a relevant candidate (score >= 1)")
    return RetrievalDataset(
        name=_display_name(source),
        query_ids=[query_ids[row] for row in kept],
        queries=[query_texts[row] for row in kept],
        candidate_ids=candidate_ids,
        candidates=LazyItems(candidate, len(candidate_ids), stored_candidate),
        qrels={query_ids[row]: qrels[query_ids[row]] for row in kept},
        **_provenance(source, "beir", split, dataset_id),
        notes={"queries_without_relevant": len(query_ids) - len(kept)},
    )


def check_unique(ids: Sequence[str], place: Callable[[int], str]) -> None:
    """Raises for the first repeated id, naming both places (`place(position)`, e.g. a file's row)."""
    seen: dict[str, int] = {}
    for number, identifier in enumerate(ids):
        if identifier in seen:
            raise ValueError(f"{place(number)}: {identifier!r} is not unique (first at {place(seen[identifier])})")
        seen[identifier] = number


# -- MMEB -----------------------------------------------------------------------------------------------------


def mmeb_text(instruction: str | None, text: str | None) -> str | None:
    """The item's text as MetaEmbed's prompts take it: the instruction (if any), a space, then the text, with
    the image placeholder (`<|image_1|>`) removed (the image goes in as an image)."""
    parts = [IMAGE_PLACEHOLDER.sub("", part).strip() for part in (instruction, text) if part]
    joined = " ".join(part for part in parts if part)
    return joined or None


def read_mmeb(
    source: str,
    subset: str,
    image_root: str | None = None,
    split: str = "test",
    cache_dir: str | None = None,
    dataset_id: str | None = None,
) -> RetrievalDataset:
    """One MMEB eval subset (a config of `TIGER-Lab/MMEB-eval`); see the module docstring.

    Args:
        source: the snapshot / save_to_disk folder or Hub id.
        subset: the config, e.g. "MSCOCO_i2t".
        image_root: the folder the `*_img_path` values are relative to (MMEB's `images.zip`, unzipped).
        dataset_id: the Hub id of a local snapshot outside the Hub cache (for the model card).
    """
    loaded = load_split(source, subset, split, cache_dir)
    table, where, at = loaded.data, loaded.where, loaded.at
    _check_columns(table, ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path"), where)
    has_instructions = "qry_inst" in table.column_names

    def image(path: Any, row: int, column: str) -> str | None:
        if path is None or path == "":
            return None
        if not isinstance(path, str):
            raise ValueError(f"{at(row, column)}: expected a path, got {type(path).__name__}")
        if image_root is None:
            raise ValueError(f"{at(row, column)}: {path!r} needs image_root (MMEB's image folder)")
        full = os.path.join(image_root, path)
        if not os.path.isfile(full):
            raise ValueError(f"{at(row, column)}: image file {full!r} not found")
        return full

    def item(text: str | None, path: str | None, row: int, column: str) -> dict[str, Any]:
        if text is None and path is None:
            raise ValueError(f"{at(row, column)}: neither text nor image")
        return {key: value for key, value in (("text", text), ("image", path)) if value is not None}

    query_ids, queries, candidate_lists = [], [], []
    candidate_positions: dict[tuple[str | None, str | None], int] = {}
    for row, record in enumerate(table):
        instruction = record.get("qry_inst") if has_instructions else None
        queries.append(
            item(
                mmeb_text(instruction, record["qry_text"]),
                image(record["qry_img_path"], row, "qry_img_path"),
                row,
                "qry_text",
            )
        )
        query_ids.append(str(row))
        texts, paths = record["tgt_text"], record["tgt_img_path"]
        if not isinstance(texts, list) or not isinstance(paths, list) or len(texts) != len(paths) or not texts:
            raise ValueError(
                f"{at(row)}, columns 'tgt_text' / 'tgt_img_path': expected two lists of the same non-zero "
                f"length, got {len(texts) if isinstance(texts, list) else texts!r} / "
                f"{len(paths) if isinstance(paths, list) else paths!r}"
            )
        candidate_instruction = record.get("tgt_inst") if has_instructions else None
        positions = []
        for text, path in zip(texts, paths):
            key = (mmeb_text(candidate_instruction, text), image(path, row, "tgt_img_path"))
            item(*key, row, "tgt_text")
            positions.append(candidate_positions.setdefault(key, len(candidate_positions)))
        candidate_lists.append(positions)
    if not queries:
        raise ValueError(f"{where}: no rows")
    # Candidates that repeat (the same text and image) are encoded once, as VLM2Vec does.
    candidates = [
        {key: value for key, value in zip(("text", "image"), pair) if value is not None} for pair in candidate_positions
    ]
    return RetrievalDataset(
        name=subset,
        query_ids=query_ids,
        queries=queries,
        candidate_ids=[str(position) for position in range(len(candidates))],
        candidates=candidates,
        candidate_lists=candidate_lists,
        config=subset,
        **_provenance(source, "mmeb", split, dataset_id),
        notes={"image_root": None if image_root is None else os.path.abspath(image_root)},
    )


def read_datasets(
    format: str,
    sources: Sequence[str],
    *,
    split: str = "test",
    subsets: Sequence[str] | None = None,
    image_root: str | None = None,
    cache_dir: str | None = None,
    dataset_ids: Sequence[str | None] | None = None,
) -> list[RetrievalDataset]:
    """Every dataset of `sources` in `format` ("vidore", "beir" or "mmeb"; for MMEB each source's `subsets`,
    default all its configs). `dataset_ids`: one Hub id (or None) per source, for local snapshots outside the
    Hub cache whose results should go into the model card."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if not sources:
        raise ValueError("give at least one dataset folder or Hub id")
    if dataset_ids is not None and len(dataset_ids) != len(sources):
        raise ValueError(f"{len(dataset_ids)} dataset_ids for {len(sources)} sources: give one per source (or None)")
    result = []
    for source, dataset_id in zip(sources, dataset_ids or [None] * len(sources)):
        if format == "vidore":
            result.append(read_vidore(source, split, cache_dir, dataset_id))
        elif format == "beir":
            result.append(read_beir(source, split, cache_dir, dataset_id))
        else:
            for subset in subsets or config_names(source):
                result.append(read_mmeb(source, subset, image_root, split, cache_dir, dataset_id))
    return result


__all__ = [
    "DEFAULT_METRICS",
    "FORMATS",
    "LazyItems",
    "RetrievalDataset",
    "Split",
    "config_names",
    "load_split",
    "mmeb_text",
    "read_beir",
    "read_datasets",
    "read_mmeb",
    "read_vidore",
]
