"""MetaEmbedIndex at the machine's limits: exhaustive search per storage type and budget against its bound,
two-stage recall and time, bytes per candidate; optionally the late-interaction peers on the same data.

One run measures, on the same machine and moment:
  - the fp32 GEMM rate (square matmul) and the read bandwidth (a sum over 1 GiB), with `uptime`'s load;
  - per storage (float32, float16, int8, int4, residual4) and budget (r_q, r_c), exhaustive top-10 search for
    one query (median over queries; with numba installed, also through torch's kernel, `METAEMBED_NUMBA=0`) and a
    batch of 32, against the bound max(FLOPs / GEMM rate, stored bytes read / read bandwidth) + the time of a
    top-10 over the scores: ratio = bound / time (1.0 = at the bound). "float32, whole" scores the whole-candidate
    tensor [N, R_c, D] (versions 1-2 of the format) through torch's kernel, for the prefix-block layout's effect;
  - two-stage search (the default when an ANN index exists) against exhaustive float32 MaxSim: recall@10, time;
  - bytes per candidate of each storage (safetensors shards as saved, and the ANN file) and the build time
    (quantising + HNSW);
  - with --peer-python, the peers of benchmarks/peers.py on the same vectors (fast-plaid, PyLate's PLAID and
    Voyager indexes and its exhaustive MaxSim, colsearch's index and exhaustive MaxSim; each skipped with its
    message where it does not run): build time, bytes per candidate, top-10 time (batch and one query),
    recall@10 against exhaustive float32 MaxSim at (16,64), and their ratios to ours.

    python benchmarks/bench_index.py --num-candidates 20000 --threads 2
    python benchmarks/bench_index.py --num-candidates 10000 --peer-python PEERS/bin/python \
        fast-plaid=PLAID/bin/python --plot a.png --peer-plot b.png

The peers pin their own torch (fast-plaid's wheels are built per torch release: 1.7.0.2110 for torch 2.11.0),
so they live in their own environments; PyLate 1.6.0 pins fast-plaid 1.4.6, hence a second one for the newest
fast-plaid:

    python -m venv PEERS && PEERS/bin/pip install torch==2.11.0 pylate colsearch voyager latence-shard-engine \
        latence-hnsw
    python -m venv PLAID && PLAID/bin/pip install torch==2.11.0 "fast-plaid==1.7.0.2110"

Data: `synthetic.make_collection` (clustered candidates, a third of the queries with an uninformative first
vector, so a first-vector shortlist is not flattered).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from synthetic import make_collection

from metaembed.search import single_query
from metaembed.search.index import MetaEmbedIndex
from scoring_metaembed import late_interaction_scores

BYTES_PER_ELEMENT = {"float32": 4.0, "float16": 2.0, "int8": 1.0, "int4": 0.5, "residual4": 0.5}
PEERS = ["fast-plaid", "pylate-plaid", "pylate-voyager", "colsearch", "pylate-maxsim", "colsearch-maxsim"]


def stored_bytes(storage: str, num_candidates: int, num_vectors: int, dim: int) -> float:
    """Bytes a search at r_c = `num_vectors` reads: codes, per-vector scales, residual4's float16 offsets."""
    scales = 4 if storage in ("int8", "int4", "residual4") else 0
    offsets = 2 * dim if storage == "residual4" else 0
    return num_candidates * (num_vectors * (dim * BYTES_PER_ELEMENT[storage] + scales) + offsets)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-candidates", type=int, default=20_000)
    parser.add_argument("--num-queries", type=int, default=32)
    parser.add_argument("--single-queries", type=int, default=5, help="queries timed one at a time (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budgets", nargs="+", default=["1,1", "4,8", "16,64"])
    parser.add_argument("--storages", nargs="+", default=["float32", "float16", "int8", "int4", "residual4"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--peer-python",
        nargs="+",
        default=None,
        metavar="[PEER=]PYTHON",
        help="python of the peers' environment (benchmarks/peers.py); PEER=PYTHON runs that peer with another one",
    )
    parser.add_argument("--peers", nargs="+", default=PEERS, choices=PEERS)
    parser.add_argument("--peer-timeout", type=float, default=900, help="seconds each peer may take, build included")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--plot", default=None, help="write the ratios to the bound as this PNG")
    parser.add_argument("--peer-plot", default=None, help="write recall against time and bytes of all as this PNG")
    parser.add_argument("--from-json", default=None, help="only plot the results a --json run wrote")
    return parser.parse_args()


def best_time(function, repeats: int, clock=time.perf_counter) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        function()
        best = min(best, clock() - start)
    return best


def machine_limits(repeats: int, clock=time.perf_counter) -> tuple[float, float]:
    """(fp32 GEMM FLOP/s, read bytes/s), best of `repeats` each (timed by `clock`); the read rate is the fastest
    of a sum and a matrix-vector product over 1 GiB (beyond the caches), through torch and numpy."""
    left, right = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(left, right)
    gemm = 2 * 2048**3 / best_time(lambda: torch.mm(left, right), repeats, clock)
    big = torch.ones(2**28)
    matrix, vector = big.view(-1, 128), torch.ones(128)
    array, matrix_array, vector_array = big.numpy(), matrix.numpy(), vector.numpy()
    readers = [
        lambda: big.sum(),
        lambda: numpy.add.reduce(array),
        lambda: torch.mv(matrix, vector),
        lambda: matrix_array @ vector_array,
    ]
    read = big.numel() * 4 / min(best_time(reader, repeats, clock) for reader in readers)
    return gemm, read


def top_10_seconds(num_queries: int, num_candidates: int, repeats: int) -> float:
    """Time of the top-10 of `[num_queries, num_candidates]` float32 scores: part of any search's bound."""
    scores = torch.randn(num_queries, num_candidates)
    return best_time(lambda: scores.topk(10, dim=1), repeats)


def one_query_seconds(search, queries: torch.Tensor, budget: tuple[int, int], count: int) -> float:
    """Median over `count` queries searched one at a time."""
    times = [best_time(lambda row=row: search(queries[row : row + 1], budget), 1) for row in range(count)]
    return sorted(times)[len(times) // 2]


def load_average() -> str:
    with open("/proc/loadavg") as file:
        return " ".join(file.read().split()[:3])


def main() -> None:
    args = parse_args()
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        if args.plot:
            save_plot(results, args.plot)
        if args.peer_plot:
            save_peer_plot(results, args.peer_plot)
        return
    torch.set_num_threads(args.threads)
    budgets = [tuple(int(part) for part in text.split(",")) for text in args.budgets]
    print(f"torch {torch.__version__}, {args.threads} threads; load average at start {load_average()}")
    candidates, queries, _ = make_collection(args.num_candidates, max(args.num_queries, args.single_queries))
    queries = queries[: args.num_queries]
    num_candidates, num_vectors, dim = candidates.shape
    gemm, read = machine_limits(args.repeats)
    print(f"N={num_candidates} R_c={num_vectors} D={dim}; GEMM {gemm / 1e9:.0f} GFLOP/s, read {read / 1e9:.1f} GB/s")
    results: dict = {"gemm": gemm, "read": read, "rows": [], "two_stage": [], "sizes": {}, "peers": []}
    results["setting"] = {"candidates": num_candidates, "queries": len(queries), "threads": args.threads}

    exact = MetaEmbedIndex(dim, num_vectors, "float32")
    exact.add(candidates)
    reference = exact.search(queries, 16, 64, top_k=10, shortlist_size=None)

    print(
        "\n| storage | bytes / candidate | budget | 1 query ms | torch kernel ms | bound ms | ratio | 32 queries ms "
        "| bound ms | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    top_10 = {count: top_10_seconds(count, num_candidates, args.repeats) for count in (1, len(queries))}
    indexes = {}
    for storage in ["float32, whole", *args.storages]:
        if storage == "float32, whole":

            def search(batch, budget):
                return late_interaction_scores(batch, candidates, *budget, top_k=10)

        else:
            index = MetaEmbedIndex(dim, num_vectors, storage)
            start = time.perf_counter()
            index.add(candidates)
            results.setdefault("add", {})[storage] = time.perf_counter() - start
            indexes[storage] = index
            with tempfile.TemporaryDirectory() as folder:
                index.save(folder)
                size = sum(path.stat().st_size for path in Path(folder).rglob("*.safetensors"))
            results["sizes"][storage] = size / num_candidates

            def search(batch, budget, index=index):
                return index.search(batch, *budget, top_k=10, shortlist_size=None)

        per_candidate = results["sizes"].get(storage, num_vectors * dim * 4)
        for budget in budgets:
            r_q, r_c = budget
            stored = stored_bytes("float32" if storage == "float32, whole" else storage, num_candidates, r_c, dim)
            cells = []
            for batch in (queries[:1], queries):
                search(batch, budget)  # warm-up
                if len(batch) == 1:
                    seconds = one_query_seconds(search, queries, budget, args.single_queries)
                else:
                    seconds = best_time(lambda batch=batch, budget=budget: search(batch, budget), args.repeats)
                compute = 2 * len(batch) * r_q * num_candidates * r_c * dim / gemm
                cells.append((seconds, max(compute, stored / read) + top_10[len(batch)]))
            # One query through torch's kernel too, for the one-query kernel's effect (single_query.py).
            torch_kernel = None
            if storage != "float32, whole" and single_query.available():
                os.environ["METAEMBED_NUMBA"] = "0"
                torch_kernel = one_query_seconds(search, queries, budget, args.single_queries)
                del os.environ["METAEMBED_NUMBA"]
            results["rows"].append({"storage": storage, "budget": budget, "cells": cells, "torch_kernel": torch_kernel})
            (one, one_bound), (batch_seconds, batch_bound) = cells
            print(
                f"| {storage} | {per_candidate:.0f} | ({r_q},{r_c}) | {one * 1e3:.2f} | "
                + ("-" if torch_kernel is None else f"{torch_kernel * 1e3:.2f}")
                + f" | {one_bound * 1e3:.2f} | {one_bound / one:.2f} | {batch_seconds * 1e3:.2f} | "
                f"{batch_bound * 1e3:.2f} | {batch_bound / batch_seconds:.2f} |"
            )

    print(
        "\nTwo-stage (default: HNSW over first vectors, shortlist max(100, 10 k) per query vector, first 4 query"
        " vectors), (16,64), recall@10 against exhaustive float32"
    )
    print(
        "| storage | build s (quantise + HNSW) | bytes / candidate (+ ANN) | recall@10 | hard queries "
        "| exhaustive recall@10 | ms / query (batch) | ms (one query) | exhaustive ms / query (batch) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    hard = torch.arange(len(queries)) % 3 == 2
    for storage, index in indexes.items():
        start = time.perf_counter()
        index.build_ann()
        build = time.perf_counter() - start + results["add"][storage]
        with tempfile.TemporaryDirectory() as folder:
            index.save(folder)
            ann_bytes = sum(path.stat().st_size for path in Path(folder).rglob("ann.faiss")) / num_candidates
        found = index.search(queries, 16, 64, top_k=10)
        seconds = best_time(lambda index=index: index.search(queries, 16, 64, top_k=10), args.repeats)
        one = sorted(
            best_time(lambda row=row, index=index: index.search(queries[row : row + 1], 16, 64, top_k=10), 1)
            for row in range(args.single_queries)
        )[args.single_queries // 2]
        overlap = recall_at_10(found.indices, reference.indices)
        exhaustive_recall = recall_at_10(index.search(queries, 16, 64, shortlist_size=None).indices, reference.indices)
        exhaustive = next(row for row in results["rows"] if row["storage"] == storage and row["budget"] == (16, 64))
        results["two_stage"].append(
            {
                "storage": storage,
                "build": build,
                "bytes": results["sizes"][storage],
                "ann_bytes": ann_bytes,
                "recall": float(overlap.mean()),
                "hard": float(overlap[hard].mean()),
                "exhaustive_recall": float(exhaustive_recall.mean()),
                "batch": seconds / len(queries),
                "one": one,
                "exhaustive_batch": exhaustive["cells"][1][0] / len(queries),
                "exhaustive_one": exhaustive["cells"][0][0],
            }
        )
        print(
            f"| {storage} | {build:.1f} | {results['sizes'][storage]:.0f} (+ {ann_bytes:.0f}) | "
            f"{overlap.mean():.3f} | {overlap[hard].mean():.3f} | {exhaustive_recall.mean():.3f} | "
            f"{seconds / len(queries) * 1e3:.2f} | {one * 1e3:.2f} | "
            f"{exhaustive['cells'][1][0] / len(queries) * 1e3:.2f} |"
        )
    if args.peer_python:
        run_peers(args, candidates, queries, reference, results)
    print(f"\nload average at end {load_average()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, default=str))
    if args.plot:
        save_plot(json.loads(json.dumps(results, default=str)), args.plot)
    if args.peer_plot and results["peers"]:
        save_peer_plot(json.loads(json.dumps(results, default=str)), args.peer_plot)


def recall_at_10(found: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per query, the share of the true top-10 found (positions; -1 pads never match)."""
    return torch.tensor([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(found, truth)])


def save_plot(results: dict, path: str) -> None:
    """Ratio to the bound per storage and budget, one query and 32 queries side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    storages = list(dict.fromkeys(row["storage"] for row in results["rows"]))
    budgets = list(dict.fromkeys(str(tuple(row["budget"])) for row in results["rows"]))
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    width = 0.8 / len(storages)
    for cell, (axis, title) in enumerate(zip(axes, ("one query", "32 queries"))):
        for offset, storage in enumerate(storages):
            ratios = [
                row["cells"][cell][1] / row["cells"][cell][0]
                for budget in budgets
                for row in results["rows"]
                if row["storage"] == storage and str(tuple(row["budget"])) == budget
            ]
            axis.bar([i + offset * width for i in range(len(budgets))], ratios, width, label=storage)
        axis.axhline(0.8, color="black", ls="--", lw=0.8)
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(budgets))], budgets)
        axis.set_xlabel("budget (r_q, r_c)")
        axis.set_title(f"{title}: bound / time")
    axes[0].set_ylabel("ratio to max(compute, read) bound")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"plot: {path}")


def run_peers(args, candidates, queries, reference, results) -> None:
    """Each peer in the peers' environment on the same vectors (benchmarks/peers.py), against ours: index peers
    against our default two-stage search on float16 (`metaembed index`'s default) and on residual4 (the compact
    storage), exhaustive peers against our exhaustive float32 search, all at (16,64). Ratios > 1: ours is faster
    or smaller."""
    from safetensors.torch import load_file, save_file

    ours = {row["storage"]: row for row in results["two_stage"]}
    print(
        "\nPeers on the same vectors, (16,64) top-10, recall@10 against exhaustive float32 MaxSim; ratios = peer / ours"
    )
    print(
        "| peer | version | build s | bytes / candidate | ms / query (batch) | ms (one query) | recall@10 "
        "| against | build | bytes | batch | one query |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        save_file(
            {"candidates": candidates.contiguous(), "queries": queries.contiguous()}, f"{folder}/data.safetensors"
        )
        pythons = dict(entry.split("=", 1) if "=" in entry else ("", entry) for entry in args.peer_python)
        for peer in args.peers:
            python = pythons.get(peer, pythons.get(""))
            if python is None:
                print(f"| {peer} | skipped: no --peer-python for it |")
                continue
            command = [python, str(Path(__file__).with_name("peers.py")), folder, str(args.threads), peer]
            try:
                completed = subprocess.run(command, capture_output=True, text=True, timeout=args.peer_timeout)
            except subprocess.TimeoutExpired:
                print(f"| {peer} | skipped: not done after {args.peer_timeout:.0f} s (--peer-timeout) |")
                continue
            if completed.returncode != 0:
                lines = completed.stderr.strip().splitlines() or ["no message"]
                last = next((line for line in reversed(lines) if "Error" in line), lines[-1]).strip()
                print(f"| {peer} | skipped: exit status {completed.returncode} ({last[:160]}) |")
                continue
            report = json.loads(completed.stdout.strip().splitlines()[-1])
            found = load_file(f"{folder}/{peer}.safetensors")["indices"]
            report["recall"] = float(recall_at_10(found, reference.indices).mean())
            exhaustive = report["bytes_per_candidate"] is None
            against = ["float32"] if exhaustive else [name for name in ("float16", "residual4") if name in ours]
            report["ratios"] = {}
            for name in against:
                mine = ours[name]
                ratios = {
                    "build": None if exhaustive else report["build"] / mine["build"],
                    "bytes": None
                    if exhaustive
                    else report["bytes_per_candidate"] / (mine["bytes"] + mine["ann_bytes"]),
                    "batch": report["batch"] / len(queries) / mine["exhaustive_batch" if exhaustive else "batch"],
                    "one": report["one"] / mine["exhaustive_one" if exhaustive else "one"],
                }
                report["ratios"][name] = ratios
                label = f"ours {name} {'exhaustive' if exhaustive else 'two-stage'}"
                cells = " | ".join("-" if value is None else f"{value:.2f}" for value in ratios.values())
                size = "-" if exhaustive else f"{report['bytes_per_candidate']:.0f}"
                print(
                    f"| {peer} | {report['version']} | {report['build']:.1f} | {size} | "
                    f"{report['batch'] / len(queries) * 1e3:.2f} | {report['one'] * 1e3:.2f} | {report['recall']:.3f} "
                    f"| {label} | {cells} |"
                )
            results["peers"].append(report)


def save_peer_plot(results: dict, path: str) -> None:
    """Recall@10 against ms per query (batch, log scale) for our storages (two-stage, and exhaustive float32) and
    the peers, each point labelled with its bytes per candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    queries = results["setting"]["queries"]
    points = []  # (label, ms per query, recall, colour, marker)
    for row in results["two_stage"]:
        size = (row["bytes"] + row["ann_bytes"]) / 1e3
        points.append((f"ours {row['storage']} ({size:.1f} KB)", row["batch"] * 1e3, row["recall"], "tab:blue", "o"))
    exhaustive = next((row for row in results["two_stage"] if row["storage"] == "float32"), None)
    if exhaustive is not None:
        milliseconds = exhaustive["exhaustive_batch"] * 1e3
        points.append(("ours float32, exhaustive", milliseconds, 1.0, "tab:blue", "D"))
    for report in results["peers"]:
        size = report["bytes_per_candidate"]
        label = f"{report['peer']} ({'exhaustive' if size is None else f'{size / 1e3:.1f} KB'})"
        points.append((label, report["batch"] / queries * 1e3, report["recall"], "tab:red", "s"))
    figure, axis = plt.subplots(figsize=(8, 5))
    for number, (label, milliseconds, recall, colour, marker) in enumerate(sorted(points, key=lambda p: p[1])):
        axis.scatter(milliseconds, recall, color=colour, marker=marker)
        # Alternate label heights: points at equal recall (1.000) would print over each other.
        axis.annotate(
            label, (milliseconds, recall), xytext=(4, (-12, 4, 12)[number % 3]), textcoords="offset points", fontsize=7
        )
    axis.set_xscale("log")
    axis.set_xlabel(f"ms per query (batch of {queries}), (16,64) top-10")
    axis.set_ylabel("recall@10 against exhaustive float32 MaxSim")
    setting = results["setting"]
    axis.set_title(f"{setting['candidates']:,} candidates, {setting['threads']} threads: ours (blue), peers (red)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
