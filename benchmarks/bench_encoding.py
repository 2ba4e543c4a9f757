"""Encoding cost of the Meta Tokens: MetaEmbed's forward per budget against the bare backbone's forward on
identical processed inputs (the same content tokens and pixels, no Meta Tokens), and items/s.

    python benchmarks/bench_encoding.py                    # random mid-sized Qwen2.5-VL, CPU
    python benchmarks/bench_encoding.py --device cuda --dtype bfloat16 --hidden-size 1024

Queries are short texts (~15 tokens) and texts with a small image (64 image tokens); candidates are images
with --image-tokens merged tokens (1,024 by default: a 896 x 896 page at Qwen2.5-VL's 28-pixel merge).
A query at budget r_q appends r_q Meta Tokens; a candidate at r_c appends R_q + r_c (candidate Meta Tokens
follow the query ones), so the overhead ratio depends on how long the content is.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from PIL import Image

from metaembed.testing import save_tiny_backbone
from modeling_metaembed import MetaEmbedModel
from scoring_metaembed import MMR_BUDGETS


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--image-tokens", type=int, default=1024, help="merged image tokens per candidate image")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attn-implementation", default="sdpa")
    return parser.parse_args()


def make_items(image_tokens: int, count: int) -> dict[str, list]:
    side = int(image_tokens**0.5) * 28
    page = Image.new("RGB", (side, side), "white")
    small = Image.new("RGB", (224, 224), (200, 30, 30))
    texts = [f"where is the {word} object on the page number {n}?" for n, word in enumerate(["red", "blue"] * count)]
    return {
        "text queries": texts[:count],
        "text+image queries": [{"text": text, "image": small} for text in texts[:count]],
        "image candidates": [page] * count,
    }


def best_times(functions: dict[str, object], repeats: int, device: str, clock=time.perf_counter) -> dict[str, float]:
    """Best time of each function by `clock` (wall time by default; `time.process_time` counts only this
    process's CPU time, which other processes on a shared machine do not inflate); they take turns in every
    repeat, so drifts in machine speed (turbo, neighbours) hit all of them alike."""
    for function in functions.values():
        function()  # warm-up
    best = dict.fromkeys(functions, float("inf"))
    for _ in range(repeats):
        for name, function in functions.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = clock()
            function()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best[name] = min(best[name], clock() - start)
    return best


def main() -> None:
    args = parse_args()
    folder = tempfile.mkdtemp(prefix="metaembed-bench-")
    backbone = save_tiny_backbone(
        folder,
        "qwen2_5_vl",
        max_image_tokens=args.image_tokens,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=8,
        vision_depth=4,
    )
    model = MetaEmbedModel.from_backbone(
        backbone, 16, 64, dtype=getattr(torch, args.dtype), attn_implementation=args.attn_implementation
    )
    model.to(args.device)
    items = make_items(args.image_tokens, args.batch_size)
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(
        f"torch {torch.__version__} on {device_name} ({torch.get_num_threads()} threads), {args.dtype}, "
        f"{args.attn_implementation}; random Qwen2.5-VL hidden {args.hidden_size}, {args.num_layers} layers; "
        f"batch {args.batch_size}"
    )
    print("\n| inputs | content tokens | budget | appended | MetaEmbed / bare backbone | items/s |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for name, batch in items.items():
            task = "candidate" if "candidate" in name else "query"
            processor = model.processor.process_candidates if task == "candidate" else model.processor.process_queries
            inputs = processor(batch).to(args.device)
            content = inputs["input_ids"].shape[1]
            for r_q, r_c in MMR_BUDGETS:
                num_vectors = r_c if task == "candidate" else r_q
                best = best_times(
                    {
                        "bare": lambda inputs=inputs: model.vlm(**inputs, use_cache=False),
                        "metaembed": lambda inputs=inputs, n=num_vectors, task=task: model(
                            **inputs, task=task, num_vectors=n
                        ),
                    },
                    args.repeats,
                    args.device,
                )
                appended = model.config.meta_tokens_to_append(task, num_vectors)
                print(
                    f"| {name} | {content} | {task[0]}={num_vectors} | {appended} | "
                    f"{best['metaembed'] / best['bare']:.3f}x | {len(batch) / best['metaembed']:.1f} |"
                )


if __name__ == "__main__":
    main()
