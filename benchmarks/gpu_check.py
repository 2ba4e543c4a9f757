"""One-shot GPU check: bf16 / sdpa encode paths and late-interaction scoring at the paper's setting.

Run on a CUDA machine: `python benchmarks/gpu_check.py`. Prints JSON lines; every ratio is measured in this run.
Part A (encode): a mid-size random Qwen2.5-VL (hidden 1024, 8 layers) in bf16 on the GPU: prefix exactness,
batch invariance, sdpa vs eager, bf16 vs fp32, items/s per budget, and Meta-Token overhead against the bare
backbone forward on identical inputs. Part B (scoring): 100k candidates, D = 3584, bf16 index (the paper's
7B setting), budgets (1,1), (8,16), (16,64), against a plain unchunked fp32 einsum baseline.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from PIL import Image

from metaembed.testing import save_tiny_backbone
from modeling_metaembed import MetaEmbedModel
from scoring_metaembed import late_interaction_scores

DEVICE = "cuda"


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def report(**fields) -> None:
    print(json.dumps(fields), flush=True)


def cuda_seconds(function, *arguments, repeats: int = 5) -> float:
    function(*arguments)
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        function(*arguments)
    synchronize()
    return (time.perf_counter() - start) / repeats


def make_items(count: int) -> list:
    generator = torch.Generator().manual_seed(0)
    items = []
    for index in range(count):
        pixels = torch.randint(0, 256, (448, 448, 3), generator=generator, dtype=torch.uint8).numpy()
        image = Image.fromarray(pixels)
        kind = index % 3
        text = "a photo of several coloured shapes in a grid " * (1 + index % 5)
        items.append(text if kind == 0 else image if kind == 1 else {"text": text, "image": image})
    return items


def check_encode(folder: str, num_items: int) -> None:
    items = make_items(num_items)
    model = MetaEmbedModel.from_backbone(
        folder, 16, 64, embedding_dim=128, dtype=torch.bfloat16, device_map=DEVICE, attn_implementation="sdpa"
    ).eval()
    report(part="encode", attn=model.vlm.config._attn_implementation, dtype=str(model.meta_tokens.dtype))
    full = model.encode_candidates(items, batch_size=16)
    prefix = model.encode_candidates(items, num_vectors=16, batch_size=16)
    one_by_one = torch.cat([model.encode_candidates([item], num_vectors=16) for item in items[:12]])
    report(
        check="bf16 prefix exactness (max abs diff, first 16 of 64 vs num_vectors=16)",
        value=float((prefix - full[:, :16]).abs().max()),
    )
    report(
        check="bf16 batch invariance (batch 1 vs 16, max abs diff)", value=float((one_by_one - prefix[:12]).abs().max())
    )
    eager = MetaEmbedModel.from_backbone(
        folder, 16, 64, embedding_dim=128, dtype=torch.bfloat16, device_map=DEVICE, attn_implementation="eager"
    ).eval()
    eager.load_state_dict(model.state_dict())
    report(
        check="bf16 sdpa vs eager (max abs diff)",
        value=float((eager.encode_candidates(items[:16], num_vectors=16) - prefix[:16]).abs().max()),
    )
    fp32 = MetaEmbedModel.from_backbone(folder, 16, 64, embedding_dim=128, device_map=DEVICE).eval()
    fp32.load_state_dict({key: value.float() for key, value in model.state_dict().items()})
    cosine = (fp32.encode_candidates(items[:16], num_vectors=16) * prefix[:16]).sum(-1)
    report(check="bf16 vs fp32 cosine (min)", value=float(cosine.min()))
    del eager, fp32

    # Throughput per budget and overhead against the bare backbone on the same processed batches.
    batches = [items[start : start + 16] for start in range(0, len(items), 16)]
    features = [model.processor.process_candidates(batch).to(DEVICE) for batch in batches]
    query_features = [model.processor.process_queries(batch).to(DEVICE) for batch in batches]

    def run(task: str, num_vectors: int | None, bare: bool = False):
        def go():
            with torch.inference_mode():
                for feature in query_features if task == "query" else features:
                    if bare:
                        model.vlm(**feature, use_cache=False)
                    else:
                        model(**feature, task=task, num_vectors=num_vectors)

        return go

    for task, budgets in (("candidate", (1, 16, 64)), ("query", (1, 16))):
        bare = cuda_seconds(run(task, None, bare=True), repeats=3)
        for num_vectors in budgets:
            seconds = cuda_seconds(run(task, num_vectors), repeats=3)
            report(
                part="encode-speed",
                task=task,
                num_vectors=num_vectors,
                items_per_second=round(len(items) / seconds, 1),
                overhead_vs_bare_backbone=round(seconds / bare, 4),
            )
    total = cuda_seconds(lambda: model.encode_candidates(items, batch_size=16), repeats=1)
    report(
        part="encode-speed",
        what="encode_candidates end to end incl. image preprocessing",
        items_per_second=round(len(items) / total, 1),
    )


def check_scoring(num_candidates: int, dim: int) -> None:
    torch.manual_seed(0)
    candidates = torch.empty(num_candidates, 64, dim, dtype=torch.bfloat16, device=DEVICE)
    for start in range(0, num_candidates, 10_000):
        block = torch.randn(min(10_000, num_candidates - start), 64, dim, device=DEVICE)
        candidates[start : start + block.shape[0]] = torch.nn.functional.normalize(block, dim=-1).bfloat16()
    report(part="scoring", candidates=num_candidates, dim=dim, index_gib=round(candidates.numel() * 2 / 2**30, 2))
    square = torch.randn(8192, 8192, device=DEVICE)
    fp32_gemm = 2 * 8192**3 / cuda_seconds(square.matmul, square) / 1e12
    bf16_square = square.bfloat16()
    bf16_gemm = 2 * 8192**3 / cuda_seconds(bf16_square.matmul, bf16_square) / 1e12
    report(part="scoring", square_gemm_tflops_fp32=round(fp32_gemm, 1), square_gemm_tflops_bf16=round(bf16_gemm, 1))
    del square, bf16_square
    for num_queries in (1, 32):
        queries = torch.nn.functional.normalize(torch.randn(num_queries, 16, dim, device=DEVICE), dim=-1)
        for num_query_vectors, num_candidate_vectors in ((1, 1), (8, 16), (16, 64)):
            flops = 2 * num_queries * num_candidates * num_query_vectors * num_candidate_vectors * dim
            if DEVICE == "cuda":
                torch.cuda.reset_peak_memory_stats()
            base_memory = torch.cuda.memory_allocated() if DEVICE == "cuda" else 0
            seconds = cuda_seconds(
                late_interaction_scores, queries, candidates, num_query_vectors, num_candidate_vectors
            )
            extra_memory = torch.cuda.max_memory_allocated() - base_memory if DEVICE == "cuda" else 0
            scores = late_interaction_scores(queries, candidates, num_query_vectors, num_candidate_vectors)
            # Plain reference on a slice (the full fp32 upcast would not fit at (16, 64)).
            reference_slice = slice(0, 2000)
            reference = (
                torch.einsum(
                    "qid,cjd->qcij",
                    queries[:, :num_query_vectors],
                    candidates[reference_slice, :num_candidate_vectors].float(),
                )
                .amax(-1)
                .sum(-1)
            )
            report(
                part="scoring",
                queries=num_queries,
                budget=[num_query_vectors, num_candidate_vectors],
                latency_ms=round(seconds * 1e3, 3),
                tflops=round(flops / seconds / 1e12, 2),
                ratio_vs_fp32_square_gemm=round(flops / seconds / 1e12 / fp32_gemm, 3),
                extra_memory_mib=round(extra_memory / 2**20, 1),
                max_abs_diff_vs_einsum=float((scores[:, reference_slice] - reference).abs().max()),
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-items", type=int, default=48)
    parser.add_argument("--num-candidates", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=3584)
    parser.add_argument("--device", default="cuda", help="cpu only for a dry run of this script")
    parser.add_argument("--hidden-size", type=int, default=1024)
    arguments = parser.parse_args()
    global DEVICE
    DEVICE = arguments.device
    if DEVICE == "cuda":
        report(device=torch.cuda.get_device_name(), torch=torch.__version__)
    with tempfile.TemporaryDirectory() as folder:
        save_tiny_backbone(
            folder,
            "qwen2_5_vl",
            hidden_size=arguments.hidden_size,
            num_layers=8,
            num_heads=16,
            vision_depth=4,
            max_image_tokens=256,
        )
        check_encode(folder, arguments.num_items)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    check_scoring(arguments.num_candidates, arguments.dim)


if __name__ == "__main__":
    main()
