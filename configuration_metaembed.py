"""Configuration of a MetaEmbed model: a vision-language backbone plus learnable Meta Tokens."""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

try:
    from .backbones_metaembed import get_backbone_adapter
except ImportError:  # a checkout or an installed package: plain top-level modules
    from backbones_metaembed import get_backbone_adapter

# Pipeline tasks served by the pipeline registered under another task name (see `PipelineTasks`).
PIPELINE_TASK_ALIASES = {"image-feature-extraction": "feature-extraction"}


class PipelineTasks(dict):
    """`config.custom_pipelines`: the registered pipelines, each under one task name, that also answer for the
    task names in `PIPELINE_TASK_ALIASES`.

    transformers' `pipeline()` infers the task of a model only when `custom_pipelines` holds exactly one entry, and
    builds a model's own class for a task only when `task in custom_pipelines`. MetaEmbed's one pipeline serves
    `feature-extraction` and `image-feature-extraction`; listing both names would break `pipeline(model=folder)`
    and listing one would hand the other to transformers' generic class. So the mapping holds (and saves) one
    entry and looks the alias up under it.
    """

    def _canonical(self, task: object) -> object:
        alias_of = PIPELINE_TASK_ALIASES.get(task) if isinstance(task, str) else None
        return alias_of if alias_of is not None and dict.__contains__(self, alias_of) else task

    def __contains__(self, task: object) -> bool:
        return dict.__contains__(self, self._canonical(task))

    def __getitem__(self, task: str) -> Any:
        return dict.__getitem__(self, self._canonical(task))

    def get(self, task: str, default: Any = None) -> Any:
        return dict.get(self, self._canonical(task), default)


@strict
class MetaEmbedConfig(PreTrainedConfig):
    r"""
    Configuration of [`MetaEmbedModel`].

    MetaEmbed appends `num_query_vectors` query Meta Tokens and `num_candidate_vectors` candidate Meta
    Tokens to every input of a vision-language model; their last-layer hidden states (optionally projected
    to `embedding_dim`) and L2-normalised are the item's multi-vector embedding.

    Args:
        vlm_config (`dict` or `PreTrainedConfig`):
            Config of the bare vision-language backbone, of a family in `backbones_metaembed.SUPPORTED_MODEL_TYPES`.
        num_query_vectors (`int`, defaults to 16):
            R_q, the number of query Meta Tokens (and of query vectors).
        num_candidate_vectors (`int`, defaults to 64):
            R_c, the number of candidate Meta Tokens (and of candidate vectors).
        embedding_dim (`int`, *optional*):
            Size of each vector. `None` uses the backbone's hidden size directly; an int adds a
            `Linear(hidden_size, embedding_dim)` projection.
        shared_meta_tokens (`bool`, defaults to `False`):
            Use one table for queries and candidates (the reference code's `shared_query_doc_prompt`).
            Then the table has `max(R_q, R_c)` rows and candidates do not run the query rows.
        meta_token_id (`int`, *optional*):
            Vocabulary id appended once per Meta Token as a placeholder; its embedding is replaced by the
            learned row, so the id only needs to be an ordinary (non-image, non-padding) token.
        base_model_name_or_path (`str`, *optional*):
            The backbone checkpoint the model was created from (for the model card).
        custom_pipelines (`dict`, *optional*):
            transformers pipelines this model provides: one entry, `feature-extraction`, which also serves
            `image-feature-extraction` (see `PipelineTasks`; an alias entry saved by older versions is dropped).
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the initial Meta Token rows and projection weights.
    """

    model_type = "metaembed"
    sub_configs_defaults = {"vlm_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2_5_vl")}

    vlm_config: dict | PreTrainedConfig | None = None
    num_query_vectors: int = 16
    num_candidate_vectors: int = 64
    embedding_dim: int | None = None
    shared_meta_tokens: bool = False
    meta_token_id: int | None = None
    base_model_name_or_path: str | None = None
    custom_pipelines: dict | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        for name in ("num_query_vectors", "num_candidate_vectors"):
            _check_size(getattr(self, name), name)
        if self.embedding_dim is not None:
            _check_size(self.embedding_dim, "embedding_dim", "None or ")
        adapter = get_backbone_adapter(self.vlm_config.model_type)
        if self.meta_token_id is not None:
            _check_size(self.meta_token_id, "meta_token_id", minimum=0)
            vision = adapter.vision_token_ids(self.vlm_config)
            clash = [name for name, value in vision.items() if value == self.meta_token_id]
            if clash:
                raise ValueError(f"meta_token_id {self.meta_token_id} is the backbone's vision token ({clash[0]})")
        for path, value in _image_geometry(self.vlm_config, "vlm_config"):
            _check_size(value, path)
        if self.custom_pipelines is not None:
            tasks = PipelineTasks(self.custom_pipelines)
            for alias, task in PIPELINE_TASK_ALIASES.items():
                if dict.__contains__(tasks, alias) and dict.__contains__(tasks, task):
                    del tasks[alias]
            self.custom_pipelines = tasks

    def get_text_config(self, *args, **kwargs) -> PreTrainedConfig:
        return self.vlm_config.get_text_config(*args, **kwargs)

    @property
    def hidden_size(self) -> int:
        """Hidden size of the backbone's language model."""
        return self.vlm_config.get_text_config().hidden_size

    @property
    def output_dim(self) -> int:
        """Size D of each output vector."""
        return self.embedding_dim if self.embedding_dim is not None else self.hidden_size

    @property
    def projection_dim(self) -> int:
        """`output_dim` under the name tools read for the size of a model's output embeddings (e.g.
        sentence-transformers' `get_embedding_dimension`, which otherwise takes the backbone's hidden size)."""
        return self.output_dim

    @property
    def num_meta_tokens(self) -> int:
        """Rows of the Meta Token table: query rows first, then candidate rows (or one shared block)."""
        if self.shared_meta_tokens:
            return max(self.num_query_vectors, self.num_candidate_vectors)
        return self.num_query_vectors + self.num_candidate_vectors

    def num_vectors_for(self, task: str) -> int:
        """R for `task` ("query" or "candidate")."""
        return self.num_query_vectors if task == "query" else self.num_candidate_vectors

    def meta_tokens_to_append(self, task: str, num_vectors: int) -> int:
        """How many leading rows of the table an input must carry to read `num_vectors` vectors of `task`.

        Attention is causal, so the first r vectors of a side only depend on the rows before them: a query
        needs rows [0, r_q); a candidate all query rows (they precede it in the reference layout
        [content; M_q; M_c]) and its first r_c rows. The vectors are the last `num_vectors` positions.
        """
        if task == "query" or self.shared_meta_tokens:
            return num_vectors
        return self.num_query_vectors + num_vectors


# Sizes of the vision tower that image preprocessing and positions divide by (0 would fail at encode time).
_IMAGE_GEOMETRY = ("patch_size", "spatial_merge_size", "temporal_patch_size", "image_size", "downsample_factor")


def _image_geometry(config: PreTrainedConfig, path: str) -> list[tuple[str, Any]]:
    """`(dotted name, value)` of the image-geometry fields in `config` and its sub-configs."""
    found = []
    for name, value in vars(config).items():
        if isinstance(value, PreTrainedConfig):
            found += _image_geometry(value, f"{path}.{name}")
        elif name in _IMAGE_GEOMETRY and value is not None and not isinstance(value, (list, tuple, dict)):
            found.append((f"{path}.{name}", value))
    return found


def _check_size(value: Any, name: str, allowed: str = "", minimum: int = 1) -> None:
    """One error naming the field for a size that is not an int >= `minimum` (a str "4", a float 4.5, a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be {allowed}an int >= {minimum}, got {value!r}")


MetaEmbedConfig.register_for_auto_class()

__all__ = ["PIPELINE_TASK_ALIASES", "MetaEmbedConfig", "PipelineTasks"]
