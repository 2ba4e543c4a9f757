"""sentence-transformers integration: a saved MetaEmbed folder loads as a `MultiVectorEncoder`.

    from sentence_transformers import MultiVectorEncoder

    encoder = MultiVectorEncoder("my-metaembed", trust_remote_code=True)
    queries = encoder.encode_query(["a red circle"], num_vectors=8)           # list of [8, D] tensors
    documents = encoder.encode_document([{"image": page}], num_vectors=16)   # list of [16, D] tensors
    scores = encoder.similarity(queries, documents)                           # MaxSim, [1, 1]

`MetaEmbedModel.save_pretrained` writes the three files sentence-transformers reads (`modules.json`,
`config_sentence_transformers.json` and this module's `sentence_metaembed_config.json`) through
`modeling_metaembed.save_sentence_transformers_config`; `MultiVectorEncoder.save` writes them itself. The
folder holds one `MetaEmbedModule`: the whole MetaEmbed model as a sentence-transformers input module, whose
`preprocess` is the model's processor and whose `forward` is the model's forward, so embeddings equal
`encode_queries` / `encode_candidates`.

Tasks and prompts map onto MetaEmbed as follows. sentence-transformers' task "query" is a MetaEmbed query,
"document" (and no task, i.e. plain `encode`) a MetaEmbed candidate. The processor owns MetaEmbed's prompt
templates and the "Query: " prefix, so the saved sentence-transformers prompts are empty; a prompt a user sets
is an instruction that goes in front of the item's text inside the template (MMEB-style task instructions are
part of the text in the reference code), and is never dropped or placed before the template.

This file travels with the model (it is in the Hub set); it imports without sentence-transformers, so a folder
never needs that package to load with transformers.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

try:
    from .modeling_metaembed import (
        SENTENCE_TRANSFORMERS_CONFIG_FILE,
        SENTENCE_TRANSFORMERS_CONFIG_KEYS,
        MetaEmbedModel,
        save_modality_declaration,
        save_sentence_transformers_config,
    )
    from .processing_metaembed import MetaEmbedItem, MetaEmbedProcessor, Task, normalize_item, normalize_items
    from .scoring_metaembed import check_num_vectors, check_positive_int
except ImportError:  # a checkout used as plain top-level modules
    from modeling_metaembed import (
        SENTENCE_TRANSFORMERS_CONFIG_FILE,
        SENTENCE_TRANSFORMERS_CONFIG_KEYS,
        MetaEmbedModel,
        save_modality_declaration,
        save_sentence_transformers_config,
    )
    from processing_metaembed import MetaEmbedItem, MetaEmbedProcessor, Task, normalize_item, normalize_items
    from scoring_metaembed import check_num_vectors, check_positive_int

try:
    from sentence_transformers import MultiVectorEncoder
    from sentence_transformers.base.modules import InputModule
except ImportError:
    # sentence-transformers < 6 (no MultiVectorEncoder) or not installed: the module class is never used then.
    InputModule, MultiVectorEncoder = nn.Module, None

MODULE_CONFIG_FILE = SENTENCE_TRANSFORMERS_CONFIG_FILE
# sentence-transformers task -> MetaEmbed task. `None` is plain `encode`, which embeds candidates.
METAEMBED_TASKS: dict[str | None, Task] = {None: "candidate", "query": "query", "document": "candidate"}


def metaembed_task(task: str | None) -> Task:
    """The MetaEmbed task ("query" or "candidate") for a sentence-transformers task (None, "query", "document")."""
    if task not in METAEMBED_TASKS:
        raise ValueError(
            f"task must be 'query', 'document' or None (plain encode, which embeds documents), got {task!r}"
        )
    return METAEMBED_TASKS[task]


class MetaEmbedModule(InputModule):
    """A whole MetaEmbed model as a sentence-transformers input module (for `MultiVectorEncoder`).

    `preprocess` checks and formats items with the model's processor (reference prompts, "Query: " prefix for
    queries, left padding); `forward` runs `MetaEmbedModel.forward` and returns `token_embeddings`
    `[batch, num_vectors, D]` (float32, L2-normalised) with an all-ones `attention_mask` `[batch, num_vectors]`,
    which `MultiVectorEncoder.encode` turns into one `[num_vectors, D]` tensor per item.

    Args:
        model: a MetaEmbed model with its processor attached (as `from_pretrained` / `from_backbone` return it).
        query_num_vectors: vectors `encode_query` returns when the call passes no `num_vectors`
            (1..R_q); `None` = all R_q.
        document_num_vectors: the same for `encode_document` and plain `encode` (1..R_c); `None` = all R_c.
    """

    config_file_name = MODULE_CONFIG_FILE
    config_keys = list(SENTENCE_TRANSFORMERS_CONFIG_KEYS)
    # Both reach `preprocess` and `forward` from `encode(..., task=..., num_vectors=...)`.
    forward_kwargs = {"task", "num_vectors"}

    def __init__(
        self, model: MetaEmbedModel, query_num_vectors: int | None = None, document_num_vectors: int | None = None
    ) -> None:
        super().__init__()
        if model.processor is None:
            raise ValueError("the MetaEmbed model has no processor attached; load it with from_pretrained")
        self.model = model
        config = model.config
        # Checked here so that a bad saved config fails at load rather than at the first encode.
        self.query_num_vectors = (
            None
            if query_num_vectors is None
            else check_num_vectors(query_num_vectors, config.num_query_vectors, "query_num_vectors")
        )
        self.document_num_vectors = (
            None
            if document_num_vectors is None
            else check_num_vectors(document_num_vectors, config.num_candidate_vectors, "document_num_vectors")
        )

    @property
    def modalities(self) -> list[str | tuple[str, ...]]:
        # A batch that mixes text, images and text + image items counts as "message" for sentence-transformers,
        # which refuses it unless "message" is listed. Chat-message dicts themselves are refused by
        # `preprocess` with an error naming the item.
        return ["text", "image", ("image", "text"), "message"]

    @property
    def processor(self) -> MetaEmbedProcessor:
        """The model's `MetaEmbedProcessor`."""
        return self.model.processor

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The backbone tokenizer (sentence-transformers reads `model.tokenizer`)."""
        return self.model.processor.tokenizer

    def get_embedding_dimension(self) -> int:
        """Size D of each vector."""
        return self.model.config.output_dim

    @property
    def max_seq_length(self) -> int:
        """The most tokens of an item's text (the processor's `max_text_tokens`): longer text is cut, never the
        prompt template or the Meta Tokens. sentence-transformers reads it for `model.max_seq_length` and the
        model card; setting it sets the processor's limit."""
        return self.processor.max_text_tokens

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        self.processor.max_text_tokens = check_positive_int(value, "max_seq_length")

    def on_model_ready(self, model: Any) -> None:
        """sentence-transformers' hook once the owning model is built: describe MetaEmbed correctly on the model
        card sentence-transformers generates (not a ColBERT model), and make the `MultiVectorEncoder` refuse
        `token_pooling`, which would merge MetaEmbed's ordered vectors (see `MetaEmbedMultiVectorEncoder`)."""
        card_data = getattr(model, "model_card_data", None)
        if card_data is not None:
            card_data.tags = [tag for tag in card_data.tags if tag != "colbert"]
            card_data.add_tags("metaembed")
        if MultiVectorEncoder is not None and type(model) is MultiVectorEncoder:
            model.__class__ = MetaEmbedMultiVectorEncoder

    def preprocess(
        self,
        inputs: Sequence[Any],
        prompt: str | None = None,
        task: str | None = None,
        num_vectors: int | None = None,
        max_length: int | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Backbone inputs for one batch of items, formatted for `task`.

        Args:
            inputs: items as `MetaEmbedModel.encode` takes them: str (text, never a path), PIL image, or a dict
                with "text" and/or "image". Errors name the item by its position in this batch.
            prompt: a sentence-transformers prompt; put in front of each item's text inside MetaEmbed's
                template (after the "Query: " prefix). An image-only item gets it as its text.
            task: "query", "document" or None (document).
            num_vectors: used by `forward`; accepted here because sentence-transformers passes encode's
                keyword arguments to both.
            max_length: the most tokens of each item's text for this call (the processor's `max_text_tokens`
                otherwise); sentence-transformers' trainer passes `MultiVectorEncoderTrainingArguments.max_length`.

        Returns:
            The processor's `input_ids`, `attention_mask` `[B, L]` and the backbone family's other inputs (Qwen-VL:
            `mm_token_type_ids`, plus `pixel_values`, `image_grid_thw` when there are images); `task`: the
            sentence-transformers task the inputs were formatted for, which `forward` follows (sentence-transformers'
            losses read the same key); and `modality`, as sentence-transformers' modules give it: "text", "image",
            ("image", "text") for text + image items, or "message" for a batch that mixes these.
        """
        if unsupported := sorted(name for name, value in kwargs.items() if value is not None):
            raise ValueError(
                f"MetaEmbed's preprocessing takes no {unsupported}; its prompt and truncation settings are the "
                "processor's (processor_config.json)"
            )
        side = metaembed_task(task)
        items = normalize_items(list(inputs), "batch")
        if prompt:
            items = self._with_instruction(items, prompt, side)
        processor = self.processor
        if max_length is not None:
            processor = copy.copy(processor)  # this call only: the module may be shared between threads
            processor.max_text_tokens = check_positive_int(max_length, "max_length")
        features = processor.process_checked_items(items, side, [f"batch[{i}]" for i in range(len(items))])
        modalities = {_modality(item) for item in items}
        return {
            **features,
            "task": "query" if side == "query" else "document",
            "modality": modalities.pop() if len(modalities) == 1 else "message",
        }

    def _with_instruction(self, items: list[MetaEmbedItem], prompt: str, side: Task) -> list[MetaEmbedItem]:
        """`items` with `prompt` in front of their text."""
        prefix = self.processor.query_prefix if side == "query" else self.processor.candidate_prefix
        if prefix and prompt.startswith(prefix):
            # The processor puts the prefix in already; a prompt repeating it would give it twice.
            raise ValueError(
                f"the prompt {prompt!r} starts with {prefix!r}, which MetaEmbed's processor already puts before "
                f"every {side}; leave it out of the sentence-transformers prompts"
            )
        instruction = normalize_item(prompt, "prompt").text  # the text checks: no reserved vision tokens
        return [MetaEmbedItem(text=instruction + (item.text or ""), image=item.image) for item in items]

    def forward(
        self, features: dict[str, Any], task: str | None = None, num_vectors: int | None = None
    ) -> dict[str, Any]:
        """Embed a preprocessed batch.

        Args:
            features: the output of `preprocess` (on the model's device).
            task: "query", "document" or None; must agree with the task `features` were formatted for
                (`features["task"]`), which is used when this is None.
            num_vectors: the first r vectors (1..R of that side); `None` = this module's default for the task.

        Returns:
            `features` with `token_embeddings` `[B, num_vectors, D]` (float32, L2-normalised) and
            `attention_mask` `[B, num_vectors]` (all ones: every vector is scored).
        """
        formatted_for = features.get("task")
        if task is None:
            task = formatted_for
        elif formatted_for is not None and metaembed_task(task) != metaembed_task(formatted_for):
            raise ValueError(f"the inputs were preprocessed for task {formatted_for!r}, not {task!r}")
        side = metaembed_task(task)
        if num_vectors is None:
            num_vectors = self.query_num_vectors if side == "query" else self.document_num_vectors
        model_inputs = {name: features[name] for name in self.processor.model_input_names if name in features}
        embeddings = self.model(**model_inputs, task=side, num_vectors=num_vectors).embeddings
        features["token_embeddings"] = embeddings
        features["attention_mask"] = torch.ones(embeddings.shape[:2], dtype=torch.long, device=embeddings.device)
        return features

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        """Write the MetaEmbed folder (weights always as safetensors) and this module's config to `output_path`.

        The sentence-transformers model files (modules.json, config_sentence_transformers.json) are left to the
        `MultiVectorEncoder` that saves this module, so its prompts and settings are the ones kept.
        """
        self.model.save_pretrained(output_path, sentence_transformers_files=False)
        save_modality_declaration(output_path)  # where mteb reads the modalities
        self.save_config(output_path)

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        trust_remote_code: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        config_kwargs: dict[str, Any] | None = None,
        backend: str = "torch",
        init_defaults: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> MetaEmbedModule:
        """Load the module from a MetaEmbed folder or Hub repo (sentence-transformers calls this).

        `model_kwargs` and `config_kwargs` go to `MetaEmbedModel.from_pretrained` (e.g. `dtype`,
        `device_map`, `attn_implementation`), `processor_kwargs` to the processor (e.g. `max_text_tokens`).
        """
        if backend != "torch":
            raise ValueError(f"MetaEmbed runs on the torch backend only, got backend={backend!r}")
        config = cls.load_config(
            model_name_or_path,
            subfolder=subfolder,
            token=token,
            cache_folder=cache_folder,
            revision=revision,
            local_files_only=local_files_only,
        )
        # The saved config wins over defaults injected by the loading model (sentence-transformers' rule).
        for key, value in (init_defaults or {}).items():
            config.setdefault(key, value)
        hub_kwargs = {
            "subfolder": subfolder,
            "token": token,
            "cache_dir": cache_folder,
            "revision": revision,
            "local_files_only": local_files_only,
            "trust_remote_code": trust_remote_code,
        }
        # The caller's keyword arguments win over the loading ones, as in sentence-transformers' Transformer.
        model = MetaEmbedModel.from_pretrained(
            model_name_or_path, **{**hub_kwargs, **(config_kwargs or {}), **(model_kwargs or {})}
        )
        if processor_kwargs:
            model.processor = type(model.processor).from_pretrained(
                model_name_or_path, **{**hub_kwargs, **processor_kwargs}
            )
        return cls(model, **config)


def _modality(item: MetaEmbedItem) -> str | tuple[str, str]:
    """sentence-transformers' name for the modality of one item."""
    if item.image is None:
        return "text"
    return ("image", "text") if item.text else "image"


if MultiVectorEncoder is not None:

    class MetaEmbedMultiVectorEncoder(MultiVectorEncoder):
        """The `MultiVectorEncoder` a MetaEmbed folder loads as (`MetaEmbedModule.on_model_ready` sets the class):
        sentence-transformers' own encoder, except that `token_pooling` is refused.

        Token pooling merges similar vectors of a document. MetaEmbed's vectors are ordered Meta Token outputs whose
        every prefix is a trained budget; merging them breaks that, and fewer vectors are what `num_vectors` gives.
        sentence-transformers applies `token_pooling` after the modules have run, so no module can refuse it.
        """

        def encode(self, *args: Any, **kwargs: Any) -> Any:
            arguments = inspect.signature(MultiVectorEncoder.encode).bind(self, *args, **kwargs).arguments
            if arguments.get("token_pooling") is not None:
                raise ValueError(
                    "MetaEmbed does not support token_pooling: its vectors are ordered Meta Token outputs and every "
                    "prefix is a trained budget, so merging them breaks it. For fewer vectors per item pass "
                    "num_vectors=r (the first r vectors)"
                )
            return super().encode(*args, **kwargs)


__all__ = [
    "METAEMBED_TASKS",
    "MODULE_CONFIG_FILE",
    "MetaEmbedModule",
    "metaembed_task",
    "save_sentence_transformers_config",
]
