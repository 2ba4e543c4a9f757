"""mteb at any budget: local retrieval tasks (text-to-text and text-to-image, built here, no downloads) through
`mteb_model`, against this package's evaluator and a plain `model.score` reference; and the saved folder's
modalities as mteb reads them from the Hub."""

from __future__ import annotations

import json

import pytest
from conftest import make_model, publish_to_offline_cache
from PIL import Image

from metaembed.evaluation import RetrievalDataset, evaluate
from metaembed.evaluation.mteb_bridge import mteb_model

mteb = pytest.importorskip("mteb")
pytrec_eval = pytest.importorskip("pytrec_eval")
from datasets import Dataset  # noqa: E402
from mteb.abstasks.retrieval import AbsTaskRetrieval  # noqa: E402
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402

COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
QUERIES = {"q1": "a red thing", "q2": "something green or blue", "q3": "yellow"}
RELEVANT = {"q1": {"d0": 1, "d4": 2}, "q2": {"d1": 1, "d2": 1}, "q3": {"d3": 2}}
TEXTS = [f"a page about {color} objects, number {index}" for index, color in enumerate(COLORS)]
IMAGES = [Image.new("RGB", (36, 44), color) for color in COLORS]
COMMON = {
    "description": "a local task built in the test",
    "reference": None,
    "dataset": {"path": "local/none", "revision": "0"},
    "eval_splits": ["test"],
    "eval_langs": ["eng-Latn"],
    "main_score": "ndcg_at_10",
}


def local_task(name: str, category: str, corpus_column: str, corpus_values: list) -> AbsTaskRetrieval:
    class LocalTask(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name=name,
            type="Retrieval" if category == "t2t" else "Any2AnyRetrieval",
            category=category,
            modalities=["text"] if category == "t2t" else ["text", "image"],
            **COMMON,
        )

        def load_data(self, num_proc=None, **kwargs) -> None:
            if self.data_loaded:
                return
            corpus = {"id": [f"d{index}" for index in range(len(corpus_values))], corpus_column: corpus_values}
            split = RetrievalSplitData(
                queries=Dataset.from_dict({"id": list(QUERIES), "text": list(QUERIES.values())}),
                corpus=Dataset.from_dict(corpus),
                relevant_docs=RELEVANT,
                top_ranked=None,
            )
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    return LocalTask()


def reference_ndcg10(model, candidates: list, budget: tuple[int, int]) -> float:
    """nDCG@10 from model.score over every pair, by pytrec_eval on the full run."""
    queries = model.encode_queries(list(QUERIES.values()))
    scores = model.score(queries, model.encode_candidates(candidates), *budget)
    run = {
        query: {f"d{index}": value for index, value in enumerate(row.tolist())} for query, row in zip(QUERIES, scores)
    }
    per_query = pytrec_eval.RelevanceEvaluator(RELEVANT, {"ndcg_cut.10"}).evaluate(run)
    return sum(values["ndcg_cut_10"] for values in per_query.values()) / len(per_query)


def test_mteb_at_two_budgets_matches_this_package_and_keeps_two_cache_entries(backbone_dirs, tmp_path):
    model = make_model(backbone_dirs["qwen2_5_vl"])
    folder = tmp_path / "my-metaembed"
    model.save_pretrained(folder)
    cache = mteb.ResultCache(cache_path=str(tmp_path / "mteb-cache"))
    corpora = {"LocalT2T": TEXTS, "LocalT2I": IMAGES}
    budgets = [(1, 1), (4, 8)]
    # One budget from the model object, one from the saved folder (loaded as MultiVectorEncoder by mteb's wrapper).
    wrappers = [mteb_model(model, budgets[0], name="me/tiny-metaembed"), mteb_model(str(folder), budgets[1])]
    assert wrappers[0].mteb_model_meta.name == "me/tiny-metaembed-budget-1x1"
    assert wrappers[1].mteb_model_meta.name == "local/my-metaembed-budget-4x8"
    assert wrappers[0].mteb_model_meta.revision.endswith("-budget-1x1")
    for budget, wrapper in zip(budgets, wrappers):
        tasks = [local_task("LocalT2T", "t2t", "text", TEXTS), local_task("LocalT2I", "t2i", "image", IMAGES)]
        results = mteb.evaluate(wrapper, tasks, cache=cache, encode_kwargs={"batch_size": 4}, show_progress_bar=False)
        for task_result in results.task_results:
            candidates = corpora[task_result.task_name]
            ours = evaluate(
                model,
                RetrievalDataset(
                    task_result.task_name,
                    list(QUERIES),
                    list(QUERIES.values()),
                    [f"d{i}" for i in range(6)],
                    candidates,
                    qrels=RELEVANT,
                    format="beir",  # a published format: mteb's protocol, means rounded as mteb rounds them
                ),
                [budget],
                metrics=["ndcg@10"],
            )[0].metrics["ndcg@10"]
            theirs = task_result.scores["test"][0]["ndcg_at_10"]  # mteb rounds to 5 decimals; so does its protocol
            assert theirs == ours, (task_result.task_name, budget)
            assert ours == pytest.approx(reference_ndcg10(model, candidates, budget), abs=5e-6 + 1e-9)
    # Two budgets, two cache entries, each holding its own numbers.
    entries = sorted(path.parent for path in (tmp_path / "mteb-cache").rglob("LocalT2I.json"))
    assert len(entries) == 2 and entries[0] != entries[1]
    stored = {}
    for entry in entries:
        scores = json.loads((entry / "LocalT2T.json").read_text())["scores"]["test"][0]
        stored[str(entry)] = scores["ndcg_at_10"]
    assert any("budget-1x1" in path for path in stored) and any("budget-4x8" in path for path in stored)
    expected = {1: reference_ndcg10(model, TEXTS, budgets[0]), 8: reference_ndcg10(model, TEXTS, budgets[1])}
    for path, value in stored.items():
        assert value == pytest.approx(expected[8 if "4x8" in path else 1], abs=5e-6)
    # A rerun at a cached budget reads its own entry back, not the other budget's.
    again = mteb.evaluate(
        wrappers[1], [local_task("LocalT2T", "t2t", "text", TEXTS)], cache=cache, show_progress_bar=False
    )
    assert again.task_results[0].scores["test"][0]["ndcg_at_10"] == pytest.approx(expected[8], abs=5e-6)


def test_saved_folder_declares_text_and_image_where_mteb_reads_them(backbone_dirs, tmp_path, monkeypatch):
    """mteb's Hub loader (what `mteb.get_model_meta(repo, fetch_from_hf=True)` runs) finds a late-interaction
    model with text and image, from the folder as published."""
    import huggingface_hub.constants
    from mteb.models import MultiVectorWrapper
    from mteb.models.model_meta import ModelMeta

    folder = tmp_path / "model"
    make_model(backbone_dirs["qwen2_5_vl"]).save_pretrained(folder)
    publish_to_offline_cache(folder, tmp_path / "hf", "me/tiny-metaembed")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    loader, model_type, modalities = ModelMeta._detect_model_type_and_loader("me/tiny-metaembed")
    assert (loader, model_type, modalities) == (MultiVectorWrapper, "late-interaction", ["image", "text"])
