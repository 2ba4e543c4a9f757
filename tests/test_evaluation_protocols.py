"""Evaluation protocols against their references, on identical score matrices.

A `MatrixModel` encodes query i as the one-hot vector e_i and candidate j as column j of a chosen score matrix, so
at budget (1, 1) the evaluator scores exactly that matrix (late interaction of one vector each is a dot product).
- mteb 2.x is installed: its own retrieval evaluator (`calculate_retrieval_scores`, `mrr`) gets the same matrix as
  a full run; per-query values agree to 1e-6 and the reported means equal mteb's (rounded as mteb rounds).
- vidore-benchmark 5.x pins mteb 1.16 and VLM2Vec is not a package: their rules are written out here from their
  code (file and lines cited) and checked on hand-computed cases.
"""

from __future__ import annotations

import importlib
import os
from types import SimpleNamespace

import pyarrow
import pyarrow.parquet
import pytest
import torch
from PIL import Image

from metaembed.evaluation import RetrievalDataset, evaluate, read_datasets, read_mmeb, read_vidore
from metaembed.evaluation import metrics as metrics_module
from metaembed.evaluation.report import format_table

datasets = pytest.importorskip("datasets")
pytrec_eval = pytest.importorskip("pytrec_eval")
evaluate_module = importlib.import_module("metaembed.evaluation.evaluate")

METRICS = ("ndcg@5", "ndcg@10", "recall@100", "mrr@10", "map@10", "precision@1")
# pytrec_eval / mteb names of METRICS
MTEB_NAMES = {
    "ndcg@5": "ndcg_cut_5",
    "ndcg@10": "ndcg_cut_10",
    "recall@100": "recall_100",
    "map@10": "map_cut_10",
    "precision@1": "P_1",
}


class MatrixModel:
    """A stand-in model whose (1, 1) scores are `scores[query index, candidate index]` exactly; items are mapped
    to indices by `query_index` / `candidate_index`."""

    def __init__(self, scores, query_index, candidate_index) -> None:
        self.scores = torch.tensor(scores, dtype=torch.float32)
        self.query_index, self.candidate_index = query_index, candidate_index
        self.config = SimpleNamespace(num_query_vectors=1, num_candidate_vectors=1, output_dim=self.scores.shape[0])
        self.batches: list[int] = []

    def encode(self, items, task, num_vectors=None, batch_size=16, show_progress_bar=None):
        self.batches.append(len(items))
        rows = []
        for item in items:
            if task == "query":
                rows.append(torch.nn.functional.one_hot(torch.tensor(self.query_index(item)), self.scores.shape[0]))
            else:
                rows.append(self.scores[:, self.candidate_index(item)])
        return torch.stack(rows).float()[:, None, :]


def captured_runs(monkeypatch) -> list[tuple]:
    """The (qrels, run, mrr_run) each `evaluate` scoring hands to `ranking_metrics`."""
    runs = []
    real = evaluate_module.ranking_metrics

    def recording(qrels, run, metrics, **options):
        runs.append((qrels, run, options.get("mrr_run")))
        return real(qrels, run, metrics, **options)

    monkeypatch.setattr(evaluate_module, "ranking_metrics", recording)
    return runs


def mteb_per_query(qrels, full_run, k_values=(1, 5, 10, 100)) -> dict[str, dict[str, float]]:
    """mteb 2.x's per-query numbers for METRICS on a full run (its own evaluator functions)."""
    retrieval_metrics = pytest.importorskip("mteb._evaluators.retrieval_metrics")
    result = retrieval_metrics.calculate_retrieval_scores(full_run, qrels, list(k_values))
    per_query = {name: {q: result.all_scores[q][key] for q in result.all_scores} for name, key in MTEB_NAMES.items()}
    reciprocal = retrieval_metrics.mrr(qrels, full_run, [10])["MRR@10"]
    per_query["mrr@10"] = dict(zip(full_run, reciprocal))
    means = {
        "ndcg@5": result.ndcg["NDCG@5"],
        "ndcg@10": result.ndcg["NDCG@10"],
        "recall@100": result.recall["Recall@100"],
        "map@10": result.map["MAP@10"],
        "precision@1": result.precision["P@1"],
        "mrr@10": round(result.mrr["MRR@10"], 5),  # mteb rounds MRR when it reports it (make_score_dict callers)
    }
    return per_query, means


def assert_per_query_close(ours: dict, theirs: dict) -> None:
    for name in METRICS:
        assert set(ours[name]) == set(theirs[name]), name
        for query in ours[name]:
            assert ours[name][query] == pytest.approx(theirs[name][query], abs=1e-6), (name, query)


# -- mteb 2.x: BEIR with ties, graded qrels, grade-0-only queries -----------------------------------------------

# 6 queries x 12 candidates, values on a coarse grid: many ties, within and across the relevant ones.
TIED_SCORES = [
    [0.5, 0.5, 0.5, 0.25, 0.5, 0.0, -0.25, 0.5, 0.25, 0.5, 0.0, 0.5],
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [-0.5, -0.25, -0.5, -0.75, -0.25, -0.5, -0.5, -0.25, -1.0, -0.5, -0.25, -0.5],
    [1.0, 0.75, 1.0, 0.75, 0.5, 1.0, 0.75, 0.5, 1.0, 0.25, 1.0, 0.75],
    [0.25, 0.5, 0.25, 0.5, 0.25, 0.5, 0.25, 0.5, 0.25, 0.5, 0.25, 0.5],
    [0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75],
]
DOC_IDS = [f"doc{number}" for number in (3, 10, 1, 7, 12, 2, 9, 4, 11, 5, 8, 6)]  # string order != position order
GRADED_QRELS = {
    "q0": {"doc3": 2, "doc12": 1, "doc5": 3, "doc6": 0},
    "q1": {"doc10": 1, "doc9": 2},
    "q2": {"doc7": 1, "doc11": 1, "doc2": 0},
    "q3": {"doc1": 0, "doc8": 0},  # judged only with grade 0: counted, scores 0
    "q4": {"doc10": 3, "doc3": 1, "doc4": 2, "doc6": 1},
    # q5: no qrels row at all: not scored by mteb (nor here)
}


def matrix_dataset(**fields) -> tuple[RetrievalDataset, MatrixModel]:
    query_ids = [f"q{row}" for row in range(len(TIED_SCORES))]
    model = MatrixModel(TIED_SCORES, lambda text: int(text[1:]), lambda text: DOC_IDS.index(text))
    dataset = RetrievalDataset(
        name="tied",
        query_ids=[query for query in query_ids if query in GRADED_QRELS],
        queries=[query for query in query_ids if query in GRADED_QRELS],
        candidate_ids=list(DOC_IDS),
        candidates=list(DOC_IDS),
        qrels=GRADED_QRELS,
        metrics=METRICS,
        format="beir",
        **fields,
    )
    return dataset, model


def full_run(query_ids, candidate_ids, scores) -> dict[str, dict[str, float]]:
    return {query: dict(zip(candidate_ids, map(float, scores[int(query[1:])]))) for query in query_ids}


def test_mteb_protocol_equals_mtebs_evaluator_per_query_with_ties_grades_and_grade_zero_queries(monkeypatch):
    dataset, model = matrix_dataset()
    runs = captured_runs(monkeypatch)
    (result,) = evaluate(model, dataset, [(1, 1)])
    qrels, run, mrr_run = runs[-1]
    assert mrr_run is None  # mteb 2.x: MRR ranks under the same rule as trec_eval
    ours = metrics_module.per_query_metrics(qrels, run, METRICS)
    theirs, their_means = mteb_per_query(GRADED_QRELS, full_run(dataset.query_ids, DOC_IDS, TIED_SCORES))
    assert set(ours["ndcg@10"]) == {"q0", "q1", "q2", "q3", "q4"}  # the grade-0-only query counts
    assert_per_query_close(ours, theirs)
    assert result.metrics == their_means  # means rounded to 5 decimals as mteb reports them
    assert result.protocol == "mteb" and result.reference.startswith("mteb 2.")


def test_the_grade_zero_only_query_counts_as_zero():
    """Hand-computed: two queries, one judged only with grade 0. mteb counts it: mean recall@1 = (1 + 0) / 2."""
    dataset = RetrievalDataset(
        name="zero",
        query_ids=["a", "b"],
        queries=["a", "b"],
        candidate_ids=["x", "y"],
        candidates=["x", "y"],
        qrels={"a": {"x": 1}, "b": {"y": 0}},
        metrics=("recall@1", "ndcg@5"),
    )
    model = MatrixModel([[1.0, 0.0], [0.0, 1.0]], "ab".index, "xy".index)
    (result,) = evaluate(model, dataset, [(1, 1)])
    assert result.metrics == {"recall@1": 0.5, "ndcg@5": 0.5}


# -- ViDoRe v1: repeated queries --------------------------------------------------------------------------------


def numbered_page(number: int) -> Image.Image:
    """Page `number`, recognisable by its width after a parquet round trip."""
    return Image.new("RGB", (40 + number, 40), "white")


# ViDoRe v1 rows (query, page file): "alpha" asked on 3 rows (pages p0, p2, p4), "beta" on 2 (p1, p3), a row
# without a query; p2 repeats on two rows.
VIDORE_ROWS = [
    ("alpha", "p0.png"),
    ("beta", "p1.png"),
    ("alpha", "p2.png"),
    (None, "p5.png"),
    ("beta", "p3.png"),
    ("gamma", "p2.png"),
    ("alpha", "p4.png"),
]
PAGES = ["p0.png", "p1.png", "p2.png", "p5.png", "p3.png", "p4.png"]  # corpus order: first appearance
QUERY_TEXTS = ["alpha", "beta", "gamma"]
# query x page (PAGES order); negatives and ties where the rules differ
VIDORE_SCORES = [
    [0.25, 0.75, 0.25, -0.5, 0.75, 0.5],
    [-0.25, -0.5, -0.75, -0.25, -0.25, -1.0],
    [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
]


def write_vidore(root) -> str:
    table = datasets.Dataset.from_dict(
        {
            "query": [query for query, _ in VIDORE_ROWS],
            "image": [numbered_page(int(name[1])) for _, name in VIDORE_ROWS],
            "image_filename": [name for _, name in VIDORE_ROWS],
        }
    ).cast_column("image", datasets.Image())
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    table.to_parquet(os.path.join(root, "data", "test-00000-of-00001.parquet"))
    return str(root)


def vidore_model() -> MatrixModel:
    return MatrixModel(
        VIDORE_SCORES,
        QUERY_TEXTS.index,
        lambda item: PAGES.index(f"p{item['image'].size[0] - 40}.png"),
    )


def test_mteb_protocol_makes_every_row_of_a_repeated_query_relevant(tmp_path, monkeypatch):
    """mteb's ViDoRe v1 tasks read BEIR copies in which every row asking a text makes its page relevant;
    on those qrels and the same scores, mteb's evaluator and this package agree per query."""
    dataset = read_vidore(write_vidore(tmp_path / "vidore"), protocol="mteb")
    by_text = dict(zip(dataset.queries, dataset.query_ids))
    assert dataset.qrels == {
        by_text["alpha"]: {"p0.png": 1, "p2.png": 1, "p4.png": 1},
        by_text["beta"]: {"p1.png": 1, "p3.png": 1},
        by_text["gamma"]: {"p2.png": 1},
    }
    runs = captured_runs(monkeypatch)
    (result,) = evaluate(vidore_model(), dataset, [(1, 1)], metrics=METRICS)
    qrels, run, _ = runs[-1]
    scores = {query_id: VIDORE_SCORES[QUERY_TEXTS.index(text)] for text, query_id in by_text.items()}
    reference_run = {query: dict(zip(PAGES, map(float, row))) for query, row in scores.items()}
    theirs, their_means = mteb_per_query(dataset.qrels, reference_run)
    assert_per_query_close(metrics_module.per_query_metrics(qrels, run, METRICS), theirs)
    assert result.metrics == their_means and result.main_metric == "ndcg@5"


def vidore_benchmark_reference(rows, pages, scores, texts):
    """vidore-benchmark 5.x, written out from its code:
    - vidore_evaluator_qa.py `evaluate_dataset` + data_utils.py `deduplicate_dataset_rows`: queries are the distinct
      non-None texts (first occurrence), "" kept;
    - vidore_evaluator_qa.py lines 142-160 (`_get_relevant_docs_results`): `queries2filename` is a dict over all
      rows (the last row wins); results[query][filename] = max(results[query].get(filename, 0), score), except
      the very first passage, stored as it is (so every other page is clamped at 0);
    - mteb 1.16.5 evaluators/utils.py lines 71-90 (`mrr`): sorted by score alone (stable: ties keep the results'
      insertion order), relevant = grade > 0; ndcg / recall / ... from pytrec_eval on the full run.
    Passages are the table's rows (a page on several rows is scored on each, with the same score)."""
    queries2filename = {query: name for query, name in rows}
    relevant, results = {}, {}
    for query in dict.fromkeys(query for query, _ in rows if query is not None):
        relevant[query] = {queries2filename[query]: 1}
        for _, name in rows:
            score = float(scores[texts.index(query)][pages.index(name)])
            if query in results:
                results[query][name] = max(results[query].get(name, 0), score)
            else:
                results[query] = {name: score}
    per_query = pytrec_eval.RelevanceEvaluator(relevant, {"ndcg_cut.5,10", "recall.100", "P.1", "map_cut.10"})
    values = per_query.evaluate(results)
    reference = {name: {q: values[q][key] for q in values} for name, key in MTEB_NAMES.items()}
    reference["mrr@10"] = {}
    for query, doc_scores in results.items():
        ranked = sorted(doc_scores.items(), key=lambda item: item[1], reverse=True)[:10]
        hits = [rank for rank, (doc, _) in enumerate(ranked) if relevant[query].get(doc, 0) > 0]
        reference["mrr@10"][query] = 1 / (hits[0] + 1) if hits else 0.0
    return relevant, reference


def test_vidore_benchmark_protocol_last_row_wins_scores_clamped_mrr_ties_in_corpus_order(tmp_path, monkeypatch):
    dataset = read_vidore(write_vidore(tmp_path / "vidore"), protocol="vidore-benchmark")
    by_text = dict(zip(dataset.queries, dataset.query_ids))
    relevant, reference = vidore_benchmark_reference(VIDORE_ROWS, PAGES, VIDORE_SCORES, QUERY_TEXTS)
    assert dataset.qrels == {by_text[text]: pages for text, pages in relevant.items()}
    assert dataset.qrels[by_text["alpha"]] == {"p4.png": 1}  # the last row's page
    runs = captured_runs(monkeypatch)
    (result,) = evaluate(vidore_model(), dataset, [(1, 1)], metrics=METRICS)
    qrels, run, mrr_run = runs[-1]
    assert mrr_run is not None
    ours = metrics_module.per_query_metrics(qrels, run, METRICS, mrr_run=mrr_run)
    for name in METRICS:
        for text, query_id in by_text.items():
            assert ours[name][query_id] == pytest.approx(reference[name][text], abs=1e-6), (name, text)
    # Hand-computed: "beta" (relevant p3, 5th page) has only negative scores. Clamped, every page but p0 scores
    # 0 and p0 -0.25: ranked by id descending among the zeros p5, p4, p3, ... -> p3 third: nDCG@5 = 1/log2(4).
    assert ours["ndcg@5"][by_text["beta"]] == pytest.approx(0.5, abs=1e-9)
    # MRR ties in corpus order: p1, p2, p5, p3 (all 0) -> p3 fourth: 1/4 (trec_eval's order would give 1/3).
    assert ours["mrr@10"][by_text["beta"]] == pytest.approx(0.25, abs=1e-9)
    assert result.protocol == "vidore-benchmark" and result.reference.startswith("vidore-benchmark 5")


def test_mteb_protocol_scores_pages_with_the_same_image_as_one_page(tmp_path):
    """mteb's ViDoRe v1 copies hold each distinct page image once: two files with the same bytes are one page,
    relevant to the queries of both rows; vidore-benchmark scores them apart (by image_filename)."""
    table = datasets.Dataset.from_dict(
        {
            "query": ["alpha", "beta", "gamma"],
            "image": [numbered_page(0), numbered_page(1), numbered_page(0)],
            "image_filename": ["a.png", "b.png", "copy-of-a.png"],
        }
    ).cast_column("image", datasets.Image())
    os.makedirs(tmp_path / "v" / "data")
    table.to_parquet(str(tmp_path / "v" / "data" / "test-00000-of-00001.parquet"))
    mteb = read_vidore(str(tmp_path / "v"))
    assert mteb.candidate_ids == ["a.png", "b.png"] and mteb.notes["pages_with_the_same_image"] == 1
    assert mteb.qrels == {"0": {"a.png": 1}, "1": {"b.png": 1}, "2": {"a.png": 1}}
    vidore_benchmark = read_vidore(str(tmp_path / "v"), protocol="vidore-benchmark")
    assert vidore_benchmark.candidate_ids == ["a.png", "b.png", "copy-of-a.png"]


def test_vidore_benchmark_protocol_refuses_an_empty_query_it_would_keep(tmp_path):
    table = datasets.Dataset.from_dict(
        {"query": ["", "alpha"], "image": [numbered_page(0), numbered_page(1)], "image_filename": ["a", "b"]}
    ).cast_column("image", datasets.Image())
    os.makedirs(tmp_path / "v" / "data")
    table.to_parquet(str(tmp_path / "v" / "data" / "test-00000-of-00001.parquet"))
    assert read_vidore(str(tmp_path / "v")).queries == ["alpha"]  # mteb drops it
    with pytest.raises(ValueError, match=r"row 0, column 'query': an empty query, which protocol 'vidore-benchmark'"):
        read_vidore(str(tmp_path / "v"), protocol="vidore-benchmark")


def test_protocol_names_are_checked_per_format(tmp_path):
    with pytest.raises(ValueError, match=r"protocol must be one of"):
        read_datasets("beir", ["x"], protocol="trec")
    with pytest.raises(ValueError, match=r"protocol 'vlm2vec' applies to the formats \['mmeb'\], not 'vidore'"):
        read_datasets("vidore", ["x"], protocol="vlm2vec")


# -- VLM2Vec (MMEB) ---------------------------------------------------------------------------------------------


def write_mmeb(root, image_root) -> str:
    os.makedirs(image_root, exist_ok=True)
    for number in range(3):
        numbered_page(number).save(os.path.join(image_root, f"{number}.png"))
    rows = {
        # image_cls (VLM2Vec image_cls_dataset.py line 26: candidates are the bare tgt_text)
        "N24News": {
            "qry_inst": "<|image_1|> Classify the news:",
            "qry_text": "",
            "qry_img_path": "0.png",
            "tgt_inst": "Represent the class:",
            "tgt_text": ["sports", "politics"],
            "tgt_img_path": ["1.png", "2.png"],
        },
        # image_t2i (image_t2i_eval.py lines 25-38: tgt_inst, then the caption, on image candidates)
        "MSCOCO_t2i": {
            "qry_inst": "Find me an everyday image that matches the given caption:",
            "qry_text": "a dog",
            "qry_img_path": "",
            "tgt_inst": "<|image_1|> Represent the given image.",
            "tgt_text": ["", ""],
            "tgt_img_path": ["1.png", "2.png"],
        },
    }
    for subset, row in rows.items():
        os.makedirs(os.path.join(root, subset), exist_ok=True)
        datasets.Dataset.from_list([row]).to_parquet(os.path.join(root, subset, "test-00000-of-00001.parquet"))
    return str(root)


def test_vlm2vec_instructions_per_task_kind_and_subsets_read_by_folder_without_configs(tmp_path):
    image_root = str(tmp_path / "images")
    folder = write_mmeb(tmp_path / "mmeb", image_root)  # no README: each subset is its folder
    text_to_image, classification = read_datasets("mmeb", [folder], image_root=image_root)
    assert [text_to_image.name, classification.name] == ["MSCOCO_t2i", "N24News"]
    assert classification.candidates == [{"text": "sports"}, {"text": "politics"}]  # no tgt_inst, no image
    assert classification.queries == [{"text": "Classify the news:", "image": os.path.join(image_root, "0.png")}]
    assert text_to_image.candidates == [
        {"text": "Represent the given image.", "image": os.path.join(image_root, name)} for name in ("1.png", "2.png")
    ]
    assert classification.protocol == "vlm2vec"


def test_vlm2vec_argmax_ties_count_for_the_positive():
    """VLM2Vec v1: `argmax(scores) == 0`; on a tie the first entry (the positive) wins. Hand-computed: query 0's
    positive ties with a negative (hit), query 1's positive is beaten (miss): precision@1 = 1/2."""
    dataset = RetrievalDataset(
        name="lists",
        query_ids=["0", "1"],
        queries=["a", "b"],
        candidate_ids=["0", "1", "2"],
        candidates=["x", "y", "z"],
        candidate_lists=[[0, 1], [1, 2]],
        metrics=("precision@1",),
        format="mmeb",
    )
    model = MatrixModel([[0.5, 0.5, 0.0], [0.0, 0.25, 0.75]], "ab".index, "xyz".index)
    (result,) = evaluate(model, dataset, [(1, 1)])
    assert result.metrics == {"precision@1": 0.5}
    assert result.protocol == "vlm2vec"
    assert "protocol vlm2vec: the numbers of VLM2Vec" in format_table([result])
    assert "argmax over the candidate list: a tie with the positive (entry 0) is a hit" in format_table([result])


def test_mmeb_qry_text_of_the_wrong_type_names_the_row(tmp_path):
    os.makedirs(tmp_path / "mmeb" / "Sub")
    table = pyarrow.table(
        {"qry_text": [5, 6], "qry_img_path": ["", ""], "tgt_text": [["a"], ["a"]], "tgt_img_path": [[""], [""]]}
    )
    pyarrow.parquet.write_table(table, str(tmp_path / "mmeb" / "Sub" / "test-00000-of-00001.parquet"))
    with pytest.raises(ValueError, match=r"Sub/test-00000-of-00001.parquet row 0, column 'qry_text': expected a str"):
        read_mmeb(str(tmp_path / "mmeb"), "Sub")


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (("vidore/esg_reports_v2", None), "ndcg@5"),  # ViDoRe v2: mteb main_score ndcg_at_5
        ((None, "/data/docvqa_test_subsampled_beir"), "ndcg@5"),  # mteb's ViDoRe v1 BEIR copies
        (("vidore/vidore_v3_hr_mteb_format", None), "ndcg@10"),  # ViDoRe v3
        (("mteb/scifact", "/data/scifact"), "ndcg@10"),  # BEIR
    ],
)
def test_the_main_score_is_the_leaderboards(names, expected):
    from metaembed.evaluation.protocols import main_metric

    assert main_metric("beir", names) == expected


def test_mmeb_subsets_of_a_readme_without_configs_are_read_by_folder(tmp_path):
    image_root = str(tmp_path / "images")
    folder = write_mmeb(tmp_path / "mmeb", image_root)
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as file:
        file.write("---\nlicense: apache-2.0\n---\n\nMMEB eval, copied without its configs.\n")
    assert [dataset.name for dataset in read_datasets("mmeb", [folder], image_root=image_root)] == [
        "MSCOCO_t2i",
        "N24News",
    ]
