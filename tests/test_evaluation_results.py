"""Results never lost, never clobbering: the optional plot, the output folder, the model card (comments, custom
fields, entry names, concurrent writers, symlinks, modes, a broken front matter found before the run), and
scoring time measured after a warm-up."""

from __future__ import annotations

import importlib
import json
import os
import sys
import threading
from types import SimpleNamespace

import pytest
import torch
from conftest import make_model

from metaembed.cli import main
from metaembed.evaluation import RetrievalDataset, evaluate
from metaembed.evaluation.card import write_card_results
from metaembed.evaluation.evaluate import BudgetResult

datasets = pytest.importorskip("datasets")
pytest.importorskip("pytrec_eval")
evaluate_module = importlib.import_module("metaembed.evaluation.evaluate")


@pytest.fixture(scope="module")
def model_dir(backbone_dirs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    make_model(backbone_dirs["qwen2_5_vl"]).save_pretrained(folder)
    return folder


README = """---
configs:
- config_name: corpus
  data_files:
  - split: corpus
    path: corpus/*
- config_name: queries
  data_files:
  - split: queries
    path: queries/*
- config_name: qrels
  data_files:
  - split: test
    path: qrels/*
---
"""


def text_beir(root) -> str:
    """A two-query text collection in the BEIR layout of the Hub (configs declared in the README)."""
    tables = {
        "corpus": datasets.Dataset.from_dict({"corpus-id": ["d0", "d1", "d2"], "text": ["red", "blue", "green"]}),
        "queries": datasets.Dataset.from_dict({"query-id": ["q0", "q1"], "query": ["red?", "blue?"]}),
        "qrels": datasets.Dataset.from_dict({"query-id": ["q0", "q1"], "corpus-id": ["d0", "d1"], "score": [1, 1]}),
    }
    for role, table in tables.items():
        os.makedirs(os.path.join(root, role))
        table.to_parquet(os.path.join(root, role, f"{'test' if role == 'qrels' else role}.parquet"))
    (root / "README.md").write_text(README)
    return str(root)


def command(model_dir, data, output, *extra) -> list[str]:
    return [
        "evaluate",
        str(model_dir),
        data,
        "--format",
        "beir",
        "--budgets",
        "1,1",
        "--output-dir",
        str(output),
        *extra,
    ]


def test_without_matplotlib_the_run_completes_with_a_note(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    output = tmp_path / "out"
    main(command(model_dir, text_beir(tmp_path / "beir"), output))
    captured = capsys.readouterr()
    assert "no plot: matplotlib is not installed" in captured.err
    results = json.loads((output / "results.json").read_text())
    assert results["protocols"]["mteb"]["reference"].startswith("mteb 2.")
    assert results["results"][0]["protocol"] == "mteb" and results["results"][0]["main_score"] >= 0
    assert "protocol mteb: the numbers of mteb 2." in captured.out
    assert not (output / "quality_vs_budget.png").exists()


def test_the_output_folder_keeps_files_it_did_not_write(model_dir, tmp_path, capsys):
    output = tmp_path / "out"
    os.makedirs(output)
    (output / "results.json").write_text("my own results\n")
    (output / "quality_vs_budget.png").write_bytes(b"my own plot")
    (output / "notes.txt").write_text("mine")
    data = text_beir(tmp_path / "beir")
    main(command(model_dir, data, output))
    printed = capsys.readouterr().out
    assert (output / "results.json").read_text() == "my own results\n"
    assert (output / "quality_vs_budget.png").read_bytes() == b"my own plot"
    assert (output / "notes.txt").read_text() == "mine"
    assert "results.json was not written by metaembed: kept; this run's is" in printed
    written = sorted(name for name in os.listdir(output) if name.startswith("results-"))
    assert len(written) == 1 and json.loads((output / written[0]).read_text())["results"]
    # A file this package wrote is replaced by the next run (no pile of copies).
    fresh = tmp_path / "fresh"
    main(command(model_dir, data, fresh))
    main(command(model_dir, data, fresh))
    assert sorted(name for name in os.listdir(fresh) if name.startswith("results")) == ["results.json"]


def result(budget=(1, 1), value=0.5, dataset_id="vidore/mini_v2") -> BudgetResult:
    return BudgetResult(
        dataset="mini_v2",
        budget=budget,
        metrics={"ndcg@5": value},
        main_metric="ndcg@5",
        index_bytes_per_candidate=64,
        scoring_ms_per_query=0.1,
        num_queries=2,
        num_candidates=3,
        dataset_id=dataset_id,
        dataset_config=None,
        dataset_split="test",
        format="beir",
    )


USER_CARD = """---
# the user's comment, kept
license: apache-2.0  # inline comment, kept
my_field: keep me
model-index:
- name: my-model
  results:
  - task:
      type: retrieval
    dataset:
      name: mini_v2
      type: vidore/mini_v2
      split: test
    metrics:
    - type: ndcg_at_5
      value: 0.1
      config: r_q=1,r_c=1
      verified: false
      my_metric_field: custom
- name: another-model
  results:
  - task:
      type: retrieval
    dataset:
      name: other
      type: org/other
    metrics:
    - type: accuracy
      value: 0.9
# a comment after the model index, kept
tags:
- metaembed
---

# My model
"""


def test_card_updates_keep_comments_custom_fields_and_entry_names(tmp_path):
    import yaml

    (tmp_path / "README.md").write_text(USER_CARD)
    write_card_results(tmp_path, [result((1, 1), 0.75), result((2, 4), 0.8)])
    text = (tmp_path / "README.md").read_text()
    for line in ("# the user's comment, kept", "license: apache-2.0  # inline comment, kept", "my_field: keep me"):
        assert line in text
    assert "# a comment after the model index, kept" in text and text.endswith("---\n\n# My model\n")
    index = yaml.safe_load(text.split("---")[1])["model-index"]
    assert [entry["name"] for entry in index] == ["my-model", "another-model"]
    assert index[1]["results"][0]["metrics"] == [{"type": "accuracy", "value": 0.9}]
    metrics = index[0]["results"][0]["metrics"]
    assert metrics[0] == {
        "type": "ndcg_at_5",
        "value": 0.75,
        "config": "r_q=1,r_c=1",
        "verified": False,
        "my_metric_field": "custom",
        "name": "nDCG@5 at budget (1, 1)",
    }
    assert [metric["config"] for metric in metrics] == ["r_q=1,r_c=1", "r_q=2,r_c=4"]


def test_a_column_0_comment_inside_the_model_index_leaves_no_stale_tail(tmp_path):
    import yaml

    # A comment at column 0 between two entries is still inside the block: the whole old block is replaced once.
    card = USER_CARD.replace("- name: another-model", "# the second entry\n- name: another-model")
    (tmp_path / "README.md").write_text(card)
    write_card_results(tmp_path, [result((1, 1), 0.75)])
    text = (tmp_path / "README.md").read_text()
    assert text.count("name: another-model") == 1 and text.count("model-index:") == 1
    index = yaml.safe_load(text.split("---")[1])["model-index"]
    assert [entry["name"] for entry in index] == ["my-model", "another-model"]
    assert "# a comment after the model index, kept" in text


def test_concurrent_card_writers_lose_no_update(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n")
    errors = []

    def writer(offset: int) -> None:
        try:
            for number in range(15):
                write_card_results(tmp_path, [result((1, offset + number), 0.5)], model_name="m")
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(offset,)) for offset in (1, 101)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    from huggingface_hub import ModelCard

    configs = {entry.metric_config for entry in ModelCard.load(tmp_path / "README.md").data.eval_results}
    assert len(configs) == 30


def test_a_symlinked_card_stays_a_symlink_with_its_mode(tmp_path):
    real = tmp_path / "cards" / "README.md"
    os.makedirs(real.parent)
    real.write_text("---\nlicense: mit\n---\n")
    os.chmod(real, 0o640)
    folder = tmp_path / "model"
    os.makedirs(folder)
    os.symlink(real, folder / "README.md")
    write_card_results(folder, [result()])
    assert os.path.islink(folder / "README.md") and "ndcg_at_5" in real.read_text()
    assert os.stat(real).st_mode & 0o777 == 0o640


def test_cards_linked_to_one_file_share_its_lock_and_a_hub_cache_blob_is_refused(tmp_path):
    real = tmp_path / "cards" / "README.md"
    os.makedirs(real.parent)
    real.write_text("---\nlicense: mit\n---\n")
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder in folders:
        os.makedirs(folder)
        os.symlink(real, folder / "README.md")
        write_card_results(folder, [result()])
    assert sorted(os.listdir(tmp_path / "cards")) == [".metaembed-card.lock", "README.md"]
    assert not any((folder / ".metaembed-card.lock").exists() for folder in folders)
    # A snapshot of the Hugging Face cache: its README is a blob shared by revisions, never edited.
    blob = tmp_path / "hub" / "models--org--name" / "blobs" / ("0" * 40)
    os.makedirs(blob.parent)
    blob.write_text("---\nlicense: mit\n---\n")
    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / ("1" * 40)
    os.makedirs(snapshot)
    os.symlink(blob, snapshot / "README.md")
    with pytest.raises(ValueError, match="file of the Hugging Face cache"):
        write_card_results(snapshot, [result()])
    assert blob.read_text() == "---\nlicense: mit\n---\n"


def test_a_broken_front_matter_is_reported_before_the_evaluation(model_dir, tmp_path, capsys):
    card = tmp_path / "broken"
    os.makedirs(card)
    for name in os.listdir(model_dir):
        os.symlink(os.path.join(model_dir, name), card / name) if name != "README.md" else None
    (card / "README.md").write_text("---\nlicense: [mit\n---\n")
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(command(card, text_beir(tmp_path / "beir"), output, "--write-card"))
    assert exit_info.value.code == 2
    assert "README.md: the front matter is not valid YAML" in capsys.readouterr().err
    assert not output.exists()  # nothing was evaluated


class FakeClockScoring:
    """A clock that only the scoring calls move: 1 s for the first call of each shape (setup, warm-up), 1 ms
    for the others, so the time `evaluate` reports shows whether warm-up fell inside the timed region."""

    def __init__(self, monkeypatch) -> None:
        self.now, self.seen = 0.0, set()
        real = evaluate_module.late_interaction_scores

        def scoring(queries, candidates, *args, **kwargs):
            shape = (tuple(queries.shape), tuple(candidates.shape), args)
            self.now += 0.001 if shape in self.seen else 1.0
            self.seen.add(shape)
            return real(queries, candidates, *args, **kwargs)

        monkeypatch.setattr(evaluate_module, "late_interaction_scores", scoring)
        monkeypatch.setattr(evaluate_module.time, "perf_counter", lambda: self.now)


class RandomModel:
    config = SimpleNamespace(num_query_vectors=2, num_candidate_vectors=2, output_dim=4)

    def encode(self, items, task, num_vectors=None, batch_size=16, show_progress_bar=None):
        generator = torch.Generator().manual_seed(len(items) + len(task))
        return torch.randn(len(items), num_vectors, 4, generator=generator)


def test_scoring_time_is_measured_after_a_warm_up(monkeypatch):
    dataset = RetrievalDataset(
        name="timed",
        query_ids=[f"q{number}" for number in range(5)],
        queries=[f"query {number}" for number in range(5)],
        candidate_ids=[f"d{number}" for number in range(7)],
        candidates=[f"doc {number}" for number in range(7)],
        qrels={f"q{number}": {f"d{number}": 1} for number in range(5)},
    )
    FakeClockScoring(monkeypatch)
    results = evaluate(RandomModel(), dataset, [(1, 1), (2, 2)], metrics=["ndcg@5"])
    # One scoring call per budget (5 queries x 7 candidates fit one block), timed after its warm-up: 1 ms / 5.
    assert [round(result.scoring_ms_per_query, 6) for result in results] == [0.2, 0.2]
