"""MetaEmbed: multi-vector retrieval embeddings from Meta Tokens appended to a vision-language model.

Layout (reference, facebookresearch/MetaEmbed): every input is `[content; M_q; M_c]`, where `M_q` are the
R_q query Meta Tokens and `M_c` the R_c candidate Meta Tokens, rows of one learnable table. A query's
vectors are the last-layer hidden states at `M_q`, a candidate's at `M_c`, optionally projected, then
L2-normalised. Attention is causal, so the first r vectors of a side depend only on the content and the
table rows before them: this implementation appends just those rows (queries never run `M_c`; asking for
r vectors runs r rows), which gives the same vectors for less compute.
"""

from __future__ import annotations

import importlib.util
import json
import os
import string
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, PreTrainedModel
from transformers.utils import ModelOutput

try:
    from .configuration_metaembed import MetaEmbedConfig
    from .pipeline_metaembed import check_processed_inputs, pipeline_registrations
    from .processing_metaembed import (
        TEMPLATE_TOKENS,
        MetaEmbedItem,
        MetaEmbedProcessor,
        Task,
        check_task,
        normalize_items,
    )
    from .scoring_metaembed import check_num_vectors, check_positive_int, late_interaction_scores
except ImportError:  # a checkout or an installed package: plain top-level modules
    from configuration_metaembed import MetaEmbedConfig
    from pipeline_metaembed import check_processed_inputs, pipeline_registrations
    from processing_metaembed import (
        TEMPLATE_TOKENS,
        MetaEmbedItem,
        MetaEmbedProcessor,
        Task,
        check_task,
        normalize_items,
    )
    from scoring_metaembed import check_num_vectors, check_positive_int, late_interaction_scores

# Placeholder appended once per Meta Token; its embedding is replaced by the learned row. Never used by the
# prompt templates, so the appended run can't merge with content.
DEFAULT_META_TOKEN = "<|box_start|>"
MODEL_CARD_TEMPLATE = "model_card.md"
HUB_FILES = (
    "configuration_metaembed.py",
    "modeling_metaembed.py",
    "processing_metaembed.py",
    "scoring_metaembed.py",
    "pipeline_metaembed.py",
    "sentence_transformers_metaembed.py",
    "handler.py",
    "model_card.md",
    "requirements.txt",
)
"""The Hub set: the code and templates every saved folder carries, copied by `save_pretrained`. They sit at the
top of the repository; an installed package keeps the files that are not modules in `INSTALLED_HUB_FILES`."""
INSTALLED_HUB_FILES = Path("metaembed", "hub_files")
"""Where, beside the installed top-level modules, `setup.py` puts the Hub files that are not importable modules
(a module named `handler` must not be installed)."""
# sentence-transformers' view of a saved folder (`sentence_transformers_metaembed.py` reads these names): the
# module's own config file (not config.json, which belongs to the model) and its keys.
SENTENCE_TRANSFORMERS_MODULE = "sentence_transformers_metaembed.MetaEmbedModule"
SENTENCE_TRANSFORMERS_CONFIG_FILE = "sentence_metaembed_config.json"
SENTENCE_TRANSFORMERS_CONFIG_KEYS = ("query_num_vectors", "document_num_vectors")
# Keyword arguments of from_pretrained that also locate the processor files.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "trust_remote_code")


@dataclass
class MetaEmbedOutput(ModelOutput):
    r"""
    Output of [`MetaEmbedModel`].

    embeddings (`torch.FloatTensor` of shape `(batch_size, num_vectors, embedding_dim)`):
        L2-normalised float32 vectors read at the Meta Token positions of the requested side.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        Backbone hidden states, when `output_hidden_states=True`.
    """

    embeddings: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class MetaEmbedPreTrainedModel(PreTrainedModel):
    config: MetaEmbedConfig
    config_class = MetaEmbedConfig
    base_model_prefix = "metaembed"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = []
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True


class MetaEmbedModel(MetaEmbedPreTrainedModel):
    r"""
    A vision-language backbone with a learnable Meta Token table `[R_q + R_c, hidden]` (one shared block of
    `max(R_q, R_c)` rows with `shared_meta_tokens`) and an optional projection to `embedding_dim`.

    Use `from_backbone` to create one from a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint, `encode_queries` /
    `encode_candidates` to embed items, and `score` for late-interaction scores.
    """

    def __init__(self, config: MetaEmbedConfig, vlm: PreTrainedModel | None = None):
        super().__init__(config)
        self.vlm = vlm if vlm is not None else AutoModel.from_config(config.vlm_config)
        self.meta_tokens = nn.Parameter(torch.empty(config.num_meta_tokens, config.hidden_size))
        self.projection = (
            nn.Linear(config.hidden_size, config.embedding_dim) if config.embedding_dim is not None else None
        )
        self.processor: MetaEmbedProcessor | None = None
        # Stateless (reads only its input ids), so concurrent calls and DataParallel replicas are safe.
        self.vlm.get_input_embeddings().register_forward_hook(self._insert_meta_tokens)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if module is self:
            nn.init.normal_(self.meta_tokens, mean=0.0, std=std)
        elif module is self.projection:
            nn.init.normal_(module.weight, mean=0.0, std=std)
            nn.init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    def _insert_meta_tokens(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on the input embeddings: the trailing run of `meta_token_id` placeholders in
        `input_ids` [B, L] gets rows [0, K) of the Meta Token table instead of the placeholder embedding."""
        input_ids = args[0] if args else None
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or self.config.meta_token_id is None:
            return output
        is_meta = input_ids == self.config.meta_token_id
        run_lengths = is_meta.flip(-1).int().cumprod(-1).sum(-1)  # [B] trailing placeholders per row
        num_appended = int(run_lengths.max())
        if num_appended == 0:
            return output
        if bool((run_lengths != num_appended).any()):
            raise ValueError("every row must end with the same number of Meta Token placeholders")
        if num_appended > self.meta_tokens.shape[0]:
            raise ValueError(f"{num_appended} Meta Tokens requested, the table has {self.meta_tokens.shape[0]}")
        rows = self.meta_tokens[:num_appended].to(device=output.device, dtype=output.dtype)
        rows = rows.unsqueeze(0).expand(output.shape[0], -1, -1)
        return torch.cat([output[:, :-num_appended], rows], dim=1)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        task: Task = "candidate",
        num_vectors: int | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> MetaEmbedOutput:
        r"""
        Embed a processed batch (the output of `MetaEmbedProcessor.process_queries` / `process_candidates`).

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): content tokens, padded on
                either side (positions are computed from `attention_mask`).
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`).
            pixel_values (`torch.Tensor` of shape `(num_patches, patch_dim)`, *optional*).
            image_grid_thw (`torch.LongTensor` of shape `(num_images, 3)`, *optional*).
            mm_token_type_ids (`torch.IntTensor` of shape `(batch_size, sequence_length)`, *optional*): 1 at
                image tokens; derived from `input_ids` when absent.
            task (`"query"` or `"candidate"`): which Meta Tokens to read.
            num_vectors (`int`, *optional*): read the first r vectors (1..R of that side); all when `None`.

        Returns:
            [`MetaEmbedOutput`] with `embeddings` of shape `(batch_size, num_vectors, embedding_dim)`, float32.
        """
        task = check_task(task)
        num_vectors = check_num_vectors(num_vectors, self.config.num_vectors_for(task))
        check_processed_inputs(self.processor, input_ids, attention_mask)
        return self._embed(
            task,
            num_vectors,
            input_ids=input_ids,
            attention_mask=attention_mask,
            mm_token_type_ids=mm_token_type_ids,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )

    def _embed(
        self,
        task: Task,
        num_vectors: int,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        mm_token_type_ids: torch.IntTensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        **backbone_inputs: Any,
    ) -> MetaEmbedOutput:
        """`forward` with `task` and `num_vectors` already checked by the public entry point; `backbone_inputs`
        (`pixel_values`, `output_hidden_states`, ...) go to the backbone."""
        if self.config.meta_token_id is None:
            raise ValueError("config.meta_token_id is not set; create the model with MetaEmbedModel.from_backbone")
        if bool((input_ids[:, -1] == self.config.meta_token_id).any()):
            raise ValueError("input_ids already end with the Meta Token placeholder; pass content tokens only")
        batch_size = input_ids.shape[0]
        num_appended = self.config.meta_tokens_to_append(task, num_vectors)

        def append(tensor: torch.Tensor, value: int) -> torch.Tensor:
            return torch.cat([tensor, tensor.new_full((batch_size, num_appended), value)], dim=1)

        if mm_token_type_ids is None:
            mm_token_type_ids = (input_ids == self.config.vlm_config.image_token_id).int()
        input_ids = append(input_ids, self.config.meta_token_id)
        attention_mask = append(attention_mask, 1)
        mm_token_type_ids = append(mm_token_type_ids, 0)
        # Explicit positions: independent of the padding side and amount, and the backbone's cached
        # `rope_deltas` (module state shared between threads) is never read or written.
        position_ids, _ = self.vlm.get_rope_index(
            input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask
        )
        outputs = self.vlm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            use_cache=False,
            return_dict=True,
            **backbone_inputs,
        )
        vectors = outputs.last_hidden_state[:, -num_vectors:]
        if self.projection is not None:
            vectors = self.projection(vectors.to(self.projection.weight.device, self.projection.weight.dtype))
        embeddings = F.normalize(vectors.float(), dim=-1)
        return MetaEmbedOutput(embeddings=embeddings, hidden_states=outputs.hidden_states)

    def get_text_features(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        mm_token_type_ids: torch.IntTensor | None = None,
    ) -> torch.FloatTensor:
        """The single-vector (budget (1, 1)) candidate embedding `[B, D]` of processed text, as CLIP-style
        `get_text_features` (tools such as sentence-transformers' `SentenceTransformer` call it)."""
        return self(
            input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids, num_vectors=1
        ).embeddings[:, 0]

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.LongTensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        mm_token_type_ids: torch.IntTensor | None = None,
    ) -> torch.FloatTensor:
        """The single-vector (budget (1, 1)) candidate embedding `[B, D]` of processed images (with their
        prompt tokens from `MetaEmbedProcessor.__call__`), as CLIP-style `get_image_features`."""
        return self(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            num_vectors=1,
        ).embeddings[:, 0]

    # ----------------------------------------------------------------------------------------------------
    # Encoding
    # ----------------------------------------------------------------------------------------------------

    def encode_queries(
        self,
        inputs: list[Any],
        num_vectors: int | None = None,
        batch_size: int = 16,
        show_progress_bar: bool | None = None,
        convert_to_numpy: bool = False,
        device: str | torch.device | None = None,
    ) -> torch.Tensor:
        """Embed query items. See `encode`; returns `[len(inputs), num_vectors, D]` float32."""
        return self.encode(inputs, "query", num_vectors, batch_size, show_progress_bar, convert_to_numpy, device)

    def encode_candidates(
        self,
        inputs: list[Any],
        num_vectors: int | None = None,
        batch_size: int = 16,
        show_progress_bar: bool | None = None,
        convert_to_numpy: bool = False,
        device: str | torch.device | None = None,
    ) -> torch.Tensor:
        """Embed candidate items. See `encode`; returns `[len(inputs), num_vectors, D]` float32."""
        return self.encode(inputs, "candidate", num_vectors, batch_size, show_progress_bar, convert_to_numpy, device)

    @torch.inference_mode()
    def encode(
        self,
        inputs: list[Any],
        task: Task = "candidate",
        num_vectors: int | None = None,
        batch_size: int = 16,
        show_progress_bar: bool | None = None,
        convert_to_numpy: bool = False,
        device: str | torch.device | None = None,
    ) -> torch.Tensor:
        """
        Embed a list of items as queries or candidates.

        Args:
            inputs: items; each a `str` (text, never read as a path), a `PIL.Image.Image`, or a dict with
                "text" and/or "image" (PIL image or file path). Modalities may be mixed.
            task: "query" or "candidate".
            num_vectors: the first r vectors to return (1..R_q or 1..R_c); `None` = all. Only the Meta
                Tokens those vectors depend on are run.
            batch_size: items per forward pass. Items are sorted by length to waste no padding; results
                come back in input order and do not depend on the batching.
            show_progress_bar: `None` shows one for multi-batch runs when stderr is a terminal.
            convert_to_numpy: return a `numpy.ndarray` instead of a tensor.
            device: where the returned tensor lives (default CPU); the computation runs on the model's device.

        Returns:
            float32 tensor `[len(inputs), num_vectors, D]`, each vector L2-normalised.
        """
        task = check_task(task)
        num_vectors = check_num_vectors(num_vectors, self.config.num_vectors_for(task))
        batch_size = check_positive_int(batch_size, "batch_size")
        items = normalize_items(inputs)
        result = torch.empty(len(items), num_vectors, self.config.output_dim, dtype=torch.float32)
        if items:
            if self.processor is None:
                raise ValueError(
                    "this model has no processor attached; load it with from_pretrained/from_backbone "
                    "or set model.processor = MetaEmbedProcessor(...)"
                )
            # Longest first: similar lengths share a batch, and an out-of-memory error shows up at once.
            order = sorted(range(len(items)), key=lambda index: -_estimated_length(items[index]))
            batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
            if show_progress_bar is None:
                show_progress_bar = len(batches) > 1 and sys.stderr.isatty()
            input_device = self.vlm.get_input_embeddings().weight.device
            if self.training:
                self.eval()
            from tqdm.auto import tqdm

            for batch in tqdm(batches, desc=f"Encoding {task}s", disable=not show_progress_bar):
                features = self.processor.process_checked_items(
                    [items[index] for index in batch], task, [f"inputs[{index}]" for index in batch]
                ).to(input_device)
                embeddings = self._embed(task, num_vectors, **features).embeddings
                result[batch] = embeddings.to("cpu", torch.float32)
        if convert_to_numpy:
            return result.numpy()
        return result if device is None else result.to(device)

    def score(
        self,
        query_embeddings: torch.Tensor | list[torch.Tensor],
        candidate_embeddings: torch.Tensor | list[torch.Tensor],
        num_query_vectors: int | None = None,
        num_candidate_vectors: int | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Late-interaction scores `[num_queries, num_candidates]` (float32, CPU) of embeddings from `encode_*`,
        over their first `num_query_vectors` / `num_candidate_vectors` vectors; see `late_interaction_scores`."""
        scores = late_interaction_scores(
            query_embeddings, candidate_embeddings, num_query_vectors, num_candidate_vectors, **kwargs
        )
        if isinstance(scores, torch.Tensor):
            return scores.cpu()
        return type(scores)(*(part.cpu() for part in scores))

    # ----------------------------------------------------------------------------------------------------
    # Creating, saving, loading
    # ----------------------------------------------------------------------------------------------------

    @classmethod
    def from_backbone(
        cls,
        backbone_name_or_path: str | os.PathLike,
        num_query_vectors: int = 16,
        num_candidate_vectors: int = 64,
        embedding_dim: int | None = None,
        *,
        shared_meta_tokens: bool = False,
        meta_token: str = DEFAULT_META_TOKEN,
        processor_kwargs: dict[str, Any] | None = None,
        **from_pretrained_kwargs: Any,
    ) -> MetaEmbedModel:
        """
        Create an untrained MetaEmbed model from a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint.

        Loads the backbone weights (`AutoModel`, the bare VLM; a `*ForConditionalGeneration` checkpoint works,
        its `lm_head` is dropped), its tokenizer and image processor, and adds a freshly initialised Meta
        Token table (and projection when `embedding_dim` is set).

        Args:
            backbone_name_or_path: local folder or Hub repo id of the backbone.
            num_query_vectors / num_candidate_vectors: R_q and R_c.
            embedding_dim: `None` uses hidden states directly; an int adds `Linear(hidden, embedding_dim)`.
            shared_meta_tokens: one table for both sides (see `MetaEmbedConfig`).
            meta_token: vocabulary token used as the Meta Token placeholder.
            processor_kwargs: `MetaEmbedProcessor` options (`prompt_style`, `max_text_tokens`, prefixes).
            **from_pretrained_kwargs: passed to `AutoModel.from_pretrained` (`dtype`/`torch_dtype`,
                `device_map`, `attn_implementation`, `revision`, ...).
        """
        from_pretrained_kwargs = _with_available_attention(from_pretrained_kwargs)
        _check_device_map_support(from_pretrained_kwargs)
        hub_kwargs = {key: from_pretrained_kwargs[key] for key in _HUB_KWARGS if key in from_pretrained_kwargs}
        vlm = AutoModel.from_pretrained(backbone_name_or_path, **from_pretrained_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(backbone_name_or_path, **hub_kwargs)
        image_processor = AutoImageProcessor.from_pretrained(backbone_name_or_path, **hub_kwargs)
        processor = MetaEmbedProcessor(image_processor, tokenizer, **(processor_kwargs or {}))
        meta_token_id = tokenizer.convert_tokens_to_ids(meta_token)
        if meta_token_id is None or meta_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no token {meta_token!r} to use as Meta Token placeholder")
        reserved = {tokenizer.pad_token_id, vlm.config.image_token_id, vlm.config.video_token_id}
        if meta_token_id in reserved:
            raise ValueError(f"{meta_token!r} is a padding or vision token; choose another meta_token")
        attn_implementation = vlm.config._attn_implementation
        config = MetaEmbedConfig(
            vlm_config=vlm.config,
            num_query_vectors=num_query_vectors,
            num_candidate_vectors=num_candidate_vectors,
            embedding_dim=embedding_dim,
            shared_meta_tokens=shared_meta_tokens,
            meta_token_id=meta_token_id,
            base_model_name_or_path=os.fspath(backbone_name_or_path),
            custom_pipelines=pipeline_registrations(),
        )
        # Building the config resets the sub-configs' attention implementation; keep the backbone's.
        config._attn_implementation = attn_implementation
        model = cls(config, vlm=vlm)
        # New parameters follow the backbone's dtype and sit next to the input embeddings.
        embedding_weight = vlm.get_input_embeddings().weight
        model.meta_tokens.data = model.meta_tokens.data.to(embedding_weight.device, embedding_weight.dtype)
        if model.projection is not None:
            model.projection.to(embedding_weight.device, embedding_weight.dtype)
        model.processor = processor
        return model.eval()  # like from_pretrained; training code calls .train()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        """Load a saved MetaEmbed model (and its processor, attached as `model.processor`).

        Unlike plain transformers loading, missing, shape-mismatched and unexpected weights are an error (a
        MetaEmbed model with a random Meta Token table, or without the projection its weights hold, would silently
        return other vectors), and so are a `meta_token_id` outside the vocabulary and missing or foreign
        tokenizer files (a fallback vocabulary gives every text the same embedding).
        """
        kwargs = _with_available_attention(kwargs)
        _check_device_map_support(kwargs)
        want_loading_info = kwargs.pop("output_loading_info", False)
        hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
        )
        problems = {
            name: sorted(loading_info.get(name) or [])
            for name in ("missing_keys", "unexpected_keys", "mismatched_keys")
            if loading_info.get(name)
        }
        if problems:
            raise ValueError(
                f"{pretrained_model_name_or_path} does not hold exactly the weights of this MetaEmbed config "
                f"(is embedding_dim right?): {problems}"
            )
        vocabulary_rows = model.vlm.get_input_embeddings().num_embeddings
        meta_token_id = model.config.meta_token_id
        if meta_token_id is not None and not 0 <= meta_token_id < vocabulary_rows:
            raise ValueError(
                f"{pretrained_model_name_or_path}: meta_token_id {meta_token_id} is outside the vocabulary "
                f"(0..{vocabulary_rows - 1})"
            )
        try:
            processor = MetaEmbedProcessor.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        except (OSError, ValueError, TypeError) as error:
            raise ValueError(
                f"no MetaEmbed processor could be loaded from {pretrained_model_name_or_path} ({error}); "
                f"{_tokenizer_files_note(pretrained_model_name_or_path)}"
            ) from error
        _check_tokenizer_fits(processor.tokenizer, model.config, vocabulary_rows, pretrained_model_name_or_path)
        model.processor = processor
        return (model, loading_info) if want_loading_info else model

    def save_pretrained(
        self, save_directory: str | os.PathLike, *args: Any, sentence_transformers_files: bool = True, **kwargs: Any
    ) -> None:
        """Write a complete Hub folder: config.json (with `auto_map`), safetensors weights, the remote-code
        .py files, the processor and tokenizer files, README.md rendered from the model card template, and
        (unless `sentence_transformers_files=False`, as when sentence-transformers saves the model and writes
        its own) the files that load the folder as a sentence-transformers `MultiVectorEncoder`."""
        if kwargs.get("push_to_hub"):
            # transformers would upload before the processor, card, handler and sentence-transformers files
            # exist here, publishing an incomplete repo.
            raise ValueError(
                "push_to_hub=True is not supported: save_pretrained(folder) first, then upload the folder with "
                "huggingface_hub.upload_folder(repo_id=..., folder_path=folder)"
            )
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.processor is not None:
            self.processor.save_pretrained(save_directory)
        if sentence_transformers_files:
            save_sentence_transformers_config(save_directory)
        missing = []
        for file_name in HUB_FILES:
            content = _hub_file(file_name, self.name_or_path)
            if content is None:
                missing.append(file_name)
            else:
                (Path(save_directory) / file_name).write_bytes(content)
        if missing:
            warnings.warn(
                f"{missing} not found beside {__file__} or in {self.name_or_path!r}; the folder is incomplete "
                "(install the metaembed package to save complete folders)",
                stacklevel=2,
            )
        if MODEL_CARD_TEMPLATE not in missing:
            template = (Path(save_directory) / MODEL_CARD_TEMPLATE).read_text(encoding="utf-8")
            (Path(save_directory) / "README.md").write_text(self.render_model_card(template), encoding="utf-8")

    def render_model_card(self, template: str) -> str:
        """Fill the model card template (`$name` placeholders) with this model's settings."""
        config = self.config
        base_model = config.base_model_name_or_path
        # Hub metadata may only name a repo id, not a local folder the model happened to be built from.
        is_repo_id = bool(base_model) and not Path(base_model).exists() and base_model.count("/") <= 1
        return string.Template(template).substitute(
            base_model_metadata=f"base_model: {base_model}\n" if is_repo_id else "",
            base_model=base_model or config.vlm_config.model_type,
            backbone_type=config.vlm_config.model_type,
            num_query_vectors=config.num_query_vectors,
            num_candidate_vectors=config.num_candidate_vectors,
            # A mid-sized budget for the usage examples, within this model's vector counts.
            example_query_vectors=min(8, config.num_query_vectors),
            example_candidate_vectors=min(16, config.num_candidate_vectors),
            embedding_dim=config.output_dim,
            projection="a linear projection" if config.embedding_dim is not None else "no projection",
        )


# Vision tokens the backbone's config names by id: the tokenizer must give them exactly these ids.
_VISION_TOKEN_IDS = {
    "<|image_pad|>": "image_token_id",
    "<|video_pad|>": "video_token_id",
    "<|vision_start|>": "vision_start_token_id",
    "<|vision_end|>": "vision_end_token_id",
}
# A text every tokenizer of a Qwen-VL family encodes losslessly: one that does not (unknown tokens) would give many
# texts the same ids.
_PROBE_TEXT = "A red circle, 42 zebras and a quarterly report"


def _check_tokenizer_fits(tokenizer: Any, config: Any, vocabulary_rows: int, source: str | os.PathLike) -> None:
    """Refuse a tokenizer that is not the model's: transformers builds a tokenizer from tokenizer_config.json
    alone when the vocabulary files are missing (a vocabulary of only the special tokens), and every text then
    gets the same embedding; a foreign tokenizer of similar size puts the vision tokens at other ids or cannot
    encode plain text."""
    missing_tokens = [
        token for token in TEMPLATE_TOKENS if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id)
    ]
    size = len(tokenizer)
    problem = None
    if missing_tokens or size > vocabulary_rows or size < vocabulary_rows // 2:
        problem = f"lacks the prompt tokens {missing_tokens}" if missing_tokens else f"has {size} tokens"
    else:
        config_ids = {token: getattr(config.vlm_config, name, None) for token, name in _VISION_TOKEN_IDS.items()}
        moved = {
            token: (tokenizer.convert_tokens_to_ids(token), config_id)
            for token, config_id in config_ids.items()
            if config_id is not None and tokenizer.convert_tokens_to_ids(token) != config_id
        }
        round_trip = tokenizer.decode(tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"])
        if moved:
            problem = f"puts vision tokens at other ids than the model's config, (tokenizer id, config id): {moved}"
        elif round_trip != _PROBE_TEXT:
            problem = f"does not encode plain text losslessly ({_PROBE_TEXT!r} comes back as {round_trip!r})"
    if problem:
        raise ValueError(
            f"the tokenizer loaded from {source} {problem}, the model's embedding table {vocabulary_rows} rows: "
            f"{_tokenizer_files_note(source)}"
        )


def _tokenizer_files_note(source: str | os.PathLike) -> str:
    """Which tokenizer files a local model folder lacks."""
    if not os.path.isdir(source):
        return "its tokenizer files are missing or are not this model's"
    present = set(os.listdir(source))
    missing = [] if "tokenizer_config.json" in present else ["tokenizer_config.json"]
    if "tokenizer.json" not in present and not {"vocab.json", "merges.txt"} <= present:
        missing.append("tokenizer.json (or vocab.json + merges.txt)")
    if not missing:
        return f"the tokenizer files in {source} are not this model's"
    return f"{source} is missing {', '.join(missing)}; save the model with its processor (model.save_pretrained)"


def _estimated_length(item: MetaEmbedItem) -> int:
    """Rough token count used only to group similar lengths into batches."""
    length = len(item.text or "")
    if item.image is not None:
        width, height = item.image.size if hasattr(item.image, "size") else (512, 512)
        length += width * height // (28 * 28)
    return length


def _with_available_attention(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Fall back to sdpa (with a warning) when flash attention is asked for but not installed."""
    requested = kwargs.get("attn_implementation")
    if isinstance(requested, str) and requested.startswith("flash_attention"):
        package = "flash_attn_interface" if requested == "flash_attention_3" else "flash_attn"
        if importlib.util.find_spec(package) is None:
            warnings.warn(f"{requested} requested but {package} is not installed; using sdpa", stacklevel=3)
            kwargs = {**kwargs, "attn_implementation": "sdpa"}
    return kwargs


def _check_device_map_support(kwargs: dict[str, Any]) -> None:
    """transformers places a model by `device_map` through accelerate and fails deep inside without it."""
    if kwargs.get("device_map") is not None and importlib.util.find_spec("accelerate") is None:
        raise ImportError(
            f"device_map={kwargs['device_map']!r} needs the accelerate package: pip install accelerate "
            "(or load without device_map and call model.to(device))"
        )


def _hub_file(file_name: str, name_or_path: str | None) -> bytes | None:
    """Content of a Hub-set file: in the installed package's `INSTALLED_HUB_FILES`, beside this module (a
    checkout, or the installed top-level modules), else in the folder or Hub repo the model was loaded from (remote
    code runs from the dynamic-module cache, which holds only the modules that `modeling_metaembed` imports)."""
    here = Path(__file__).resolve().parent
    # An installed package's own copy first: site-packages may hold another package's handler.py or
    # requirements.txt beside the top-level modules.
    candidates = [here / INSTALLED_HUB_FILES / file_name, here / file_name]
    if name_or_path:
        candidates.append(Path(name_or_path) / file_name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.read_bytes()
    if name_or_path and not Path(name_or_path).exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name_or_path, file_name)
            if isinstance(cached, str):
                return Path(cached).read_bytes()
        except ValueError:  # not a repo id
            return None
    return None


def save_sentence_transformers_config(save_directory: str | os.PathLike) -> None:
    """Write the files that make a saved MetaEmbed folder load with
    `MultiVectorEncoder(save_directory, trust_remote_code=True)`: `modules.json` (one `MetaEmbedModule` in the
    root), `config_sentence_transformers.json` (model type, empty prompts, MaxSim) and the module's config with
    its defaults. The contents are what `MultiVectorEncoder.save` writes for such a model."""
    model_config = {
        "model_type": "MultiVectorEncoder",
        # Empty: the processor adds MetaEmbed's templates and prefixes (see sentence_transformers_metaembed.py).
        "prompts": {"query": "", "document": ""},
        "default_prompt_name": None,
        # s(q, c) = sum_i max_j <q_i, c_j>, as MetaEmbedModel.score.
        "similarity_fn_name": "maxsim",
    }
    files = {
        # The bare file name: sentence-transformers resolves it in the model folder (as remote code).
        "modules.json": [{"idx": 0, "name": "0", "path": "", "type": SENTENCE_TRANSFORMERS_MODULE}],
        "config_sentence_transformers.json": model_config,
        # The module constructor's defaults (None = all vectors).
        SENTENCE_TRANSFORMERS_CONFIG_FILE: dict.fromkeys(SENTENCE_TRANSFORMERS_CONFIG_KEYS),
    }
    for file_name, content in files.items():
        _write_json(os.path.join(save_directory, file_name), content)
    save_modality_declaration(save_directory)


def save_modality_declaration(save_directory: str | os.PathLike) -> None:
    """Write `sentence_bert_config.json` with the modalities (text, image), where sentence-transformers'
    Transformer module keeps them and mteb reads them (it refuses image tasks for a model that declares none).
    Written by every save: `save_pretrained` and `MultiVectorEncoder.save` alike."""
    declaration = {
        "modality_config": {
            modality: {"method": "forward", "method_output_name": "token_embeddings"}
            for modality in sorted(MetaEmbedPreTrainedModel.input_modalities)
        },
        "module_output_name": "token_embeddings",
    }
    _write_json(os.path.join(save_directory, "sentence_bert_config.json"), declaration)


def _write_json(path: str, content: Any) -> None:
    with open(path, "w", encoding="utf-8") as file:
        json.dump(content, file, indent=2, sort_keys=True)
        file.write("\n")


MetaEmbedModel.register_for_auto_class("AutoModel")

__all__ = [
    "HUB_FILES",
    "MetaEmbedModel",
    "MetaEmbedOutput",
    "MetaEmbedPreTrainedModel",
    "save_modality_declaration",
    "save_sentence_transformers_config",
]
