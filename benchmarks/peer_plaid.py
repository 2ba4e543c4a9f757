"""fast-plaid on the vectors of bench_index.py, in an environment that has it (run by bench_index.py).

    python peer_plaid.py FOLDER THREADS   # reads FOLDER/data.safetensors, writes FOLDER/results.safetensors

Prints one JSON line: version, build seconds, bytes per candidate (the index folder), batch and one-query seconds.
"""

from __future__ import annotations

import json
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch
from fast_plaid import search
from safetensors.torch import load_file, save_file


def main() -> None:
    folder, threads = Path(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(threads)
    data = load_file(str(folder / "data.safetensors"))
    candidates, queries = data["candidates"], data["queries"][:, :16]
    start = time.perf_counter()
    index = search.FastPlaid(index=str(folder / "plaid"), device="cpu")
    index.create(documents_embeddings=list(candidates))
    build = time.perf_counter() - start
    size = sum(path.stat().st_size for path in (folder / "plaid").rglob("*") if path.is_file())
    index.search(queries_embeddings=queries[:1], top_k=10, show_progress=False)  # warm-up
    start = time.perf_counter()
    found = index.search(queries_embeddings=queries, top_k=10, show_progress=False)
    batch = time.perf_counter() - start
    ones = []
    for row in range(min(5, len(queries))):
        start = time.perf_counter()
        index.search(queries_embeddings=queries[row : row + 1], top_k=10, show_progress=False)
        ones.append(time.perf_counter() - start)
    indices = torch.tensor([[hit[0] for hit in row] + [-1] * (10 - len(row)) for row in found])
    save_file({"indices": indices}, str(folder / "results.safetensors"))
    report = {
        "version": version("fast-plaid"),
        "build": build,
        "bytes_per_candidate": size / len(candidates),
        "batch": batch,
        "one": sorted(ones)[len(ones) // 2],
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
