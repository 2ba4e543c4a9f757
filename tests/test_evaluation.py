"""metaembed.evaluation: readers for the published formats, metrics against pytrec_eval and by hand, the
per-budget evaluator (prefix scoring, resumable embedding cache), reports, the CLI and the model card."""

from __future__ import annotations

import importlib
import os
import random
import shutil

import pytest
import torch
from conftest import make_model
from PIL import Image

from metaembed.cli import main
from metaembed.evaluation import RetrievalDataset, evaluate, read_beir, read_datasets, read_mmeb, read_vidore
from metaembed.evaluation.metrics import list_precision_at_1, ranked_ids, ranking_metrics
from metaembed.evaluation.readers import mmeb_text
from metaembed.evaluation.report import format_table, load_results, save_json, save_plot
from metaembed.search import MetaEmbedIndex
from scoring_metaembed import late_interaction_scores

# The modules (the package's `evaluate` attribute is the function of the same name).
evaluate_module = importlib.import_module("metaembed.evaluation.evaluate")
readers_module = importlib.import_module("metaembed.evaluation.readers")
datasets = pytest.importorskip("datasets")
pytrec_eval = pytest.importorskip("pytrec_eval")

BUDGETS = [(1, 1), (2, 4), (4, 8)]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]


def page(color: str, size: int = 40) -> Image.Image:
    """A generated page: a coloured block on white, the colour named by the queries."""
    image = Image.new("RGB", (size, size + 8), "white")
    image.paste(Image.new("RGB", (size // 2, size // 2), color), (4, 4))
    return image


# -- writing miniature datasets in the published layouts ------------------------------------------------------


def write_snapshot(root, tables: dict[str | None, datasets.Dataset], split: str = "test") -> str:
    """The Hub snapshot layout: `<config>/<split>-00000-of-00001.parquet` per config (`data/` for a dataset
    without configs) and the README.md whose YAML declares them, as `push_to_hub` leaves a repo."""
    lines = ["---", "configs:"]
    for config, table in tables.items():
        folder = config or "data"
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        table.to_parquet(os.path.join(root, folder, f"{split}-00000-of-00001.parquet"))
        lines += [
            f"- config_name: {config or 'default'}",
            "  data_files:",
            f"  - split: {split}",
            f"    path: {folder}/{split}-*",
        ]
    with open(os.path.join(root, "README.md"), "w", encoding="utf-8") as file:
        file.write("\n".join([*lines, "---", "", "A miniature dataset.", ""]))
    return str(root)


def write_saved(root, tables: dict[str | None, datasets.Dataset], split: str = "test") -> str:
    """`datasets.save_to_disk` folders: the DatasetDict itself, or one per config under `<root>/<config>`."""
    for config, table in tables.items():
        datasets.DatasetDict({split: table}).save_to_disk(os.path.join(root, config) if config else str(root))
    return str(root)


def vidore_tables() -> dict[str | None, datasets.Dataset]:
    """ViDoRe v1's QA table: a repeated image, a row without a query, a repeated query text, an extra column."""
    rows = [
        ("which page is red?", "red", "a.png"),
        ("which page is green?", "green", "b.png"),
        (None, "blue", "c.png"),
        ("which page is blue?", "blue", "c.png"),
        ("which page is red?", "yellow", "d.png"),  # repeated text: both rows' pages are relevant (mteb)
        ("which page is yellow?", "yellow", "d.png"),
    ]
    table = datasets.Dataset.from_dict(
        {
            "query": [row[0] for row in rows],
            "image": [page(row[1]) for row in rows],
            "image_filename": [row[2] for row in rows],
            "answer": ["x"] * len(rows),
        }
    )
    return {None: table.cast_column("image", datasets.Image())}


def beir_tables() -> dict[str, datasets.Dataset]:
    """ViDoRe v2's BEIR configs: int ids, image corpus, graded float64 scores, a `language` column."""
    corpus = datasets.Dataset.from_dict({"corpus-id": list(range(5)), "image": [page(color) for color in COLORS[:5]]})
    queries = datasets.Dataset.from_dict(
        {
            "query-id": [10, 11, 12, 13],
            "query": ["red page", "green or blue page", "yellow page", "no relevant page"],
            "language": ["english"] * 4,
        }
    )
    qrels = datasets.Dataset.from_dict(
        {"query-id": [10, 11, 11, 12, 12, 13], "corpus-id": [0, 1, 2, 3, 4, 4], "score": [1.0, 2.0, 1.0, 2.0, 1.0, 0.0]}
    )
    return {"corpus": corpus.cast_column("image", datasets.Image()), "queries": queries, "qrels": qrels}


def mmeb_tables(image_root, instructions: bool) -> dict[str, datasets.Dataset]:
    """Two MMEB eval subsets: image-to-text (the query text carries `<|image_1|>`) and text-to-image; the
    positive is each row's first candidate; `qry_inst` / `tgt_inst` only in the instruct variant."""
    os.makedirs(os.path.join(image_root, "Sub_i2t"), exist_ok=True)
    for color in COLORS:
        page(color).save(os.path.join(image_root, "Sub_i2t", f"{color}.jpg"))
    i2t_rows, t2i_rows = [], []
    for color in COLORS[:4]:
        others = [other for other in COLORS if other != color][:3]
        instruction = "Represent the given image for classification:"
        i2t_rows.append(
            {
                "qry_text": f"<|image_1|>\n{'' if instructions else instruction + ' '}what colour is the block?",
                "qry_img_path": f"Sub_i2t/{color}.jpg",
                "tgt_text": [color, *others],
                "tgt_img_path": ["", "", "", ""],
                **(
                    {"qry_inst": f"<|image_1|> {instruction}", "tgt_inst": "Represent the answer:"}
                    if instructions
                    else {}
                ),
            }
        )
        t2i_rows.append(
            {
                "qry_text": f"a {color} block",
                "qry_img_path": "",
                "tgt_text": ["<|image_1|>\nRepresent the given image."] * 4,
                "tgt_img_path": [f"Sub_i2t/{name}.jpg" for name in [color, *others]],
                **({"qry_inst": "Find the image:", "tgt_inst": ""} if instructions else {}),
            }
        )
    return {"Sub_i2t": datasets.Dataset.from_list(i2t_rows), "Sub_t2i": datasets.Dataset.from_list(t2i_rows)}


@pytest.fixture(scope="module")
def eval_model(backbone_dirs):
    return make_model(backbone_dirs["qwen2_5_vl"])


def read_both(format_name: str, tables, tmp_path, **options) -> tuple[list[RetrievalDataset], list[RetrievalDataset]]:
    snapshot = write_snapshot(tmp_path / "snapshot", tables)
    saved = write_saved(tmp_path / "saved", tables)
    cache = str(tmp_path / "hf-datasets")
    read = [read_datasets(format_name, [folder], cache_dir=cache, **options) for folder in (snapshot, saved)]
    return read[0], read[1]


def numbers(results) -> list[tuple]:
    """What must not depend on where the data was read from (timings and source names may)."""
    return [
        (r.budget, r.metrics, r.main_metric, r.index_bytes_per_candidate, r.num_queries, r.num_candidates)
        for r in results
    ]


def items_equal(first, second) -> bool:
    def plain(item):
        if isinstance(item, Image.Image):
            return ("image", item.size, item.convert("RGB").tobytes())
        if isinstance(item, dict):
            return tuple(sorted((key, plain(value)) for key, value in item.items()))
        return item

    return [plain(item) for item in first] == [plain(item) for item in second]


# -- readers --------------------------------------------------------------------------------------------------


def test_vidore_v1_from_snapshot_and_save_to_disk(eval_model, tmp_path):
    (snapshot,), (saved,) = read_both("vidore", vidore_tables(), tmp_path)
    # Distinct pages; queries: no empty one, repeated text once, relevant to every row's page that asks it (mteb).
    assert snapshot.candidate_ids == ["a.png", "b.png", "c.png", "d.png"]
    assert snapshot.queries == [
        "which page is red?",
        "which page is green?",
        "which page is blue?",
        "which page is yellow?",
    ]
    assert snapshot.qrels == {"0": {"a.png": 1, "d.png": 1}, "1": {"b.png": 1}, "3": {"c.png": 1}, "5": {"d.png": 1}}
    assert snapshot.main_metric == "ndcg@5"
    assert snapshot.candidates[2]["image"].getpixel((10, 10)) == (0, 0, 255)
    for field in ("query_ids", "queries", "candidate_ids", "qrels", "metrics"):
        assert getattr(snapshot, field) == getattr(saved, field), field
    assert items_equal(snapshot.candidates, saved.candidates)
    assert numbers(evaluate(eval_model, snapshot, BUDGETS)) == numbers(evaluate(eval_model, saved, BUDGETS))


def test_beir_from_snapshot_and_save_to_disk(eval_model, tmp_path):
    (snapshot,), (saved,) = read_both("beir", beir_tables(), tmp_path)
    # Graded relevance kept (float64 scores become ints); the query judged only with grade 0 is scored (as 0).
    assert snapshot.qrels == {"10": {"0": 1}, "11": {"1": 2, "2": 1}, "12": {"3": 2, "4": 1}, "13": {"4": 0}}
    assert snapshot.query_ids == ["10", "11", "12", "13"] and snapshot.notes["queries_judged_only_zero"] == 1
    assert snapshot.candidate_ids == ["0", "1", "2", "3", "4"] and snapshot.main_metric == "ndcg@10"
    for field in ("query_ids", "queries", "candidate_ids", "qrels"):
        assert getattr(snapshot, field) == getattr(saved, field), field
    assert items_equal(snapshot.candidates, saved.candidates)
    first, second = evaluate(eval_model, snapshot, BUDGETS), evaluate(eval_model, saved, BUDGETS)
    assert numbers(first) == numbers(second)
    assert set(first[0].metrics) == {"ndcg@10", "recall@100", "mrr@10", "ndcg@5"}


@pytest.mark.parametrize("instructions", [False, True], ids=["mmeb-v1", "with-inst"])
def test_mmeb_from_snapshot_and_save_to_disk(eval_model, tmp_path, instructions):
    image_root = str(tmp_path / "eval_images")
    tables = mmeb_tables(image_root, instructions)
    snapshot, saved = read_both("mmeb", tables, tmp_path, image_root=image_root)
    assert [dataset.name for dataset in snapshot] == ["Sub_i2t", "Sub_t2i"]
    i2t, t2i = snapshot
    # The placeholder is gone, the image goes in as an image, the instruction is part of the text.
    assert i2t.queries[0] == {
        "text": "Represent the given image for classification: what colour is the block?",
        "image": os.path.join(image_root, "Sub_i2t", "red.jpg"),
    }
    assert t2i.queries[0]["text"] == ("Find the image: a red block" if instructions else "a red block")
    # VLM2Vec gives text candidates (classification, VQA, image-to-text) no tgt_inst.
    assert i2t.candidates[i2t.candidate_lists[0][0]] == {"text": "red"}
    # Repeated candidates are encoded once; each query keeps its own list, positive first.
    assert len(t2i.candidates) == 4 and [len(positions) for positions in t2i.candidate_lists] == [4] * 4
    assert t2i.candidates[t2i.candidate_lists[1][0]]["image"].endswith("green.jpg")
    for first, second in zip(snapshot, saved):
        assert first.queries == second.queries and first.candidates == second.candidates
        assert first.candidate_lists == second.candidate_lists
    results = evaluate(eval_model, snapshot, BUDGETS)
    assert numbers(results) == numbers(evaluate(eval_model, saved, BUDGETS))
    assert [result.main_metric for result in results] == ["precision@1"] * 6
    # precision@1 by a plain computation: the positive (entry 0) scores at least as high as every other.
    t2i_results = [result for result in results if result.dataset == "Sub_t2i"]
    queries = eval_model.encode_queries(t2i.queries)
    candidates = eval_model.encode_candidates(t2i.candidates)
    for (r_q, r_c), result in zip(BUDGETS, t2i_results):
        scores = eval_model.score(queries, candidates, r_q, r_c)
        hits = [
            bool((scores[row, positions[0]] >= scores[row, positions]).all())
            for row, positions in enumerate(t2i.candidate_lists)
        ]
        assert result.metrics["precision@1"] == sum(hits) / len(hits)


def test_hub_ids_go_through_datasets_load_dataset(tmp_path, monkeypatch):
    """A Hub id takes `datasets.load_dataset(id, config, split=...)` (no network here: it returns the miniature)."""
    tables = beir_tables()
    calls = []

    def load_dataset(path, name=None, split=None, cache_dir=None):
        calls.append((path, name, split))
        return tables[name]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    dataset = read_beir("vidore/esg_reports_v2")
    assert calls == [("vidore/esg_reports_v2", config, "test") for config in ("corpus", "queries", "qrels")]
    assert dataset.hub_id == "vidore/esg_reports_v2" and dataset.name == "esg_reports_v2"
    assert dataset.qrels == {"10": {"0": 1}, "11": {"1": 2, "2": 1}, "12": {"3": 2, "4": 1}, "13": {"4": 0}}
    assert dataset.main_metric == "ndcg@5"  # ViDoRe v2's leaderboard score


def test_mmeb_text_removes_the_placeholder():
    assert mmeb_text(None, "<|image_1|>\nRepresent the given image.") == "Represent the given image."
    assert mmeb_text("<|image_1|> Find:", "a cat") == "Find: a cat"
    assert mmeb_text("", "<|image_1|>") is None


def test_bad_data_names_file_row_and_column(tmp_path):
    tables = beir_tables()
    tables["qrels"] = datasets.Dataset.from_dict({"query-id": [10, 10], "corpus-id": [0, 99], "score": [1, 1]})
    folder = write_snapshot(tmp_path / "dangling", tables)
    with pytest.raises(
        ValueError,
        match=r"dangling \[qrels/test\] qrels/test-00000-of-00001.parquet row 1, column 'corpus-id': '99' is not in",
    ):
        read_beir(folder, cache_dir=str(tmp_path / "cache"))
    tables["qrels"] = datasets.Dataset.from_dict({"query-id": [10], "corpus-id": [0], "score": [0.5]})
    folder = write_saved(tmp_path / "fractional", tables)
    with pytest.raises(ValueError, match=r"row 0, column 'score': 0.5 is not an integer grade"):
        read_beir(folder)
    table = vidore_tables()[None].remove_columns("image_filename")
    folder = write_snapshot(tmp_path / "no-column", {None: table})
    with pytest.raises(ValueError, match=r"no-column \[test\]: missing column 'image_filename'"):
        read_vidore(folder, cache_dir=str(tmp_path / "cache"))
    image_root = str(tmp_path / "images")
    mmeb = mmeb_tables(image_root, instructions=False)
    os.remove(os.path.join(image_root, "Sub_i2t", "blue.jpg"))
    folder = write_saved(tmp_path / "mmeb", mmeb)
    with pytest.raises(
        ValueError, match=r"Sub_t2i/test\] row 0, column 'tgt_img_path\[2\]': image file .*blue.jpg' not found"
    ):
        read_mmeb(folder, "Sub_t2i", image_root)
    with pytest.raises(ValueError, match=r"row 0, column 'qry_img_path': the image 'Sub_i2t/red.jpg' is a file path"):
        read_mmeb(folder, "Sub_i2t")
    folder = write_saved(tmp_path / "images-ok", vidore_tables())
    table = datasets.load_from_disk(folder)["test"].cast_column("image", datasets.Image(decode=False))
    assert table[0]["image"]["bytes"]  # the stored cell; an undecodable one gets the row and column named:
    corrupt = table.map(
        lambda row, index: {"image": {"bytes": b"not an image" if index == 1 else row["image"]["bytes"], "path": None}},
        with_indices=True,
    )
    folder = write_saved(tmp_path / "corrupt", {None: corrupt})
    dataset = read_vidore(folder)
    with pytest.raises(ValueError, match=r"corrupt \[test\] row 1, column 'image': cannot read the image"):
        dataset.candidates[1]


# -- metrics --------------------------------------------------------------------------------------------------


def test_hand_computed_ndcg_and_mrr():
    """Two queries, graded qrels, a known ranking; trec_eval's nDCG uses the grade as gain: sum rel_i / log2(i + 1)."""
    qrels = {"q1": {"d1": 2, "d3": 1, "d9": 1}, "q2": {"d4": 1}}
    run = {
        "q1": {"d2": 0.9, "d1": 0.8, "d5": 0.7, "d3": 0.6, "d6": 0.5, "d7": 0.4},  # d9 never retrieved
        "q2": {f"d{index + 10}": 1.0 - index / 20 for index in range(10)} | {"d4": 0.1},  # d4 ranked 11th
    }
    log2 = torch.log2(torch.tensor([2.0, 3.0, 4.0, 5.0, 6.0])).tolist()
    dcg = 2 / log2[1] + 1 / log2[3]  # d1 at rank 2, d3 at rank 4
    ideal = 2 / log2[0] + 1 / log2[1] + 1 / log2[2]
    ndcg5 = (dcg / ideal + 0.0) / 2  # q2's relevant page is not in its top 5
    mrr10 = (1 / 2 + 0.0) / 2  # q2's at rank 11 is past the cutoff (trec_eval's recip_rank would give 1/11)
    values = ranking_metrics(qrels, run, ["ndcg@5", "mrr@10", "recall@100"])
    assert values["ndcg@5"] == pytest.approx(ndcg5, abs=1e-6)
    assert values["mrr@10"] == pytest.approx(mrr10, abs=1e-6)
    assert values["recall@100"] == pytest.approx((2 / 3 + 1) / 2, abs=1e-6)


def test_metrics_equal_pytrec_eval_on_full_runs_with_ties():
    """Top-k lists under the stated tie rule give pytrec_eval's values on the full run (and mteb's MRR)."""
    generator = random.Random(0)
    candidate_ids = [f"doc{index}" for index in range(40)]  # "doc9" > "doc10" as strings
    query_ids = [f"q{index}" for index in range(25)]
    # Scores on a coarse grid: many ties, also at the cutoffs.
    scores = torch.tensor([[generator.randrange(6) / 4 for _ in candidate_ids] for _ in query_ids])
    qrels = {query: {doc: generator.randrange(3) for doc in generator.sample(candidate_ids, 6)} for query in query_ids}
    qrels = {query: relevance for query, relevance in qrels.items() if any(relevance.values())}
    full_run = {query: dict(zip(candidate_ids, row.tolist())) for query, row in zip(query_ids, scores)}

    metrics = ["ndcg@5", "ndcg@10", "recall@20", "precision@1", "map@10", "mrr@10", "recall_cap@5"]
    for depth in (10, 20):
        run = _ranked_run(scores, query_ids, candidate_ids, depth)
        ours = ranking_metrics(qrels, run, [name for name in metrics if int(name.split("@")[1]) <= depth])
        evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.5,10", "recall.20", "P.1", "map_cut.10"})
        per_query = evaluator.evaluate(full_run)
        for name, measure in [
            ("ndcg@5", "ndcg_cut_5"),
            ("ndcg@10", "ndcg_cut_10"),
            ("precision@1", "P_1"),
            ("map@10", "map_cut_10"),
            ("recall@20", "recall_20"),
        ]:
            if name in ours:
                expected = sum(per_query[query][measure] for query in qrels) / len(qrels)
                assert ours[name] == pytest.approx(expected, abs=1e-12), name
        # mteb's MRR@10: sort by (score, docid) descending, cut at 10, 1 / first relevant rank.
        expected_mrr = 0.0
        for query, relevance in qrels.items():
            ranked = sorted(full_run[query].items(), key=lambda pair: (pair[1], pair[0]), reverse=True)[:10]
            expected_mrr += next(
                (1 / rank for rank, (doc, _) in enumerate(ranked, 1) if relevance.get(doc, 0) >= 1), 0.0
            )
        assert ours["mrr@10"] == pytest.approx(expected_mrr / len(qrels), abs=1e-12)
    # The rule itself: equal scores rank the greater id first, as strings.
    assert [doc for doc, _ in ranked_ids({"doc10": 1.0, "doc9": 1.0, "doc2": 2.0})] == ["doc2", "doc9", "doc10"]
    assert list(_ranked_run(torch.tensor([[1.0, 1.0, 2.0]]), ["q"], ["doc10", "doc9", "doc2"], 3)["q"]) == [
        "doc2",
        "doc9",
        "doc10",
    ]


def _ranked_run(scores, query_ids, candidate_ids, depth):
    """The evaluator's top-k under the tie rule, over candidate blocks of 7 (merging across blocks)."""
    from metaembed.evaluation.metrics import scores_from_keys, top_k_by_rule

    order = sorted(range(len(candidate_ids)), key=candidate_ids.__getitem__)
    ranks = torch.empty(len(candidate_ids), dtype=torch.long)
    ranks[torch.tensor(order)] = torch.arange(len(candidate_ids))
    best = None
    for start in range(0, len(candidate_ids), 7):
        best = top_k_by_rule(scores[:, start : start + 7], ranks[start : start + 7], depth, best, start)
    keys, positions = best
    values = scores_from_keys(keys)
    assert torch.equal(values, scores.gather(1, positions))
    return {
        query: {candidate_ids[position]: value for position, value in zip(row, row_values)}
        for query, row, row_values in zip(query_ids, positions.tolist(), values.tolist())
    }


def test_list_precision_at_1_ties_favour_the_positive():
    assert list_precision_at_1([torch.tensor([0.5, 0.5, 0.1]), torch.tensor([0.2, 0.3]), torch.tensor([1.0])]) == 2 / 3


# -- the evaluator --------------------------------------------------------------------------------------------


def toy_dataset(images_by_color, count: int = 10) -> RetrievalDataset:
    candidates = [
        images_by_color[COLORS[index % 6]] if index % 2 else f"a document about {COLORS[index % 6]} things {index}"
        for index in range(count)
    ]
    queries = [f"{color} block" for color in COLORS[:4]] + [{"text": "like this", "image": images_by_color["red"]}]
    candidate_ids = [f"c{index}" for index in range(count)]
    qrels = {
        f"q{row}": {f"c{index}": 1 + (index % 3 == 0) for index in range(count) if index % 6 == row % 6}
        for row in range(len(queries))
    }
    return RetrievalDataset(
        "toy", [f"q{row}" for row in range(len(queries))], queries, candidate_ids, candidates, qrels=qrels
    )


@pytest.fixture(scope="module")
def colored_pages():
    return {color: page(color) for color in COLORS}


def reencoded_ndcg(model, dataset, budget) -> dict[str, float]:
    """Plain reference: encode at exactly the budget, score every pair with model.score, full run into pytrec_eval."""
    r_q, r_c = budget
    queries = model.encode_queries(list(dataset.queries), num_vectors=r_q)
    scores = model.score(queries, model.encode_candidates(list(dataset.candidates), num_vectors=r_c))
    run = {query: dict(zip(dataset.candidate_ids, row.tolist())) for query, row in zip(dataset.query_ids, scores)}
    per_query = pytrec_eval.RelevanceEvaluator(dataset.qrels, {"ndcg_cut.5,10"}).evaluate(run)
    return {
        f"ndcg@{k}": sum(values[f"ndcg_cut_{k}"] for values in per_query.values()) / len(per_query) for k in (10, 5)
    }


def test_prefix_scoring_equals_reencoding_at_each_budget(eval_model, colored_pages, monkeypatch):
    """Every query's score of every candidate (the run handed to the metrics) is `model.score` of the items
    encoded at exactly that budget, and so are the metrics."""
    dataset = toy_dataset(colored_pages)
    runs = []
    real_ranking_metrics = evaluate_module.ranking_metrics

    def recording_ranking_metrics(qrels, run, metrics, **options):
        runs.append(run)
        return real_ranking_metrics(qrels, run, metrics, **options)

    monkeypatch.setattr(evaluate_module, "ranking_metrics", recording_ranking_metrics)
    results = evaluate(eval_model, dataset, BUDGETS, metrics=["ndcg@10", "ndcg@5"], batch_size=3)
    assert [result.budget for result in results] == BUDGETS and len(runs) == len(BUDGETS)
    for budget, result, run in zip(BUDGETS, results, runs):
        r_q, r_c = budget
        queries = eval_model.encode_queries(list(dataset.queries), num_vectors=r_q)
        scores = eval_model.score(queries, eval_model.encode_candidates(list(dataset.candidates), num_vectors=r_c))
        for query, row in zip(dataset.query_ids, scores):
            assert set(run[query]) == set(dataset.candidate_ids)  # depth 10: every candidate
            expected = [row[dataset.candidate_ids.index(candidate)].item() for candidate in run[query]]
            assert list(run[query].values()) == pytest.approx(expected, abs=1e-5), (budget, query)
        # The mteb protocol rounds means to 5 decimals, as mteb does.
        assert result.metrics == pytest.approx(reencoded_ndcg(eval_model, dataset, budget), abs=5e-6 + 1e-9), budget
        assert result.index_bytes_per_candidate == budget[1] * 16 * 4
        assert result.num_queries == 5 and result.num_candidates == 10


def test_scoring_time_is_the_scoring_calls_per_query_in_ms(eval_model, colored_pages, monkeypatch):
    """scoring_ms_per_query: the time between the clock reads around the timed scoring, per query, in ms (a fake
    clock that advances 1 s per read: 1000 ms over 5 queries)."""
    clock = iter(range(1000))
    monkeypatch.setattr(evaluate_module.time, "perf_counter", lambda: float(next(clock)))
    results = evaluate(eval_model, toy_dataset(colored_pages), BUDGETS)
    assert [result.scoring_ms_per_query for result in results] == [200.0] * len(BUDGETS)


class CountingModel:
    """The model, counting encode calls and failing on demand (an interrupted run)."""

    def __init__(self, model, fail_after: int | None = None) -> None:
        self.model, self.fail_after, self.calls = model, fail_after, []
        self.config, self.processor, self.name_or_path = model.config, model.processor, model.name_or_path

    def state_dict(self):
        return self.model.state_dict()

    def encode(self, items, task, **kwargs):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("interrupted")
        self.calls.append((task, len(items), kwargs["num_vectors"]))
        return self.model.encode(items, task, **kwargs)


def test_resumed_run_equals_uninterrupted_and_reruns_reuse_embeddings(eval_model, colored_pages, tmp_path):
    dataset = toy_dataset(colored_pages)
    uninterrupted = evaluate(eval_model, dataset, BUDGETS, chunk_size=3)
    cache = tmp_path / "cache"
    interrupted = CountingModel(eval_model, fail_after=3)  # queries (2 parts) done, then candidates part 1 only
    with pytest.raises(KeyboardInterrupt):
        evaluate(interrupted, dataset, BUDGETS, cache_dir=cache, chunk_size=3)
    resumed = CountingModel(eval_model)
    assert numbers(evaluate(resumed, dataset, BUDGETS, cache_dir=cache, chunk_size=3)) == numbers(uninterrupted)
    assert resumed.calls == [("candidate", 3, 8), ("candidate", 3, 8), ("candidate", 1, 8)]
    # Other budgets (within what is stored): nothing encoded again, same numbers as a fresh run.
    rerun = CountingModel(eval_model)
    reused = evaluate(rerun, dataset, [(2, 4), (1, 2)], cache_dir=cache, chunk_size=3)
    assert numbers(reused) == numbers(evaluate(eval_model, dataset, [(2, 4), (1, 2)]))
    assert rerun.calls == []
    # More queries: only the new part is encoded.
    more = RetrievalDataset(
        "toy",
        [*dataset.query_ids, "q5"],
        [*list(dataset.queries), "purple block"],
        dataset.candidate_ids,
        dataset.candidates,
        qrels={**dataset.qrels, "q5": {"c4": 1}},
    )
    rerun = CountingModel(eval_model)
    evaluate(rerun, more, BUDGETS, cache_dir=cache, chunk_size=3)
    assert rerun.calls == [("query", 3, 4)]
    # A part whose save was cut short is encoded again, never trusted.
    part = next(folder for folder, _, files in os.walk(cache) if "candidate-000000003-000000006" in folder)
    shards = [os.path.join(root, name) for root, _, names in os.walk(part) for name in names]
    shards = [path for path in shards if path.endswith(".safetensors")]
    assert shards
    for path in shards:
        with open(path, "r+b") as file:
            file.truncate(20)
    rerun = CountingModel(eval_model)
    assert numbers(evaluate(rerun, dataset, BUDGETS, cache_dir=cache, chunk_size=3)) == numbers(uninterrupted)
    assert rerun.calls == [("candidate", 3, 8)]


def test_an_edited_item_is_encoded_again_never_served_stale(eval_model, colored_pages, tmp_path):
    """Same ids, other content: the cache is keyed by the items' content, so only the edited part re-encodes and
    the numbers are those of the edited data."""
    dataset = toy_dataset(colored_pages)
    cache = tmp_path / "cache"
    evaluate(eval_model, dataset, BUDGETS, cache_dir=cache, chunk_size=3)
    candidates = list(dataset.candidates)
    candidates[4] = "a document about something else entirely"  # part 3..5
    candidates[7] = colored_pages[COLORS[0]].rotate(90)  # part 6..8: an image with other pixels
    edited = RetrievalDataset(
        "toy", dataset.query_ids, dataset.queries, dataset.candidate_ids, candidates, qrels=dataset.qrels
    )
    rerun = CountingModel(eval_model)
    assert numbers(evaluate(rerun, edited, BUDGETS, cache_dir=cache, chunk_size=3)) == numbers(
        evaluate(eval_model, edited, BUDGETS)
    )
    assert rerun.calls == [("candidate", 3, 8), ("candidate", 3, 8)]


def test_evaluate_refuses_bad_arguments(eval_model, colored_pages):
    dataset = toy_dataset(colored_pages)
    with pytest.raises(ValueError, match=r"budgets\[1\] r_c"):
        evaluate(eval_model, dataset, [(1, 1), (2, 9)])
    with pytest.raises(ValueError, match="unknown metric 'ndcg10'"):
        evaluate(eval_model, dataset, [(1, 1)], metrics=["ndcg10"])
    with pytest.raises(TypeError, match="RetrievalDataset"):
        evaluate(eval_model, [], [(1, 1)])
    with pytest.raises(
        ValueError, match=r"x: candidate_ids\[1\]: 'c' is not unique \(first at x: candidate_ids\[0\]\)"
    ):
        RetrievalDataset("x", ["q"], ["a"], ["c", "c"], ["x", "y"], qrels={"q": {"c": 1}})


def test_reports_table_json_plot(eval_model, colored_pages, tmp_path):
    results = evaluate(eval_model, [toy_dataset(colored_pages), toy_dataset(colored_pages, 8)], BUDGETS)
    results[3:] = [type(result)(**{**result.__dict__, "dataset": "toy-8"}) for result in results[3:]]
    table = format_table(results)
    lines = table.splitlines()
    assert lines[0] == "| dataset (metric x 100) | (1, 1) | (2, 4) | (4, 8) |"
    assert lines[2].startswith("| toy (nDCG@10) | ") and lines[3].startswith("| toy-8 (nDCG@10) | ")
    average = (results[0].main_value + results[3].main_value) / 2
    assert lines[4].split(" | ")[1] == f"**{100 * average:.1f}**"
    assert lines[5] == "| index bytes / candidate | 64 | 256 | 512 |"
    save_json(results, tmp_path / "results.json", model="tiny")
    assert load_results(tmp_path / "results.json") == results
    save_plot(results, tmp_path / "plot.png")
    assert Image.open(tmp_path / "plot.png").size[0] > 300


# -- command line and model card ------------------------------------------------------------------------------


def test_evaluate_command_writes_table_json_plot_and_card(eval_model, tmp_path, capsys):
    from huggingface_hub import ModelCard, metadata_load

    model_dir = tmp_path / "model"
    eval_model.save_pretrained(model_dir)
    data = write_snapshot(tmp_path / "datasets--vidore--mini_v2" / "snapshots" / ("a" * 40), beir_tables())
    output = tmp_path / "out"
    arguments = [
        "evaluate",
        str(model_dir),
        data,
        "--format",
        "beir",
        "--budgets",
        "1,1",
        "4,8",
        "--output-dir",
        str(output),
    ]
    main([*arguments, "--write-card", "--metrics", "ndcg@5", "mrr@10"])
    printed = capsys.readouterr().out
    assert "| mini_v2 (nDCG@5) |" in printed and "| **average** |" in printed
    results = load_results(output / "results.json")
    assert [result.budget for result in results] == [(1, 1), (4, 8)]
    assert results[0].dataset_id == "vidore/mini_v2" and results[0].dataset_revision == "a" * 40
    assert os.path.getsize(output / "quality_vs_budget.png") > 1000
    # The card: model-index in the Hub's format, one entry per dataset, budget and metric, read back.
    card = ModelCard.load(model_dir / "README.md")
    entries = {(entry.metric_type, entry.metric_config): entry for entry in card.data.eval_results}
    assert set(entries) == {
        (metric, config) for metric in ("ndcg_at_5", "mrr_at_10") for config in ("r_q=1,r_c=1", "r_q=4,r_c=8")
    }
    assert entries["ndcg_at_5", "r_q=4,r_c=8"].metric_value == pytest.approx(results[1].metrics["ndcg@5"], abs=1e-5)
    assert entries["ndcg_at_5", "r_q=4,r_c=8"].dataset_type == "vidore/mini_v2"
    assert entries["ndcg_at_5", "r_q=4,r_c=8"].dataset_split == "test"
    raw = metadata_load(model_dir / "README.md")
    assert raw["model-index"][0]["results"][0]["metrics"][0]["type"] == "ndcg_at_5"
    assert raw["tags"] and "metaembed" in raw["tags"]  # the rest of the card's metadata is kept
    # A second run replaces its own entries and keeps the others.
    main([*arguments[:5], "--budgets", "1,1", "--output-dir", str(output), "--write-card", "--metrics", "ndcg@5"])
    card = ModelCard.load(model_dir / "README.md")
    assert len(card.data.eval_results) == 4
    # Bad input: one line, argparse's exit status.
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(model_dir), str(tmp_path / "missing"), "--format", "vidore", "--output-dir", str(output)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("metaembed evaluate: error: ") and "missing" in error and len(error.splitlines()) == 1
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(model_dir), data, "--format", "beir", "--budgets", "4,9", "--output-dir", str(output)])
    assert exit_info.value.code == 2 and "r_c" in capsys.readouterr().err
    # A local snapshot outside the Hub cache gets its Hub id from --dataset-id (one per DATA), else stays off the card.
    plain = write_snapshot(tmp_path / "plain", beir_tables())
    command = ["evaluate", str(model_dir), plain, "--format", "beir", "--budgets", "2,4", "--output-dir", str(output)]
    main([*command, "--write-card", "--metrics", "ndcg@5", "--dataset-id", "vidore/plain_beir"])
    card = ModelCard.load(model_dir / "README.md")
    assert {entry.dataset_type for entry in card.data.eval_results if entry.metric_config == "r_q=2,r_c=4"} == {
        "vidore/plain_beir"
    }
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--dataset-id", "vidore/a", "vidore/b"])
    assert exit_info.value.code == 2 and "one per source" in capsys.readouterr().err


# -- memory bounds, decoding once, fingerprints, card provenance ----------------------------------------------


def test_cached_parts_are_memory_mapped_and_score_blocks_are_bounded(eval_model, colored_pages, tmp_path, monkeypatch):
    """With a cache, every part in use is the memory-mapped index reopened from disk (the encoded vectors leave
    RAM); scoring computes blocks of at most `_SCORE_ELEMENTS` query x candidate scores, queries chunked too; the
    numbers equal those of one unbounded block, for ranked datasets and candidate lists."""
    dataset = toy_dataset(colored_pages)
    lists = RetrievalDataset(
        "lists",
        dataset.query_ids,
        dataset.queries,
        dataset.candidate_ids,
        dataset.candidates,
        candidate_lists=[[(row + shift) % 10 for shift in range(0, 10, 2)] for row in range(5)],
        metrics=("precision@1",),
    )
    unbounded = evaluate(eval_model, [dataset, lists], BUDGETS)
    opened, kept, shapes = [], [], []
    real_load, real_encode = MetaEmbedIndex.load.__func__, evaluate_module.StoredEmbeddings.encode.__func__

    def load(cls, folder, mmap=True):
        index = real_load(cls, folder, mmap)
        opened.append((index, mmap))
        return index

    def encode(cls, *args, **kwargs):
        stored = real_encode(cls, *args, **kwargs)
        kept.extend(stored.parts)
        return stored

    def scores(queries, candidates, *args):
        shapes.append((len(queries), len(candidates)))
        return late_interaction_scores(queries, candidates, *args)

    monkeypatch.setattr(MetaEmbedIndex, "load", classmethod(load))
    monkeypatch.setattr(evaluate_module.StoredEmbeddings, "encode", classmethod(encode))
    monkeypatch.setattr(evaluate_module, "late_interaction_scores", scores)
    monkeypatch.setattr(evaluate_module, "_BLOCK_ELEMENTS", 2 * 4 * 16)  # 2 queries at r_q=4, 1 candidate at r_c=8
    monkeypatch.setattr(evaluate_module, "_SCORE_ELEMENTS", 6)
    bounded = evaluate(eval_model, [dataset, lists], BUDGETS, cache_dir=tmp_path / "cache", chunk_size=3)
    assert len(kept) == 2 * (2 + 4) and all(any(part is index and mmap for index, mmap in opened) for part in kept)
    assert shapes and all(queries * candidates <= 6 for queries, candidates in shapes), shapes
    assert max(queries for queries, _ in shapes) == 5 and min(queries for queries, _ in shapes) < 5
    for first, second in zip(unbounded, bounded):
        assert (first.budget, first.num_queries) == (second.budget, second.num_queries)
        assert first.metrics == pytest.approx(second.metrics, abs=1e-6)


def test_images_are_decoded_once_per_run_and_not_at_all_on_resume(eval_model, tmp_path, monkeypatch):
    """The cache key hashes the stored image bytes: a first run decodes each page once (to encode it), a rerun
    decodes none, and editing a page's bytes still re-encodes its part."""
    folder = write_snapshot(tmp_path / "snapshot", vidore_tables())
    dataset = read_vidore(folder, cache_dir=str(tmp_path / "hf"))
    decoded = []
    real_open_image = readers_module._open_image

    def counting_open_image(value, where, root=None):
        decoded.append(where)
        return real_open_image(value, where, root)

    monkeypatch.setattr(readers_module, "_open_image", counting_open_image)
    cache = tmp_path / "cache"
    first = evaluate(eval_model, dataset, BUDGETS, cache_dir=cache, chunk_size=2)
    assert sorted(decoded) == sorted(set(decoded)) and len(decoded) == len(dataset.candidate_ids)
    decoded.clear()
    assert numbers(evaluate(eval_model, dataset, BUDGETS, cache_dir=cache, chunk_size=2)) == numbers(first)
    assert decoded == []
    table = vidore_tables()[None]
    table = table.map(lambda row, index: {"image": page("purple") if index == 4 else row["image"]}, with_indices=True)
    edited = read_vidore(write_snapshot(tmp_path / "edited", {None: table}), cache_dir=str(tmp_path / "hf"))
    edited.name = dataset.name
    edited.source = dataset.source  # the same cache folder: only the content differs
    rerun = CountingModel(eval_model)
    evaluate(rerun, edited, BUDGETS, cache_dir=cache, chunk_size=2)
    assert rerun.calls == [("candidate", 2, 8)]  # d.png (row 4's image) is in part 2..3


def test_model_fingerprint_hashes_the_weights_once_per_model_until_they_change(backbone_dirs, monkeypatch):
    from metaembed import fingerprint

    model = make_model(backbone_dirs["qwen2_5_vl"])
    hashed = []
    real_tensor_bytes = fingerprint._tensor_bytes
    monkeypatch.setattr(fingerprint, "_tensor_bytes", lambda tensor: hashed.append(1) or real_tensor_bytes(tensor))
    first = fingerprint.model_fingerprint(model)
    count = len(hashed)
    assert count == len(model.state_dict())
    assert fingerprint.model_fingerprint(model) == first and len(hashed) == count  # cached
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # an in-place change (an optimizer step)
    changed = fingerprint.model_fingerprint(model)
    assert changed != first and len(hashed) == 2 * count
    model.config.num_query_vectors_note = "x"  # config is hashed on every call
    assert fingerprint.model_fingerprint(model) != changed
    # The same weights with another vocabulary read other token ids: another fingerprint.
    with_note = fingerprint.model_fingerprint(model)
    model.processor.tokenizer.add_tokens(["<|a-new-token|>"])
    assert fingerprint.model_fingerprint(model) != with_note


def test_the_card_carries_only_hub_dataset_ids(eval_model, tmp_path):
    """A folder outside the Hub cache is no Hub id: its results stay out of the card, with a warning, unless
    the user states the snapshot's Hub id (`dataset_id`); a local path never reaches the published card."""
    from huggingface_hub import ModelCard

    from metaembed.evaluation.card import write_card_results

    folder = write_snapshot(tmp_path / "mini", beir_tables())
    cache = str(tmp_path / "hf")
    model_dir = tmp_path / "model"
    eval_model.save_pretrained(model_dir)
    local = evaluate(eval_model, read_beir(folder, cache_dir=cache), [(1, 1)], metrics=["ndcg@5"])
    assert local[0].dataset_id is None
    with pytest.warns(UserWarning, match=r"left out of the model card: \['mini'\].*dataset_id"):
        write_card_results(model_dir, local)
    card_text = (model_dir / "README.md").read_text(encoding="utf-8")
    assert str(tmp_path) not in card_text and not ModelCard.load(model_dir / "README.md").data.eval_results
    named = read_datasets("beir", [folder], cache_dir=cache, dataset_ids=["vidore/mini_v2"])
    write_card_results(model_dir, evaluate(eval_model, named, [(1, 1)], metrics=["ndcg@5"]))
    entries = ModelCard.load(model_dir / "README.md").data.eval_results
    assert [entry.dataset_type for entry in entries] == ["vidore/mini_v2"]
    assert str(tmp_path) not in (model_dir / "README.md").read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="dataset_id must be a Hub dataset id"):
        read_beir(folder, cache_dir=cache, dataset_id=str(tmp_path))
    with pytest.raises(ValueError, match="1 dataset_ids for 2 sources"):
        read_datasets("beir", [folder, folder], dataset_ids=["a/b"])


def test_errors_name_the_parquet_file_and_its_row(tmp_path):
    """A split of several parquet files: an error names the file and the row within it, not the row counted
    across the split; a save_to_disk split (no parquet files) names the row within the split."""
    tables = beir_tables()
    folder = write_snapshot(tmp_path / "shards", tables)
    os.remove(os.path.join(folder, "qrels", "test-00000-of-00001.parquet"))
    first = {"query-id": [10, 11, 11], "corpus-id": [0, 1, 2], "score": [1, 2, 1]}
    second = {"query-id": [12, 12, 13], "corpus-id": [3, 77, 4], "score": [2, 1, 0]}
    for number, rows in enumerate([first, second]):
        datasets.Dataset.from_dict(rows).to_parquet(
            os.path.join(folder, "qrels", f"test-0000{number}-of-00002.parquet")
        )
    with pytest.raises(
        ValueError, match=r"shards \[qrels/test\] qrels/test-00001-of-00002.parquet row 1, column 'corpus-id': '77'"
    ):
        read_beir(folder, cache_dir=str(tmp_path / "cache"))
    tables["qrels"] = datasets.concatenate_datasets([datasets.Dataset.from_dict(rows) for rows in (first, second)])
    with pytest.raises(ValueError, match=r"saved \[qrels/test\] row 4, column 'corpus-id': '77'"):
        read_beir(write_saved(tmp_path / "saved", tables))
    tables["queries"] = datasets.Dataset.from_dict({"query-id": [10, 11, 10], "query": ["a", "b", "c"]})
    with pytest.raises(ValueError, match=r"\[queries/test\] row 2, column 'query-id': '10' is not unique \(first at"):
        read_beir(write_saved(tmp_path / "repeated", tables))


def test_beir_layouts_of_the_hub(eval_model, tmp_path):
    """The BEIR layouts published on the Hub read to the same dataset as ViDoRe v2's (configs corpus / queries /
    qrels, split test): BEIR's and mteb's (configs `corpus` and `queries` whose only split is named after them,
    qrels as config `default` with a test split), as snapshots and as save_to_disk folders."""
    tables = beir_tables()
    reference = read_beir(write_snapshot(tmp_path / "v2", tables), cache_dir=str(tmp_path / "hf"))
    splits = {"corpus": "corpus", "queries": "queries", "default": "test"}
    layout = {"corpus": tables["corpus"], "queries": tables["queries"], "default": tables["qrels"]}
    snapshot = tmp_path / "mteb-layout"
    lines = ["---", "configs:"]
    for config, table in layout.items():
        os.makedirs(snapshot / config, exist_ok=True)
        table.to_parquet(str(snapshot / config / f"{splits[config]}-00000-of-00001.parquet"))
        lines += [f"- config_name: {config}", "  data_files:", f"  - split: {splits[config]}"]
        lines += [f"    path: {config}/{splits[config]}-*"]
    (snapshot / "README.md").write_text("\n".join([*lines, "---", ""]), encoding="utf-8")
    saved = tmp_path / "mteb-saved"
    for config, table in layout.items():
        datasets.DatasetDict({splits[config]: table}).save_to_disk(str(saved / config))
    for folder in (snapshot, saved):
        dataset = read_beir(str(folder), cache_dir=str(tmp_path / "hf"))
        assert (dataset.query_ids, dataset.queries, dataset.candidate_ids) == (
            reference.query_ids,
            reference.queries,
            reference.candidate_ids,
        )
        assert dataset.qrels == reference.qrels and items_equal(dataset.candidates, reference.candidates)
    shutil.rmtree(saved / "default")
    with pytest.raises(ValueError, match=r"no qrels table \(tried configs \['qrels', 'default'\]\)"):
        read_beir(str(saved))
