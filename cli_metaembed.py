"""The `metaembed` command line: `demo` (the end-to-end main job) and `train`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def run_demo(arguments: argparse.Namespace) -> None:
    """Train a tiny MetaEmbed from scratch with and without MMR on rendered scenes and report every budget."""
    from demo_metaembed import DemoSettings, run_demo

    settings = DemoSettings(
        steps=arguments.steps, num_candidates=arguments.num_candidates, num_queries=arguments.num_queries
    )
    run_demo(settings, arguments.output_dir)


def read_jsonl_rows(path: str) -> list[dict[str, Any]]:
    """Training rows from a JSONL file: {"query": ..., "positive": ..., "negatives": [...]}, each cell a string
    (text) or {"text": ..., "image": "path"} with image paths relative to the file's folder."""
    folder = Path(path).resolve().parent
    rows = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not valid JSON: {error}") from error
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number} must be a JSON object with 'query' and 'positive'")
            rows.append({key: _resolve_images(value, folder) for key, value in row.items()})
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


def _resolve_images(value: Any, folder: Path) -> Any:
    if isinstance(value, list):
        return [_resolve_images(item, folder) for item in value]
    if isinstance(value, dict) and isinstance(value.get("image"), str):
        return {**value, "image": str(folder / value["image"])}
    return value


def run_train(arguments: argparse.Namespace) -> None:
    """Create (or continue) a MetaEmbed model and train it with the MMR loss; writes a complete Hub folder."""
    from modeling_metaembed import MetaEmbedModel
    from training_metaembed import train_metaembed

    if arguments.train_file:
        train_dataset = read_jsonl_rows(arguments.train_file)
    else:
        from datasets import load_from_disk

        train_dataset = load_from_disk(arguments.dataset)
    load_options = {"dtype": "bfloat16"} if arguments.bf16 else {}
    if arguments.model:
        model = MetaEmbedModel.from_pretrained(arguments.model, trust_remote_code=True, **load_options)
    else:
        model = MetaEmbedModel.from_backbone(
            arguments.backbone,
            arguments.num_query_vectors,
            arguments.num_candidate_vectors,
            embedding_dim=arguments.embedding_dim,
            **load_options,
        )
    train_metaembed(
        model,
        train_dataset,
        arguments.output_dir,
        temperature=arguments.temperature,
        lora_rank=arguments.lora_rank or None,
        lora_alpha=arguments.lora_alpha,
        cached_mini_batch_size=arguments.cached_mini_batch_size,
        per_device_train_batch_size=arguments.batch_size,
        learning_rate=arguments.learning_rate,
        num_train_epochs=arguments.epochs,
        max_steps=arguments.max_steps,
        bf16=arguments.bf16,
        gradient_checkpointing=arguments.gradient_checkpointing,
        logging_steps=arguments.logging_steps,
    )
    print(f"saved the trained model to {arguments.output_dir}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="metaembed", description="MetaEmbed multimodal retrieval")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train a tiny model from scratch with and without MMR, report budgets")
    demo.add_argument("--steps", type=int, default=1500, help="training steps per model")
    demo.add_argument("--num-candidates", type=int, default=1000, help="held-out scenes to index")
    demo.add_argument("--num-queries", type=int, default=1000)
    demo.add_argument("--output-dir", default=None, help="where to write models and plot (default: a temp folder)")
    demo.set_defaults(handler=run_demo)

    train = commands.add_parser("train", help="train a MetaEmbed model with the MMR loss")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--backbone", help="Qwen2-VL / Qwen2.5-VL / Qwen3-VL folder or repo id to start from")
    source.add_argument("--model", help="an existing MetaEmbed folder or repo id to continue training")
    data = train.add_mutually_exclusive_group(required=True)
    data.add_argument("--train-file", help="JSONL rows {query, positive, negatives?}")
    data.add_argument("--dataset", help="a datasets folder (save_to_disk) with query / positive / negatives")
    train.add_argument("--output-dir", required=True)
    train.add_argument("--num-query-vectors", type=int, default=16)
    train.add_argument("--num-candidate-vectors", type=int, default=64)
    train.add_argument("--embedding-dim", type=int, default=None, help="add a projection to this size")
    train.add_argument("--lora-rank", type=int, default=32, help="0 trains every parameter")
    train.add_argument("--lora-alpha", type=int, default=32)
    train.add_argument("--temperature", type=float, default=0.03)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--cached-mini-batch-size", type=int, default=None, help="gradient cache mini-batch size")
    train.add_argument("--learning-rate", type=float, default=1e-4)
    train.add_argument("--epochs", type=float, default=1.0)
    train.add_argument("--max-steps", type=int, default=-1)
    train.add_argument("--bf16", action="store_true")
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--logging-steps", type=int, default=10)
    train.set_defaults(handler=run_train)

    arguments = parser.parse_args(argv)
    arguments.handler(arguments)


if __name__ == "__main__":
    sys.exit(main())
