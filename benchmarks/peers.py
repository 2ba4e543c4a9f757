"""The late-interaction peers on the vectors of bench_index.py, each in an environment that has it (run by
bench_index.py with --peer-python; the peers pin their own torch, so they live in a separate virtual environment).

    python peers.py FOLDER THREADS PEER   # reads FOLDER/data.safetensors, writes FOLDER/PEER.safetensors

PEER is one of:
  fast-plaid        fast-plaid's PLAID index (its defaults), top-10 search
  pylate-plaid      PyLate's `indexes.PLAID` (fast-plaid with PyLate's defaults), top-10 search
  pylate-voyager    PyLate's `indexes.Voyager` (HNSW over every vector) then PyLate's MaxSim rerank of what it finds
  pylate-maxsim     PyLate's exhaustive `scores.colbert_scores` over every candidate (1,024 at a time), top-10
  colsearch         colsearch's `Index` (its defaults), top-10 search
  colsearch-maxsim  colsearch's exhaustive `fast_colbert_scores` over every candidate (1,024 at a time), top-10

Prints one JSON line: version, build seconds (0 for the exhaustive ones), bytes per candidate of the index folder
(None for the exhaustive ones), batch and one-query seconds (median of 5). Exits with status 3 and a message on
stderr when the peer is not installed.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TOP_K = 10
_EXHAUSTIVE_CHUNK = 1024


def folder_bytes(path: Path) -> int:
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def exhaustive(score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], candidates: torch.Tensor):
    """Top-10 of a peer's all-to-all MaxSim, over chunks of candidates (its [Q, N] scores at once would not fit)."""

    def search(queries: torch.Tensor) -> list[list[int]]:
        scores = torch.cat(
            [
                score(queries, candidates[start : start + _EXHAUSTIVE_CHUNK]).float()
                for start in range(0, len(candidates), _EXHAUSTIVE_CHUNK)
            ],
            dim=1,
        )
        return scores.topk(TOP_K, dim=1).indices.tolist()

    return search


def build(peer: str, folder: Path, candidates: torch.Tensor):
    """(package whose version is reported, search function queries -> top-10 positions, index folder or None)."""
    if peer == "fast-plaid":
        from fast_plaid import search as fast_plaid_search

        index = fast_plaid_search.FastPlaid(index=str(folder / "index"), device="cpu")
        index.create(documents_embeddings=list(candidates))

        def run(queries):
            found = index.search(queries_embeddings=queries, top_k=TOP_K, show_progress=False)
            return [[hit[0] for hit in row] for row in found]

        return "fast-plaid", run, folder / "index"
    if peer in ("pylate-plaid", "pylate-voyager"):
        from pylate import indexes

        ids = [str(position) for position in range(len(candidates))]
        if peer == "pylate-plaid":
            index = indexes.PLAID(
                index_folder=str(folder / "index"), index_name="bench", override=True, show_progress=False, device="cpu"
            )
            index.add_documents(documents_ids=ids, documents_embeddings=list(candidates))

            def run(queries):
                return [[int(hit["id"]) for hit in row] for row in index(queries, k=TOP_K)]

            return "pylate", run, folder / "index"
        from pylate import rank

        index = indexes.Voyager(index_folder=str(folder / "index"), index_name="bench", override=True)
        index.add_documents(documents_ids=ids, documents_embeddings=list(candidates.numpy()))

        def run(queries):
            # PyLate's retrieve pipeline: the documents owning each query vector's 100 nearest vectors (its
            # k_token default), reranked by MaxSim.
            found = index(queries.numpy(), k=100)["documents_ids"]
            rows = [[int(identifier) for identifier in dict.fromkeys(itertools.chain(*row))] for row in found]
            reranked = rank.rerank(
                documents_ids=rows,
                queries_embeddings=list(queries),
                documents_embeddings=[[candidates[position] for position in row] for row in rows],
            )
            return [[int(hit["id"]) for hit in row[:TOP_K]] for row in reranked]

        return "voyager", run, folder / "index"
    if peer == "pylate-maxsim":
        from pylate import scores

        return "pylate", exhaustive(scores.colbert_scores, candidates), None
    if peer == "colsearch":
        import colsearch

        index = colsearch.Index(str(folder / "index"), dim=candidates.shape[2], device="cpu")
        index.add(candidates.numpy(), ids=list(range(len(candidates))))
        index.flush()  # seals the added documents into its compressed shards (else a brute-force memtable)

        def run(queries):
            found = index.search_batch(list(queries.numpy()), k=TOP_K)
            return [[result.doc_id for result in row] for row in found]

        return "colsearch", run, folder / "index"
    if peer == "colsearch-maxsim":
        from colsearch import fast_colbert_scores

        return "colsearch", exhaustive(fast_colbert_scores, candidates), None
    raise SystemExit(f"unknown peer {peer!r}")


def main() -> None:
    folder, threads, peer = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(threads)
    data = load_file(str(folder / "data.safetensors"))
    candidates, queries = data["candidates"], data["queries"][:, :16].contiguous()
    start = time.perf_counter()
    try:
        package, search, index_folder = build(peer, folder / peer, candidates)
        package_version = version(package)
    except (ImportError, PackageNotFoundError) as error:
        print(f"{peer} is not installed here ({error})", file=sys.stderr)
        raise SystemExit(3) from None
    seconds_to_build = time.perf_counter() - start if index_folder is not None else 0.0
    search(queries[:1])  # warm-up
    start = time.perf_counter()
    found = search(queries)
    batch = time.perf_counter() - start
    ones = []
    for row in range(min(5, len(queries))):
        start = time.perf_counter()
        search(queries[row : row + 1])
        ones.append(time.perf_counter() - start)
    indices = torch.tensor([row + [-1] * (TOP_K - len(row)) for row in found])
    save_file({"indices": indices}, str(folder / f"{peer}.safetensors"))
    report = {
        "peer": peer,
        "version": package_version,
        "build": seconds_to_build,
        "bytes_per_candidate": None if index_folder is None else folder_bytes(index_folder) / len(candidates),
        "batch": batch,
        "one": sorted(ones)[len(ones) // 2],
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
