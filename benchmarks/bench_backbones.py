"""MetaEmbed's encode cost on every supported backbone family, against the bare backbone's forward on the same
processed inputs.

    python benchmarks/bench_backbones.py                      # every family, random backbones, CPU
    python benchmarks/bench_backbones.py --families mllama paligemma2 --hidden-size 512 --device cuda

Per family and input kind it prints two ratios, each of the best of --repeats runs taken in turns (CPU time of
this process on the CPU, so run it with OMP_NUM_THREADS=1 there; wall time on a GPU):

- `MetaEmbed / bare (content)`: `model(**inputs, task, num_vectors)` against `model.vlm(**inputs)` on the same
  processed content. Above 1 mostly by the appended Meta Tokens (R_q for a query, R_q + r_c for a candidate),
  so it depends on how long the content is.
- `MetaEmbed / bare (same length)`: against the bare forward on the content followed by as many placeholder
  tokens as MetaEmbed appends: what MetaEmbed itself adds (explicit positions, the Meta Token rows, the
  projection and normalisation, Mllama's split of image and text rows). The goal is at most 1.10.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from bench_encoding import best_times  # this folder is on sys.path when the script runs
from PIL import Image

from metaembed.testing import SUPPORTED_FAMILIES, save_tiny_backbone
from modeling_metaembed import MetaEmbedModel


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(SUPPORTED_FAMILIES), choices=SUPPORTED_FAMILIES)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    return parser.parse_args()


def make_inputs(batch_size: int) -> dict[str, tuple[str, int, list]]:
    """name -> (task, num_vectors, items): the largest MMR budget of each side."""
    picture = Image.new("RGB", (96, 64), (30, 120, 200))
    questions = [f"where is the {word} object on page {n}?" for n, word in enumerate(["red", "blue"] * batch_size)]
    long_text = " ".join(f"sentence {n} of a long passage about retrieval." for n in range(25))
    return {
        "text query": ("query", 16, questions[:batch_size]),
        "text+image candidate": (
            "candidate",
            64,
            [{"text": text, "image": picture} for text in questions[:batch_size]],
        ),
        "long text candidate": ("candidate", 64, [long_text] * batch_size),
    }


def same_length_inputs(model: MetaEmbedModel, inputs: dict, num_appended: int) -> dict:
    """`inputs` with `num_appended` placeholder tokens after the content, as MetaEmbed's forward runs them:
    every [B, L, ...] tensor grows by `num_appended` along L (ids: the placeholder; masks: the last column)."""
    input_ids = inputs["input_ids"]
    batch_size, length = input_ids.shape
    extended = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and tuple(value.shape[:2]) == (batch_size, length):
            tail = value[:, -1:].expand(-1, num_appended, *value.shape[2:])
            if name == "input_ids":
                tail = torch.full_like(tail, model.config.meta_token_id)
            value = torch.cat([value, tail], dim=1)
        extended[name] = value
    return extended


def measure(model: MetaEmbedModel, family: str, args: argparse.Namespace) -> None:
    """Print one table row per input kind for `model`."""
    for name, (task, num_vectors, items) in make_inputs(args.batch_size).items():
        process = model.processor.process_queries if task == "query" else model.processor.process_candidates
        inputs = dict(process(items).to(args.device))
        appended = model.config.meta_tokens_to_append(task, num_vectors)
        extended = same_length_inputs(model, inputs, appended)
        best = best_times(
            {
                "bare": partial(model.vlm, **inputs, use_cache=False),
                "bare_same_length": partial(model.vlm, **extended, use_cache=False),
                "metaembed": partial(model, **inputs, task=task, num_vectors=num_vectors),
            },
            args.repeats,
            args.device,
            # CPU time of this process on the CPU (with one thread, its compute time): on a shared machine the
            # wall time swings by tens of percent with the neighbours' load.
            time.perf_counter if args.device.startswith("cuda") else time.process_time,
        )
        print(
            f"| {family} | {name} | {inputs['input_ids'].shape[1]} | {appended} | "
            f"{best['metaembed'] / best['bare']:.2f}x | {best['metaembed'] / best['bare_same_length']:.3f}x |",
            flush=True,
        )


def allow_smolvlm_without_num2words() -> None:
    """SmolVLM's processor refuses to build without `num2words`, which it uses only to write video prompts; this
    benchmark embeds images and text, so a stand-in does where the package is not installed."""
    from transformers.models.smolvlm import processing_smolvlm

    if processing_smolvlm.num2words is None:
        processing_smolvlm.num2words = str


def main() -> None:
    args = parse_args()
    allow_smolvlm_without_num2words()
    root = Path(tempfile.mkdtemp(prefix="metaembed-bench-backbones-"))
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(
        f"torch {torch.__version__} on {device_name} ({torch.get_num_threads()} threads), {args.dtype}; random "
        f"backbones, text hidden {args.hidden_size}, {args.num_layers} layers; batch {args.batch_size}; "
        "R_q = 16, R_c = 64"
    )
    print("\n| family | inputs | content tokens | appended | MetaEmbed / bare (content) | ... (same length) |")
    print("|---|---|---|---|---|---|")
    for family in args.families:
        backbone = save_tiny_backbone(
            root / family, family, hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=8
        )
        model = MetaEmbedModel.from_backbone(backbone, 16, 64, embedding_dim=128, dtype=getattr(torch, args.dtype))
        with torch.inference_mode():
            measure(model.to(args.device).eval(), family, args)


if __name__ == "__main__":
    main()
