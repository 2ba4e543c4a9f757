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
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer, PreTrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

try:
    from .backbones_metaembed import BackboneAdapter, get_backbone_adapter
    from .configuration_metaembed import MetaEmbedConfig
    from .pipeline_metaembed import check_processed_inputs, pipeline_registrations
    from .processing_metaembed import (
        MetaEmbedItem,
        MetaEmbedProcessor,
        Task,
        check_task,
        missing_tokens,
        normalize_items,
    )
    from .scoring_metaembed import check_num_vectors, check_positive_int, late_interaction_scores
except ImportError:  # a checkout or an installed package: plain top-level modules
    from backbones_metaembed import BackboneAdapter, get_backbone_adapter
    from configuration_metaembed import MetaEmbedConfig
    from pipeline_metaembed import check_processed_inputs, pipeline_registrations
    from processing_metaembed import (
        MetaEmbedItem,
        MetaEmbedProcessor,
        Task,
        check_task,
        missing_tokens,
        normalize_items,
    )
    from scoring_metaembed import check_num_vectors, check_positive_int, late_interaction_scores

MODEL_CARD_TEMPLATE = "model_card.md"
HUB_FILES = (
    "backbones_metaembed.py",
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

    Use `from_backbone` to create one from a checkpoint of a supported family
    (`backbones_metaembed.SUPPORTED_MODEL_TYPES`), `encode_queries` / `encode_candidates` to embed items, and
    `score` for late-interaction scores.
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
        self.vlm.get_input_embeddings().register_forward_hook(self._insert_meta_tokens, with_kwargs=True)
        self.post_init()

    @property
    def backbone_adapter(self) -> BackboneAdapter:
        """What MetaEmbed knows about the backbone's family (prompts, positions, inputs, LoRA targets)."""
        return get_backbone_adapter(self.config.vlm_config.model_type)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if module is self:
            nn.init.normal_(self.meta_tokens, mean=0.0, std=std)
        elif module is self.projection:
            nn.init.normal_(module.weight, mean=0.0, std=std)
            nn.init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    def _insert_meta_tokens(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on the input embeddings: the trailing run of `meta_token_id` placeholders in
        `input_ids` [B, L] gets rows [0, K) of the Meta Token table instead of the placeholder embedding.

        Every family embeds its `input_ids` through this module and keeps them for its own image placement and
        positions, so inserting the rows here serves all of them (Qwen2-VL refuses `input_ids` together with
        `inputs_embeds`). Stateless: it reads only its input."""
        input_ids = args[0] if args else kwargs.get("input_ids", kwargs.get("input"))
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
        Embed a processed batch (the output of `MetaEmbedProcessor.process_items` / `process_queries` /
        `process_candidates`), for any supported backbone family.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): content tokens, padded on
                either side (positions are computed from `attention_mask`).
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`).
            pixel_values (`torch.Tensor`, *optional*): the family processor's image tensor (Qwen-VL:
                `(num_patches, patch_dim)`).
            image_grid_thw (`torch.LongTensor` of shape `(num_images, 3)`, *optional*): Qwen-VL image grids.
            mm_token_type_ids (`torch.IntTensor` of shape `(batch_size, sequence_length)`, *optional*): Qwen-VL, 1
                at image tokens; derived from `input_ids` when absent.
            task (`"query"` or `"candidate"`): which Meta Tokens to read.
            num_vectors (`int`, *optional*): read the first r vectors (1..R of that side); all when `None`.
            kwargs: the family's other inputs from the processor (`pixel_attention_mask`, `image_sizes`,
                `aspect_ratio_ids`, `aspect_ratio_mask`, `cross_attention_mask`, `token_type_ids`).

        Returns:
            [`MetaEmbedOutput`] with `embeddings` of shape `(batch_size, num_vectors, embedding_dim)`, float32.
        """
        task = check_task(task)
        num_vectors = check_num_vectors(num_vectors, self.config.num_vectors_for(task))
        check_processed_inputs(self.processor, input_ids, attention_mask)
        optional = {
            "pixel_values": pixel_values,
            "image_grid_thw": image_grid_thw,
            "mm_token_type_ids": mm_token_type_ids,
            "output_hidden_states": output_hidden_states,
        }
        return self._embed(
            task,
            num_vectors,
            input_ids=input_ids,
            attention_mask=attention_mask,
            **{name: value for name, value in optional.items() if value is not None},
            **kwargs,
        )

    def _embed(
        self,
        task: Task,
        num_vectors: int,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        **backbone_inputs: Any,
    ) -> MetaEmbedOutput:
        """`forward` with `task` and `num_vectors` already checked by the public entry point; `backbone_inputs`
        (the processor's other outputs, `output_hidden_states`, ...) go to the backbone."""
        if self.config.meta_token_id is None:
            raise ValueError("config.meta_token_id is not set; create the model with MetaEmbedModel.from_backbone")
        if bool((input_ids[:, -1] == self.config.meta_token_id).any()):
            raise ValueError("input_ids already end with the Meta Token placeholder; pass content tokens only")
        adapter = self.backbone_adapter
        if adapter.cross_attention and backbone_inputs.get("pixel_values") is not None:
            has_image = (input_ids == adapter.image_token_id(self.config.vlm_config)).any(-1)
            if not bool(has_image.all()):
                return self._embed_split_by_image(
                    task, num_vectors, input_ids, attention_mask, has_image, backbone_inputs
                )
        return self._embed_rows(task, num_vectors, input_ids, attention_mask, backbone_inputs)

    def _embed_split_by_image(
        self,
        task: Task,
        num_vectors: int,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        has_image: torch.Tensor,
        backbone_inputs: dict[str, Any],
    ) -> MetaEmbedOutput:
        """Cross-attention families (Mllama): rows without an image run without pixel inputs, as they would alone
        (given pixel inputs, a text-only row's masked cross-attention still reads the batch's images)."""
        text_inputs = {
            name: value
            for name, value in backbone_inputs.items()
            if name not in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")
        }
        image_inputs = dict(backbone_inputs)
        if "cross_attention_mask" in image_inputs:
            image_inputs["cross_attention_mask"] = image_inputs["cross_attention_mask"][has_image]
        parts = [
            (
                has_image,
                self._embed_rows(task, num_vectors, input_ids[has_image], attention_mask[has_image], image_inputs),
            ),
            (
                ~has_image,
                self._embed_rows(task, num_vectors, input_ids[~has_image], attention_mask[~has_image], text_inputs),
            ),
        ]
        embeddings = parts[0][1].embeddings.new_empty(input_ids.shape[0], *parts[0][1].embeddings.shape[1:])
        hidden_states = None
        if parts[0][1].hidden_states is not None:
            hidden_states = tuple(
                layer.new_empty(input_ids.shape[0], *layer.shape[1:]) for layer in parts[0][1].hidden_states
            )
        for rows, output in parts:
            embeddings[rows] = output.embeddings
            for merged, layer in zip(hidden_states or (), output.hidden_states or ()):
                merged[rows] = layer
        return MetaEmbedOutput(embeddings=embeddings, hidden_states=hidden_states)

    def _embed_rows(
        self,
        task: Task,
        num_vectors: int,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        backbone_inputs: dict[str, Any],
    ) -> MetaEmbedOutput:
        """One backbone forward over `[content; Meta Tokens]`."""
        adapter = self.backbone_adapter
        backbone_inputs = dict(backbone_inputs)
        batch_size = input_ids.shape[0]
        num_appended = self.config.meta_tokens_to_append(task, num_vectors)

        def append(tensor: torch.Tensor, value: int) -> torch.Tensor:
            return torch.cat([tensor, tensor.new_full((batch_size, num_appended), value)], dim=1)

        image_token_id = adapter.image_token_id(self.config.vlm_config)
        if adapter.rope == "mrope" and backbone_inputs.get("mm_token_type_ids") is None:
            backbone_inputs["mm_token_type_ids"] = (input_ids == image_token_id).int()
        if adapter.token_type_ids is not None and backbone_inputs.get("token_type_ids") is None:
            is_image = input_ids == image_token_id
            backbone_inputs["token_type_ids"] = (
                is_image.long() if adapter.token_type_ids == "image" else torch.zeros_like(input_ids)
            )
        if adapter.token_type_ids == "image" and not bool(backbone_inputs["token_type_ids"].any()):
            # No image token: the backbone's plain causal mask is the same mask, and Gemma 3 builds it much faster
            # than its image-block mask from token_type_ids.
            del backbone_inputs["token_type_ids"]
        input_ids = append(input_ids, self.config.meta_token_id)
        attention_mask = append(attention_mask, 1)
        if "mm_token_type_ids" in backbone_inputs:
            backbone_inputs["mm_token_type_ids"] = append(backbone_inputs["mm_token_type_ids"], 0)
        if "token_type_ids" in backbone_inputs:
            backbone_inputs["token_type_ids"] = append(backbone_inputs["token_type_ids"], adapter.meta_token_type_id)
        if backbone_inputs.get("cross_attention_mask") is not None:
            # The Meta Tokens attend to the images the content's last token attends to (whatever the padding side).
            mask = backbone_inputs["cross_attention_mask"]
            last = (attention_mask[:, : mask.shape[1]] * torch.arange(1, mask.shape[1] + 1, device=mask.device)).argmax(
                -1
            )
            tail = mask[torch.arange(batch_size, device=mask.device), last].unsqueeze(1)
            tail = tail.expand(-1, num_appended, *mask.shape[2:])
            backbone_inputs["cross_attention_mask"] = torch.cat([mask, tail], dim=1)
        # Explicit positions: independent of the padding side and amount, and the backbone's cached
        # `rope_deltas` (module state shared between threads) is never read or written.
        if adapter.rope == "mrope":
            position_ids, _ = self.vlm.get_rope_index(
                input_ids,
                mm_token_type_ids=backbone_inputs["mm_token_type_ids"],
                image_grid_thw=backbone_inputs.get("image_grid_thw"),
                attention_mask=attention_mask,
            )
        else:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0) + adapter.position_offset
        outputs = self.vlm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
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
        token_type_ids: torch.LongTensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
    ) -> torch.FloatTensor:
        """The single-vector (budget (1, 1)) candidate embedding `[B, D]` of processed text, as CLIP-style
        `get_text_features` (tools such as sentence-transformers' `SentenceTransformer` call it with the processor's
        outputs its signature names, so every family's text inputs are named here)."""
        inputs = {
            "mm_token_type_ids": mm_token_type_ids,
            "token_type_ids": token_type_ids,
            "cross_attention_mask": cross_attention_mask,
        }
        present = {name: value for name, value in inputs.items() if value is not None}
        return self(input_ids=input_ids, attention_mask=attention_mask, num_vectors=1, **present).embeddings[:, 0]

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        image_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        aspect_ratio_ids: torch.LongTensor | None = None,
        aspect_ratio_mask: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
    ) -> torch.FloatTensor:
        """The single-vector (budget (1, 1)) candidate embedding `[B, D]` of processed images (with their
        prompt tokens and the family's image inputs from `MetaEmbedProcessor.__call__`), as CLIP-style
        `get_image_features`; every family's image inputs are named (see `get_text_features`)."""
        inputs = {
            "image_grid_thw": image_grid_thw,
            "mm_token_type_ids": mm_token_type_ids,
            "token_type_ids": token_type_ids,
            "pixel_attention_mask": pixel_attention_mask,
            "image_sizes": image_sizes,
            "aspect_ratio_ids": aspect_ratio_ids,
            "aspect_ratio_mask": aspect_ratio_mask,
            "cross_attention_mask": cross_attention_mask,
        }
        present = {name: value for name, value in inputs.items() if value is not None}
        return self(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, num_vectors=1, **present
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
        meta_token: str | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        **from_pretrained_kwargs: Any,
    ) -> MetaEmbedModel:
        """
        Create an untrained MetaEmbed model from a vision-language checkpoint of a supported family
        (`backbones_metaembed.SUPPORTED_MODEL_TYPES`: Qwen2-VL, Qwen2.5-VL, Qwen3-VL(-MoE), Qwen3.5, Mllama,
        PaliGemma (2), Idefics3, SmolVLM, Gemma 3, LLaVA-OneVision, LLaVA-NeXT, InternVL).

        Reads the backbone's config first and refuses any other `model_type` before loading weights; checks its
        tokenizer as `from_pretrained` does; then loads the backbone weights (`AutoModel`, the bare VLM; a
        `*ForConditionalGeneration` checkpoint works, its `lm_head` is dropped), its tokenizer and image processor,
        and adds a freshly initialised Meta Token table (and projection when `embedding_dim` is set).

        Args:
            backbone_name_or_path: local folder or Hub repo id of the backbone.
            num_query_vectors / num_candidate_vectors: R_q and R_c.
            embedding_dim: `None` uses hidden states directly; an int adds `Linear(hidden, embedding_dim)`.
            shared_meta_tokens: one table for both sides (see `MetaEmbedConfig`).
            meta_token: vocabulary token used as the Meta Token placeholder; `None` picks the family's default
                (Qwen-VL: `<|box_start|>`), or the highest-id ordinary token when the tokenizer has none free.
            processor_kwargs: `MetaEmbedProcessor` options (`prompt_style`, `max_text_tokens`, prefixes).
            **from_pretrained_kwargs: passed to `AutoModel.from_pretrained` (`dtype`/`torch_dtype`,
                `device_map`, `attn_implementation`, `revision`, ...).
        """
        from_pretrained_kwargs = _with_available_attention(from_pretrained_kwargs)
        _check_device_map_support(from_pretrained_kwargs)
        hub_kwargs = {key: from_pretrained_kwargs[key] for key in _HUB_KWARGS if key in from_pretrained_kwargs}
        config_dict, _ = PreTrainedConfig.get_config_dict(backbone_name_or_path, **hub_kwargs)
        adapter = get_backbone_adapter(config_dict.get("model_type"))  # before any weights load
        backbone_config = AutoConfig.from_pretrained(backbone_name_or_path, **hub_kwargs)
        from_pretrained_kwargs = _with_softcap_attention(from_pretrained_kwargs, backbone_config)
        tokenizer = AutoTokenizer.from_pretrained(backbone_name_or_path, **hub_kwargs)
        image_processor = AutoImageProcessor.from_pretrained(backbone_name_or_path, **hub_kwargs)
        processor = MetaEmbedProcessor(
            image_processor,
            tokenizer,
            backbone_model_type=adapter.model_type,
            backbone_processor_kwargs=_backbone_processor_options(backbone_name_or_path, adapter, hub_kwargs),
            **(processor_kwargs or {}),
        )
        meta_token = meta_token if meta_token is not None else _default_meta_token(tokenizer, adapter, backbone_config)
        meta_token_id = tokenizer.convert_tokens_to_ids(meta_token)
        if missing_tokens(tokenizer, (meta_token,)):
            raise ValueError(f"the tokenizer has no token {meta_token!r} to use as Meta Token placeholder")
        if meta_token_id in _reserved_token_ids(tokenizer, adapter, backbone_config):
            raise ValueError(f"{meta_token!r} is a padding, prompt or vision token; choose another meta_token")
        vlm = AutoModel.from_pretrained(backbone_name_or_path, **from_pretrained_kwargs)
        # Against the embedding table, as at load: the text config's vocab_size can be smaller (Llama-3.2-Vision's
        # `<|image|>` is id 128256 = vocab_size; its table has vocab_size + 8 rows).
        vocabulary_rows = vlm.get_input_embeddings().num_embeddings
        _check_tokenizer_fits(tokenizer, backbone_config, vocabulary_rows, backbone_name_or_path)
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
        if kwargs.get("attn_implementation") is None and not args:
            config = kwargs.get("config")
            if not isinstance(config, MetaEmbedConfig):
                config = MetaEmbedConfig.from_pretrained(
                    pretrained_model_name_or_path, **{k: v for k, v in hub_kwargs.items() if k != "trust_remote_code"}
                )
            kwargs = _with_softcap_attention(kwargs, config.vlm_config)
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
        adapter = model.backbone_adapter
        saved = processor.adapter
        # Folders saved before the family was recorded have the Qwen-VL default, which serves every Qwen-VL family.
        if saved is not adapter and not (saved.rope == adapter.rope == "mrope"):
            raise ValueError(
                f"{pretrained_model_name_or_path}: the processor is for {saved.model_type} backbones, the model's "
                f"backbone is {adapter.model_type}"
            )
        _check_tokenizer_fits(
            processor.tokenizer, model.config.vlm_config, vocabulary_rows, pretrained_model_name_or_path
        )
        # The placeholder rule of creation: a padding, prompt or vision token would break every encode.
        if meta_token_id in _reserved_token_ids(processor.tokenizer, adapter, model.config.vlm_config):
            raise ValueError(
                f"{pretrained_model_name_or_path}: config.json's meta_token_id {meta_token_id} is a padding, prompt or "
                "vision token of the tokenizer; it must be an ordinary token"
            )
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


# A text every tokenizer of a supported family encodes losslessly: one that does not (unknown tokens) would give many
# texts the same ids.
_PROBE_TEXT = "A red circle, 42 zebras and a quarterly report"


def _check_tokenizer_fits(
    tokenizer: Any, backbone_config: Any, vocabulary_rows: int, source: str | os.PathLike
) -> None:
    """Refuse a tokenizer that is not the backbone's, the same at creation (`from_backbone`) and at load: transformers
    builds a tokenizer from tokenizer_config.json alone when the vocabulary files are missing (a vocabulary of only
    the special tokens), and every text then gets the same embedding; a foreign tokenizer of similar size lacks the
    family's prompt tokens, puts its vision tokens at other ids or cannot encode plain text."""
    adapter = get_backbone_adapter(backbone_config.model_type)
    required = (*adapter.template_tokens, adapter.image_token, *adapter.image_span_tokens)
    missing = missing_tokens(tokenizer, tuple(dict.fromkeys(required)))
    size = len(tokenizer)
    problem = None
    if missing or size > vocabulary_rows or size < vocabulary_rows // 2:
        problem = f"lacks the {adapter.name} prompt tokens {missing}" if missing else f"has {size} tokens"
    else:
        moved = {}
        for token, attribute in adapter.named_token_ids().items():
            config_id = getattr(backbone_config, attribute, None)
            if isinstance(config_id, int) and tokenizer.convert_tokens_to_ids(token) != config_id:
                moved[token] = (tokenizer.convert_tokens_to_ids(token), config_id)
        round_trip = tokenizer.decode(tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"])
        if moved:
            problem = f"puts vision tokens at other ids than the model's config, (tokenizer id, config id): {moved}"
        elif round_trip.strip() != _PROBE_TEXT:
            problem = f"does not encode plain text losslessly ({_PROBE_TEXT!r} comes back as {round_trip!r})"
    if problem:
        raise ValueError(
            f"the tokenizer loaded from {source} {problem}, the model's embedding table {vocabulary_rows} rows: "
            f"{_tokenizer_files_note(source)}"
        )


def _reserved_token_ids(tokenizer: Any, adapter: BackboneAdapter, backbone_config: Any) -> set[int]:
    """Ids a Meta Token placeholder must not be: padding, the prompt templates' tokens, vision tokens."""
    template_ids = [tokenizer.convert_tokens_to_ids(token) for token in (*adapter.template_tokens, adapter.image_token)]
    return {tokenizer.pad_token_id, *template_ids, *adapter.vision_token_ids(backbone_config).values()}


def _default_meta_token(tokenizer: Any, adapter: BackboneAdapter, backbone_config: Any) -> str:
    """The family's first Meta Token placeholder candidate the tokenizer has and may use; else the ordinary
    vocabulary entry with the highest id (any token serves: its embedding is replaced, and every prompt ends with a
    template token, so the appended run never merges with content)."""
    reserved = _reserved_token_ids(tokenizer, adapter, backbone_config)
    for token in adapter.meta_tokens:
        if not missing_tokens(tokenizer, (token,)) and tokenizer.convert_tokens_to_ids(token) not in reserved:
            return token
    added = set(tokenizer.get_added_vocab().values())
    vocabulary = tokenizer.get_vocab()
    ordinary = [token for token, index in vocabulary.items() if index not in added and index not in reserved]
    if ordinary:
        return max(ordinary, key=vocabulary.__getitem__)
    raise ValueError(
        f"the tokenizer has none of the {adapter.name} Meta Token placeholders {list(adapter.meta_tokens)} free; "
        "pass meta_token= (an ordinary token the prompts do not use)"
    )


def _backbone_processor_options(
    backbone_name_or_path: str | os.PathLike, adapter: BackboneAdapter, hub_kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The options in the backbone's processor_config.json that its family's processor takes (e.g. Idefics3's
    `image_seq_len`); read as JSON, because the family's processor class may not load here (its video processor
    needs torchvision)."""
    from transformers.utils import cached_file

    path = cached_file(
        backbone_name_or_path,
        "processor_config.json",
        _raise_exceptions_for_missing_entries=False,
        **{key: value for key, value in hub_kwargs.items() if key != "trust_remote_code"},
    )
    if path is None:
        return {}
    with open(path, encoding="utf-8") as file:
        return adapter.processor_init_kwargs(json.load(file))


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


def _with_softcap_attention(kwargs: dict[str, Any], backbone_config: Any) -> dict[str, Any]:
    """Eager attention for a backbone that caps attention logits (Gemma 2 text: PaliGemma 2), which sdpa refuses,
    unless the caller chose an implementation."""
    text_config = backbone_config.get_text_config()
    if kwargs.get("attn_implementation") is None and getattr(text_config, "attn_logit_softcapping", None) is not None:
        return {**kwargs, "attn_implementation": "eager"}
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
