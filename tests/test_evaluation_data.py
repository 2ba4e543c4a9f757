"""Data the evaluator can trust: local folders read from their files (never a stale cache), layouts without a
README, validation before any encoding (also through the Python API), hostile image cells and paths, and the
memory bound of decoding pages per encode batch."""

from __future__ import annotations

import importlib
import io
import os
import re
import struct
import threading
import zlib
from types import SimpleNamespace

import pyarrow
import pyarrow.parquet
import pytest
import torch
from PIL import Image

from metaembed.evaluation import RetrievalDataset, evaluate, read_beir, read_mmeb, read_vidore

datasets = pytest.importorskip("datasets")
pytest.importorskip("pytrec_eval")
evaluate_module = importlib.import_module("metaembed.evaluation.evaluate")
readers_module = importlib.import_module("metaembed.evaluation.readers")


def page(width: int, height: int = 40, color: str = "white") -> Image.Image:
    return Image.new("RGB", (width, height), color)


def write_table(folder, table: datasets.Dataset, name: str = "test-00000-of-00001.parquet") -> str:
    os.makedirs(folder, exist_ok=True)
    table.to_parquet(os.path.join(folder, name))
    return str(folder)


def vidore_table(queries, widths, names=None) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {
            "query": list(queries),
            "image": [page(width) for width in widths],
            "image_filename": list(names or [f"p{number}.png" for number in range(len(widths))]),
        }
    ).cast_column("image", datasets.Image())


def beir_tables(scores=(1, 1), corpus_ids=("d0", "d1")) -> dict[str, datasets.Dataset]:
    return {
        "corpus": datasets.Dataset.from_dict({"corpus-id": list(corpus_ids), "text": ["red page", "blue page"]}),
        "queries": datasets.Dataset.from_dict({"query-id": ["q0", "q1"], "query": ["red?", "blue?"]}),
        "qrels": datasets.Dataset.from_dict(
            {"query-id": ["q0", "q1"], "corpus-id": ["d0", "d1"], "score": list(scores)}
        ),
    }


def write_beir_folders(root, tables) -> str:
    """BEIR as many people copy it: `corpus/`, `queries/`, `qrels/` parquet folders, no README."""
    for role, table in tables.items():
        write_table(os.path.join(root, role), table, f"{'test' if role == 'qrels' else role}.parquet")
    return str(root)


class NoEncoding:
    """A model that fails the test if anything is encoded (validation must come first)."""

    config = SimpleNamespace(num_query_vectors=2, num_candidate_vectors=2, output_dim=4)

    def encode(self, *args, **kwargs):
        raise AssertionError("encoded before validation")


# -- never stale ------------------------------------------------------------------------------------------------


def write_snapshot(root, table: datasets.Dataset) -> str:
    """The Hub snapshot layout of a one-table dataset: data/test-*.parquet and the README declaring it."""
    write_table(os.path.join(root, "data"), table)
    with open(os.path.join(root, "README.md"), "w", encoding="utf-8") as file:
        file.write(
            "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: test\n    path: data/test-*\n---\n"
        )
    return str(root)


def test_an_edited_file_or_a_same_named_folder_gives_its_own_data(tmp_path):
    cache = str(tmp_path / "hf-cache")  # one datasets cache for every read, as a user's ~/.cache
    first = write_snapshot(tmp_path / "a" / "docvqa", vidore_table(["which?"], [41]))
    assert read_vidore(first, cache_dir=cache).queries == ["which?"]
    write_snapshot(first, vidore_table(["edited?", "new?"], [41, 42]))  # edited in place
    assert read_vidore(first, cache_dir=cache).queries == ["edited?", "new?"]
    other = write_snapshot(tmp_path / "b" / "docvqa", vidore_table(["other?"], [43]))  # same folder name
    dataset = read_vidore(other, cache_dir=cache)
    assert dataset.queries == ["other?"] and dataset.candidates[0]["image"].size == (43, 40)


def test_beir_folders_without_a_readme_are_read_by_folder(tmp_path):
    folder = write_beir_folders(tmp_path / "beir", beir_tables())
    dataset = read_beir(folder)
    assert dataset.candidate_ids == ["d0", "d1"] and dataset.qrels == {"q0": {"d0": 1}, "q1": {"d1": 1}}
    assert dataset.main_metric == "ndcg@10"


def test_an_empty_query_without_qrels_is_dropped_as_mteb_drops_it(tmp_path):
    tables = beir_tables()
    tables["queries"] = datasets.Dataset.from_dict({"query-id": ["q0", "q1", "q2"], "query": ["red?", "blue?", ""]})
    dataset = read_beir(write_beir_folders(tmp_path / "beir", tables))
    assert dataset.query_ids == ["q0", "q1"]
    tables["qrels"] = datasets.Dataset.from_dict({"query-id": ["q2"], "corpus-id": ["d0"], "score": [1]})
    with pytest.raises(ValueError, match=r"queries.*empty or not a string"):
        read_beir(write_beir_folders(tmp_path / "scored", tables))


# -- validated before encoding, naming file, row and column -----------------------------------------------------


@pytest.mark.parametrize(
    ("scores", "message"),
    [
        ((1, 3e9), r"qrels/test.parquet row 1, column 'score': 3000000000.0 is not an integer grade within"),
        ((1e300, 1), r"qrels/test.parquet row 0, column 'score': 1e\+300 is not an integer grade within"),
    ],
)
def test_grades_beyond_the_bound_are_refused_naming_the_cell(tmp_path, scores, message):
    folder = write_beir_folders(tmp_path / "beir", beir_tables(scores=scores))
    with pytest.raises(ValueError, match=message):
        read_beir(folder)


def test_a_null_corpus_id_is_refused_not_read_as_none(tmp_path):
    folder = write_beir_folders(tmp_path / "beir", beir_tables(corpus_ids=("d0", None)))
    with pytest.raises(ValueError, match=r"corpus/corpus.parquet row 1, column 'corpus-id': expected an id .* None"):
        read_beir(folder)


def python_api_dataset(**changes) -> dict:
    fields = {
        "name": "api",
        "query_ids": ["q0", "q1"],
        "queries": ["red?", "blue?"],
        "candidate_ids": ["d0", "d1"],
        "candidates": ["red", "blue"],
        "qrels": {"q0": {"d0": 1}, "q1": {"d1": 1}},
    }
    return {**fields, **changes}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"qrels": {"q0": {"d0": 1}, "q1": {"d9": 1}}}, r"qrels\['q1'\]\['d9'\]: 'd9' is not in candidate_ids"),
        ({"qrels": {"q0": {"d0": 1}, "q7": {"d1": 1}}}, r"qrels\['q7'\]: 'q7' is not in query_ids"),
        ({"candidate_ids": ["d0", None]}, r"candidate_ids\[1\] is None, not a string"),
        ({"qrels": None, "candidate_lists": [[0, 5], [1]]}, r"candidate_lists\[0\]\[1\] is 5, not a position"),
        ({"qrels": None, "candidate_lists": [[0], []]}, r"candidate_lists\[1\] must be a non-empty list"),
        ({"metrics": ("ndcg@99999999999999999999",)}, r"unknown metric 'ndcg@99999999999999999999'"),
        ({"qrels": {"q0": {"d0": 3e9}, "q1": {"d1": 1}}}, r"qrels\['q0'\]\['d0'\]: 3000000000.0 is not an integer"),
    ],
)
def test_the_python_api_validates_datasets_when_built(changes, message):
    with pytest.raises(ValueError, match=message):
        RetrievalDataset(**python_api_dataset(**changes))


def test_a_dataset_changed_after_it_was_built_is_checked_again_before_encoding():
    dataset = RetrievalDataset(**python_api_dataset())
    dataset.qrels["q1"] = {"d9": 1}  # unknown id: silently a lower nDCG (0.75 -> 0.5) before
    with pytest.raises(ValueError, match=r"qrels\['q1'\]\['d9'\]: 'd9' is not in candidate_ids"):
        evaluate(NoEncoding(), dataset, [(1, 1)])


def test_bad_metric_names_fail_before_any_encoding():
    dataset = RetrievalDataset(**python_api_dataset())
    for metrics in (["ndcg@99999999999999999999"], ["ndcg@5", "hits@3"]):
        with pytest.raises(ValueError, match="unknown metric"):
            evaluate(NoEncoding(), dataset, [(1, 1)], metrics=metrics)


# -- hostile image cells and paths ------------------------------------------------------------------------------


def write_cells(folder, paths) -> str:
    """A ViDoRe v1 table whose image cells hold only a path (no bytes), written as is (pyarrow)."""
    features = datasets.Features(
        {"query": datasets.Value("string"), "image": datasets.Image(), "image_filename": datasets.Value("string")}
    )
    table = pyarrow.Table.from_pydict(
        {
            "query": [f"q{number}" for number in range(len(paths))],
            "image": [{"bytes": None, "path": path} for path in paths],
            "image_filename": [f"p{number}.png" for number in range(len(paths))],
        },
        schema=features.arrow_schema,
    )
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    pyarrow.parquet.write_table(table, os.path.join(folder, "data", "test-00000-of-00001.parquet"))
    return str(folder)


def finishes(function) -> object:
    """function() run in a thread that must finish (a FIFO must not hang the reader); its result or error."""
    outcome = {}

    def target():
        try:
            outcome["value"] = function()
        except Exception as error:  # returned for the test to check
            outcome["value"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the reader hung"
    return outcome["value"]


def test_image_cells_read_only_regular_files_under_the_dataset_folder(tmp_path):
    outside = tmp_path / "secret.png"
    page(50).save(outside)
    folder = tmp_path / "vidore"
    os.makedirs(folder / "pages")
    page(51).save(folder / "pages" / "fine.png")
    os.symlink(outside, folder / "pages" / "link.png")
    os.mkfifo(folder / "pages" / "fifo.png")
    dataset = read_vidore(write_cells(folder, ["pages/fine.png"]), protocol="vidore-benchmark")
    assert dataset.candidates[0]["image"].size == (51, 40)  # a relative path under the folder is read
    cases = {
        "/dev/zero": r"the image path '/dev/zero' must be relative",
        "../secret.png": r"the image path '../secret.png' must be relative to .*, without '..'",
        "pages/link.png": r"the image path 'pages/link.png' leads outside",
        "pages/fifo.png": r".*pages/fifo.png' is not a regular file",
        str(outside): r"the image path '.*secret.png' must be relative",
    }
    for path, message in cases.items():
        # Refused when the dataset is read (before any encoding), naming the cell, and never hanging.
        write_cells(folder, ["pages/fine.png", path])
        for protocol in ("mteb", "vidore-benchmark"):
            error = finishes(lambda protocol=protocol: read_vidore(str(folder), protocol=protocol).candidates[1])
            assert isinstance(error, ValueError), error
            expected = rf"data/test-00000-of-00001.parquet row 1, column 'image': {message}"
            assert re.search(expected, str(error)), (expected, str(error))


def test_beir_image_cells_are_checked_when_read(tmp_path):
    page(50).save(tmp_path / "secret.png")
    features = datasets.Features({"corpus-id": datasets.Value("string"), "image": datasets.Image()})
    corpus = pyarrow.Table.from_pydict(
        {"corpus-id": ["d0", "d1"], "image": [{"bytes": b"", "path": None}, {"bytes": None, "path": "../secret.png"}]},
        schema=features.arrow_schema,
    )
    tables = beir_tables()
    folder = write_beir_folders(tmp_path / "beir", {"queries": tables["queries"], "qrels": tables["qrels"]})
    os.makedirs(tmp_path / "beir" / "corpus")
    pyarrow.parquet.write_table(corpus, str(tmp_path / "beir" / "corpus" / "corpus.parquet"))
    with pytest.raises(ValueError, match=r"corpus/corpus.parquet row 1, column 'image': the image path '\.\./secret"):
        read_beir(folder)


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the pixel data is a 1x1 image's): what a decompression bomb
    looks like until it is decoded."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(data)


def test_a_decompression_bomb_inside_a_cell_is_refused_like_one_given_by_path(tmp_path):
    bomb = png_header_claiming(13_000, 13_000)  # 169 megapixels: PIL itself only warns below 2x its limit
    table = datasets.Dataset.from_dict(
        {"query": ["q"], "image": [{"bytes": bomb, "path": None}], "image_filename": ["bomb.png"]},
        features=datasets.Features(
            {"query": datasets.Value("string"), "image": datasets.Image(), "image_filename": datasets.Value("string")}
        ),
    )
    dataset = read_vidore(os.path.dirname(write_table(tmp_path / "v" / "data", table)))
    with pytest.raises(ValueError, match=r"row 0, column 'image': .*169000000 pixels exceeds the limit"):
        dataset.candidates[0]


def test_mmeb_image_paths_stay_inside_the_image_root(tmp_path):
    root = tmp_path / "images"
    os.makedirs(root)
    page(50).save(tmp_path / "secret.png")
    page(51).save(root / "fine.png")
    os.symlink(tmp_path / "secret.png", root / "link.png")
    cases = {
        "../secret.png": r"must be relative to .*, without '..'",
        str(tmp_path / "secret.png"): r"must be relative",
        "link.png": r"leads outside",
    }
    for number, (path, message) in enumerate(cases.items()):
        subset = f"S{number}"
        table = pyarrow.table({"qry_text": ["q"], "qry_img_path": [path], "tgt_text": [["a"]], "tgt_img_path": [[""]]})
        os.makedirs(tmp_path / "mmeb" / subset)
        pyarrow.parquet.write_table(table, str(tmp_path / "mmeb" / subset / "test-00000-of-00001.parquet"))
        with pytest.raises(ValueError, match=rf"row 0, column 'qry_img_path': the image path .*{message}"):
            read_mmeb(str(tmp_path / "mmeb"), subset, image_root=str(root))


# -- bounded memory ---------------------------------------------------------------------------------------------


def resident_bytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemoryModel:
    """Decodes each item's image (as the real processor does), records resident memory, returns zeros."""

    config = SimpleNamespace(num_query_vectors=1, num_candidate_vectors=1, output_dim=4)

    def __init__(self) -> None:
        self.peak = 0

    def encode(self, items, task, num_vectors=None, batch_size=16, show_progress_bar=None):
        for item in items:
            if isinstance(item, dict) and "image" in item:
                item["image"].convert("RGB")
        self.peak = max(self.peak, resident_bytes())
        return torch.zeros(len(items), 1, 4)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from /proc")
def test_pages_are_decoded_per_encode_batch_within_a_stated_memory_bound(tmp_path):
    """24 pages of 1500 x 1500 (6.75 MB each decoded) in one 1,024-item part, batch size 2: decoding the part at
    once adds ~160 MB; per batch, the bound is 4 batches' worth of decoded pages (for the copies the model and
    PIL make) plus 32 MB of allocator slack."""
    width, count, batch_size = 1500, 24, 2
    folder = tmp_path / "large"
    os.makedirs(folder / "data")
    for start in range(0, count, 8):  # written in parts: the test itself never holds every page
        table = vidore_table(
            [f"q{number}" for number in range(start, start + 8)],
            [width] * 8,
            [f"p{number}.png" for number in range(start, start + 8)],
        )
        table = table.cast_column("image", datasets.Image(decode=False))
        table = table.map(
            lambda row, index, start=start: {"image": {"bytes": _png(width, start + index), "path": None}},
            with_indices=True,
        )
        table.to_parquet(str(folder / "data" / f"test-{start:05d}-of-00003.parquet"))
    dataset = read_vidore(str(folder))
    assert len(dataset.candidate_ids) == count
    page_bytes = width * width * 3
    bound = 4 * batch_size * page_bytes + 32 * 2**20
    model = PeakMemoryModel()
    baseline = resident_bytes()
    evaluate(model, dataset, [(1, 1)], batch_size=batch_size, chunk_size=1024)
    growth = model.peak - baseline
    print(f"peak growth {growth / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB (all pages decoded: 154 MiB)")
    assert growth < bound


def _png(width: int, number: int) -> bytes:
    """A distinct page (pages with the same image would be one page under mteb's protocol)."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, width), (number, 255 - number, 128)).save(buffer, "PNG")
    return buffer.getvalue()
