"""Readers for the published retrieval benchmark formats, each returning a `RetrievalDataset`.

Every reader takes a dataset as the Hub publishes it, from any of three places, through one code path:
- a local folder laid out as the Hub snapshot (`huggingface_hub.snapshot_download`: parquet files plus the
  README.md that declares the configs), or without a README / without a `configs:` block (then each config is
  the subfolder of that name: BEIR's `corpus/`, `queries/`, `qrels/`, MMEB's subsets), read from its parquet files
  on every call (never served from the `datasets` cache, which would return an edited file's or a same-named
  folder's old data);
- a Hub dataset id (online), read by `datasets.load_dataset`;
- a `datasets.save_to_disk` folder (one per config, as `<folder>/<config>` where the format has configs), read by
  `datasets.load_from_disk`.

Formats:
- ViDoRe v1 (`vidore/docvqa_test_subsampled`, ...): one table with `query`, `image`, `image_filename`; the corpus
  is the distinct `image_filename`s (a row may repeat an image or have no query); a query's relevant page is its
  own row's image. A query text that repeats over rows is one query; which rows' pages are relevant follows the
  protocol (`protocols`: mteb makes every row's page relevant, vidore-benchmark the last row's).
- BEIR (ViDoRe v2 and later, `vidore/esg_reports_v2`, ..., and text collections): configs `corpus`
  (`corpus-id` or `_id`; `text` with optional `title`, and/or `image`), `queries` (`query-id` or `_id`; `query` or
  `text`) and `qrels` (`query-id`, `corpus-id`, `score`, graded relevance kept; queries judged only with grade 0
  are counted, as mteb and vidore-benchmark count them).
- MMEB eval subsets (`TIGER-Lab/MMEB-eval`, one config per subset): `qry_text`, `qry_img_path`, `tgt_text` (list),
  `tgt_img_path` (list), and optionally `qry_inst` / `tgt_inst` (the instruct variant); image paths are relative to
  an image folder. Each query is ranked against its own candidate list, whose first entry is the positive.
  Candidates take `tgt_inst` only where VLM2Vec gives it (`protocols.MMEB_INSTRUCTED_CANDIDATES`).

Everything is validated when read, before any encoding, with errors naming the file, row and column. Images are
decoded only when an item is encoded, one encode batch at a time. An image cell (or MMEB path) must name a regular
file under the dataset's folder (or `image_root`), read with a size bound; decompression bombs are refused.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from .metrics import check_grade, parse_metric
from .protocols import MMEB_INSTRUCTED_CANDIDATES, MMEB_TEXT_CANDIDATES, get_protocol, main_metric

FORMATS = ("vidore", "beir", "mmeb")
# Each format's metrics; the first is the benchmark's own (the one of the paper's tables). BEIR datasets put
# their leaderboard's main score first (`protocols.main_metric`: nDCG@5 for ViDoRe v2, nDCG@10 for v3 and BEIR).
DEFAULT_METRICS = {
    "vidore": ("ndcg@5", "ndcg@10", "recall@100", "mrr@10"),
    "beir": ("ndcg@10", "ndcg@5", "recall@100", "mrr@10"),
    "mmeb": ("precision@1",),
}
# An image file (or image cell's file) larger than this is refused unread.
MAX_IMAGE_FILE_BYTES = 256 * 2**20
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
    # the protocol (`protocols.PROTOCOLS`) whose rules turn scores into numbers; None: the format's default
    # (mteb for ranked datasets, vlm2vec for candidate lists)
    protocol: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Checks everything evaluation reads, so bad data fails here (and again in `evaluate`, for a dataset
        changed after it was built), before any encoding."""
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
            for position, identifier in enumerate(ids):
                if not isinstance(identifier, str):
                    raise ValueError(f"{self.name}: {kind}_ids[{position}] is {identifier!r}, not a string")
            check_unique(ids, lambda position, kind=kind: f"{self.name}: {kind}_ids[{position}]")
        if isinstance(self.metrics, str) or not self.metrics:
            raise ValueError(f"{self.name}: metrics must be a non-empty tuple of names, got {self.metrics!r}")
        self.metrics = tuple(self.metrics)
        if self.candidate_lists is not None:
            self._check_candidate_lists()
        else:
            for name in self.metrics:
                parse_metric(name)
            self._check_qrels()
        get_protocol(self.protocol, "mmeb" if self.candidate_lists is not None else self.format or "beir")

    def _check_qrels(self) -> None:
        if not isinstance(self.qrels, dict) or not self.qrels:
            raise ValueError(f"{self.name}: qrels must be a non-empty dict {{query id: {{candidate id: grade}}}}")
        queries, candidates = set(self.query_ids), set(self.candidate_ids)
        for query, judged in self.qrels.items():
            if query not in queries:
                raise ValueError(f"{self.name}: qrels[{query!r}]: {query!r} is not in query_ids")
            if not isinstance(judged, dict):
                raise ValueError(f"{self.name}: qrels[{query!r}] must be a dict {{candidate id: grade}}")
            for doc, grade in judged.items():
                if doc not in candidates:
                    raise ValueError(f"{self.name}: qrels[{query!r}][{doc!r}]: {doc!r} is not in candidate_ids")
                check_grade(grade, f"{self.name}: qrels[{query!r}][{doc!r}]")

    def _check_candidate_lists(self) -> None:
        if len(self.candidate_lists) != len(self.query_ids):
            raise ValueError(
                f"{self.name}: {len(self.candidate_lists)} candidate lists for {len(self.query_ids)} queries"
            )
        count = len(self.candidate_ids)
        for number, positions in enumerate(self.candidate_lists):
            if isinstance(positions, (str, bytes)) or not isinstance(positions, Sequence) or not positions:
                raise ValueError(f"{self.name}: candidate_lists[{number}] must be a non-empty list of positions")
            for entry, position in enumerate(positions):
                if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < count:
                    raise ValueError(
                        f"{self.name}: candidate_lists[{number}][{entry}] is {position!r}, not a position into "
                        f"the {count} candidates"
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
    """The split `split` of `<source>/<config>` (or `source`) saved with `save_to_disk`, else of the local folder
    `source` (read from its parquet files, `_local_files`), else of the Hub id `source` through
    `datasets.load_dataset(source, config, split=split)`. With `only_split`, a config without that split but with
    exactly one other (BEIR's `corpus` / `queries` splits) gives that one."""
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
    if os.path.isdir(source):
        files, split = _local_files(source, config, split, only_split)
        # A private cache per read: the files as they are now, never a cached copy of another folder's.
        data = datasets.Dataset.from_parquet(files, cache_dir=_fresh_cache_dir())
        return Split(data, _where(source, config, split), _file_rows(source, files, len(data)))
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
    return Split(data, _where(source, config, split))


_CACHE_ROOT: list[str] = []


def _fresh_cache_dir() -> str:
    """A new folder for `datasets`' arrow files of one read, removed when the process exits."""
    if not _CACHE_ROOT:
        _CACHE_ROOT.append(tempfile.mkdtemp(prefix="metaembed-evaluation-"))
        atexit.register(shutil.rmtree, _CACHE_ROOT[0], True)
    return tempfile.mkdtemp(dir=_CACHE_ROOT[0])


def _where(source: str, config: str | None, split: str) -> str:
    return f"{source} [{config}/{split}]" if config else f"{source} [{split}]"


def _declared_configs(source: str) -> list[dict[str, Any]] | None:
    """The `configs:` of the folder's README.md front matter; None without a README or such a block."""
    readme = os.path.join(source, "README.md")
    if not os.path.isfile(readme):
        return None
    from huggingface_hub.repocard import metadata_load

    try:
        metadata = metadata_load(readme) or {}
    except Exception as error:  # yaml raises several kinds; all mean a broken front matter
        raise ValueError(f"{readme}: the front matter is not valid YAML ({error})") from error
    configs = metadata.get("configs")
    return configs if isinstance(configs, list) and configs else None


def _split_of(path: str) -> str:
    """The split a parquet file holds by the Hub's naming: `<split>-00000-of-00001.parquet`, `<split>.parquet`,
    or a `<split>/` folder."""
    name = os.path.basename(path)
    return re.split(r"[-.]", name, maxsplit=1)[0]


def _local_files(source: str, config: str | None, split: str, only_split: bool) -> tuple[list[str], str]:
    """(parquet files in order, split) of a config of a local folder: those its README's `configs:` declares,
    else every parquet file under `<source>/<config>` (or `source`), grouped by split name."""
    if _declared_configs(source) is not None:
        import datasets

        try:
            declared = datasets.load_dataset_builder(source, config).config.data_files or {}
        except ValueError as error:
            raise ValueError(f"cannot read {source} (config {config!r}): {error}") from error
        groups = {str(name): [str(path) for path in paths] for name, paths in declared.items()}
    else:
        folder = os.path.join(source, config) if config else source
        if not os.path.isdir(folder):
            present = sorted(name for name in os.listdir(source) if os.path.isdir(os.path.join(source, name)))
            raise ValueError(f"{source}: no {config!r} folder (a folder without README configs; found {present})")
        groups = {}
        for root, folders, names in os.walk(folder):
            folders.sort()
            for name in sorted(names):
                if name.endswith(".parquet"):
                    path = os.path.join(root, name)
                    groups.setdefault(_split_of(path), []).append(path)
    if split not in groups and (only_split or not config) and len(groups) == 1:
        split = next(iter(groups))
    if split not in groups:
        where = f"{source} (config {config!r})" if config else source
        raise ValueError(f"{where} has no split {split!r} (found {sorted(groups)})")
    files = groups[split]
    if not files or not all(path.endswith(".parquet") for path in files):
        raise ValueError(f"{source}: split {split!r} must be parquet files, got {files}")
    return files, split


def _file_rows(source: str, files: Sequence[str], num_rows: int) -> list[tuple[str, int]]:
    """(file relative to `source`, first row) of the parquet files of a split, in the order read; empty when
    the files do not add up to the split."""
    import pyarrow.parquet

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
    """The configs (e.g. MMEB subsets) of a save_to_disk folder (its saved subfolders), a snapshot folder (as its
    README.md declares them, else its subfolders holding parquet files) or a Hub id."""
    if os.path.isdir(source):
        if names := _saved_configs(source):
            return names
        declared = _declared_configs(source)
        if declared is not None:
            return [str(entry.get("config_name", "default")) for entry in declared if isinstance(entry, dict)]
        return sorted(
            name
            for name in os.listdir(source)
            if os.path.isdir(os.path.join(source, name))
            and any(file.endswith(".parquet") for _, _, files in os.walk(os.path.join(source, name)) for file in files)
        )
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


def safe_image_path(path: Any, root: str | None, where: str) -> str:
    """The file `path` names under `root`, checked: a relative path without `..`, resolving (symlinks followed)
    to a regular file inside `root` of at most `MAX_IMAGE_FILE_BYTES`. No device, FIFO or file outside."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"{where}: expected an image path, got {path!r}")
    if root is None:
        raise ValueError(f"{where}: the image {path!r} is a file path: give the folder it is under (image_root)")
    if os.path.isabs(path) or ".." in re.split(r"[/\\]", path):
        raise ValueError(f"{where}: the image path {path!r} must be relative to {root!r}, without '..'")
    base = os.path.realpath(root)
    full = os.path.realpath(os.path.join(base, path))
    if os.path.commonpath([base, full]) != base:
        raise ValueError(f"{where}: the image path {path!r} leads outside {root!r} (a symlink?)")
    try:
        status = os.stat(full)
    except OSError as error:
        raise ValueError(f"{where}: image file {os.path.join(root, path)!r} not found") from error
    if not stat.S_ISREG(status.st_mode):
        raise ValueError(f"{where}: {os.path.join(root, path)!r} is not a regular file")
    if status.st_size > MAX_IMAGE_FILE_BYTES:
        raise ValueError(f"{where}: {os.path.join(root, path)!r} is larger than {MAX_IMAGE_FILE_BYTES} bytes")
    return full


def _read_bounded(path: str, where: str) -> bytes:
    """The bytes of the regular file `path` (opened without blocking, checked again once open), at most
    `MAX_IMAGE_FILE_BYTES`."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(descriptor, "rb") as file:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ValueError(f"{where}: {path!r} is not a regular file")
        content = file.read(MAX_IMAGE_FILE_BYTES + 1)
    if len(content) > MAX_IMAGE_FILE_BYTES:
        raise ValueError(f"{where}: {path!r} is larger than {MAX_IMAGE_FILE_BYTES} bytes")
    return content


def _image_digest(value: Any, where: str, root: str | None) -> str:
    """sha256 of an image cell's stored bytes (a path-only cell's file, read as `_open_image` reads it; a decoded
    image's pixels)."""
    if isinstance(value, Image.Image):
        content = value.tobytes()
    elif isinstance(value, dict) and value.get("bytes") is not None:
        content = value["bytes"]
    elif isinstance(value, dict) and value.get("path"):
        content = _read_bounded(safe_image_path(value["path"], root, where), where)
    else:
        raise ValueError(f"{where}: no image")
    return hashlib.sha256(content).hexdigest()


def _check_path_cells(split: Split, table, column: str, rows: Sequence[int], root: str | None) -> None:
    """Checks, when the dataset is read, the image cells among `rows` that hold only a path (`safe_image_path`),
    without reading any stored image bytes."""
    import pyarrow
    import pyarrow.compute

    cells = table.data.column(column)
    if not pyarrow.types.is_struct(cells.type) or cells.type.get_field_index("path") < 0:
        return
    paths = pyarrow.compute.struct_field(cells, "path").to_pylist()
    no_bytes = pyarrow.compute.is_null(pyarrow.compute.struct_field(cells, "bytes")).to_pylist()
    for row in rows:
        if no_bytes[row] and paths[row] is not None:
            safe_image_path(paths[row], root, split.at(row, column))


def _cell_root(source: str, image_root: str | None) -> str | None:
    """The folder image cells holding a path may name files under: `image_root`, else a local dataset's folder
    (a Hub id has none: such cells are refused)."""
    return image_root if image_root is not None else (source if os.path.isdir(source) else None)


def _open_image(value: Any, where: str, root: str | None = None) -> Image.Image:
    """A PIL image from a datasets Image cell (decoded, or {"bytes", "path"}: a path only under `root`), loaded
    now so errors name the cell; the pixel-count (decompression bomb) limit applies before decoding."""
    from processing_metaembed import _check_pixel_count

    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            image = Image.open(io.BytesIO(_read_bounded(safe_image_path(value["path"], root, where), where)))
        else:
            raise ValueError("no image")
        _check_pixel_count(image.size)
        image.load()
    except Exception as error:  # PIL raises many kinds; all mean the same to the user
        message = str(error) if str(error).startswith(where) else f"{where}: cannot read the image ({error})"
        raise ValueError(message) from error
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
    source: str,
    split: str = "test",
    cache_dir: str | None = None,
    dataset_id: str | None = None,
    *,
    protocol: str | None = None,
    image_root: str | None = None,
) -> RetrievalDataset:
    """A ViDoRe v1 dataset (one table: `query`, `image`, `image_filename`); see the module docstring.

    Args:
        protocol: "mteb" (default: every row of a repeated query text makes its page relevant; empty queries
            dropped) or "vidore-benchmark" (the last row's page; an empty-string query is kept, so it is refused
            here, as MetaEmbed cannot encode empty text).
        dataset_id: the Hub id of a local snapshot outside the Hub cache (for the model card).
        image_root: the folder image cells that hold a path (no bytes) are under (default: the dataset folder).
    """
    rules = get_protocol(protocol, "vidore")
    loaded = load_split(source, None, split, cache_dir)
    table, where, at = loaded.data, loaded.where, loaded.at
    columns = _check_columns(table, ("query", "image", "image_filename"), where)
    queries_column, names = table[columns["query"]], table[columns["image_filename"]]
    first_row: dict[str, int] = {}
    for row, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise ValueError(f"{at(row, 'image_filename')}: expected a file name, got {name!r}")
        first_row.setdefault(name, row)
    # query text -> the rows that ask it, in row order
    query_rows: dict[str, list[int]] = {}
    for row, text in enumerate(queries_column):
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{at(row, 'query')}: expected a string or None, got {type(text).__name__}")
        if text is None:
            continue
        if not text.strip():
            if rules.keep_empty_queries:  # vidore-benchmark 5.x deduplicate_dataset_rows keeps "" (drops None)
                raise ValueError(
                    f"{at(row, 'query')}: an empty query, which protocol {rules.name!r} keeps and scores; "
                    "MetaEmbed cannot encode empty text (use protocol 'mteb', which drops it)"
                )
            continue
        query_rows.setdefault(text, []).append(row)
    if not query_rows:
        raise ValueError(f"{where}: no row has a query")
    images = _undecoded(table.select_columns([columns["image"]]), columns["image"])
    root = _cell_root(source, image_root)
    _check_path_cells(loaded, images, columns["image"], list(first_row.values()), root)
    # page file name -> the page it is scored as: itself, or under mteb the first file with the same image bytes
    # (mteb's ViDoRe v1 copies hold each distinct page image once)
    page_of = {name: name for name in first_row}
    if rules.repeated_queries == "all":
        first_of_digest: dict[str, str] = {}
        for name, row in first_row.items():
            digest = _image_digest(images[row][columns["image"]], at(row, "image"), root)
            page_of[name] = first_of_digest.setdefault(digest, name)
    candidate_ids = [name for name in first_row if page_of[name] == name]
    candidate_rows = [first_row[name] for name in candidate_ids]

    def stored_candidate(position: int) -> dict[str, Any]:
        return {"image": images[candidate_rows[position]][columns["image"]]}

    def candidate(position: int) -> dict[str, Any]:
        row = candidate_rows[position]
        return {"image": _open_image(stored_candidate(position)["image"], at(row, "image"), root)}

    query_ids = [str(rows[0]) for rows in query_rows.values()]
    if rules.repeated_queries == "last":  # vidore_evaluator_qa.py: queries2filename, a dict over all rows
        qrels = {str(rows[0]): {page_of[names[rows[-1]]]: 1} for rows in query_rows.values()}
    else:  # mteb's *_beir copies: every row asking the text makes its page relevant
        qrels = {str(rows[0]): {page_of[names[row]]: 1 for row in rows} for rows in query_rows.values()}
    provenance = _provenance(source, "vidore", split, dataset_id)
    return RetrievalDataset(
        name=_display_name(source),
        query_ids=query_ids,
        queries=list(query_rows),
        candidate_ids=candidate_ids,
        candidates=LazyItems(candidate, len(candidate_ids), stored_candidate),
        qrels=qrels,
        protocol=rules.name,
        **provenance,
        notes={
            "repeated_query_rows": sum(len(rows) - 1 for rows in query_rows.values()),
            "pages_with_the_same_image": len(first_row) - len(candidate_ids),
        },
    )


# -- BEIR -----------------------------------------------------------------------------------------------------


def _text_of(row: dict[str, Any], columns: Sequence[str]) -> str | None:
    parts = [row[name] for name in columns if isinstance(row.get(name), str) and row[name].strip()]
    return " ".join(parts) if parts else None


def _ids(split: Split, column: str) -> list[str]:
    """The id column as strings (ints allowed, as the Hub's BEIR copies store some); None or other types fail
    naming the row."""
    result = []
    for row, identifier in enumerate(split.data[column]):
        if isinstance(identifier, bool) or not isinstance(identifier, (str, int)) or identifier == "":
            raise ValueError(f"{split.at(row, column)}: expected an id (string or integer), got {identifier!r}")
        result.append(str(identifier))
    return result


def read_beir(
    source: str,
    split: str = "test",
    cache_dir: str | None = None,
    dataset_id: str | None = None,
    *,
    protocol: str | None = None,
    image_root: str | None = None,
) -> RetrievalDataset:
    """A BEIR-format dataset (configs `corpus`, `queries`, `qrels`, or folders of those names); see the module
    docstring. Every query with a qrels row is scored, also one judged only with grade 0 (it scores 0), as mteb
    and vidore-benchmark do; the main metric is the leaderboard's (`protocols.main_metric`).

    Args:
        protocol: "mteb" (default) or "vidore-benchmark".
        dataset_id: the Hub id of a local snapshot outside the Hub cache (for the model card).
        image_root: the folder image cells that hold a path (no bytes) are under (default: the dataset folder).
    """
    rules = get_protocol(protocol, "beir")
    tables = {role: _load_beir_config(source, role, split, cache_dir) for role in BEIR_CONFIGS}
    where = {role: loaded.where for role, loaded in tables.items()}
    corpus = tables["corpus"].data
    id_column = _check_columns(corpus, ("id",), where["corpus"], {"id": ("corpus-id", "_id")})["id"]
    text_columns = [name for name in ("title", "text") if name in corpus.column_names]
    has_image = "image" in corpus.column_names
    if not text_columns and not has_image:
        raise ValueError(f"{where['corpus']}: no 'text' or 'image' column (columns: {corpus.column_names})")
    candidate_ids = _ids(tables["corpus"], id_column)
    check_unique(candidate_ids, lambda row: tables["corpus"].at(row, id_column))
    texts = corpus.select_columns(text_columns) if text_columns else None
    images = _undecoded(corpus.select_columns(["image"]), "image") if has_image else None
    root = _cell_root(source, image_root)
    if images is not None:
        _check_path_cells(tables["corpus"], images, "image", range(len(candidate_ids)), root)
    if texts is not None:
        for row, record in enumerate(texts):
            for name in text_columns:
                if record[name] is not None and not isinstance(record[name], str):
                    raise ValueError(f"{tables['corpus'].at(row, name)}: expected a string, got {record[name]!r}")

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
            item["image"] = _open_image(item["image"], f"{tables['corpus'].at(row, 'image')}", root)
        return item

    queries = tables["queries"].data
    query_columns = _check_columns(
        queries, ("id", "text"), where["queries"], {"id": ("query-id", "_id"), "text": ("query", "text")}
    )
    query_ids = _ids(tables["queries"], query_columns["id"])
    check_unique(query_ids, lambda row: tables["queries"].at(row, query_columns["id"]))
    query_texts = list(queries[query_columns["text"]])

    qrels_split = tables["qrels"]
    _check_columns(qrels_split.data, ("query-id", "corpus-id", "score"), where["qrels"])
    known_queries, known_candidates = set(query_ids), set(candidate_ids)
    qrels: dict[str, dict[str, int]] = {}
    scores = qrels_split.data["score"]
    for row, (query, doc, score) in enumerate(
        zip(_ids(qrels_split, "query-id"), _ids(qrels_split, "corpus-id"), scores)
    ):
        if query not in known_queries:
            raise ValueError(f"{qrels_split.at(row, 'query-id')}: {query!r} is not in the queries")
        if doc not in known_candidates:
            raise ValueError(f"{qrels_split.at(row, 'corpus-id')}: {doc!r} is not in the corpus")
        qrels.setdefault(query, {})[doc] = check_grade(score, f"{qrels_split.at(row, 'score')}")
    # Queries without any qrels row are not scored (mteb's _filter_queries_without_positives): not encoded either.
    kept = [row for row, query in enumerate(query_ids) if query in qrels]
    if not kept:
        raise ValueError(f"{where['qrels']}: no query has a qrels row")
    for row in kept:  # only the scored queries: mteb drops the others whatever they hold
        if not isinstance(query_texts[row], str) or not query_texts[row].strip():
            raise ValueError(f"{tables['queries'].at(row, query_columns['text'])}: empty or not a string")
    provenance = _provenance(source, "beir", split, dataset_id)
    main = main_metric("beir", (provenance["hub_id"], os.path.abspath(source) if os.path.exists(source) else source))
    provenance["metrics"] = (main, *[name for name in DEFAULT_METRICS["beir"] if name != main])
    return RetrievalDataset(
        name=_display_name(source),
        query_ids=[query_ids[row] for row in kept],
        queries=[query_texts[row] for row in kept],
        candidate_ids=candidate_ids,
        candidates=LazyItems(candidate, len(candidate_ids), stored_candidate),
        qrels={query_ids[row]: qrels[query_ids[row]] for row in kept},
        protocol=rules.name,
        **provenance,
        notes={
            "queries_without_qrels": len(query_ids) - len(kept),
            "queries_judged_only_zero": sum(max(qrels[query_ids[row]].values()) < 1 for row in kept),
        },
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


def _optional_text(value: Any, where: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
    return value


def read_mmeb(
    source: str,
    subset: str,
    image_root: str | None = None,
    split: str = "test",
    cache_dir: str | None = None,
    dataset_id: str | None = None,
    *,
    protocol: str | None = None,
) -> RetrievalDataset:
    """One MMEB eval subset (a config of `TIGER-Lab/MMEB-eval`, or a subfolder of a folder without `configs:`);
    see the module docstring.

    Args:
        source: the snapshot / save_to_disk folder or Hub id.
        subset: the config, e.g. "MSCOCO_i2t".
        image_root: the folder the `*_img_path` values are relative to (MMEB's `images.zip`, unzipped); paths
            must stay inside it (no `..`, no absolute path, no symlink out) and name regular files.
        dataset_id: the Hub id of a local snapshot outside the Hub cache (for the model card).
        protocol: "vlm2vec" (the only one): `tgt_inst` goes to the candidates of the datasets VLM2Vec gives it
            (text-to-image, image-to-image, grounding); classification, VQA and image-to-text candidates are the
            bare `tgt_text` (no instruction, no image). A subset VLM2Vec does not list gets `tgt_inst` on
            candidates that have an image.
    """
    rules = get_protocol(protocol, "mmeb")
    loaded = load_split(source, subset, split, cache_dir)
    table, where, at = loaded.data, loaded.where, loaded.at
    _check_columns(table, ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path"), where)
    has_instructions = "qry_inst" in table.column_names
    text_candidates = subset in MMEB_TEXT_CANDIDATES

    def image(path: Any, row: int, column: str) -> str | None:
        if path is None or path == "":
            return None
        return safe_image_path(path, image_root, at(row, column))

    def item(text: str | None, path: str | None, row: int, column: str) -> dict[str, Any]:
        if text is None and path is None:
            raise ValueError(f"{at(row, column)}: neither text nor image")
        return {key: value for key, value in (("text", text), ("image", path)) if value is not None}

    query_ids, queries, candidate_lists = [], [], []
    candidate_positions: dict[tuple[str | None, str | None], int] = {}
    for row, record in enumerate(table):
        instruction = _optional_text(record.get("qry_inst"), at(row, "qry_inst")) if has_instructions else None
        text = _optional_text(record["qry_text"], at(row, "qry_text"))
        query_image = image(record["qry_img_path"], row, "qry_img_path")
        queries.append(item(mmeb_text(instruction, text), query_image, row, "qry_text"))
        query_ids.append(str(row))
        texts, paths = record["tgt_text"], record["tgt_img_path"]
        if not isinstance(texts, list) or not isinstance(paths, list) or len(texts) != len(paths) or not texts:
            raise ValueError(
                f"{at(row)}, columns 'tgt_text' / 'tgt_img_path': expected two lists of the same non-zero "
                f"length, got {len(texts) if isinstance(texts, list) else texts!r} / "
                f"{len(paths) if isinstance(paths, list) else paths!r}"
            )
        candidate_instruction = (
            _optional_text(record.get("tgt_inst"), at(row, "tgt_inst")) if has_instructions else None
        )
        positions = []
        for entry, (text, path) in enumerate(zip(texts, paths)):
            text = _optional_text(text, f"{at(row, 'tgt_text')}[{entry}]")
            # VLM2Vec image_cls / image_qa / image_i2t: the candidate is the bare tgt_text (line 26 of each).
            path = None if text_candidates else image(path, row, f"tgt_img_path[{entry}]")
            instructed = not text_candidates and (subset in MMEB_INSTRUCTED_CANDIDATES or path is not None)
            key = (mmeb_text(candidate_instruction if instructed else None, text), path)
            item(*key, row, f"tgt_text[{entry}]")
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
        protocol=rules.name,
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
    protocol: str | None = None,
) -> list[RetrievalDataset]:
    """Every dataset of `sources` in `format` ("vidore", "beir" or "mmeb"; for MMEB each source's `subsets`,
    default all its configs). `dataset_ids`: one Hub id (or None) per source, for local snapshots outside the
    Hub cache whose results should go into the model card. `protocol`: see `protocols` (default: the format's)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    get_protocol(protocol, format)
    if not sources:
        raise ValueError("give at least one dataset folder or Hub id")
    if dataset_ids is not None and len(dataset_ids) != len(sources):
        raise ValueError(f"{len(dataset_ids)} dataset_ids for {len(sources)} sources: give one per source (or None)")
    result = []
    for source, dataset_id in zip(sources, dataset_ids or [None] * len(sources)):
        if format == "vidore":
            result.append(read_vidore(source, split, cache_dir, dataset_id, protocol=protocol, image_root=image_root))
        elif format == "beir":
            result.append(read_beir(source, split, cache_dir, dataset_id, protocol=protocol, image_root=image_root))
        else:
            for subset in subsets or config_names(source):
                result.append(read_mmeb(source, subset, image_root, split, cache_dir, dataset_id, protocol=protocol))
    return result


__all__ = [
    "DEFAULT_METRICS",
    "FORMATS",
    "MAX_IMAGE_FILE_BYTES",
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
    "safe_image_path",
]
