"""How much recall can ANY code of a given size keep on the search benchmark's data? (issue 19, item 5)

    python benchmarks/compact_bound.py                      # 10k candidates, 300 queries, one thread
    python benchmarks/compact_bound.py --num-candidates 50000

Recall@10 against exhaustive float32 MaxSim at (16, 64) falls as the stored vectors' error grows, whatever the
code. This measures, in one run: (1) each storage's decoding error (the norm of stored minus original, per
vector) and its exhaustive recall@10; (2) recall@10 with Gaussian errors of set norms added to the float32
vectors, the error-to-recall curve; (3) the smallest error any code of B bytes per candidate can reach. A
benchmark vector is topic and candidate directions shared by the candidate's vectors plus fresh isotropic noise
(`synthetic.make_collection`); what remains once the candidate's mean is removed is mostly that noise, about
Gaussian, and a Gaussian source of variance s^2 per element coded at R bits per element keeps a mean squared error
of at least s^2 2^(-2R) (Shannon's distortion-rate bound). So at B bytes per 64 x 128 candidate (R = 8B / 8192, the
mean's own bytes not even counted) no code's error norm is below rms(residual) * 2^(-R).
"""

from __future__ import annotations

import argparse
import math

import torch
from bench_index import recall_at_10, stored_bytes
from synthetic import make_collection

from metaembed.search import MetaEmbedIndex
from scoring_metaembed import late_interaction_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-candidates", type=int, default=10_000)
    parser.add_argument("--num-queries", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--peer-bytes", type=float, nargs="+", default=[4847, 5325], help="bytes per candidate")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    candidates, queries, _ = make_collection(args.num_candidates, args.num_queries)
    num_candidates, num_vectors, dim = candidates.shape
    truth = late_interaction_scores(queries, candidates, 16, 64, top_k=10).indices
    print(f"N={num_candidates}, {len(queries)} queries, (16, 64), recall@10 against exhaustive float32 MaxSim\n")
    print("| storage | bytes / candidate | error norm (rms) | exhaustive recall@10 |\n|---|---|---|---|")
    for storage in ("float16", "int8", "int4", "residual4"):
        index = MetaEmbedIndex(dim, num_vectors, storage)
        index.add(candidates)
        decoded = index.get_embeddings(torch.arange(num_candidates), num_vectors).float()
        error = (decoded - candidates).norm(dim=-1).pow(2).mean().sqrt()
        found = index.search(queries, 16, 64, top_k=10, shortlist_size=None).indices
        size = stored_bytes(storage, 1, num_vectors, dim)
        print(f"| {storage} | {size:.0f} | {error:.4f} | {recall_at_10(found, truth).mean():.3f} |")
    generator = torch.Generator().manual_seed(1)
    print("\n| Gaussian error norm | recall@10 |\n|---|---|")
    curve = []
    for norm in (0.002, 0.004, 0.006, 0.008, 0.011, 0.016, 0.022, 0.032, 0.045):
        noise = torch.randn(candidates.shape, generator=generator)
        noisy = candidates + noise / noise.norm(dim=-1, keepdim=True) * norm
        recall = float(recall_at_10(late_interaction_scores(queries, noisy, 16, 64, top_k=10).indices, truth).mean())
        curve.append((norm, recall))
        print(f"| {norm:.3f} | {recall:.3f} |")
    residual = (candidates - candidates.mean(1, keepdim=True)).norm(dim=-1).pow(2).mean().sqrt().item()
    print(f"\nresidual from the candidate's mean: rms norm {residual:.3f} per vector")
    print("| bytes / candidate | bits / element | least error norm any code reaches | recall@10 at that error |")
    print("|---|---|---|---|")
    for size in args.peer_bytes:
        bits = 8 * size / (num_vectors * dim)
        least = residual * 2.0 ** (-bits)
        nearest = min(curve, key=lambda point: abs(math.log(point[0] / least)))
        print(f"| {size:,.0f} | {bits:.2f} | {least:.4f} | ~{nearest[1]:.3f} (curve at {nearest[0]:.3f}) |")
    needed = min((norm for norm, recall in curve if recall < 0.99), default=curve[-1][0])
    bits = math.log2(residual / needed)
    print(
        f"\nrecall@10 first falls below 0.99 at error norm {needed:.3f}: keeping it above needs an error below that,"
        f" at least {bits:.2f} bits per element ({bits * num_vectors * dim / 8:,.0f} bytes per candidate) for any code"
    )


if __name__ == "__main__":
    main()
