"""transformers pipelines for MetaEmbed: `feature-extraction` (any item) and `image-feature-extraction`.

Registered through `custom_pipelines` in config.json, so `pipeline(task, model=repo, trust_remote_code=True)`
and the Hub's inference widgets return exactly what `encode_candidates` returns for the same item.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Pipeline

try:
    from .processing_metaembed import check_task, normalize_item
    from .scoring_metaembed import check_num_vectors
except ImportError:  # a checkout or an installed package: plain top-level modules
    from processing_metaembed import check_task, normalize_item
    from scoring_metaembed import check_num_vectors

PIPELINE_TASKS = ("feature-extraction", "image-feature-extraction")


def pipeline_registrations() -> dict[str, dict[str, Any]]:
    """The `custom_pipelines` entry of config.json."""
    return {task: {"impl": "pipeline_metaembed.MetaEmbedPipeline", "pt": ["AutoModel"]} for task in PIPELINE_TASKS}


class MetaEmbedPipeline(Pipeline):
    """Embeds one item per call (or each item of a list): text, a PIL image, or a {"text", "image"} dict.

    For `image-feature-extraction`, a string is an image path, as in transformers' image pipelines; for
    `feature-extraction` it is text. Call parameters: `task` ("candidate" by default, or "query"),
    `num_vectors` (default all) and `return_tensors`. Each result is `[num_vectors, D]` (nested lists, or
    a float32 tensor with `return_tensors=True`).
    """

    # The model carries its own MetaEmbedProcessor; do not let the factory load parts of it separately.
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def _sanitize_parameters(
        self, task: str | None = None, num_vectors: int | None = None, return_tensors: bool | None = None, **kwargs
    ):
        if kwargs:
            raise TypeError(f"unexpected MetaEmbed pipeline parameters: {sorted(kwargs)}")
        preprocess_parameters, forward_parameters, postprocess_parameters = {}, {}, {}
        if task is not None:
            preprocess_parameters["task"] = forward_parameters["task"] = check_task(task)
        if num_vectors is not None:
            forward_parameters["num_vectors"] = num_vectors
        if return_tensors is not None:
            postprocess_parameters["return_tensors"] = return_tensors
        return preprocess_parameters, forward_parameters, postprocess_parameters

    def preprocess(self, item: Any, task: str = "candidate") -> dict[str, torch.Tensor]:
        if self.task == "image-feature-extraction" and isinstance(item, str):
            item = {"image": item}
        checked = normalize_item(item, "inputs")
        return dict(self.model.processor.process_checked_items([checked], task, ["inputs"]))

    def _forward(self, features: dict[str, torch.Tensor], task: str = "candidate", num_vectors: int | None = None):
        # The task was checked by _sanitize_parameters; the count is checked here, once the task is known.
        num_vectors = check_num_vectors(num_vectors, self.model.config.num_vectors_for(task))
        return {"embeddings": self.model._embed(task, num_vectors, **features).embeddings}

    def postprocess(self, model_outputs: dict[str, torch.Tensor], return_tensors: bool = False):
        embeddings = model_outputs["embeddings"][0].to("cpu", torch.float32)
        return embeddings if return_tensors else embeddings.tolist()
