"""The `metaembed` command line."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def run_demo(arguments: argparse.Namespace) -> None:
    """Create a tiny MetaEmbed model from a random backbone, save it as a Hub folder, load it back through
    `AutoModel` (remote code) and encode / score text, images and text + image items at several budgets."""
    import torch
    from PIL import Image, ImageDraw
    from transformers import AutoModel

    from modeling_metaembed import MetaEmbedModel
    from tiny_metaembed import save_tiny_backbone

    print("NOTE: the backbone and Meta Tokens are random (no MetaEmbed weights are public and this demo does not")
    print("train); the scores below exercise the pipeline, they do not measure retrieval quality.\n")
    output_dir = arguments.output_dir or tempfile.mkdtemp(prefix="metaembed-demo-")
    backbone_dir = save_tiny_backbone(os.path.join(output_dir, "backbone"), arguments.backbone)
    model = MetaEmbedModel.from_backbone(backbone_dir, num_query_vectors=16, num_candidate_vectors=64, embedding_dim=32)
    model_dir = os.path.join(output_dir, "metaembed-tiny")
    model.save_pretrained(model_dir)
    print(f"saved a complete Hub folder to {model_dir}: {', '.join(sorted(os.listdir(model_dir)))}\n")
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True)

    def scene(color: str, corner: tuple[int, int]) -> Image.Image:
        image = Image.new("RGB", (112, 112), "white")
        x, y = corner
        ImageDraw.Draw(image).ellipse((x, y, x + 40, y + 40), fill=color)
        return image

    queries = ["a red circle in the top left", "a blue circle in the bottom right", scene("red", (10, 10))]
    candidates = [
        scene("red", (10, 10)),
        scene("blue", (60, 60)),
        {"text": "a green circle", "image": scene("green", (30, 30))},
        "a page of text about circles",
    ]
    budgets = [(1, 1), (2, 4), (4, 8), (8, 16), (16, 64)]
    start = time.perf_counter()
    query_embeddings = model.encode_queries(queries)
    candidate_embeddings = model.encode_candidates(candidates)
    elapsed = time.perf_counter() - start
    print(
        f"encoded {len(queries)} queries {tuple(query_embeddings.shape)} and {len(candidates)} candidates "
        f"{tuple(candidate_embeddings.shape)} in {elapsed:.2f} s"
    )
    print(f"\n{'budget':>9}  {'index bytes/candidate (fp16)':>28}  top candidate per query (score)")
    for num_query_vectors, num_candidate_vectors in budgets:
        scores = model.score(query_embeddings, candidate_embeddings, num_query_vectors, num_candidate_vectors)
        best = scores.max(dim=1)
        ranked = ", ".join(f"{int(i)} ({float(s):.2f})" for s, i in zip(best.values, best.indices))
        index_bytes = num_candidate_vectors * candidate_embeddings.shape[-1] * 2
        print(f"{(num_query_vectors, num_candidate_vectors)!s:>9}  {index_bytes:>28}  {ranked}")
    prefix = model.encode_candidates(candidates, num_vectors=4)
    assert torch.allclose(prefix, candidate_embeddings[:, :4], atol=1e-5)
    print("\nencode_candidates(num_vectors=4) equals the first 4 of 64 vectors (computed with 4 Meta Tokens).")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="metaembed", description="MetaEmbed multimodal retrieval")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="build a tiny random model, save/load it, encode and score")
    demo.add_argument("--backbone", default="qwen2_5_vl", choices=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
    demo.add_argument("--output-dir", default=None, help="where to write the model (default: a temp folder)")
    demo.set_defaults(handler=run_demo)
    arguments = parser.parse_args(argv)
    arguments.handler(arguments)


if __name__ == "__main__":
    sys.exit(main())
