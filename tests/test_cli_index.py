"""`metaembed index` / `metaembed search`: corpora from folders, JSONL and text files; sharded multi-process
encoding that equals a single process; resuming; search output equal to the Python API."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, make_model
from sample_images import make_images

from metaembed.cli import main, read_corpus
from metaembed.search.index import MetaEmbedIndex


@pytest.fixture(scope="module")
def model_dir(backbone_dirs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    make_model(backbone_dirs["qwen2_5_vl"]).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    os.makedirs(folder / "nested")
    for number, (name, image) in enumerate(make_images().items()):
        image.convert("RGB").save(folder / ("nested" if number % 2 else "") / f"{name}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_read_corpus_folder_jsonl_and_text(image_folder, tmp_path):
    items, ids, metadata = read_corpus(str(image_folder))
    assert ids == sorted(ids) and all(name.endswith(".png") for name in ids) and "nested/tall.png" in ids
    assert items[0] == {"image": os.path.join(str(image_folder), ids[0])} and metadata[0] == {"path": ids[0]}
    jsonl = tmp_path / "corpus.jsonl"
    make_images()["rgb"].convert("RGB").save(tmp_path / "pic.png")  # items are checked as they are read
    jsonl.write_text(
        json.dumps({"id": "a", "text": "a caption", "source": "web"})
        + "\n\n"
        + json.dumps({"image": "pic.png", "text": "with text"})
        + "\n"
    )
    items, ids, metadata = read_corpus(str(jsonl))
    assert ids == ["a", 3] and items[0] == {"text": "a caption"}
    assert items[1] == {"image": str(tmp_path / "pic.png"), "text": "with text"}
    assert metadata[0] == {"text": "a caption", "source": "web"}
    text = tmp_path / "corpus.txt"
    text.write_text("first line\n\nthird line\n")
    assert read_corpus(str(text))[:2] == (["first line", "third line"], [1, 3])
    jsonl.write_text('{"text": "ok"}\n{"caption": "no text or image"}\n')
    with pytest.raises(ValueError, match=r"corpus\.jsonl:2"):
        read_corpus(str(jsonl))
    os.makedirs(tmp_path / "empty_folder")
    with pytest.raises(ValueError, match="no image files"):
        read_corpus(str(tmp_path / "empty_folder"))


def test_index_then_search_equals_the_python_api(model_dir, image_folder, tmp_path, capsys):
    from transformers import AutoModel

    output = tmp_path / "index"
    main(["index", model_dir, str(image_folder), str(output), "--storage", "float32", "--shard-size", "3"])
    index = MetaEmbedIndex.load(str(output))
    items, ids, _ = read_corpus(str(image_folder))
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True)
    expected = model.encode_candidates(items)
    assert index.ids == ids and index.model_name_or_path == model_dir
    torch.testing.assert_close(index.get_embeddings(range(len(index))), expected, atol=1e-5, rtol=0)
    capsys.readouterr()

    main(["search", str(output), "a red circle", "--image", items[1]["image"], "--budget", "2", "4", "--json"])
    printed = json.loads(capsys.readouterr().out)
    queries = model.encode_queries(["a red circle", {"image": items[1]["image"]}])
    reference = index.search(queries, 2, 4, top_k=10)
    assert [[hit["id"] for hit in entry["results"]] for entry in printed] == reference.ids
    assert printed[1]["results"][0]["metadata"] == {"path": reference.ids[1][0]}
    torch.testing.assert_close(
        torch.tensor([[hit["score"] for hit in entry["results"]] for entry in printed]),
        reference.scores,
        atol=1e-5,
        rtol=0,
    )
    main(["search", str(output), "a red circle", "--top-k", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "query: a red circle" and len(lines) == 3


def test_two_processes_write_the_shards_of_one_index_and_resume(model_dir, image_folder, tmp_path, capsys, monkeypatch):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    main(["index", model_dir, str(image_folder), str(single), "--storage", "int8", "--shard-size", "2"])
    command = [sys.executable, "-m", "metaembed.cli", "index", model_dir, str(image_folder), str(sharded)]
    command += ["--storage", "int8", "--shard-size", "2"]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": "2", "HF_HUB_OFFLINE": "1"}
    processes = [
        subprocess.Popen(command, env={**environment, "RANK": str(rank)}, stdout=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    outputs = [process.communicate()[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0]
    assert "[rank 0] shard 1/" in outputs[0] and "[rank 1] shard 2/" in outputs[1]
    one, two = MetaEmbedIndex.load(str(single)), MetaEmbedIndex.load(str(sharded))
    assert two.ids == one.ids and len(two._shards) == len(one._shards) > 2
    torch.testing.assert_close(
        two.get_embeddings(range(len(two))), one.get_embeddings(range(len(one))), atol=1e-4, rtol=0
    )

    # Resume: a job where only rank 0 ran leaves no index (readers see none), and a single-process rerun encodes
    # only the shards rank 0 did not write.
    total = len(one._shards)
    partial = tmp_path / "partial"
    arguments = ["index", model_dir, str(image_folder), str(partial), "--storage", "int8", "--shard-size", "2"]
    capsys.readouterr()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    main(arguments)
    first = capsys.readouterr().out
    assert f"[rank 0] 0 shard(s) reused, {(total + 1) // 2} encoded" in first
    assert "are other processes' to write" in first
    with pytest.raises(FileNotFoundError, match=r"no index\.json"):
        MetaEmbedIndex.load(str(partial))
    monkeypatch.setenv("WORLD_SIZE", "1")
    main(arguments)
    rerun = capsys.readouterr().out
    assert f"{(total + 1) // 2} shard(s) reused, {total // 2} encoded" in rerun
    assert f"shard 2/{total}: items 2..3" in rerun and f"shard 1/{total}:" not in rerun
    resumed = MetaEmbedIndex.load(str(partial))
    assert resumed.ids == one.ids and torch.equal(
        resumed.get_embeddings(range(len(one))), two.get_embeddings(range(len(one)))
    )


def test_jsonl_ids_must_be_unique_strings_or_integers(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "a", "id": 2}\n{"text": "b"}\n')  # line 2's default id is 2 too
    with pytest.raises(ValueError, match="id 2 appears more than once"):
        read_corpus(str(corpus))
    corpus.write_text('{"text": "a", "id": [1]}\n')
    with pytest.raises(ValueError, match=r"corpus\.jsonl:1: 'id' must be"):
        read_corpus(str(corpus))


def user_error(capsys, arguments: list[str]) -> str:
    """The one line `metaembed` prints for a user error (exit status 2, no traceback)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    # Progress bars (transformers' weight loading) may come before it.
    lines = [line for line in error.split("\n") if line and not line.startswith("\r")]
    assert "Traceback" not in error and len(lines) == 1 and lines[0].startswith("metaembed index: error: "), error
    return lines[0]


def test_rerun_into_an_index_made_differently_is_refused_unless_overwritten(model_dir, image_folder, tmp_path, capsys):
    output = str(tmp_path / "index")
    main(["index", model_dir, str(image_folder), output, "--storage", "float16", "--shard-size", "3"])
    (tmp_path / "index" / "my-notes.txt").write_text("keep")
    error = user_error(
        capsys, ["index", model_dir, str(image_folder), output, "--storage", "int8", "--shard-size", "3"]
    )
    assert "made differently (storage: 'float16' there, 'int8' now)" in error and "--overwrite" in error
    error = user_error(capsys, ["index", model_dir, str(image_folder), output, "--shard-size", "2"])
    assert "made differently (corpus:" in error and "'shard_size': 2" in error
    main(["index", model_dir, str(image_folder), output, "--storage", "int8", "--shard-size", "2", "--overwrite"])
    index = MetaEmbedIndex.load(output)
    assert index.storage == "int8" and len(index._shards) == (len(index) + 1) // 2
    # --overwrite replaced the index's own files only.
    assert (tmp_path / "index" / "my-notes.txt").read_text() == "keep" and len(
        list((tmp_path / "index").glob("gen-*"))
    ) == 1


def test_index_never_writes_into_or_deletes_a_folder_that_is_not_an_index(model_dir, image_folder, tmp_path, capsys):
    project = tmp_path / "project"
    project.mkdir()
    (project / "index.json").write_text(json.dumps({"name": "my-app", "version": "1.0"}))
    (project / "main.py").write_text("print('hello')")
    (project / "corpus.txt").write_text("first\nsecond\n")
    before = {path.name: path.read_bytes() for path in project.iterdir()}
    for extra in ([], ["--overwrite"]):
        error = user_error(capsys, ["index", model_dir, str(project / "corpus.txt"), str(project), *extra])
        what = f"{project / 'index.json'} is not a MetaEmbed index manifest: {project} holds corpus.txt, index.json"
        assert what in error
        assert "new or empty folder" in error and "--overwrite" not in error
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep")
    for extra in ([], ["--overwrite"]):
        error = user_error(capsys, ["index", model_dir, str(project / "corpus.txt"), str(notes), *extra])
        assert "is not a MetaEmbed index (no index.json) and is not empty: it holds todo.txt" in error
        assert "--overwrite" not in error and "delete" not in error
    assert {path.name: path.read_bytes() for path in project.iterdir()} == before
    assert os.listdir(notes) == ["todo.txt"]


def test_resume_reencodes_only_shards_whose_items_or_model_changed(backbone_dirs, tmp_path, capsys):
    from transformers import AutoModel

    model_dir = tmp_path / "model"
    make_model(backbone_dirs["qwen2_5_vl"]).save_pretrained(model_dir)
    corpus, output = tmp_path / "corpus.txt", str(tmp_path / "index")
    lines = ["a red circle", "a blue square", "quarterly report", "zebra", "a green triangle"]
    corpus.write_text("\n".join(lines) + "\n")

    def run() -> str:
        capsys.readouterr()
        main(["index", str(model_dir), str(corpus), output, "--storage", "float32", "--shard-size", "2"])
        return capsys.readouterr().out

    assert "0 shard(s) reused, 3 encoded" in run()
    assert "3 shard(s) reused, 0 encoded" in run()
    lines[2] = "quarterly financial report"  # an edited line: its shard (items 2..3) is encoded again
    corpus.write_text("\n".join(lines) + "\n")
    printed = run()
    assert "2 shard(s) reused, 1 encoded" in printed and "shard 2/3: items 2..3" in printed
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True)
    torch.testing.assert_close(
        MetaEmbedIndex.load(output).get_embeddings(range(5)), model.encode_candidates(lines), atol=1e-5, rtol=0
    )
    # Other weights under the same path: nothing encoded by the old model is reused.
    other = make_model(backbone_dirs["qwen2_5_vl"])
    with torch.no_grad():
        other.meta_tokens.mul_(-1)
    other.save_pretrained(model_dir)
    assert "0 shard(s) reused, 3 encoded" in run()
    torch.testing.assert_close(
        MetaEmbedIndex.load(output).get_embeddings(range(5)), other.encode_candidates(lines), atol=1e-5, rtol=0
    )


def test_search_prints_only_found_candidates_when_a_two_stage_row_ends_early(model_dir, image_folder, tmp_path, capsys):
    output = str(tmp_path / "index")
    main(["index", model_dir, str(image_folder), output, "--storage", "float32"])
    index = MetaEmbedIndex.load(output)
    # Every candidate vector indexed: 3 nearest vectors may belong to fewer than 3 candidates.
    index.build_ann(num_vectors=index.num_vectors, kind="flat")
    index.save(output)
    capsys.readouterr()
    main(["search", output, "a red circle", "--top-k", "3", "--shortlist", "3", "--json"])
    hits = json.loads(capsys.readouterr().out)[0]["results"]
    assert 1 <= len(hits) <= 3 and all(hit["metadata"] is not None for hit in hits)
    assert [hit["rank"] for hit in hits] == list(range(1, len(hits) + 1))


def test_search_defaults_to_two_stages_when_the_index_has_an_ann_and_says_so(model_dir, image_folder, tmp_path, capsys):
    output = str(tmp_path / "index")
    main(["index", model_dir, str(image_folder), output, "--storage", "float32"])
    capsys.readouterr()
    main(["search", output, "a red circle", "--top-k", "2", "--json"])
    captured = capsys.readouterr()
    assert "search: exhaustive" in captured.err  # no ANN index saved: exact
    exact = json.loads(captured.out)[0]["results"]
    index = MetaEmbedIndex.load(output)
    index.build_ann(kind="flat")
    index.save(output)
    main(["search", output, "a red circle", "--top-k", "2", "--json"])
    captured = capsys.readouterr()
    assert "search: two stages" in captured.err and "--exhaustive" in captured.err
    assert json.loads(captured.out)[0]["results"] == exact  # a shortlist of 100 holds this small index whole
    main(["search", output, "a red circle", "--top-k", "2", "--json", "--exhaustive"])
    captured = capsys.readouterr()
    assert "search: exhaustive" in captured.err and json.loads(captured.out)[0]["results"] == exact
    with pytest.raises(SystemExit):
        main(["search", output, "a red circle", "--exhaustive", "--shortlist", "5"])


def test_resume_never_reuses_shards_of_another_storage_or_vector_count(model_dir, tmp_path, capsys):
    from transformers import AutoModel

    from metaembed.search import storage

    corpus, output = tmp_path / "corpus.txt", str(tmp_path / "index")
    lines = ["a red circle", "a blue square", "quarterly report"]
    corpus.write_text("\n".join(lines) + "\n")
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True)
    expected = model.encode_candidates(lines)
    # The same --shard-size every time: only the storage / vector count differ from the shards already there.
    # int4 and residual4 shards have the same dtype and shapes of codes and scales; only residual4 has offsets.
    extras = (["--storage", "float16"], ["--storage", "int8"], ["--storage", "int8", "--num-vectors", "2"])
    for extra in (*extras, ["--storage", "int4"], ["--storage", "residual4"]):
        capsys.readouterr()
        main(["index", model_dir, str(corpus), output, "--shard-size", "2", "--overwrite", *extra])
        assert "0 shard(s) reused, 2 encoded" in capsys.readouterr().out
        index = MetaEmbedIndex.load(output)
        assert index.storage == extra[1] and index.num_vectors == (
            2 if "--num-vectors" in extra else model.config.num_candidate_vectors
        )
        stored = index.get_embeddings(range(3))
        tolerance = 0.3 if extra[1] in ("int4", "residual4") else 2e-2
        torch.testing.assert_close(stored, expected[:, : index.num_vectors], atol=tolerance, rtol=0)
    main(["index", model_dir, str(corpus), output, "--shard-size", "2", "--storage", "residual4"])
    assert "2 shard(s) reused, 0 encoded" in capsys.readouterr().out
    assert torch.equal(MetaEmbedIndex.load(output).get_embeddings(range(3)), stored)
    # A sidecar that claims a layout its tensors do not have is never taken as written.
    source = {"storage": "float16", "num_vectors": 2, "dim": 4}
    path = str(tmp_path / "generation")
    os.makedirs(path)
    storage.write_shard(path, 0, 1, torch.zeros(1, 2, 4, dtype=torch.float16), None, ["a"], None, source)
    assert storage.shard_written(path, 0, 1, ["a"], source)
    for tensors in (torch.zeros(1, 2, 4), torch.zeros(1, 1, 4, dtype=torch.float16)):  # other dtype, other count
        storage.write_shard(path, 0, 1, tensors, None, ["a"], None, source)
        assert not storage.shard_written(path, 0, 1, ["a"], source)


def test_resume_stores_edited_metadata_and_ids(model_dir, tmp_path, capsys):
    corpus, output = tmp_path / "corpus.jsonl", str(tmp_path / "index")
    rows = [{"id": "a", "text": "a red circle", "source": "web"}, {"id": "b", "text": "zebra", "source": "web"}]
    rows.append({"id": "c", "text": "a blue square", "source": "web"})

    def run() -> str:
        corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
        capsys.readouterr()
        main(["index", model_dir, str(corpus), output, "--storage", "float32", "--shard-size", "2"])
        return capsys.readouterr().out

    run()
    rows[0]["source"] = "print"  # only the metadata of shard 1 changes
    rows[2]["id"] = "c2"  # only the id of shard 2
    assert "0 shard(s) reused, 2 encoded" in run()
    index = MetaEmbedIndex.load(output)
    assert index.ids == ["a", "b", "c2"] and index.metadata(0) == {"text": "a red circle", "source": "print"}
    assert "2 shard(s) reused, 0 encoded" in run()


@pytest.mark.parametrize(
    "line, message",
    [
        ({"text": 5}, r"corpus\.jsonl:4\['text'\] is int, expected str"),
        ({"image": 5}, r"corpus\.jsonl:4\['image'\] is int"),
        ({"image": "missing.png"}, r"corpus\.jsonl:4\['image'\]: no image file"),
    ],
)
def test_a_bad_corpus_item_is_refused_by_line_before_anything_is_encoded(model_dir, tmp_path, capsys, line, message):
    corpus, output = tmp_path / "corpus.jsonl", tmp_path / "index"
    rows = [{"text": "a red circle"}, {"text": "zebra"}, {"text": "a blue square"}, line]
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
    error = user_error(capsys, ["index", model_dir, str(corpus), str(output), "--shard-size", "1"])
    assert re.search(message, error), error
    assert not output.exists()  # nothing encoded, nothing written


def test_a_save_during_a_job_leaves_its_shards_and_the_job_commits(model_dir, tmp_path, capsys, monkeypatch):
    """A concurrent save commits its own index while the job encodes; it used to remove the job's generation too,
    so the job's encoded shards were lost (the job then failed). Now the job's generation is in use and kept, and
    the job commits after the save: the last commit wins, each index whole."""
    from metaembed.search import storage

    corpus, output = tmp_path / "corpus.txt", str(tmp_path / "index")
    corpus.write_text("a red circle\nzebra\na blue square\n")
    write_shard = storage.write_shard
    other = MetaEmbedIndex(4, 1)
    other.add(torch.ones(1, 1, 4), ids=["other"])
    saved_meanwhile = []

    def write_then_another_save(path, number, total, *arguments):
        write_shard(path, number, total, *arguments)
        if number == total - 1:  # a concurrent `save` commits while this job's shards wait for its commit
            monkeypatch.setattr(storage, "write_shard", write_shard)
            other.save(output)
            saved_meanwhile.append(MetaEmbedIndex.load(output).ids)

    monkeypatch.setattr(storage, "write_shard", write_then_another_save)
    main(["index", model_dir, str(corpus), output, "--shard-size", "2"])
    assert saved_meanwhile == [["other"]]
    assert len(MetaEmbedIndex.load(output)) == 3  # the job's own index, committed after the other save
