"""Time colpali-engine's `score_multi_vector` on bench_scoring's inputs, in colpali-engine's own virtualenv.

Run by `bench_scoring.py --colpali-python VENV/bin/python` (colpali-engine needs a torchvision build that
matches its torch, which this package does not install): same generator, same tensors, scores written to a
safetensors file for the comparison and the best time printed as JSON.

colpali_engine/__init__.py imports every model class (and with them torchvision); the scorer itself is
plain torch, so the package is registered without running its __init__ and only the scorer is imported.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import types

from bench_scoring import make_inputs, parse_args, parse_budget


def import_score_multi_vector():
    spec = importlib.util.find_spec("colpali_engine")
    package = types.ModuleType("colpali_engine")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["colpali_engine"] = package
    from colpali_engine.utils.processing_utils import BaseVisualRetrieverProcessor

    return BaseVisualRetrieverProcessor.score_multi_vector


def main() -> None:
    import torch
    from safetensors.torch import save_file

    output, budget_text, *rest = sys.argv[1:]
    args = parse_args(rest)
    score_multi_vector = import_score_multi_vector()
    queries, candidates = make_inputs(args)
    num_query_vectors, num_candidate_vectors = parse_budget(budget_text)
    queries = queries[:, :num_query_vectors].contiguous()
    candidates = candidates[:, :num_candidate_vectors].contiguous()
    score_multi_vector(queries, candidates[:2048], device=args.device)  # warm-up
    best, scores = float("inf"), None
    started = time.perf_counter()
    for _ in range(args.repeats):
        start = time.perf_counter()
        scores = score_multi_vector(queries, candidates, device=args.device)
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() - started > args.time_limit:
            break
    save_file({"scores": scores.float().contiguous()}, output)
    print(json.dumps({"seconds": best, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
