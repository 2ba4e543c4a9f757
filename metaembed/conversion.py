"""Import checkpoints written by the reference MetaEmbed training code into this package's format.

The reference code (facebookresearch/MetaEmbed, built on colpali-engine + peft) trains `LastQwen2_5`, a
`Qwen2_5_VLForConditionalGeneration` subclass with two extra modules (and likewise `LastLlama3Vision` for
Llama-3.2-Vision and `LastPali` for PaliGemma, see below), and LoRA on the backbone:

- `prompt_embed_tokens`: `nn.Embedding(R_q + R_c, hidden)` (one block of `R_q` rows when
  `shared_query_doc_prompt=True`), the Meta Token table, query rows first;
- `custom_text_proj`: `nn.Linear(hidden, dim)`, absent when trained with `dim=-1` (the paper's 7B runs);
- peft `LoraConfig(r=32, lora_alpha=32, target_modules='(.*(model).*(down_proj|gate_proj|up_proj|k_proj|q_proj|
  v_proj|o_proj).*$)', modules_to_save=['prompt_embed_tokens', 'custom_text_proj'])`. With the module names of
  transformers >= 4.52 (the reference pins 4.55) that regex adapts q/k/v/o/gate/up/down of every language-model
  layer and gate/up/down of every vision block (the vision attention is `attn.qkv` / `attn.proj`, which it
  does not match); with the older names (`visual.blocks...`, no "model" in the path) the vision tower gets none.

`PeftModel.save_pretrained` then writes `adapter_model.safetensors` + `adapter_config.json`; a merged or
non-peft run writes `model.safetensors` with every backbone tensor. `import_reference_checkpoint` reads either
(or an in-memory state dict), builds a `MetaEmbedModel` from the same backbone with `from_backbone`, copies the
table and projection, and merges the LoRA deltas `W += (lora_alpha / r) * B @ A` into the backbone weights.

Key names understood (after removing one wrapper prefix common to all keys, found as whatever precedes
`prompt_embed_tokens`: "" for a plain state dict, "base_model.model." for peft, "module." for DDP, ...):

====================================================  =========================================================
reference key                                         here
====================================================  =========================================================
`prompt_embed_tokens.weight` / `prompt_embed_tokens`  `meta_tokens` [R_q + R_c, hidden]
`custom_text_proj.weight` / `.bias`                   `projection` (sets `embedding_dim`)
`X.modules_to_save.<adapter>.Y`                       as `X.Y` (peft's trained copy in a raw PeftModel state dict)
`X.original_module.Y`                                 ignored (peft's frozen copy of the initial value)
`M.lora_A[.<adapter>].weight` + `M.lora_B[...]`       merged into backbone Linear `M` (M mapped as below)
`M.base_layer.weight` / `.bias`                       backbone tensor `M.weight` / `M.bias`
`lm_head.weight`                                      ignored (an embedding model has no LM head)
`learnable_temp`                                      ignored (training-only logit temperature)
`embed_tokens.weight`                                 `language_model.embed_tokens.weight` (LastQwen2_5 alias)
any other key                                         backbone tensor, name mapped as below
====================================================  =========================================================

Backbone module names, reference -> `MetaEmbedModel.vlm` (the bare backbone model), first match wins, per
reference class (`REFERENCE_LAYOUTS`, chosen by the backbone's `model_type`):

- `LastQwen2_5` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL backbones; the class subclasses the `*ForConditionalGeneration`):
  `model.language_model.*` -> `language_model.*`, `model.visual.*` -> `visual.*` (transformers >= 4.52 in memory:
  peft adapters; 5.x files); `visual.*` -> `visual.*`, `model.*` -> `language_model.*` (transformers <= 4.51, and
  4.52-4.57 `save_pretrained` files); `language_model.*` -> `language_model.*` (bare-model names).
- `LastLlama3Vision` (Llama-3.2-Vision; subclasses `MllamaForConditionalGeneration`, code written for the
  transformers <= 4.51 layout): `language_model.model.*` -> `language_model.*`, `vision_model.*`,
  `multi_modal_projector.*` as they are, and the >= 4.52 names `model.language_model.*`, `model.vision_model.*`,
  `model.multi_modal_projector.*`; `lm_head.weight` / `language_model.lm_head.weight` ignored.
- `LastPali` (PaliGemma / PaliGemma 2; holds `PaliGemmaForConditionalGeneration` as `model`):
  `model.language_model.model.*` -> `language_model.*`, `model.vision_tower.*` -> `vision_tower.*`,
  `model.multi_modal_projector.*` -> `multi_modal_projector.*`, and the >= 4.52 names `model.model.<same>.*`;
  `model.lm_head.weight` / `model.language_model.lm_head.weight` ignored.

The table row layout (`[content; M_q; M_c]`, query rows first) and `custom_text_proj` are the same in all three.

Every key must be understood and land on an existing tensor of matching shape; anything else is an error that
lists the offending keys (nothing is dropped silently). Pickle files (`.bin`, `.pt`) are never opened.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modeling_metaembed import MetaEmbedModel

logger = logging.getLogger(__name__)

# The reference training config: LoraConfig(r=32, lora_alpha=32).
REFERENCE_LORA_ALPHA = 32.0
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
MODEL_WEIGHTS_FILE = "model.safetensors"
MODEL_WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Pickle files in a Trainer checkpoint folder that hold training state, not weights.
TRAINING_STATE_FILES = ("optimizer.pt", "scheduler.pt", "training_args.bin", "scaler.pt")

TABLE_NAME = "prompt_embed_tokens"
PROJECTION_NAME = "custom_text_proj"
_LM_HEAD = "the language-model head is not used for embeddings"
_TEMPERATURE = "training-only logit temperature"


@dataclass(frozen=True)
class ReferenceLayout:
    """How one reference model class names its tensors (see the module docstring)."""

    reference_class: str
    name_rules: tuple[tuple[str, str], ...]  # (pattern, replacement) onto `MetaEmbedModel.vlm` names, first wins
    ignored_keys: dict[str, str]  # reference key -> why it carries nothing an embedding model uses


_QWEN_LAYOUT = ReferenceLayout(
    "LastQwen2_5",
    (
        (r"^model\.language_model\.", "language_model."),
        (r"^model\.visual\.", "visual."),
        (r"^visual\.", "visual."),
        (r"^model\.", "language_model."),
        (r"^language_model\.", "language_model."),
        (r"^embed_tokens\.", "language_model.embed_tokens."),
    ),
    {"lm_head.weight": _LM_HEAD, "learnable_temp": _TEMPERATURE},
)
REFERENCE_LAYOUTS: dict[str, ReferenceLayout] = {
    "qwen2_vl": _QWEN_LAYOUT,
    "qwen2_5_vl": _QWEN_LAYOUT,
    "qwen3_vl": _QWEN_LAYOUT,
    # LastLlama3Vision subclasses MllamaForConditionalGeneration (its code reads `language_model.model`, the
    # transformers <= 4.51 layout); >= 4.52 module names (peft adapters made there) are read too.
    "mllama": ReferenceLayout(
        "LastLlama3Vision",
        (
            (r"^model\.language_model\.", "language_model."),
            (r"^model\.vision_model\.", "vision_model."),
            (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
            (r"^language_model\.model\.", "language_model."),
            (r"^vision_model\.", "vision_model."),
            (r"^multi_modal_projector\.", "multi_modal_projector."),
        ),
        {"lm_head.weight": _LM_HEAD, "language_model.lm_head.weight": _LM_HEAD, "learnable_temp": _TEMPERATURE},
    ),
    # LastPali wraps PaliGemmaForConditionalGeneration as `model` (Gemma 2 text in the reference runs).
    "paligemma": ReferenceLayout(
        "LastPali",
        (
            (r"^model\.model\.language_model\.", "language_model."),
            (r"^model\.model\.vision_tower\.", "vision_tower."),
            (r"^model\.model\.multi_modal_projector\.", "multi_modal_projector."),
            (r"^model\.language_model\.model\.", "language_model."),
            (r"^model\.vision_tower\.", "vision_tower."),
            (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
        ),
        {
            "model.lm_head.weight": _LM_HEAD,
            "model.language_model.lm_head.weight": _LM_HEAD,
            "learnable_temp": _TEMPERATURE,
        },
    ),
}
"""The reference model classes this importer reads, by backbone `model_type`."""
BACKBONE_NAME_RULES = _QWEN_LAYOUT.name_rules
IGNORED_KEYS = _QWEN_LAYOUT.ignored_keys

_TABLE_KEY = re.compile(rf"^(?P<wrapper>.*?){TABLE_NAME}(?:\.modules_to_save\.(?P<adapter>[^.]+))?(?:\.weight)?$")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_LORA_UNSUPPORTED = re.compile(r"\.lora_(embedding_[AB]|magnitude_vector|[AB]\.([^.]+\.)?bias)\b")
_MODULES_TO_SAVE = re.compile(r"^(?P<module>.+?)\.modules_to_save\.(?P<adapter>[^.]+)\.(?P<tensor>.+)$")
_ORIGINAL_MODULE = re.compile(r"(^|\.)original_module\.")
_BASE_LAYER = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<tensor>weight|bias)$")


class ReferenceCheckpointError(ValueError):
    """A reference checkpoint that cannot be imported faithfully (missing, unknown or mis-shaped tensors)."""


@dataclass
class LoraPair:
    """One LoRA adapter on a Linear layer: `delta W = scale * up @ down`.

    down: `lora_A.weight`, shape `[rank, in_features]`; up: `lora_B.weight`, shape `[out_features, rank]`.
    """

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None


@dataclass
class ReferenceCheckpoint:
    """A reference state dict sorted by role; names are the reference's, wrapper prefix removed."""

    meta_tokens: torch.Tensor  # [num_rows, hidden]
    projection_weight: torch.Tensor | None = None  # [dim, hidden]
    projection_bias: torch.Tensor | None = None  # [dim]
    lora: dict[str, LoraPair] = field(default_factory=dict)  # reference module path -> pair
    backbone_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # reference tensor name -> tensor
    ignored_keys: list[str] = field(default_factory=list)
    wrapper_prefix: str = ""


# --------------------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------------------


def _pickle_refusal(pickle_file: Path) -> ReferenceCheckpointError:
    output = pickle_file.with_name(
        ADAPTER_WEIGHTS_FILE if pickle_file.name.startswith("adapter_model") else MODEL_WEIGHTS_FILE
    )
    return ReferenceCheckpointError(
        f"{pickle_file} is a pickle file; this importer only reads safetensors, because unpickling can run "
        "arbitrary code. If you trust the file, convert it yourself, then import the folder or the new file:\n"
        f'  python -c "import torch; from safetensors.torch import save_file; '
        f"save_file({{k: v.clone().contiguous() for k, v in torch.load('{pickle_file}', map_location='cpu', "
        f"weights_only=True).items()}}, '{output}')\""
    )


def _weight_files_in_folder(folder: Path) -> list[Path]:
    """The safetensors files holding a checkpoint folder's weights."""
    adapter, model = folder / ADAPTER_WEIGHTS_FILE, folder / MODEL_WEIGHTS_FILE
    index = folder / MODEL_WEIGHTS_INDEX_FILE
    if adapter.is_file() and (model.is_file() or index.is_file()):
        raise ReferenceCheckpointError(
            f"{folder} holds both {ADAPTER_WEIGHTS_FILE} and full model weights; pass the file to import"
        )
    if adapter.is_file():
        return [adapter]
    if model.is_file():
        return [model]
    if index.is_file():
        shard_names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [folder / name for name in shard_names]
    pickle_files = sorted(
        path
        for path in folder.iterdir()
        if path.suffix in PICKLE_SUFFIXES and path.name not in TRAINING_STATE_FILES and not path.name.startswith("rng")
    )
    if pickle_files:
        raise _pickle_refusal(pickle_files[0])
    contents = sorted(path.name for path in folder.iterdir())
    raise ReferenceCheckpointError(
        f"no {ADAPTER_WEIGHTS_FILE}, {MODEL_WEIGHTS_FILE} or {MODEL_WEIGHTS_INDEX_FILE} in {folder} "
        f"(it holds {contents})"
    )


def load_reference_state_dict(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """
    Read a reference checkpoint without unpickling anything.

    Args:
        checkpoint: a `.safetensors` file, a folder with `adapter_model.safetensors` / `model.safetensors` /
            `model.safetensors.index.json`, or an in-memory state dict.

    Returns:
        `(state_dict, adapter_config)`: the tensors by name, and the parsed `adapter_config.json` found in the
        folder (or beside the file), else `None`.
    """
    if isinstance(checkpoint, Mapping):
        return dict(checkpoint), None
    from safetensors.torch import load_file

    path = Path(checkpoint)
    if path.is_dir():
        weight_files, config_file = _weight_files_in_folder(path), path / ADAPTER_CONFIG_FILE
    elif path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise _pickle_refusal(path)
        if path.suffix != ".safetensors":
            raise ReferenceCheckpointError(f"{path} is not a .safetensors file")
        weight_files, config_file = [path], path.with_name(ADAPTER_CONFIG_FILE)
    else:
        raise FileNotFoundError(f"reference checkpoint {path} does not exist")
    state_dict: dict[str, torch.Tensor] = {}
    for weight_file in weight_files:
        state_dict.update(load_file(weight_file))
    adapter_config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else None
    return state_dict, adapter_config


# --------------------------------------------------------------------------------------------------------------
# Sorting keys
# --------------------------------------------------------------------------------------------------------------


def parse_reference_state_dict(
    state_dict: Mapping[str, torch.Tensor], ignored_keys: Mapping[str, str] = IGNORED_KEYS
) -> ReferenceCheckpoint:
    """Sort a reference state dict into table, projection, LoRA pairs, backbone tensors and ignored keys
    (`ignored_keys`: the layout's names, after the wrapper prefix).

    Raises `ReferenceCheckpointError` when the table is missing or ambiguous, keys lack the common wrapper
    prefix, LoRA pairs are incomplete or of an unsupported kind, or peft adapter names disagree.
    """
    table_matches = [(key, match) for key in state_dict if (match := _TABLE_KEY.match(key))]
    if not table_matches:
        raise ReferenceCheckpointError(
            f"no Meta Token table: no key ending in '{TABLE_NAME}.weight' among {len(state_dict)} keys "
            f"(first: {sorted(state_dict)[:5]}); is this a reference MetaEmbed checkpoint (LastQwen2_5, "
            "LastLlama3Vision, LastPali)?"
        )
    if len(table_matches) > 1:
        raise ReferenceCheckpointError(f"several Meta Token tables: {sorted(key for key, _ in table_matches)}")
    table_key, table_match = table_matches[0]
    wrapper = table_match["wrapper"]
    outside = sorted(key for key in state_dict if not key.startswith(wrapper))
    if outside:
        raise ReferenceCheckpointError(f"keys outside the checkpoint's prefix {wrapper!r}: {outside}")

    checkpoint = ReferenceCheckpoint(meta_tokens=state_dict[table_key], wrapper_prefix=wrapper)
    adapter_names: set[str] = {table_match["adapter"]} if table_match["adapter"] else set()
    unsupported: list[str] = []
    for key, tensor in state_dict.items():
        if key == table_key:
            continue
        name = key[len(wrapper) :]
        if name in ignored_keys or _ORIGINAL_MODULE.search(name):
            checkpoint.ignored_keys.append(key)
            continue
        if saved := _MODULES_TO_SAVE.match(name):
            adapter_names.add(saved["adapter"])
            name = f"{saved['module']}.{saved['tensor']}"
        if name.startswith(f"{PROJECTION_NAME}."):
            if name == f"{PROJECTION_NAME}.weight":
                checkpoint.projection_weight = tensor
            elif name == f"{PROJECTION_NAME}.bias":
                checkpoint.projection_bias = tensor
            else:
                unsupported.append(key)
            continue
        if _LORA_UNSUPPORTED.search(name):
            unsupported.append(key)
            continue
        if lora := _LORA_KEY.match(name):
            if lora["adapter"]:
                adapter_names.add(lora["adapter"])
            pair = checkpoint.lora.setdefault(lora["module"], LoraPair())
            if lora["side"] == "A":
                pair.down = tensor
            else:
                pair.up = tensor
            continue
        if base := _BASE_LAYER.match(name):
            name = f"{base['module']}.{base['tensor']}"
        if name in checkpoint.backbone_tensors:
            raise ReferenceCheckpointError(f"two tensors for {name} (one of them {key})")
        checkpoint.backbone_tensors[name] = tensor
    if unsupported:
        raise ReferenceCheckpointError(
            "unsupported tensors (LoRA on embeddings, DoRA, LoRA biases, or unknown projection parts): "
            f"{sorted(unsupported)}"
        )
    if len(adapter_names) > 1:
        raise ReferenceCheckpointError(f"several peft adapters in one state dict: {sorted(adapter_names)}")
    incomplete = sorted(module for module, pair in checkpoint.lora.items() if pair.down is None or pair.up is None)
    if incomplete:
        raise ReferenceCheckpointError(f"LoRA modules missing lora_A or lora_B: {incomplete}")
    if (checkpoint.projection_weight is None) != (checkpoint.projection_bias is None):
        raise ReferenceCheckpointError(f"{PROJECTION_NAME} needs both weight and bias (Linear with bias)")
    return checkpoint


def backbone_name(reference_name: str, name_rules: tuple[tuple[str, str], ...] = BACKBONE_NAME_RULES) -> str | None:
    """The `MetaEmbedModel.vlm` name of a reference backbone tensor or module name (the layout's `name_rules`,
    LastQwen2_5's by default), or `None` when no rule applies."""
    for pattern, replacement in name_rules:
        mapped, count = re.subn(pattern, replacement, reference_name, count=1)
        if count:
            return mapped
    return None


# --------------------------------------------------------------------------------------------------------------
# LoRA scaling
# --------------------------------------------------------------------------------------------------------------


def _pattern_value(patterns: Mapping[str, Any] | None, module: str) -> Any | None:
    """peft's `rank_pattern` / `alpha_pattern` lookup: the first pattern matching the module name's tail."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def _lora_scale(module: str, rank: int, adapter_config: Mapping[str, Any] | None, lora_alpha: float) -> float:
    """`lora_alpha / r` (or `/ sqrt(r)` with rsLoRA) for one module, checking its rank against the config."""
    if adapter_config is not None:
        expected_rank = _pattern_value(adapter_config.get("rank_pattern"), module) or adapter_config.get("r")
        if expected_rank is not None and int(expected_rank) != rank:
            raise ReferenceCheckpointError(
                f"{ADAPTER_CONFIG_FILE} gives r={expected_rank} for {module}, but its lora_A has rank {rank}"
            )
        lora_alpha = float(_pattern_value(adapter_config.get("alpha_pattern"), module) or lora_alpha)
        if adapter_config.get("use_rslora"):
            return lora_alpha / math.sqrt(rank)
    return lora_alpha / rank


def _check_adapter_config(adapter_config: Mapping[str, Any]) -> None:
    peft_type = adapter_config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ReferenceCheckpointError(f"{ADAPTER_CONFIG_FILE}: peft_type {peft_type!r} is not LoRA")
    for flag in ("use_dora", "fan_in_fan_out", "lora_bias"):
        if adapter_config.get(flag):
            raise ReferenceCheckpointError(f"{ADAPTER_CONFIG_FILE}: {flag}=true is not supported")


# --------------------------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------------------------


def import_reference_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    backbone_name_or_path: str | os.PathLike,
    num_query_vectors: int = 16,
    num_candidate_vectors: int = 64,
    *,
    lora_alpha: float | None = None,
    **from_backbone_kwargs: Any,
) -> MetaEmbedModel:
    """
    Build a `MetaEmbedModel` from a checkpoint of the reference training code and the backbone it was trained on.

    The result embeds exactly like the reference model (same layout `[content; M_q; M_c]`, same vectors) with
    the LoRA adapters merged into the backbone weights, and `save_pretrained` writes a complete Hub folder.

    Args:
        checkpoint: a `.safetensors` file, a folder with `adapter_model.safetensors` (peft) or
            `model.safetensors` (full / merged; sharded index supported), or an in-memory state dict. Key
            names: see the module docstring. Pickle files (`.bin`, `.pt`) are refused with a conversion command.
        backbone_name_or_path: the checkpoint the reference run started from (folder or repo id: Qwen2/2.5/3-VL,
            Llama-3.2-Vision, PaliGemma; see `REFERENCE_LAYOUTS`, anything else is refused before loading); its
            tokenizer and image processor are used too.
        num_query_vectors / num_candidate_vectors: R_q and R_c of the reference run (`num_query_prompt_tokens`,
            `num_doc_prompt_tokens`); the table must have R_q + R_c rows (R_q with `shared_meta_tokens=True`,
            the reference's `shared_query_doc_prompt`, which requires R_q == R_c).
        lora_alpha: LoRA alpha; `None` takes `lora_alpha` from `adapter_config.json` (in the folder or beside
            the file), else 32 as in the reference config. The rank r is read from each `lora_A` `[r, in]`;
            the merged delta is `(lora_alpha / r) * lora_B @ lora_A` (rsLoRA, `rank_pattern` and
            `alpha_pattern` of the config are honoured).
        **from_backbone_kwargs: passed to `MetaEmbedModel.from_backbone` (`dtype`, `device_map`,
            `shared_meta_tokens`, `meta_token`, `processor_kwargs`, ...). `embedding_dim` is taken from
            `custom_text_proj` (`None` when the checkpoint has none); passing a different one is an error.

    Returns:
        The `MetaEmbedModel` in eval mode, processor attached.

    Raises:
        ReferenceCheckpointError: missing table, wrong row count or hidden size, unknown keys (all listed),
            tensors whose shape does not match the backbone, incomplete or unsupported LoRA, pickle files.
    """
    from transformers import AutoConfig

    backbone_config_options = {
        key: from_backbone_kwargs[key] for key in ("revision", "trust_remote_code") if key in from_backbone_kwargs
    }
    model_type = AutoConfig.from_pretrained(backbone_name_or_path, **backbone_config_options).model_type
    layout = REFERENCE_LAYOUTS.get(model_type)
    if layout is None:  # before any weight is read
        raise ReferenceCheckpointError(
            f"no reference model class for backbones of model_type {model_type!r}; the reference code's classes "
            f"importable here: {', '.join(sorted({item.reference_class for item in REFERENCE_LAYOUTS.values()}))} "
            f"(model_type {', '.join(REFERENCE_LAYOUTS)})"
        )
    state_dict, adapter_config = load_reference_state_dict(checkpoint)
    reference = parse_reference_state_dict(state_dict, layout.ignored_keys)
    if adapter_config is not None:
        _check_adapter_config(adapter_config)
        config_alpha = adapter_config.get("lora_alpha")
        if lora_alpha is not None and config_alpha is not None and float(config_alpha) != float(lora_alpha):
            raise ReferenceCheckpointError(
                f"lora_alpha={lora_alpha} was given but {ADAPTER_CONFIG_FILE} says lora_alpha={config_alpha}"
            )
        if lora_alpha is None and config_alpha is not None:
            lora_alpha = float(config_alpha)
    lora_alpha = REFERENCE_LORA_ALPHA if lora_alpha is None else float(lora_alpha)

    # Checks that need no backbone come first.
    shared = bool(from_backbone_kwargs.get("shared_meta_tokens", False))
    expected_rows = (
        max(num_query_vectors, num_candidate_vectors) if shared else num_query_vectors + num_candidate_vectors
    )
    table = reference.meta_tokens
    if table.dim() != 2:
        raise ReferenceCheckpointError(f"{TABLE_NAME} must be [rows, hidden], got shape {tuple(table.shape)}")
    if table.shape[0] != expected_rows:
        layout = (
            f"max(R_q, R_c) = {expected_rows} (shared_meta_tokens=True)"
            if shared
            else f"R_q + R_c = {num_query_vectors} + {num_candidate_vectors} = {expected_rows}"
        )
        hint = "" if shared else "; a table trained with shared_query_doc_prompt needs shared_meta_tokens=True"
        raise ReferenceCheckpointError(f"{TABLE_NAME} has {table.shape[0]} rows, expected {layout}{hint}")
    embedding_dim = None if reference.projection_weight is None else int(reference.projection_weight.shape[0])
    if "embedding_dim" in from_backbone_kwargs:
        requested = from_backbone_kwargs.pop("embedding_dim")
        if requested != embedding_dim:
            raise ReferenceCheckpointError(
                f"embedding_dim={requested} was given but the checkpoint's {PROJECTION_NAME} gives {embedding_dim}"
            )

    model = MetaEmbedModel.from_backbone(
        backbone_name_or_path, num_query_vectors, num_candidate_vectors, embedding_dim, **from_backbone_kwargs
    )
    hidden_size = model.config.hidden_size
    if table.shape[1] != hidden_size:
        raise ReferenceCheckpointError(
            f"{TABLE_NAME} has hidden size {table.shape[1]}, the backbone {backbone_name_or_path} has {hidden_size}"
        )
    projection_tensors = (reference.projection_weight, reference.projection_bias)
    if reference.projection_weight is not None and tuple(tuple(tensor.shape) for tensor in projection_tensors) != (
        (embedding_dim, hidden_size),
        (embedding_dim,),
    ):
        raise ReferenceCheckpointError(
            f"{PROJECTION_NAME} weight {tuple(reference.projection_weight.shape)} / bias "
            f"{tuple(reference.projection_bias.shape)} do not fit Linear({hidden_size}, {embedding_dim})"
        )

    backbone_updates = _resolve_backbone_tensors(model.vlm, reference.backbone_tensors, layout.name_rules)
    lora_targets = _resolve_lora_targets(model.vlm, reference.lora, layout.name_rules)
    with torch.no_grad():
        model.meta_tokens.copy_(table)
        if model.projection is not None:
            model.projection.weight.copy_(reference.projection_weight)
            model.projection.bias.copy_(reference.projection_bias)
        for target, tensor in backbone_updates:
            target.copy_(tensor)
        for module_name, (linear, pair) in lora_targets.items():
            scale = _lora_scale(module_name, pair.down.shape[0], adapter_config, lora_alpha)
            delta = scale * (pair.up.float() @ pair.down.float())  # [out, r] @ [r, in] -> [out, in]
            linear.weight.copy_(linear.weight.float() + delta.to(linear.weight.device))
    logger.info(
        "imported reference checkpoint: table %s, projection %s, %d LoRA deltas merged, %d backbone tensors "
        "replaced, ignored %s",
        tuple(table.shape),
        None if embedding_dim is None else (embedding_dim, hidden_size),
        len(lora_targets),
        len(backbone_updates),
        reference.ignored_keys,
    )
    return model.eval()


def _resolve_backbone_tensors(
    vlm: nn.Module, tensors: Mapping[str, torch.Tensor], name_rules: tuple[tuple[str, str], ...]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Map reference backbone tensors onto `vlm`'s parameters/buffers: `[(target, source)]`. Aliases (the same
    target twice) must agree. Raises listing every name that maps nowhere or has the wrong shape."""
    targets = dict(vlm.named_parameters()) | dict(vlm.named_buffers())
    updates: dict[str, tuple[str, torch.Tensor]] = {}
    unknown, mismatched = [], []
    for reference_name, tensor in tensors.items():
        name = backbone_name(reference_name, name_rules)
        if name is None or name not in targets:
            unknown.append(reference_name)
            continue
        if tuple(tensor.shape) != tuple(targets[name].shape):
            mismatched.append(f"{reference_name} {tuple(tensor.shape)} vs {name} {tuple(targets[name].shape)}")
            continue
        if name in updates and not torch.equal(updates[name][1], tensor):
            raise ReferenceCheckpointError(f"{updates[name][0]} and {reference_name} both set {name} but differ")
        updates[name] = (reference_name, tensor)
    if unknown:
        raise ReferenceCheckpointError(
            f"unknown keys (no backbone tensor of that name; see REFERENCE_LAYOUTS): {sorted(unknown)}"
        )
    if mismatched:
        raise ReferenceCheckpointError(f"backbone tensors of the wrong shape: {sorted(mismatched)}")
    return [(targets[name], tensor) for name, (_, tensor) in updates.items()]


def _resolve_lora_targets(
    vlm: nn.Module, lora: Mapping[str, LoraPair], name_rules: tuple[tuple[str, str], ...]
) -> dict[str, tuple[nn.Linear, LoraPair]]:
    """Find the Linear layer of `vlm` for each LoRA pair (keyed by reference module name) and check shapes."""
    modules = dict(vlm.named_modules())
    resolved: dict[str, tuple[nn.Linear, LoraPair]] = {}
    unknown, mismatched = [], []
    for reference_module, pair in lora.items():
        name = backbone_name(reference_module, name_rules)
        linear = modules.get(name) if name is not None else None
        if not isinstance(linear, nn.Linear):
            unknown.append(reference_module)
            continue
        rank = pair.down.shape[0]
        if pair.down.shape != (rank, linear.in_features) or pair.up.shape != (linear.out_features, rank):
            mismatched.append(
                f"{reference_module}: lora_A {tuple(pair.down.shape)}, lora_B {tuple(pair.up.shape)} vs "
                f"Linear({linear.in_features}, {linear.out_features})"
            )
            continue
        resolved[reference_module] = (linear, pair)
    if unknown:
        raise ReferenceCheckpointError(f"LoRA on modules that are not Linear layers of the backbone: {sorted(unknown)}")
    if mismatched:
        raise ReferenceCheckpointError(f"LoRA tensors of the wrong shape: {sorted(mismatched)}")
    return resolved


__all__ = [
    "BACKBONE_NAME_RULES",
    "REFERENCE_LAYOUTS",
    "ReferenceCheckpointError",
    "backbone_name",
    "import_reference_checkpoint",
    "load_reference_state_dict",
    "parse_reference_state_dict",
]
