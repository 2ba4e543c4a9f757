"""Search benchmark on the trained demo model: quality, latency and index size per budget; storage dtypes;
two-stage search (faiss HNSW over the first vector, exact rerank) against exhaustive search.

    python benchmarks/bench_search.py                       # 100k candidates, 200 queries
    python benchmarks/bench_search.py --num-candidates 5000 --num-queries 20 --steps 20   # smoke test

The first run trains the demo's MMR model (`metaembed demo` settings, a few minutes on CPU) and encodes the
candidates; both are cached in --work-dir, so later runs only search. Candidates are random scenes of the
demo's task (5 x 5 boards of coloured shapes); queries name one object (text) or show it (image), and every
scene with that object in that cell is relevant (thousands per query, as in the demo). Two-stage search is
timed on the batch of queries and one query at a time (the serving case), each against exhaustive search timed
the same way.
Writes search_budgets.png and search_two_stage.png into --work-dir.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from metaembed.demo import DemoSettings, save_demo_backbone, train_demo_model
from metaembed.search.index import MetaEmbedIndex
from scoring_metaembed import MMR_BUDGETS


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default=".bench/search")
    parser.add_argument("--num-candidates", type=int, default=100_000)
    parser.add_argument("--num-queries", type=int, default=200)
    parser.add_argument("--steps", type=int, default=DemoSettings.steps, help="demo training steps (first run)")
    parser.add_argument("--shortlists", type=int, nargs="+", default=[100, 250, 500, 1000, 2000, 4000])
    parser.add_argument(
        "--first-stages",
        nargs="+",
        default=["hnsw:1:1", "hnsw:4:2", "flat:4:2"],
        help="first stages to try, kind:candidate vectors indexed:query vectors searched",
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--single-queries", type=int, default=50, help="queries timed one at a time")
    return parser.parse_args()


def prepare(args: argparse.Namespace) -> tuple[torch.nn.Module, MetaEmbedIndex, dict]:
    """The trained model, the fp32 index of the candidates, and per query set (queries, relevance [Q, N])."""
    from transformers import AutoModel

    work = Path(args.work_dir)
    model_dir = work / f"model-{args.steps}"
    if not (model_dir / "config.json").exists():
        settings = DemoSettings(steps=args.steps)
        backbone = save_demo_backbone(str(work / "backbone"), settings)
        start = time.perf_counter()
        train_demo_model(backbone, str(model_dir), settings, mmr=True)
        print(f"trained the demo model in {time.perf_counter() - start:.0f} s")
    model = AutoModel.from_pretrained(str(model_dir), trust_remote_code=True)
    task, rng = DemoSettings().task, random.Random(2024)
    scenes = [task.random_scene(rng) for _ in range(args.num_candidates)]
    index_dir = work / f"index-{args.steps}-{args.num_candidates}"
    if not (index_dir / "index.json").exists():
        index = MetaEmbedIndex(model.config.output_dim, model.config.num_candidate_vectors, "float32", str(model_dir))
        start = time.perf_counter()
        block = 10_000
        for offset in range(0, len(scenes), block):
            images = [task.draw(scene) for scene in scenes[offset : offset + block]]
            index.add(model.encode_candidates(images, batch_size=args.batch_size, show_progress_bar=True))
        seconds = time.perf_counter() - start
        print(f"encoded {len(scenes)} candidates in {seconds:.0f} s ({len(scenes) / seconds:.0f} items/s)")
        index.save(str(index_dir))
    index = MetaEmbedIndex.load(str(index_dir))
    targets = []
    while len(targets) < args.num_queries:
        scene = rng.choice(scenes)
        filled = [position for position, color in scene.items() if color is not None]
        if filled:
            position = rng.choice(filled)
            targets.append((scene[position], position, len(targets) % 3 != 2))
    object_queries = [task.query(color, position, as_text) for color, position, as_text in targets]
    object_relevant = torch.tensor([[scene[position] == color for scene in scenes] for color, position, _ in targets])
    query_sets = {"object": (object_queries, object_relevant)}
    return model, index, query_sets


def timed(function, repeats: int = 3):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def one_at_a_time(search, queries: torch.Tensor) -> float:
    """Median seconds of `search` on each query alone ([1, R_q, D]), after one warm-up call."""
    search(queries[:1])
    seconds = []
    for row in range(len(queries)):
        start = time.perf_counter()
        search(queries[row : row + 1])
        seconds.append(time.perf_counter() - start)
    return sorted(seconds)[len(seconds) // 2]


def task_recalls(indices: torch.Tensor, relevant: torch.Tensor) -> tuple[float, float]:
    """R@1 and capped R@10 of result rows `indices` [Q, 10] (-1 = padding, never relevant) against `relevant`
    [Q, N]."""
    hits = relevant.gather(1, indices.clamp(min=0)).float() * (indices >= 0)
    return float(hits[:, 0].mean()), float((hits.sum(1) / relevant.sum(1).clamp(max=10)).mean())


def overlap_at_k(got: torch.Tensor, want: torch.Tensor) -> float:
    """Mean fraction of `want`'s top-k (per row) that `got` also returned."""
    return sum(len(set(g.tolist()) & set(w.tolist())) / len(w) for g, w in zip(got, want)) / len(want)


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    model, index, query_sets = prepare(args)
    dim = index.dim
    print(
        f"\ntorch {torch.__version__}, CPU {torch.get_num_threads()} threads; {len(index)} candidates, "
        f"{args.num_queries} queries per set, D={dim}, R_c={index.num_vectors}; times are per query, measured "
        "on the whole batch of queries (best of 3)"
    )
    budget_rows, stage_rows = {}, {}
    everything = index.get_embeddings(range(len(index)))
    for set_name, (queries, relevant) in query_sets.items():
        query_embeddings = model.encode_queries(queries, batch_size=args.batch_size)
        num_queries = len(queries)
        print(f"\n### {set_name} queries\n")
        # 1. Exhaustive search per budget: quality, latency, index size.
        print("| budget | R@1 | R@10 (capped) | ms / query (exhaustive) | index MB (fp32) |")
        print("|---|---|---|---|---|")
        budget_rows[set_name], exhaustive = [], {}
        for r_q, r_c in MMR_BUDGETS:
            seconds, results = timed(
                lambda r_q=r_q, r_c=r_c, embeddings=query_embeddings: index.search(
                    embeddings, r_q, r_c, top_k=10, shortlist_size=None
                )
            )
            exhaustive[(r_q, r_c)] = (seconds, results)
            recall_1, recall_10 = task_recalls(results.indices, relevant)
            megabytes = len(index) * r_c * dim * 4 / 1e6
            milliseconds = seconds / num_queries * 1e3
            budget_rows[set_name].append(((r_q, r_c), recall_1, recall_10, milliseconds, megabytes))
            print(f"| ({r_q},{r_c}) | {recall_1:.3f} | {recall_10:.3f} | {milliseconds:.2f} | {megabytes:.0f} |")

        # 2. Storage dtypes: the same search on float16 / int8 copies; overlap with the float32 top-10.
        print("\n| storage | bytes / vector | overlap@10 with float32, (16,64) | (1,1) | R@1 (16,64) |")
        print("|---|---|---|---|---|")
        for storage, size in (("float32", 4 * dim), ("float16", 2 * dim), ("int8", dim + 4)):
            copy = MetaEmbedIndex(dim, index.num_vectors, storage)
            copy.add(everything)
            full_budget = copy.search(query_embeddings, 16, 64, top_k=10, shortlist_size=None).indices
            single_vector = copy.search(query_embeddings, 1, 1, top_k=10, shortlist_size=None).indices
            cells = [
                overlap_at_k(full_budget, exhaustive[(16, 64)][1].indices),
                overlap_at_k(single_vector, exhaustive[(1, 1)][1].indices),
            ]
            recall_1 = float(relevant.gather(1, full_budget[:, :1]).float().mean())
            print(f"| {storage} | {size} | {cells[0]:.4f} | {cells[1]:.4f} | {recall_1:.3f} |")

        # 3. Two-stage search at (16, 64) against exhaustive.
        exhaustive_seconds, exhaustive_results = exhaustive[(16, 64)]
        singles = query_embeddings[: args.single_queries]
        single_seconds = one_at_a_time(
            lambda query: index.search(query, 16, 64, top_k=10, shortlist_size=None), singles
        )
        print(
            f"\nexhaustive (16,64): {exhaustive_seconds / num_queries * 1e3:.2f} ms / query in a batch of "
            f"{num_queries}, {single_seconds * 1e3:.2f} ms one query at a time"
        )
        print(
            "| first stage | shortlist | reranked | recall@10 of exhaustive | same, ties within 1e-3 | R@1 | R@10 "
            "(capped) | ms / query (batch) | speed-up | ms (one query) | speed-up |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        stage_rows[set_name] = []
        for stage in args.first_stages:
            kind, candidate_vectors, query_vectors = stage.split(":")
            start = time.perf_counter()
            index.build_ann(num_vectors=int(candidate_vectors), kind=kind)
            build_seconds = time.perf_counter() - start
            label = f"{kind}, {candidate_vectors} c-vec, {query_vectors} q-vec (built in {build_seconds:.1f} s)"
            for shortlist in args.shortlists:
                seconds, results = timed(
                    lambda shortlist=shortlist, m=int(query_vectors), embeddings=query_embeddings: index.search(
                        embeddings, 16, 64, top_k=10, shortlist_size=shortlist, ann_query_vectors=m
                    )
                )
                reranked = sum(len(s) for s in index.ann_search(query_embeddings, shortlist, int(query_vectors)))
                recall = overlap_at_k(results.indices, exhaustive_results.indices)
                # ann-benchmarks' definition: a result counts if it scores within 1e-3 of the true 10th best.
                tied_recall = float((results.scores >= exhaustive_results.scores[:, -1:] - 1e-3).float().mean())
                task_recall_1, task_recall_10 = task_recalls(results.indices, relevant)
                speedup = exhaustive_seconds / seconds
                one = one_at_a_time(
                    lambda query, shortlist=shortlist, m=int(query_vectors): index.search(
                        query, 16, 64, top_k=10, shortlist_size=shortlist, ann_query_vectors=m
                    ),
                    singles,
                )
                stage_rows[set_name].append(
                    (stage, shortlist, recall, seconds / num_queries * 1e3, speedup, task_recall_10)
                )
                print(
                    f"| {label} | {shortlist} | {reranked / num_queries:.0f} | {recall:.4f} | {tied_recall:.4f} | "
                    f"{task_recall_1:.3f} | {task_recall_10:.3f} | {seconds / num_queries * 1e3:.2f} | "
                    f"{speedup:.1f}x | {one * 1e3:.2f} | {single_seconds / one:.1f}x |"
                )
    save_plots(Path(args.work_dir), budget_rows, stage_rows)


def save_plots(folder: Path, budget_rows: dict, stage_rows: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for set_name, rows in budget_rows.items():
        labels = [f"({r_q},{r_c})" for (r_q, r_c), *_ in rows]
        axes[0].plot(labels, [row[1] for row in rows], marker="o", label=f"R@1, {set_name}")
        axes[0].plot(labels, [row[2] for row in rows], marker="s", ls="--", label=f"R@10, {set_name}")
    axes[0].set_title("quality")
    axes[0].legend(fontsize=7)
    rows = next(iter(budget_rows.values()))
    axes[1].bar(labels, [row[3] for row in rows])
    axes[1].set_title("ms / query, exhaustive")
    axes[2].bar(labels, [row[4] for row in rows])
    axes[2].set_title("index MB (fp32)")
    for axis in axes:
        axis.set_xlabel("budget (r_q, r_c)")
    figure.tight_layout()
    figure.savefig(folder / "search_budgets.png", dpi=110)
    figure, axis = plt.subplots(figsize=(6, 4))
    for set_name, rows in stage_rows.items():
        for stage in dict.fromkeys(row[0] for row in rows):
            points = [row for row in rows if row[0] == stage]
            speedups = [row[4] for row in points]
            (line,) = axis.plot(speedups, [row[5] for row in points], marker="o", label=f"{set_name}, {stage}: R@10")
            axis.plot(
                speedups,
                [row[2] for row in points],
                marker="s",
                ls="--",
                color=line.get_color(),
                label=f"{set_name}, {stage}: overlap with exhaustive top-10",
            )
    axis.axhline(0.99, color="grey", ls="--", lw=0.8)
    axis.axvline(20, color="grey", ls=":", lw=0.8)
    axis.set_xscale("log")
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axis.set_xlabel("speed-up vs exhaustive at (16,64)")
    axis.set_ylabel("recall@10")
    axis.set_title("two-stage search (kind:c-vectors:q-vectors)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(folder / "search_two_stage.png", dpi=110)
    print(f"plots: {folder / 'search_budgets.png'}, {folder / 'search_two_stage.png'}")


if __name__ == "__main__":
    main()
