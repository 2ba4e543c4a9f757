"""Crash consistency of `MetaEmbedIndex.save` over an existing index: a failure at every file operation, and
processes killed (SIGKILL) or interrupted (SIGINT) at random moments. After each trial the folder loads as exactly
the old or exactly the new index; after the next successful save nothing else of the format is left."""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import random
import signal
import time

import faiss
import pytest
import torch
import torch.nn.functional as F

from metaembed.search import storage
from metaembed.search.index import MetaEmbedIndex

DIM, NUM_VECTORS = 8, 4


def make_index(seed: int, count: int, storage_dtype: str, ann: bool) -> MetaEmbedIndex:
    generator = torch.Generator().manual_seed(seed)
    index = MetaEmbedIndex(DIM, NUM_VECTORS, storage_dtype)
    vectors = F.normalize(torch.randn(count, NUM_VECTORS, DIM, generator=generator), dim=-1)
    half = count // 2
    index.add(vectors[:half], [f"{seed}-{i}" for i in range(half)], [{"seed": seed, "n": i} for i in range(half)])
    index.add(vectors[half:], [f"{seed}-{i}" for i in range(half, count)])
    if ann:
        index.build_ann(kind="flat")
    return index


@pytest.fixture(autouse=True)
def no_disk_flush(monkeypatch):
    """fsync is still called (and counted, and failed by the injection) but does not wait for the disk: what it
    guards against, power loss, is beyond a process-level test, and the trials run many times faster."""
    monkeypatch.setattr(os, "fsync", lambda descriptor: None)


@pytest.fixture(scope="module", params=["int8", "int4", "residual4"])
def versions(request) -> tuple[MetaEmbedIndex, MetaEmbedIndex]:
    """(old, new): different sizes, shard counts, storage types (each quantised one), metadata and ANN files."""
    return make_index(1, 30, "float32", ann=False), make_index(2, 42, request.param, ann=True)


def state_of(index: MetaEmbedIndex) -> tuple:
    everything = range(len(index))
    return (
        index.storage,
        index.ids,
        [index.metadata(position) for position in everything],
        index.get_embeddings(everything).tolist(),
        None if index._ann is None else index._ann.ntotal,
    )


def loads_as_old_or_new(folder: str, old: MetaEmbedIndex, new: MetaEmbedIndex) -> str:
    state = state_of(MetaEmbedIndex.load(folder))
    assert state in (state_of(old), state_of(new))
    return "old" if state == state_of(old) else "new"


def save_and_check_clean(index: MetaEmbedIndex, folder: str) -> None:
    """A successful save leaves exactly the manifest, the lock file and the generation it names."""
    index.save(folder, max_shard_candidates=16)
    with open(os.path.join(folder, "index.json"), encoding="utf-8") as file:
        manifest = json.load(file)
    generation = manifest["generation"]
    assert sorted(os.listdir(folder)) == sorted(["index.json", "index.lock", generation])
    expected = {entry["name"] + suffix for entry in manifest["shards"] for suffix in (".safetensors", ".json")}
    if manifest["ann_file"]:
        expected.add("ann.faiss")
    assert set(os.listdir(os.path.join(folder, generation))) == expected


class InjectedFailure(Exception):
    """Not an OSError, so no error handling of the code under test can mistake it for a harmless one: each
    injection stops the save exactly there, as an interrupt would."""


class FailAtOperation:
    """Patches every file operation `save` can make (create, write, fsync, chmod, link, rename, remove, mkdir,
    safetensors and faiss writers) to count calls and raise at call number `fail_at` (never, if None)."""

    OS_FUNCTIONS = ("replace", "rename", "remove", "unlink", "rmdir", "mkdir", "makedirs", "link", "fsync", "chmod")

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_at: int | None) -> None:
        self.calls = 0
        self.fail_at = fail_at
        for name in self.OS_FUNCTIONS:
            monkeypatch.setattr(os, name, self.counted(getattr(os, name)))
        monkeypatch.setattr(os, "open", self.counted(os.open, lambda path, flags, *rest: flags & os.O_CREAT))
        writes = lambda file, mode="r", *rest, **options: set(mode) & set("wxa+")  # noqa: E731
        monkeypatch.setattr(builtins, "open", self.counted(builtins.open, writes))
        monkeypatch.setattr(storage, "save_file", self.counted(storage.save_file))
        monkeypatch.setattr(faiss, "write_index", self.counted(faiss.write_index))

    def counted(self, function, counts=lambda *arguments, **options: True):
        def wrapper(*arguments, **options):
            if counts(*arguments, **options):
                self.calls += 1
                if self.calls == self.fail_at:
                    raise InjectedFailure(f"injected failure at file operation {self.calls}")
            return function(*arguments, **options)

        return wrapper


def test_a_failure_at_every_file_operation_leaves_the_old_or_the_new_index(versions, tmp_path, monkeypatch):
    old, new = versions
    folder = str(tmp_path / "index")
    save_and_check_clean(old, folder)
    with monkeypatch.context() as patch:
        counter = FailAtOperation(patch, fail_at=None)
        new.save(folder, max_shard_candidates=16)
    operations = counter.calls
    assert operations > 20  # every shard file, the ANN file, the manifest and the clean-up
    outcomes = []
    for fail_at in range(1, operations + 1):
        save_and_check_clean(old, folder)
        with monkeypatch.context() as patch:
            FailAtOperation(patch, fail_at)
            with contextlib.suppress(InjectedFailure):
                new.save(folder, max_shard_candidates=16)
        outcomes.append(loads_as_old_or_new(folder, old, new))
        save_and_check_clean(new, folder)  # and the next save cleans up whatever the failure left
        assert loads_as_old_or_new(folder, old, new) == "new"
    # Failures before the manifest switch keep the old index, failures after it (clean-up) the new one: both
    # occur, at every point of the save.
    assert outcomes[0] == "old" and outcomes[-1] == "new"
    assert outcomes == sorted(outcomes, key=["old", "new"].index)


def save_in_child(index: MetaEmbedIndex, folder: str, kill_signal: int | None = None, delay: float = 0.0):
    """Save `index` in a forked process that, with `kill_signal`, sends itself that signal after `delay` seconds
    (a timer: wherever the save is then). Returns (wait status, seconds the save took or None if it was cut)."""
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(reader)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if kill_signal is not None:
                signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), kill_signal))
                signal.setitimer(signal.ITIMER_REAL, max(delay, 1e-6))
            start = time.perf_counter()
            index.save(folder, max_shard_candidates=16)
            duration = time.perf_counter() - start
            signal.setitimer(signal.ITIMER_REAL, 0)
            os.write(writer, repr(duration).encode())
        except BaseException:  # KeyboardInterrupt from SIGINT
            os._exit(1)
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        reported = pipe.read()
    _, status = os.waitpid(child, 0)
    return status, float(reported) if reported else None


@pytest.mark.parametrize("kill_signal", [signal.SIGKILL, signal.SIGINT])
def test_processes_killed_at_random_moments_leave_the_old_or_the_new_index(versions, tmp_path, kill_signal):
    old, new = versions
    folder = str(tmp_path / "index")
    # How long one save takes in such a process: the kills are spread over that span (and a little past it).
    durations = []
    for _ in range(3):
        save_and_check_clean(old, folder)
        durations.append(save_in_child(new, folder)[1])
    span = 1.2 * max(durations)
    rng = random.Random(kill_signal)
    # Where the kills land depends on the machine's load, so no mix of outcomes is required here: that every
    # point of a save gives the old or the new index is covered deterministically by the injection test above.
    for _ in range(30):
        save_and_check_clean(old, folder)
        status, finished = save_in_child(new, folder, kill_signal, rng.uniform(0.0, span))
        outcome = loads_as_old_or_new(folder, old, new)
        if finished is None:  # cut short by the signal, not by anything else
            assert os.WTERMSIG(status) == kill_signal if os.WIFSIGNALED(status) else kill_signal == signal.SIGINT
        else:
            assert outcome == "new"
    save_and_check_clean(new, folder)


def test_a_reader_during_saves_opens_the_old_or_the_new_index(versions, tmp_path):
    old, new = versions
    folder = str(tmp_path / "index")
    save_and_check_clean(old, folder)
    child = os.fork()
    if child == 0:  # a writer switching versions back and forth (each save removes the version before)
        try:
            for _ in range(10):
                for version in (new, old):
                    version.save(folder, max_shard_candidates=16)
        except BaseException:
            os._exit(1)
        os._exit(0)
    loads, (finished, status) = [], (0, 0)
    while not finished:
        loads.append(loads_as_old_or_new(folder, old, new))
        finished, status = os.waitpid(child, os.WNOHANG)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and set(loads) <= {"old", "new"}
    assert loads_as_old_or_new(folder, old, new) == "old"
