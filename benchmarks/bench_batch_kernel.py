"""A batch of queries through the outer-product kernel (`single_query.batch_scores`, as `MetaEmbedIndex.search`
runs it with numba) against torch's kernel (`METAEMBED_NUMBA=0`), in one run, on one thread (CPU time:
`time.process_time`, so that other work on a shared machine counts less), per storage and budget, with each
one's share of the one-thread bound max(FLOPs / square-matmul rate, stored bytes / read rate) measured in the
same run.

    python benchmarks/bench_batch_kernel.py --num-candidates 10000 --num-queries 32
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_index import best_time, machine_limits, stored_bytes
from synthetic import make_collection

from metaembed.search.index import MetaEmbedIndex


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-candidates", type=int, default=10_000)
    parser.add_argument("--num-queries", type=int, default=32)
    parser.add_argument("--budgets", nargs="+", default=["1,1", "2,4", "4,8", "8,16", "16,64"])
    parser.add_argument("--storages", nargs="+", default=["float32", "float16", "int8", "int4", "residual4"])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    candidates, queries, _ = make_collection(args.num_candidates, args.num_queries)
    gemm, read = machine_limits(args.repeats, time.process_time)
    print(f"one thread: matmul {gemm / 1e9:.0f} GFLOP/s, read {read / 1e9:.1f} GB/s; load {os.getloadavg()[0]:.2f}")
    print("| storage | r_q, r_c | torch ms | kernel ms | torch / kernel | torch share of bound | kernel share |")
    print("|---|---|---|---|---|---|---|")
    for storage in args.storages:
        index = MetaEmbedIndex(candidates.shape[2], candidates.shape[1], storage=storage)
        index.add(candidates)
        for budget in args.budgets:
            r_q, r_c = (int(part) for part in budget.split(","))
            stored = stored_bytes(storage, len(candidates), r_c, candidates.shape[2])
            flops = 2 * len(queries) * r_q * r_c * candidates.shape[2] * len(candidates)
            bound = max(flops / gemm, stored / read)

            def search(r_q=r_q, r_c=r_c, index=index):
                return index.search(queries, r_q, r_c, top_k=10, shortlist_size=None)

            times = {}
            for numba in ("0", "1"):
                os.environ["METAEMBED_NUMBA"] = numba
                first = best_time(search, 1, time.process_time)  # compiles
                # Short searches are repeated for about half a second (the best of them).
                repeats = max(args.repeats, int(0.5 / max(first, 1e-4)))
                times[numba] = best_time(search, repeats, time.process_time)
            os.environ.pop("METAEMBED_NUMBA")
            old, new = times["0"], times["1"]
            print(
                f"| {storage} | {r_q}, {r_c} | {old * 1e3:.1f} | {new * 1e3:.1f} | {old / new:.2f} | "
                f"{bound / old:.2f} | {bound / new:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
