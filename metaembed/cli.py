"""The `metaembed` command line: `demo` (the end-to-end main job), `train`, `index`, `search` and `evaluate`."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def run_demo(arguments: argparse.Namespace) -> None:
    """Train a tiny MetaEmbed from scratch with and without MMR on rendered scenes and report every budget."""
    from .demo import DemoSettings, run_demo

    settings = DemoSettings(
        steps=arguments.steps,
        num_candidates=arguments.num_candidates,
        num_queries=arguments.num_queries,
        seed=arguments.seed,
    )
    run_demo(settings, arguments.output_dir)


def _resolve_images(value: Any, folder: Path) -> Any:
    if isinstance(value, list):
        return [_resolve_images(item, folder) for item in value]
    if isinstance(value, dict) and isinstance(value.get("image"), str):
        return {**value, "image": str(folder / value["image"])}
    return value


def run_train(arguments: argparse.Namespace) -> None:
    """Create (or continue) a MetaEmbed model and train it with the MMR loss; writes a complete Hub folder."""
    from modeling_metaembed import MetaEmbedModel

    from .training import train_metaembed

    if arguments.train_file:
        from .training.data import read_training_jsonl

        train_dataset = read_training_jsonl(arguments.train_file, arguments.allow_absolute_image_paths)
    else:
        from datasets import load_from_disk

        train_dataset = load_from_disk(arguments.dataset)
    load_options = {"dtype": "bfloat16"} if arguments.bf16 else {}
    if arguments.model:
        model = load_model(arguments.model, load_options.get("dtype", "auto"), None, arguments.trust_remote_code)
    else:
        model = MetaEmbedModel.from_backbone(
            arguments.backbone,
            arguments.num_query_vectors,
            arguments.num_candidate_vectors,
            embedding_dim=arguments.embedding_dim,
            trust_remote_code=arguments.trust_remote_code,  # False: a backbone needing remote code is refused
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


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def read_corpus(path: str) -> tuple[list[Any], list[Any], list[Any]]:
    """(items, ids, metadata) of a corpus to index.

    - a folder: every image file below it (sorted); id = the path relative to the folder.
    - a .jsonl file: one object per line with "text" and/or "image" (path relative to the file) and an optional
      "id"; any other fields become the metadata.
    - any other file: one text per non-empty line; id = the line number.

    Every item is checked here, before anything is encoded; errors name it (`corpus.jsonl:4`, or an image's
    path relative to the folder).
    """
    from processing_metaembed import normalize_item

    from .search.storage import check_strict_json

    if os.path.isdir(path):
        files = sorted(
            os.path.relpath(os.path.join(folder, name), path)
            for folder, _, names in os.walk(path)
            for name in names
            if name.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not files:
            raise ValueError(f"{path} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        items = [{"image": os.path.join(path, name)} for name in files]
        for item, name in zip(items, files):
            normalize_item(item, name)
        return items, files, [{"path": name} for name in files]
    items, ids, metadata = [], [], []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            if not path.endswith(".jsonl"):
                normalize_item(line.rstrip("\n"), f"{path}:{number}")
                items.append(line.rstrip("\n"))
                ids.append(number)
                metadata.append({"text": line.strip()})
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not valid JSON: {error}") from error
            if not isinstance(row, dict) or not ({"text", "image"} & row.keys()):
                raise ValueError(f"{path}:{number} must be a JSON object with 'text' and/or 'image'")
            item = {key: row[key] for key in ("text", "image") if key in row}
            identifier = row.get("id", number)
            if isinstance(identifier, bool) or not isinstance(identifier, (str, int)):
                raise ValueError(f"{path}:{number}: 'id' must be a string or an integer, got {identifier!r}")
            items.append(_resolve_images(item, Path(path).resolve().parent))
            normalize_item(items[-1], f"{path}:{number}")
            ids.append(identifier)
            metadata.append({key: value for key, value in row.items() if key != "id"})
            check_strict_json(metadata[-1], f"{path}:{number}")  # Python's json reads NaN / Infinity too
    if not items:
        raise ValueError(f"{path} holds no items")
    seen: set[Any] = set()
    for identifier in ids:
        if identifier in seen:
            raise ValueError(f"{path}: id {identifier!r} appears more than once (ids default to line numbers)")
        seen.add(identifier)
    return items, ids, metadata


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) from the environment torchrun / accelerate launch set; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def load_model(name_or_path: str, dtype: str, device: str | None, trust_remote_code: bool = False) -> Any:
    """The model of a command: served by the installed package's classes unless `--trust-remote-code` (see
    `metaembed.loading`); model paths come from users and from data (an index's index.json) alike."""
    from .loading import load_model as load_metaembed_model

    options: dict[str, Any] = {} if dtype == "auto" else {"dtype": dtype}
    model = load_metaembed_model(name_or_path, trust_remote_code=trust_remote_code, **options)
    if device is None and os.environ.get("LOCAL_RANK") is not None:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{os.environ['LOCAL_RANK']}"
    return model.to(device) if device else model


def run_index(arguments: argparse.Namespace) -> None:
    """Encode a corpus into a MetaEmbedIndex folder. Under torchrun / accelerate launch every process encodes
    its share of the shards (no communication) into the job's generation; whichever process finds them all
    written commits the index. A shard already encoded from the same items by the same model is reused, so a
    rerun resumes and an edited corpus re-encodes only the shards whose items changed."""
    from scoring_metaembed import check_num_vectors

    from .fingerprint import items_digest, model_fingerprint, records_digest
    from .search import storage
    from .search.index import MetaEmbedIndex

    folder = arguments.output_dir
    existing = _existing_index(folder)
    items, ids, metadata = read_corpus(arguments.input)
    rank, world_size = distributed_rank()
    # Another writer (a `save`, another job) holding the folder: fail now, or wait as --wait says, not after encoding.
    lock_wait = arguments.wait if arguments.wait is not None else (0.0 if world_size == 1 else math.inf)
    with storage.write_lock(folder, lock_wait, report=_print_progress):
        pass
    model = load_model(arguments.model, arguments.dtype, arguments.device, arguments.trust_remote_code)
    num_vectors = check_num_vectors(arguments.num_vectors, model.config.num_candidate_vectors, "--num-vectors")
    model_path = os.path.abspath(arguments.model) if os.path.isdir(arguments.model) else arguments.model
    corpus = {"input": os.path.abspath(arguments.input), "items": len(items), "shard_size": arguments.shard_size}
    settings = MetaEmbedIndex(model.config.output_dim, num_vectors, arguments.storage, model_path).manifest(corpus)
    if existing is not None and not arguments.overwrite:
        _check_resumable(folder, existing, settings)
    fingerprint = model_fingerprint(model)
    shards = [
        (start, min(start + arguments.shard_size, len(items))) for start in range(0, len(items), arguments.shard_size)
    ]
    # The reuse key: everything that decides a shard's bytes (its items' content, the model, the stored layout,
    # its ids and metadata); `shard_written` also checks the tensors' header against the layout.
    layout = {"storage": arguments.storage, "num_vectors": num_vectors, "dim": model.config.output_dim}
    sources = [
        {
            **layout,
            "items_sha256": items_digest(items[start:end]),
            "records_sha256": records_digest(ids[start:end], metadata[start:end]),
            "model_sha256": fingerprint,
        }
        for start, end in shards
    ]
    generation = storage.job_generation({"settings": settings, "sources": sources})
    path = storage.generation_folder(folder, generation)
    reused = encoded = 0
    own_shards = range(rank, len(shards), world_size)
    # Shared by the job's processes until they end: saves and commits meanwhile leave this generation alone.
    with storage.job_running(path):
        try:
            for number in own_shards:
                start, end = shards[number]
                shard_ids, source = ids[start:end], sources[number]
                if storage.shard_written(path, number, len(shards), shard_ids, source) or storage.reuse_shard(
                    folder, path, number, len(shards), shard_ids, source
                ):
                    reused += 1
                    continue
                print(f"[rank {rank}] shard {number + 1}/{len(shards)}: items {start}..{end - 1}", flush=True)
                embeddings = model.encode_candidates(
                    items[start:end], num_vectors=num_vectors, batch_size=arguments.batch_size, show_progress_bar=True
                )
                stored = storage.quantize(embeddings, arguments.storage)
                storage.check_storable(stored, shard_ids, arguments.storage)
                storage.write_shard(
                    path,
                    number,
                    len(shards),
                    stored.embeddings,
                    stored.scales,
                    shard_ids,
                    metadata[start:end],
                    source,
                    stored.offsets,
                )
                encoded += 1
        except FileNotFoundError:
            if os.path.isdir(path):
                raise
            raise _job_removed(folder) from None
        print(f"[rank {rank}] {reused} shard(s) reused, {encoded} encoded", flush=True)
        with storage.write_lock(folder, lock_wait, report=_print_progress):  # ranks of one job commit in turn
            current = storage.read_manifest(folder)
            if current is not None and current.get("generation") == generation:
                print(f"[rank {rank}] done: {folder}", flush=True)
                return
            waiting = [
                number
                for number, (start, end) in enumerate(shards)
                if not storage.shard_written(path, number, len(shards), ids[start:end], sources[number])
            ]
            if set(waiting) & set(own_shards):
                raise _job_removed(folder)
            if waiting:
                print(
                    f"[rank {rank}] done; shard(s) {[n + 1 for n in waiting]} are other processes' to write", flush=True
                )
                return
            storage.commit(folder, generation, settings, len(shards))
        print(f"[rank {rank}] done: {folder}", flush=True)


def _print_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _job_removed(folder: str) -> OSError:
    """The error of a `metaembed index` process whose own shards were removed before it could commit them."""
    from .search import storage

    return storage.IndexChangedError(
        f"{folder}: shards this process wrote were removed before the index was committed (another process saved "
        "or committed an index into this folder meanwhile); nothing was committed: rerun when it is done"
    )


def _existing_index(folder: str) -> dict[str, Any] | None:
    """The manifest of the MetaEmbed index in `folder`; None for a missing or empty folder (or one holding only
    this format's own files, e.g. a job that has not committed yet). Anything else is refused, saying what is
    there: nothing is ever written into or deleted from a folder that is not an index."""
    from .search import storage

    if not os.path.exists(folder):
        return None
    if not os.path.isdir(folder):
        raise ValueError(f"{folder} exists and is not a folder; choose a new or empty folder for the index")
    foreign = sorted(name for name in os.listdir(folder) if not storage.is_own_entry(folder, name))
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    try:
        manifest = storage.read_manifest(folder)
    except ValueError as error:
        raise ValueError(f"{error}: {folder} holds {shown}; choose a new or empty folder for the index") from None
    if manifest is None and foreign:
        raise ValueError(
            f"{folder} is not a MetaEmbed index (no index.json) and is not empty: it holds {shown}; "
            "choose a new or empty folder for the index"
        )
    return manifest


def _check_resumable(folder: str, existing: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Refuse to replace an index made by another model, storage, vector count or corpus layout unless asked."""
    # ANN settings are not part of what the shards hold; everything else must match.
    different = [key for key, value in wanted.items() if key != "ann" and existing.get(key) != value]
    if different:
        details = ", ".join(f"{key}: {existing.get(key)!r} there, {wanted[key]!r} now" for key in different)
        raise ValueError(
            f"{folder} holds a MetaEmbed index made differently ({details}); choose another folder, or pass "
            "--overwrite to replace that index"
        )


def run_search(arguments: argparse.Namespace) -> None:
    """Encode queries and print the best candidates of an index with their scores."""
    from .search.index import MetaEmbedIndex

    index = MetaEmbedIndex.load(arguments.index)
    model_name = arguments.model or index.model_name_or_path
    if not model_name:
        raise ValueError(f"{arguments.index} records no model: pass --model")
    model = load_model(model_name, arguments.dtype, arguments.device, arguments.trust_remote_code)
    queries: list[Any] = list(arguments.queries)
    if arguments.image:
        queries += [{"image": path} for path in arguments.image]
    if not queries:
        raise ValueError("give at least one query text or --image")
    num_query_vectors, num_candidate_vectors = arguments.budget
    embeddings = model.encode_queries(queries, num_vectors=num_query_vectors)
    top_k = min(arguments.top_k, len(index))
    requested = None if arguments.exhaustive else arguments.shortlist or "auto"
    shortlist, ann_query_vectors = index.search_plan(top_k, num_query_vectors or embeddings.shape[1], requested)
    # Said on stderr, so --json output stays one JSON document.
    if shortlist is None:
        print("search: exhaustive (every candidate scored exactly)", file=sys.stderr)
    else:
        print(
            f"search: two stages, the ANN index's {shortlist} nearest vectors to each of {ann_query_vectors} query "
            "vector(s), reranked exactly (--exhaustive scores every candidate)",
            file=sys.stderr,
        )
    results = index.search(
        embeddings,
        num_query_vectors,
        num_candidate_vectors,
        top_k,
        shortlist_size=shortlist,
        ann_query_vectors=ann_query_vectors,
    )
    output = []
    for query, scores, positions, row_ids in zip(queries, results.scores, results.indices, results.ids):
        # Two-stage rows can end early (position -1) when the shortlist held fewer candidates than --top-k.
        found = [hit for hit in zip(scores.tolist(), positions.tolist(), row_ids) if hit[1] >= 0]
        hits = [
            {"rank": rank, "score": round(score, 6), "id": identifier, "metadata": index.metadata(position)}
            for rank, (score, position, identifier) in enumerate(found, start=1)
        ]
        output.append({"query": query, "results": hits})
    if arguments.json:
        print(json.dumps(output, indent=2))
        return
    for entry in output:
        print(f"query: {entry['query']}")
        for hit in entry["results"]:
            print(f"  {hit['rank']:>3}  {hit['score']:9.4f}  {hit['id']}  {json.dumps(hit['metadata'])}")


def parse_budget(text: str) -> tuple[int, int]:
    """ "4,8" -> (4, 8): a budget (r_q, r_c) on the command line."""
    parts = text.split(",")
    if len(parts) != 2 or not all(part.strip().isdigit() and int(part) >= 1 for part in parts):
        raise argparse.ArgumentTypeError(f"a budget is R_Q,R_C with two positive integers (e.g. 4,8), got {text!r}")
    return int(parts[0]), int(parts[1])


def run_evaluate(arguments: argparse.Namespace) -> None:
    """Evaluate a model on ViDoRe / BEIR / MMEB datasets at every budget: table, JSON, plot, card results."""
    from .evaluation import evaluate, read_datasets
    from .evaluation.card import writable_card, write_card_results
    from .evaluation.report import format_table, json_writer, plotting_available, save_plot, write_output

    # Everything that can fail after the evaluation is checked before it: the card (its front matter parses)
    # and the optional plot (skipped with a note without matplotlib).
    if arguments.write_card:
        if not os.path.isdir(arguments.model):
            raise ValueError(f"--write-card needs MODEL to be a saved model folder with a README.md: {arguments.model}")
        writable_card(arguments.model)
    plot = plotting_available()
    if not plot:
        print("no plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    # Bad data or arguments raise ValueError / OSError: `main` prints one line and exits 2.
    datasets = read_datasets(
        arguments.format,
        arguments.data,
        split=arguments.split,
        subsets=arguments.subsets,
        image_root=arguments.image_root,
        dataset_ids=arguments.dataset_id,
        protocol=arguments.protocol,
    )
    model = load_model(arguments.model, arguments.dtype, arguments.device, arguments.trust_remote_code)
    os.makedirs(arguments.output_dir, exist_ok=True)
    results = evaluate(
        model,
        datasets,
        arguments.budgets,
        metrics=arguments.metrics,
        batch_size=arguments.batch_size,
        cache_dir=os.path.join(arguments.output_dir, "embeddings"),
        storage=arguments.storage,
        show_progress_bar=True,
    )
    print(format_table(results))
    written = [write_output(arguments.output_dir, "results.json", json_writer(results, model=arguments.model))]
    if plot:
        written.append(
            write_output(arguments.output_dir, "quality_vs_budget.png", lambda path: save_plot(results, path))
        )
    print("\n" + ", ".join(path for path, _ in written))
    for _, note in written:
        if note:
            print(note)
    if arguments.write_card:
        print(f"model card: {write_card_results(arguments.model, results)}")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


positive_int, non_negative_int = int_at_least(1), int_at_least(0)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0 (`inf` allowed)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text}")
    return value


MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_trust_remote_code_argument(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the .py files of the model folder (also one an index names); without it the installed "
        "metaembed serves the model and a folder with other code is refused",
    )


def build_parser() -> argparse.ArgumentParser:
    from scoring_metaembed import MMR_BUDGETS

    parser = argparse.ArgumentParser(prog="metaembed", description="MetaEmbed multimodal retrieval")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train a tiny model from scratch with and without MMR, report budgets")
    demo.add_argument("--steps", type=positive_int, default=1000, help="training steps per model")
    demo.add_argument("--num-candidates", type=positive_int, default=1000, help="held-out scenes to index")
    demo.add_argument("--num-queries", type=positive_int, default=2000, help="held-out text and image queries")
    demo.add_argument("--seed", type=non_negative_int, default=0, help="seed of the backbone, training data, training")
    demo.add_argument("--output-dir", default=None, help="where to write models and plot (default: a temp folder)")
    demo.set_defaults(handler=run_demo)

    train = commands.add_parser("train", help="train a MetaEmbed model with the MMR loss")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--backbone", help="Qwen2-VL / Qwen2.5-VL / Qwen3-VL folder or repo id to start from")
    source.add_argument("--model", help="an existing MetaEmbed folder or repo id to continue training")
    data = train.add_mutually_exclusive_group(required=True)
    data.add_argument("--train-file", help="JSONL rows {query, positive, negatives?}")
    data.add_argument("--dataset", help="a datasets folder (save_to_disk) with query / positive / negatives")
    train.add_argument(
        "--allow-absolute-image-paths",
        action="store_true",
        help="let --train-file name images by absolute paths or outside its folder",
    )
    train.add_argument("--output-dir", required=True)
    train.add_argument("--num-query-vectors", type=positive_int, default=16)
    train.add_argument("--num-candidate-vectors", type=positive_int, default=64)
    train.add_argument("--embedding-dim", type=positive_int, default=None, help="add a projection to this size")
    train.add_argument("--lora-rank", type=non_negative_int, default=32, help="0 trains every parameter")
    train.add_argument("--lora-alpha", type=positive_int, default=32)
    train.add_argument("--temperature", type=positive_float, default=0.03)
    train.add_argument("--batch-size", type=positive_int, default=32)
    train.add_argument(
        "--cached-mini-batch-size", type=positive_int, default=None, help="gradient cache mini-batch size"
    )
    train.add_argument("--learning-rate", type=positive_float, default=1e-4)
    train.add_argument("--epochs", type=positive_float, default=1.0)
    train.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: run the epochs)")
    train.add_argument("--bf16", action="store_true")
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--logging-steps", type=positive_int, default=10)
    add_trust_remote_code_argument(train)
    train.set_defaults(handler=run_train)

    index = commands.add_parser("index", help="encode a folder of images, a text file or a JSONL file into an index")
    index.add_argument("model", help="a MetaEmbed folder or repo id")
    index.add_argument("input", help="a folder of images, a .jsonl file ({text?, image?, id?, ...}) or a text file")
    index.add_argument("output_dir", help="a new or empty folder, or a MetaEmbed index to resume or replace")
    index.add_argument(
        "--storage",
        choices=["float32", "float16", "int8", "int4", "residual4"],
        default="float16",
        help="bytes per 64 x 128 candidate (recall@10 against float32 on the README's benchmark): float32 32,768; "
        "float16 16,384 (1.000, default); int8 8,448 (0.994); int4 4,352 (0.872); residual4 4,608 (0.934, the "
        "compact one: below fast-plaid's 4,847 bytes and 0.897)",
    )
    index.add_argument("--num-vectors", type=positive_int, default=None, help="candidate vectors kept (default: all)")
    index.add_argument("--batch-size", type=positive_int, default=32)
    index.add_argument("--shard-size", type=positive_int, default=50_000, help="candidates per shard file")
    index.add_argument("--dtype", choices=MODEL_DTYPES, default="auto", help="model dtype")
    index.add_argument("--device", default=None, help="e.g. cuda:0 (default: the model's; LOCAL_RANK's GPU)")
    index.add_argument(
        "--overwrite", action="store_true", help="replace a MetaEmbed index made with other settings in output_dir"
    )
    index.add_argument(
        "--wait",
        type=non_negative_float,
        default=None,
        metavar="SECONDS",
        help="wait up to this long for another process writing the index (default: fail at once; ranks of a "
        "multi-process job wait for each other)",
    )
    add_trust_remote_code_argument(index)
    index.set_defaults(handler=run_index)

    search = commands.add_parser("search", help="search an index: queries -> ranked ids with scores")
    search.add_argument("index")
    search.add_argument("queries", nargs="*", help="query texts")
    search.add_argument("--image", action="append", help="an image query (path); repeatable")
    search.add_argument(
        "--budget", type=positive_int, nargs=2, default=(None, None), metavar=("R_Q", "R_C"), help="default: all"
    )
    search.add_argument("--top-k", type=positive_int, default=10)
    stages = search.add_mutually_exclusive_group()
    stages.add_argument(
        "--shortlist",
        type=positive_int,
        default=None,
        help="two-stage search with this shortlist per first-stage query vector (default: two stages with the "
        "index's own default when it holds an ANN index, else exhaustive)",
    )
    stages.add_argument("--exhaustive", action="store_true", help="score every candidate (exact)")
    search.add_argument("--model", default=None, help="override the model recorded in the index")
    search.add_argument("--dtype", choices=MODEL_DTYPES, default="auto")
    search.add_argument("--device", default=None)
    search.add_argument("--json", action="store_true", help="print JSON")
    add_trust_remote_code_argument(search)
    search.set_defaults(handler=run_search)
    evaluation = commands.add_parser(
        "evaluate", help="quality, index size and scoring time at every budget on ViDoRe / BEIR / MMEB datasets"
    )
    evaluation.add_argument("model", help="a MetaEmbed folder or repo id")
    evaluation.add_argument("data", nargs="+", help="dataset folders (Hub snapshot or save_to_disk) or Hub ids")
    evaluation.add_argument("--format", required=True, choices=["vidore", "beir", "mmeb"])
    evaluation.add_argument(
        "--protocol",
        choices=["mteb", "vidore-benchmark", "vlm2vec"],
        default=None,
        help="whose published numbers to reproduce (default: mteb 2.x for vidore/beir, VLM2Vec for mmeb)",
    )
    evaluation.add_argument(
        "--budgets",
        type=parse_budget,
        nargs="+",
        default=list(MMR_BUDGETS),
        metavar="R_Q,R_C",
        help="budgets to score (default: the paper's five)",
    )
    evaluation.add_argument("--output-dir", default="metaembed-evaluation", help="results, plot and embedding cache")
    evaluation.add_argument("--metrics", nargs="+", default=None, help="e.g. ndcg@5 recall@100 (default: the format's)")
    evaluation.add_argument("--split", default="test")
    evaluation.add_argument("--subsets", nargs="+", default=None, help="MMEB subsets (default: all configs)")
    evaluation.add_argument("--image-root", default=None, help="MMEB: the folder image paths are relative to")
    evaluation.add_argument("--batch-size", type=positive_int, default=16)
    evaluation.add_argument("--storage", choices=["float32", "float16", "int8"], default="float32")
    evaluation.add_argument("--dtype", choices=MODEL_DTYPES, default="auto")
    evaluation.add_argument("--device", default=None)
    evaluation.add_argument("--write-card", action="store_true", help="add the results to MODEL/README.md")
    evaluation.add_argument(
        "--dataset-id",
        nargs="+",
        default=None,
        help="the Hub id of each DATA folder (one per DATA), so --write-card can name local snapshots",
    )
    add_trust_remote_code_argument(evaluation)
    evaluation.set_defaults(handler=run_evaluate)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run the `metaembed` command. Bad arguments and errors in what the user gave (files, folders, values,
    items of the wrong type) print one line and exit with status 2, as argparse does; anything else is a bug and
    keeps its traceback."""
    parser = build_parser()
    arguments = parser.parse_args(argv)
    try:
        arguments.handler(arguments)
    except (TypeError, ValueError, OSError) as error:
        parser.exit(2, f"metaembed {arguments.command}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
