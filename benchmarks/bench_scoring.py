"""Benchmark of late_interaction_scores against a big square GEMM and a plain chunked matmul + amax + sum.

One run measures, on the same inputs and machine:
  (a) a square fp32 matmul: the throughput ceiling of this device, in GFLOP/s;
  (b) "plain": chunked `queries @ chunk.T`, then amax over candidate vectors and sum over query vectors,
      with a fresh intermediate per chunk of --plain-chunk-size candidates (the obvious implementation);
  (c) late_interaction_scores with its default chunking;
for each budget (r_q, r_c), with FLOPs = 2 * Q * r_q * N * r_c * D, and the peak extra memory of (b) and
(c) at N candidates. On CPU that is the resident-set high-water mark (VmHWM in /proc/self/status, Linux)
of a fresh subprocess after the call, minus its RSS (VmRSS) just before the call; on CUDA it is
torch.cuda.max_memory_allocated minus the memory allocated before the call. Both include the [Q, N]
float32 result.

    python benchmarks/bench_scoring.py                    # the paper's setting: 100k candidates, 32 queries
    python benchmarks/bench_scoring.py --num-candidates 20000 --device cuda

The candidates are random L2-normalised blocks repeated to fill N items (scoring speed does not depend on
the values, and filling gigabytes with fresh random numbers would take longer than the benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from scoring_metaembed import late_interaction_scores

_RANDOM_BLOCK_CANDIDATES = 256


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-candidates", type=int, default=100_000)
    parser.add_argument("--num-queries", type=int, default=32)
    parser.add_argument("--query-vectors", type=int, default=16, help="R_q stored per query")
    parser.add_argument("--candidate-vectors", type=int, default=64, help="R_c stored per candidate")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument(
        "--budgets", nargs="+", default=["1,1", "2,4", "4,8", "8,16", "16,64"], help="budgets r_q,r_c to time"
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--square-size", type=int, default=None, help="default 4096 on CPU, 8192 on GPU")
    parser.add_argument("--plain-chunk-size", type=int, default=1024, help="candidates per chunk of (b)")
    parser.add_argument("--repeats", type=int, default=3, help="at most this many timed runs (best counts)")
    parser.add_argument("--time-limit", type=float, default=4.0, help="stop repeating a budget after this many seconds")
    parser.add_argument("--skip-memory", action="store_true", help="do not measure peak memory")
    parser.add_argument(
        "--with-sentence-transformers",
        action="store_true",
        help="also time sentence_transformers' util.maxsim",
    )
    parser.add_argument(
        "--colpali-python",
        default=None,
        help="python of a virtualenv with colpali-engine: also time its score_multi_vector (peer_colpali.py)",
    )
    parser.add_argument("--plot", default=None, help="write throughput per budget (and memory) as this PNG")
    parser.add_argument(
        "--memory-candidates",
        type=int,
        nargs="*",
        default=[],
        help="also measure peak extra memory at (16,64) for these candidate counts (for the plot)",
    )
    # Internal: one memory measurement in a fresh process (see measure_cpu_memory).
    parser.add_argument("--memory-probe", nargs=2, metavar=("METHOD", "BUDGET"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def parse_budget(text: str) -> tuple[int, int]:
    num_query_vectors, num_candidate_vectors = (int(part) for part in text.split(","))
    return num_query_vectors, num_candidate_vectors


def make_inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries [Q, R_q, D] and candidates [N, R_c, D], L2-normalised, in --dtype on --device."""
    generator = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    queries = torch.randn(args.num_queries, args.query_vectors, args.dim, generator=generator)
    queries = torch.nn.functional.normalize(queries, dim=-1).to(args.device, dtype)
    block = torch.randn(_RANDOM_BLOCK_CANDIDATES, args.candidate_vectors, args.dim, generator=generator)
    block = torch.nn.functional.normalize(block, dim=-1).to(args.device, dtype)
    candidates = torch.empty(args.num_candidates, args.candidate_vectors, args.dim, dtype=dtype, device=args.device)
    for start in range(0, args.num_candidates, _RANDOM_BLOCK_CANDIDATES):
        end = min(start + _RANDOM_BLOCK_CANDIDATES, args.num_candidates)
        candidates[start:end] = block[: end - start]
    return queries, candidates


def plain_chunked_scores(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    num_query_vectors: int,
    num_candidate_vectors: int,
    chunk_size: int,
) -> torch.Tensor:
    """(b): the straightforward chunked late interaction, fp32, a new intermediate per chunk."""
    num_queries, num_candidates, dim = queries.shape[0], candidates.shape[0], queries.shape[2]
    query_matrix = queries[:, :num_query_vectors].float().reshape(-1, dim)
    scores = torch.empty(num_queries, num_candidates, device=candidates.device)
    for start in range(0, num_candidates, chunk_size):
        chunk = candidates[start : start + chunk_size, :num_candidate_vectors].float()
        similarities = query_matrix @ chunk.reshape(-1, dim).T
        similarities = similarities.view(num_queries, num_query_vectors, chunk.shape[0], num_candidate_vectors)
        scores[:, start : start + chunk.shape[0]] = similarities.amax(dim=3).sum(dim=1)
    return scores


def methods(args: argparse.Namespace) -> dict[str, Callable[..., torch.Tensor]]:
    """Name -> fn(queries, candidates, r_q, r_c) returning [Q, N] float32 scores."""
    table = {
        "plain": lambda q, c, rq, rc: plain_chunked_scores(q, c, rq, rc, args.plain_chunk_size),
        "ours": lambda q, c, rq, rc: late_interaction_scores(q, c, rq, rc),
    }
    if args.with_sentence_transformers:
        table["st_maxsim"] = sentence_transformers_maxsim
    return table


def sentence_transformers_maxsim(
    queries: torch.Tensor, candidates: torch.Tensor, num_query_vectors: int, num_candidate_vectors: int
) -> torch.Tensor:
    from sentence_transformers.util import maxsim  # imported here: slow, and only wanted with the flag

    return maxsim(queries[:, :num_query_vectors], candidates[:, :num_candidate_vectors])


def run_colpali(args: argparse.Namespace, budget: tuple[int, int]) -> tuple[float, torch.Tensor]:
    """colpali-engine's score_multi_vector in its own virtualenv on the same inputs: (best seconds, scores)."""
    import tempfile

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as folder:
        output = os.path.join(folder, "scores.safetensors")
        forwarded = [argument for argument in sys.argv[1:] if argument not in ("--with-sentence-transformers",)]
        forwarded = strip_option(forwarded, "--colpali-python", "--plot", "--memory-candidates")
        command = [args.colpali_python, str(Path(__file__).with_name("peer_colpali.py")), output]
        command += [f"{budget[0]},{budget[1]}", *forwarded]
        result = subprocess.run(command, check=True, capture_output=True, text=True)
        seconds = json.loads(result.stdout.strip().splitlines()[-1])["seconds"]
        return seconds, load_file(output)["scores"]


def strip_option(arguments: list[str], *options: str) -> list[str]:
    """`arguments` without the given options and their values."""
    kept, skipping = [], False
    for argument in arguments:
        if argument in options:
            skipping = True
            continue
        if skipping and not argument.startswith("--"):
            continue
        skipping = False
        kept.append(argument)
    return kept


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def square_gemm_gflops(args: argparse.Namespace) -> tuple[int, float]:
    size = args.square_size or (8192 if torch.device(args.device).type == "cuda" else 4096)
    left = torch.randn(size, size, device=args.device)
    right = torch.randn(size, size, device=args.device)
    torch.mm(left, right)  # warm-up: thread pools, kernels
    best = float("inf")
    for _ in range(args.repeats):
        synchronize(args.device)
        start = time.perf_counter()
        torch.mm(left, right)
        synchronize(args.device)
        best = min(best, time.perf_counter() - start)
    return size, 2 * size**3 / best / 1e9


def time_budget(
    args: argparse.Namespace,
    queries: torch.Tensor,
    candidates: torch.Tensor,
    budget: tuple[int, int],
) -> dict[str, float]:
    """Best wall time of each method for one budget; the methods take turns, so background load hits all."""
    functions = methods(args)
    for function in functions.values():  # warm-up on a slice
        function(queries, candidates[:2048], *budget)
    best = dict.fromkeys(functions, float("inf"))
    started = time.perf_counter()
    for _ in range(args.repeats):
        for name, function in functions.items():
            synchronize(args.device)
            start = time.perf_counter()
            function(queries, candidates, *budget)
            synchronize(args.device)
            best[name] = min(best[name], time.perf_counter() - start)
        if time.perf_counter() - started > args.time_limit:
            break
    return best


def memory_status() -> dict[str, int]:
    """This process's resident set size now (VmRSS) and its high-water mark (VmHWM), in bytes. Not
    getrusage's ru_maxrss: that one starts from the parent's peak in a child made by fork + exec."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, amount, unit = line.split()
                assert unit == "kB", line
                values[key.rstrip(":")] = int(amount) * 1024
    return values


def memory_probe(args: argparse.Namespace) -> None:
    """In a fresh process: peak RSS growth of one call, printed as JSON (bytes)."""
    method, budget_text = args.memory_probe
    queries, candidates = make_inputs(args)
    function = methods(args)[method]
    before = memory_status()
    function(queries, candidates, *parse_budget(budget_text))
    after = memory_status()
    # slack: how far an earlier transient (building the inputs) could hide the call's own peak.
    print(json.dumps({"extra": after["VmHWM"] - before["VmRSS"], "slack": before["VmHWM"] - before["VmRSS"]}))


def measure_cpu_memory(args: argparse.Namespace, method: str, budget: tuple[int, int]) -> dict[str, int]:
    command = [
        sys.executable,
        __file__,
        *strip_option(sys.argv[1:], "--colpali-python", "--plot", "--memory-candidates"),
    ]
    command += ["--num-candidates", str(args.num_candidates), "--memory-probe", method, f"{budget[0]},{budget[1]}"]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def measure_cuda_memory(
    args: argparse.Namespace,
    method: str,
    queries: torch.Tensor,
    candidates: torch.Tensor,
    budget: tuple[int, int],
) -> dict[str, int]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    methods(args)[method](queries, candidates, *budget)
    torch.cuda.synchronize()
    return {"extra": torch.cuda.max_memory_allocated() - before, "slack": 0}


def main() -> None:
    args = parse_args()
    if args.memory_probe:
        memory_probe(args)
        return
    budgets = [parse_budget(text) for text in args.budgets]
    on_cuda = torch.device(args.device).type == "cuda"
    device_name = torch.cuda.get_device_name(args.device) if on_cuda else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"torch {torch.__version__} on {device_name}; Q={args.num_queries} R_q={args.query_vectors} "
        f"R_c={args.candidate_vectors} D={args.dim} N={args.num_candidates} candidates in {args.dtype}, "
        f"compute in float32"
    )
    if on_cuda:
        print(f"TF32 matmuls allowed: {torch.backends.cuda.matmul.allow_tf32}")
    size, square_gflops = square_gemm_gflops(args)

    queries, candidates = make_inputs(args)
    rows = []
    for budget in budgets:
        gflop = 2 * args.num_queries * budget[0] * args.num_candidates * budget[1] * args.dim / 1e9
        best = time_budget(args, queries, candidates, budget)
        ours = late_interaction_scores(queries, candidates, *budget)
        differences = {
            name: (ours - function(queries, candidates, *budget)).abs().max().item()
            for name, function in methods(args).items()
            if name != "ours"
        }
        if args.colpali_python:
            best["colpali"], colpali_scores = run_colpali(args, budget)
            differences["colpali"] = (ours - colpali_scores.to(ours.device)).abs().max().item()
        rows.append((budget, gflop, best, differences))
        del ours

    # Measured again after the budgets, best of both: a burst of background load must not lower the ceiling.
    square_gflops = max(square_gflops, square_gemm_gflops(args)[1])
    print(f"(a) square fp32 GEMM {size}x{size}x{size}: {square_gflops:.1f} GFLOP/s (best before/after)")

    extra_columns = [name for name in rows[0][2] if name not in ("plain", "ours")]
    print(
        "\n(b) plain chunked matmul+amax+sum vs (c) late_interaction_scores (best of up to "
        f"{args.repeats} runs); ours/x = how many times faster ours is; max |diff| against ours"
    )
    header = "| budget | GFLOP | ours s | ours GFLOP/s | ours/GEMM | plain s | ours/plain |"
    header += "".join(f" {name} s | ours/{name} |" for name in extra_columns) + " max abs diff |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for budget, gflop, best, differences in rows:
        ours_rate = gflop / best["ours"]
        line = (
            f"| ({budget[0]},{budget[1]}) | {gflop:.2f} | {best['ours']:.3f} | {ours_rate:.1f} | "
            f"{ours_rate / square_gflops:.2f} | {best['plain']:.3f} | {best['plain'] / best['ours']:.2f} |"
        )
        line += "".join(f" {best[name]:.3f} | {best[name] / best['ours']:.2f} |" for name in extra_columns)
        line += f" {max(differences.values()):.1e} |"
        print(line)

    memory_rows = [] if args.skip_memory else report_memory(args, budgets, on_cuda, queries, candidates)
    if args.plot:
        save_plot(args.plot, rows, square_gflops, memory_rows)


def report_memory(
    args: argparse.Namespace,
    budgets: list[tuple[int, int]],
    on_cuda: bool,
    queries: torch.Tensor,
    candidates: torch.Tensor,
) -> list[tuple[int, float, float]]:
    """Print peak extra memory per budget (and per candidate count with --memory-candidates); returns the
    (candidates, plain MiB, ours MiB) rows of the latter for the plot."""
    if not on_cuda and not os.path.exists("/proc/self/status"):
        print("\nPeak memory: needs Linux's /proc/self/status; skipped")
        return []
    result_mb = args.num_queries * args.num_candidates * 4 / 2**20
    how = (
        "torch.cuda.max_memory_allocated minus allocated before the call"
        if on_cuda
        else "fresh subprocess per cell: VmHWM after the call minus VmRSS before it, from /proc/self/status"
    )
    print(f"\nPeak extra memory at N={args.num_candidates} ({how}; includes the {result_mb:.1f} MiB result)")
    print(f"{'budget':>8} {'plain MiB':>10} {'ours MiB':>10}")
    for budget in budgets:
        cells = []
        for method in ("plain", "ours"):
            if on_cuda:
                memory = measure_cuda_memory(args, method, queries, candidates, budget)
            else:
                memory = measure_cpu_memory(args, method, budget)
            # At or below the slack the call's own peak may be lower still: the number is an upper bound.
            bound = "<=" if memory["extra"] <= memory["slack"] else ""
            cells.append(f"{bound + format(memory['extra'] / 2**20, '.1f'):>10}")
        print(f"{f'({budget[0]},{budget[1]})':>8} {cells[0]} {cells[1]}")
    memory_rows = []
    if args.memory_candidates and not on_cuda:
        print("\nPeak extra memory at (16,64) vs candidates (MiB; includes the result)")
        print("| candidates | plain | ours |\n|---|---|---|")
        for count in args.memory_candidates:
            probe_args = argparse.Namespace(**{**vars(args), "num_candidates": count})
            plain, ours = (
                measure_cpu_memory(probe_args, method, (16, 64))["extra"] / 2**20 for method in ("plain", "ours")
            )
            memory_rows.append((count, plain, ours))
            print(f"| {count} | {plain:.0f} | {ours:.0f} |")
    return memory_rows


def save_plot(path: str, rows: list, square_gflops: float, memory_rows: list) -> None:
    """Throughput (GFLOP/s) per budget and method, the GEMM ceiling as a line; memory vs candidates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2 if memory_rows else 1, figsize=(11 if memory_rows else 6, 3.8), squeeze=False)
    axis = axes[0][0]
    labels = [f"({budget[0]},{budget[1]})" for budget, *_ in rows]
    names = list(rows[0][2])
    width = 0.8 / len(names)
    for offset, name in enumerate(names):
        rates = [gflop / best[name] for _, gflop, best, _ in rows]
        axis.bar([i + offset * width for i in range(len(rows))], rates, width, label=name)
    axis.axhline(square_gflops, color="black", ls="--", lw=0.8, label="square fp32 GEMM")
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], labels)
    axis.set_ylabel("GFLOP/s")
    axis.set_xlabel("budget (r_q, r_c)")
    axis.set_title("late-interaction scoring throughput")
    axis.legend(fontsize=8)
    if memory_rows:
        axis = axes[0][1]
        counts = [row[0] for row in memory_rows]
        axis.plot(counts, [row[1] for row in memory_rows], marker="o", label="plain")
        axis.plot(counts, [row[2] for row in memory_rows], marker="s", label="ours")
        axis.set_xscale("log")
        axis.set_xlabel("candidates")
        axis.set_ylabel("peak extra MiB at (16,64)")
        axis.set_title("memory vs candidates")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
