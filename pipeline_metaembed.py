"""transformers pipelines for MetaEmbed: `feature-extraction` (any item) and `image-feature-extraction`.

Registered through `custom_pipelines` in config.json, so `pipeline(task, model=repo, trust_remote_code=True)`,
`pipeline(model=repo, trust_remote_code=True)` (feature-extraction) and the Inference Toolkit's default path
(`HF_TASK=feature-extraction` / `image-feature-extraction` without a handler.py) return exactly what
`encode_candidates` returns for the same item.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import PIL.Image
import torch
from transformers import Pipeline
from transformers.image_utils import load_image as load_image_reference

try:
    from .configuration_metaembed import PIPELINE_TASK_ALIASES
    from .processing_metaembed import MetaEmbedProcessor, check_task, normalize_item
    from .scoring_metaembed import check_num_vectors, check_positive_int
except ImportError:  # a checkout or an installed package: plain top-level modules
    from configuration_metaembed import PIPELINE_TASK_ALIASES
    from processing_metaembed import MetaEmbedProcessor, check_task, normalize_item
    from scoring_metaembed import check_num_vectors, check_positive_int

# The task registered in config.json; configuration_metaembed.PipelineTasks serves PIPELINE_TASK_ALIASES with it.
DEFAULT_PIPELINE_TASK = "feature-extraction"


def pipeline_registrations() -> dict[str, dict[str, Any]]:
    """The `custom_pipelines` entry of config.json: one entry, so `pipeline(model=folder)` infers its task (the
    config answers for `image-feature-extraction` with the same entry)."""
    return {DEFAULT_PIPELINE_TASK: {"impl": "pipeline_metaembed.MetaEmbedPipeline", "pt": ["AutoModel"]}}


def check_processed_inputs(processor: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """Refuse `input_ids` that are not MetaEmbed prompts, e.g. raw text from a tokenizer, as transformers' stock
    `feature-extraction` pipeline passes when it is built around a loaded model object (`pipeline(task,
    model=model)` does not read the model's `custom_pipelines`): its vectors would silently differ from
    `encode_candidates`. A row must start (after padding) with the opening tokens all of `processor`'s text prompts
    share, or hold the family's image token (PaliGemma's image prompts start with the image, before that opening).
    """
    if processor is None or input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        return
    prefix = torch.tensor(_prompt_prefix(processor), dtype=input_ids.dtype, device=input_ids.device)
    if len(prefix) == 0 or input_ids.shape[1] < len(prefix):
        return
    first = attention_mask.long().argmax(1, keepdim=True)  # the first attended position, either padding side
    positions = (first + torch.arange(len(prefix), device=input_ids.device)).clamp(max=input_ids.shape[1] - 1)
    prompted = (input_ids.gather(1, positions) == prefix).all(1)
    image_token_id = getattr(processor, "image_token_id", None)
    if image_token_id is not None:
        prompted |= ((input_ids == image_token_id) & attention_mask.bool()).any(1)
    if not bool(prompted.all()):
        row = int((~prompted).nonzero()[0, 0])
        raise ValueError(
            f"input_ids[{row}] is not a MetaEmbed prompt (raw tokenizer output?): build inputs with model.processor "
            "(process_queries / process_candidates) or call model.encode_queries / encode_candidates. For a "
            "pipeline around a loaded model use MetaEmbedPipeline(model=model) or pipeline(task, model=model, "
            "pipeline_class=MetaEmbedPipeline); pipeline(task, model=folder, trust_remote_code=True) finds it itself"
        )


def _prompt_prefix(processor: Any) -> list[int]:
    """The token ids every text prompt of `processor` starts with: queries and candidates, two different texts (so
    the opening stops before the text even when the query and candidate prefixes are the same)."""
    rows = []
    for batch in (processor.process_queries(["a", "b"]), processor.process_candidates(["a", "b"])):
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            rows.append(ids[mask.bool()].tolist())
    prefix = []
    for ids in zip(*rows):
        if len(set(ids)) > 1:
            break
        prefix.append(ids[0])
    return prefix


def _is_url(reference: str) -> bool:
    return reference.startswith(("http://", "https://"))


def _fetch_url(url: str, timeout: float | None) -> PIL.Image.Image:
    """The image at an http(s) URL, fetched as transformers' `load_image` fetches it (httpx, redirects followed),
    but an error status or a failed request is an error saying so, not an attempt to decode the error page."""
    import httpx  # a dependency of transformers, which fetches image URLs with it

    try:
        response = httpx.get(url, timeout=timeout, follow_redirects=True)
    except httpx.HTTPError as error:
        raise ValueError(f"the request failed: {error}") from error
    if response.is_error:
        raise ValueError(f"the server answered HTTP {response.status_code} {response.reason_phrase}")
    return PIL.Image.open(io.BytesIO(response.content))


class MetaEmbedPipeline(Pipeline):
    """Embeds one item per call (or each item of a list, dataset or generator): text, a PIL image, or a
    {"text", "image"} dict.

    For `image-feature-extraction`, a string is an image: an http(s) URL, a file path or base64, loaded as
    transformers' image pipelines load them (`timeout` applies to URLs); for `feature-extraction` it is text.

    Call parameters: `task` ("candidate" by default, or "query"), `num_vectors` (default all), `return_tensors`,
    `batch_size` (items per forward pass, through the model's own batched `encode`: the same vectors as one by
    one). The parameters transformers' feature-extraction pipelines take are accepted when MetaEmbed's output
    already is what they ask for (`framework="pt"`, `truncation=True`, `tokenize_kwargs` of the processor's
    fixed settings, a `max_length` equal to the processor's `max_text_tokens`, `pool=False`, empty
    `image_processor_kwargs`) and refused otherwise. Each result is
    `[num_vectors, D]` (nested lists, or a float32 tensor with `return_tensors=True`).
    """

    # The model carries its own MetaEmbedProcessor; do not let the factory load parts of it separately.
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def _sanitize_parameters(
        self,
        task: str | None = None,
        num_vectors: int | None = None,
        return_tensors: bool | None = None,
        timeout: float | None = None,
        framework: str | None = None,
        truncation: bool | str | None = None,
        tokenize_kwargs: dict[str, Any] | None = None,
        image_processor_kwargs: dict[str, Any] | None = None,
        pool: bool | None = None,
        **kwargs: Any,
    ):
        if kwargs:
            raise TypeError(f"unexpected MetaEmbed pipeline parameters: {sorted(kwargs)}")
        if framework not in (None, "pt"):
            raise ValueError(f"MetaEmbed runs on PyTorch only, got framework={framework!r}")
        # The processor's own check of the generic tokenizer options: MetaEmbed always cuts an item's text to
        # max_text_tokens and pads on the left, so only values that ask for exactly that are accepted.
        max_length = MetaEmbedProcessor._check_call_options({"truncation": truncation, **(tokenize_kwargs or {})})
        max_text_tokens = self.model.processor.max_text_tokens if self.model.processor is not None else None
        if max_length is not None and max_length != max_text_tokens:
            # model.encode cuts with the model's processor: another length would be silently ignored.
            raise ValueError(
                f"tokenize_kwargs max_length={max_length} differs from the processor's max_text_tokens "
                f"({max_text_tokens}), which cuts every item's text here; set "
                f"pipe.model.processor.max_text_tokens = {max_length} to change it"
            )
        if image_processor_kwargs:
            raise ValueError(
                f"MetaEmbed's image preprocessing is fixed by its processor; got image_processor_kwargs "
                f"{sorted(image_processor_kwargs)}"
            )
        if pool:
            raise ValueError(
                "MetaEmbed has no pooled output: its Meta Token vectors are the embedding; num_vectors=1 gives one "
                "vector per item"
            )
        preprocess_parameters, forward_parameters, postprocess_parameters = {}, {}, {}
        if task is not None:
            forward_parameters["task"] = check_task(task)
        if num_vectors is not None:
            forward_parameters["num_vectors"] = num_vectors
        if timeout is not None:
            preprocess_parameters["timeout"] = timeout
        if return_tensors is not None:
            postprocess_parameters["return_tensors"] = return_tensors
        return preprocess_parameters, forward_parameters, postprocess_parameters

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(inputs, (list, tuple)) and not inputs:
            # transformers' __call__ reads inputs[0]; an empty list is simply no items.
            kwargs.pop("batch_size", None), kwargs.pop("num_workers", None)
            self._sanitize_parameters(**kwargs)
            return []
        return super().__call__(list(inputs) if isinstance(inputs, tuple) else inputs, *args, **kwargs)

    def preprocess(self, item: Any, timeout: float | None = None, where: str = "inputs") -> dict[str, dict[str, Any]]:
        """The item checked (`where` names it in errors), as the dict `model.encode` takes; an image task's
        string loaded as an image."""
        if self.task in PIPELINE_TASK_ALIASES and isinstance(item, str):
            try:
                item = load_image_reference(_fetch_url(item, timeout) if _is_url(item) else item, timeout=timeout)
            except (OSError, ValueError) as error:
                raise ValueError(f"{where}: cannot load image {item[:200]!r}: {error}") from error
        checked = normalize_item(item, where)
        return {"item": {"text": checked.text, "image": checked.image}}

    def _forward(self, model_inputs: dict[str, Any], task: str = "candidate", num_vectors: int | None = None):
        return {"embeddings": self.model.encode([model_inputs["item"]], task, num_vectors)}

    def postprocess(self, model_outputs: dict[str, torch.Tensor], return_tensors: bool = False):
        embeddings = model_outputs["embeddings"][0].to("cpu", torch.float32)
        return embeddings if return_tensors else embeddings.tolist()

    def get_iterator(
        self,
        inputs: Iterable[Any],
        num_workers: int,
        batch_size: int,
        preprocess_params: dict[str, Any],
        forward_params: dict[str, Any],
        postprocess_params: dict[str, Any],
    ) -> Iterator[Any]:
        """Lists, datasets and generators: `batch_size` items at a time through `model.encode`, which pads and
        batches MetaEmbed inputs itself (transformers' generic collator knows neither its processor nor its
        left padding). Results are yielded in input order."""
        batch_size = check_positive_int(batch_size, "batch_size")
        task = forward_params.get("task", "candidate")
        num_vectors = check_num_vectors(forward_params.get("num_vectors"), self.model.config.num_vectors_for(task))
        return self._iterate(iter(inputs), batch_size, task, num_vectors, preprocess_params, postprocess_params)

    def _iterate(
        self,
        inputs: Iterator[Any],
        batch_size: int,
        task: str,
        num_vectors: int,
        preprocess_params: dict[str, Any],
        postprocess_params: dict[str, Any],
    ) -> Iterator[Any]:
        for start in itertools.count(0, batch_size):
            batch = list(itertools.islice(inputs, batch_size))
            if not batch:
                return
            items = [
                self.preprocess(item, **preprocess_params, where=f"inputs[{start + offset}]")["item"]
                for offset, item in enumerate(batch)
            ]
            embeddings = self.model.encode(items, task, num_vectors, batch_size=batch_size)
            for vectors in embeddings:
                yield self.postprocess({"embeddings": vectors[None]}, **postprocess_params)
