"""Configuration of a MetaEmbed model: a vision-language backbone plus learnable Meta Tokens."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


@strict
class MetaEmbedConfig(PreTrainedConfig):
    r"""
    Configuration of [`MetaEmbedModel`].

    MetaEmbed appends `num_query_vectors` query Meta Tokens and `num_candidate_vectors` candidate Meta
    Tokens to every input of a vision-language model; their last-layer hidden states (optionally projected
    to `embedding_dim`) and L2-normalised are the item's multi-vector embedding.

    Args:
        vlm_config (`dict` or `PreTrainedConfig`):
            Config of the bare vision-language backbone (Qwen2-VL, Qwen2.5-VL or Qwen3-VL).
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
            transformers pipelines this model provides (`feature-extraction`, `image-feature-extraction`).
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
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.embedding_dim is not None and self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be None or >= 1, got {self.embedding_dim}")

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


MetaEmbedConfig.register_for_auto_class()

__all__ = ["MetaEmbedConfig"]
