"""Index writes under contention and failing disks, and values that cannot be stored: a held lock fails at once
naming its holder (or waits as long as `--wait` says), write failures are `OSError`s naming the file with nothing
half-written left, vectors not finite in the storage dtype and non-standard JSON metadata are refused."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ROOT, make_model

from metaembed.search import storage
from metaembed.search.index import MetaEmbedIndex
from metaembed.search.storage import IndexLockedError


def vectors(count: int, num_vectors: int = 4, dim: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(count, num_vectors, dim, generator=generator), dim=-1)


def small_index(count: int = 3, storage_dtype: str = "float32") -> MetaEmbedIndex:
    index = MetaEmbedIndex(8, 4, storage_dtype)
    index.add(vectors(count), ids=[f"doc-{number}" for number in range(count)])
    return index


def files_below(folder) -> list[str]:
    """Every file below `folder` but the lock file (which records its last holder's pid)."""
    found = (os.path.relpath(os.path.join(path, name), folder) for path, _, names in os.walk(folder) for name in names)
    return sorted(name for name in found if name != storage.LOCK_FILE)


@pytest.fixture(scope="module")
def model_dir(backbone_dirs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    make_model(backbone_dirs["qwen2_5_vl"]).save_pretrained(folder)
    return str(folder)


def run_cli(*arguments: str, limit_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    """`metaembed ...` in a fresh process (flock locks are per open file: the test's own lock contends with it),
    optionally with every file it writes limited to `limit_file_bytes` (a full disk, for the writer)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    environment = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "metaembed.cli", *arguments],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit if limit_file_bytes else None,
    )


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("\r")]


# -- locks ----------------------------------------------------------------------------------------------------


def test_a_held_lock_fails_save_at_once_naming_the_holder(tmp_path):
    small_index().save(str(tmp_path))
    locked = pytest.raises(IndexLockedError, match=rf"another process \(pid {os.getpid()}\)")
    with storage.write_lock(str(tmp_path)), locked:
        small_index(5).save(str(tmp_path))
    assert len(MetaEmbedIndex.load(str(tmp_path))) == 3


def test_index_command_fails_at_once_or_waits_as_long_as_asked_for_a_held_lock(model_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a red circle\na blue square\n")
    output = tmp_path / "index"
    with storage.write_lock(str(output)):
        result = run_cli("index", model_dir, str(corpus), str(output))
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        [line] = error_lines(result)
        assert line.startswith("metaembed index: error: ") and f"another process (pid {os.getpid()})" in line
        assert "--wait" in line

        result = run_cli("index", model_dir, str(corpus), str(output), "--wait", "0.3")
        lines = error_lines(result)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "waiting up to 0.3 s" in lines[0] and f"pid {os.getpid()}" in lines[0]
        assert lines[-1].startswith("metaembed index: error: ") and "after waiting 0 s" in lines[-1]
    assert not (output / "index.json").exists()


# -- failing disks --------------------------------------------------------------------------------------------

SAVE_ON_A_FULL_DISK = textwrap.dedent(
    """
    import json, resource, signal, sys, torch
    sys.path.insert(0, sys.argv[2])
    from metaembed.search.index import MetaEmbedIndex
    index = MetaEmbedIndex(8, 4, "float32")
    index.add(torch.nn.functional.normalize(torch.randn(2000, 4, 8), dim=-1))
    if sys.argv[3] == "ann":
        index.build_ann(num_vectors=4, kind="flat")  # 256 kB, the shards 64 kB each
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # each file: at most 100 kB
    try:
        index.save(sys.argv[1], max_shard_candidates=500 if sys.argv[3] == "ann" else None)
    except BaseException as error:
        print(json.dumps({"type": type(error).__name__, "oserror": isinstance(error, OSError), "message": str(error)}))
    """
)


@pytest.mark.parametrize(
    ("failing", "file_name"), [("shard", "shard-00000-of-00001.safetensors"), ("ann", "ann.faiss")]
)
def test_a_failed_write_is_an_oserror_naming_the_file_and_leaves_the_old_index_alone(tmp_path, failing, file_name):
    folder = tmp_path / "index"
    small_index().save(str(folder))
    before = {name: (folder / name).read_bytes() for name in files_below(folder)}
    result = subprocess.run(
        [sys.executable, "-c", SAVE_ON_A_FULL_DISK, str(folder), str(ROOT), failing], capture_output=True, text=True
    )
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["oserror"], outcome
    assert f"cannot write {folder}" in outcome["message"] and file_name in outcome["message"], outcome
    # Nothing half-written is left (no new generation, no temporary file); the old index is whole.
    assert {name: (folder / name).read_bytes() for name in files_below(folder)} == before
    assert MetaEmbedIndex.load(str(folder)).ids == ["doc-0", "doc-1", "doc-2"]


def test_index_command_on_a_full_disk_prints_one_line_and_leaves_no_partial_shard(model_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"item number {number}\n" for number in range(40)))  # 40 x 8 x 16 floats: 20 kB
    output = tmp_path / "index"
    result = run_cli("index", model_dir, str(corpus), str(output), "--storage", "float32", limit_file_bytes=12_000)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    line = error_lines(result)[-1]
    assert line.startswith("metaembed index: error: ") and "shard-00000-of-00001.safetensors" in line, line
    assert "File too large" in line
    assert files_below(output) == []


# -- values ---------------------------------------------------------------------------------------------------


def test_vectors_not_finite_in_the_storage_dtype_are_refused_naming_the_item():
    index = MetaEmbedIndex(8, 4, "float16")
    large = vectors(3)
    large[1, 2, 5] = 1e30  # finite in float32, inf in float16: every score against it would be NaN
    with pytest.raises(ValueError, match=r"embeddings\[1\] \(id 'b'\) is not finite once stored as float16"):
        index.add(large, ids=["a", "b", "c"])
    assert len(index) == 0
    index.add(vectors(3), ids=["a", "b", "c"])  # nothing of the refused call was kept
    # residual4 keeps each candidate's mean in float16: the same limit applies to it.
    with pytest.raises(ValueError, match=r"embeddings\[1\] \(id 'b'\) is not finite once stored as residual4"):
        MetaEmbedIndex(8, 4, "residual4").add(large, ids=["a", "b", "c"])
    float32 = MetaEmbedIndex(8, 4, "float32")
    float32.add(large, ids=["a", "b", "c"])  # representable there
    doubles = vectors(2).double()
    doubles[0, 0, 0] = 1e300
    with pytest.raises(ValueError, match=r"embeddings\[0\] \(id 3\) is not finite once stored as float32"):
        float32.add(doubles)


def test_metadata_must_be_standard_json_naming_the_key(tmp_path):
    index = MetaEmbedIndex(8, 4)
    for metadata, message in [
        ([{"score": float("nan")}, {}], r"metadata\[0\]\['score'\] is nan: metadata must be standard JSON"),
        ([{}, {"scores": [1.0, float("inf")]}], r"metadata\[1\]\['scores'\]\[1\] is inf"),
        ([-float("inf"), None], r"metadata\[0\] is -inf"),
        ([{1: "a"}, None], r"metadata\[0\] has the key 1: JSON object keys must be strings"),
    ]:
        with pytest.raises((ValueError, TypeError), match=message):
            index.add(vectors(2), metadata=metadata)
    assert len(index) == 0
    index.add(vectors(2), metadata=[{"score": 1.5, "tags": ["x"]}, None])
    index.save(str(tmp_path / "index"))
    sidecars = list((tmp_path / "index").glob("gen-*/shard-*.json"))
    json.loads(sidecars[0].read_text(), parse_constant=lambda constant: pytest.fail(f"{constant} written"))
    # A corpus line of `metaembed index`: Python's json reads NaN, the index must not store it.
    from metaembed.cli import read_corpus

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "ok", "score": 1}\n{"text": "bad", "score": NaN}\n')
    with pytest.raises(ValueError, match=r"corpus\.jsonl:2\['score'\] is nan"):
        read_corpus(str(corpus))


def test_qdrant_refuses_duplicate_ids_in_one_add():
    import qdrant_client

    from metaembed.search.qdrant import MetaEmbedQdrant

    store = MetaEmbedQdrant(qdrant_client.QdrantClient(":memory:"), "metaembed", candidate_vector_counts=[1, 4])
    store.create(dim=8)
    with pytest.raises(ValueError, match=r"ids\[2\] = 'a' repeats ids\[0\]"):
        store.add(vectors(3), ids=["a", "b", "a"])
    assert store.client.count("metaembed", exact=True).count == 0
    store.add(vectors(2), ids=["a", 1])
    store.add(vectors(1, seed=1), ids=["a"])  # a later add replaces the point
    assert store.client.count("metaembed", exact=True).count == 2


def test_a_save_leaves_a_running_index_jobs_generation_alone(tmp_path):
    """`metaembed index` encodes into its own generation before it commits: a save (or another job's commit)
    meanwhile used to delete that generation's shards with the other leftovers, losing the job's work."""
    folder = str(tmp_path / "index")
    index = small_index()
    index.save(folder)
    job = storage.generation_folder(folder, storage.job_generation({"job": "running"}))
    with storage.job_running(job):
        shard = os.path.join(job, "shard-00000-of-00002.safetensors")
        with open(shard, "wb") as file:
            file.write(b"encoded so far")
        index.save(folder)
        assert os.path.exists(shard) and MetaEmbedIndex.load(folder).ids == index.ids
    index.save(folder)  # the job has ended (killed before its commit): its generation is a leftover now
    assert not os.path.exists(job)
