"""Importing checkpoints of the reference training code (facebookresearch/MetaEmbed: LastQwen2_5 + peft LoRA).

Expected embeddings are computed here without the importer: the base backbone with the LoRA deltas merged by
hand (or by peft itself), the table rows put after the content as the reference code does, the query or
candidate rows read, projected and normalised.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import NUM_CANDIDATE_VECTORS, NUM_QUERY_VECTORS, make_model
from safetensors.torch import save_file
from torch import nn

from metaembed.conversion import (
    ReferenceCheckpointError,
    backbone_name,
    import_reference_checkpoint,
    parse_reference_state_dict,
)
from modeling_metaembed import MetaEmbedModel

ATOL = 1e-5
EMBEDDING_DIM = 16
LORA_RANK = 4
NUM_META_TOKENS = NUM_QUERY_VECTORS + NUM_CANDIDATE_VECTORS
PEFT_PREFIX = "base_model.model."
# LoRA targets written by hand: (module in the bare VL model, reference name with transformers >= 4.52 module
# names, reference name with transformers <= 4.51 names). Vision attention `attn.qkv` is not hit by the
# reference's target regex but is a Linear any LoRA config could target.
LORA_MODULES = (
    (
        "language_model.layers.0.self_attn.q_proj",
        "model.language_model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.q_proj",
    ),
    (
        "language_model.layers.0.self_attn.v_proj",
        "model.language_model.layers.0.self_attn.v_proj",
        "model.layers.0.self_attn.v_proj",
    ),
    (
        "language_model.layers.1.self_attn.o_proj",
        "model.language_model.layers.1.self_attn.o_proj",
        "model.layers.1.self_attn.o_proj",
    ),
    (
        "language_model.layers.1.mlp.down_proj",
        "model.language_model.layers.1.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ),
    ("visual.blocks.0.mlp.gate_proj", "model.visual.blocks.0.mlp.gate_proj", "visual.blocks.0.mlp.gate_proj"),
    ("visual.blocks.1.mlp.down_proj", "model.visual.blocks.1.mlp.down_proj", "visual.blocks.1.mlp.down_proj"),
    ("visual.blocks.0.attn.qkv", "model.visual.blocks.0.attn.qkv", "visual.blocks.0.attn.qkv"),
)
# The reference training config's peft target regex.
REFERENCE_TARGET_MODULES = "(.*(model).*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$)"


@pytest.fixture(scope="module")
def backbone_dir(backbone_dirs) -> str:
    return backbone_dirs["qwen2_5_vl"]


@pytest.fixture(scope="module")
def base_model(backbone_dir) -> MetaEmbedModel:
    """The untouched backbone (and its processor); its own Meta Tokens are never used here."""
    return make_model(backbone_dir)


@pytest.fixture(scope="module")
def trained_tensors(base_model) -> dict:
    """Random "trained" tensors: table [R_q + R_c, hidden], projection, LoRA A [r, in] / B [out, r] per module."""
    generator = torch.Generator().manual_seed(7)
    hidden = base_model.config.hidden_size

    def random(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    lora = {}
    for module_name, _, _ in LORA_MODULES:
        linear = base_model.vlm.get_submodule(module_name)
        lora[module_name] = (
            random(LORA_RANK, linear.in_features, std=0.3),
            random(linear.out_features, LORA_RANK, std=0.3),
        )
    return {
        "table": random(NUM_META_TOKENS, hidden, std=1.0),
        "projection_weight": random(EMBEDDING_DIM, hidden, std=0.2),
        "projection_bias": random(EMBEDDING_DIM, std=0.2),
        "lora": lora,
    }


def reference_state_dict(trained: dict, naming: str = "new", prefix: str = PEFT_PREFIX) -> dict[str, torch.Tensor]:
    """The tensors as peft's `save_pretrained` writes them for LastQwen2_5 (adapter names removed)."""
    column = {"new": 1, "legacy": 2}[naming]
    state_dict = {
        f"{prefix}prompt_embed_tokens.weight": trained["table"],
        f"{prefix}custom_text_proj.weight": trained["projection_weight"],
        f"{prefix}custom_text_proj.bias": trained["projection_bias"],
    }
    for names in LORA_MODULES:
        down, up = trained["lora"][names[0]]
        state_dict[f"{prefix}{names[column]}.lora_A.weight"] = down
        state_dict[f"{prefix}{names[column]}.lora_B.weight"] = up
    return state_dict


def reference_layout_embeddings(
    vlm: nn.Module,
    processor,
    table: torch.Tensor,
    projection: tuple[torch.Tensor, torch.Tensor] | None,
    items: list,
    task: str,
) -> torch.Tensor:
    """As LastQwen2_5.forward: append R_q + R_c dummy ids (1) and mask ones, M-RoPE positions over the extended
    ids, table rows in place of their embeddings, causal backbone, then rows [-(R_q+R_c), -R_c) for queries or
    the last R_c for candidates, `custom_text_proj`, L2 norm. Returns [B, R, D] float32."""
    features = processor.process_queries(items) if task == "query" else processor.process_candidates(items)
    batch_size, num_meta = features["input_ids"].shape[0], table.shape[0]

    def extend(tensor: torch.Tensor, value: int) -> torch.Tensor:
        return torch.cat([tensor, torch.full((batch_size, num_meta), value, dtype=tensor.dtype)], dim=1)

    input_ids = extend(features["input_ids"], 1)
    attention_mask = extend(features["attention_mask"], 1)
    mm_token_type_ids = extend(features["mm_token_type_ids"], 0)
    position_ids, _ = vlm.get_rope_index(
        input_ids,
        mm_token_type_ids=mm_token_type_ids,
        image_grid_thw=features.get("image_grid_thw"),
        attention_mask=attention_mask,
    )
    with torch.no_grad():
        inputs_embeds = vlm.get_input_embeddings()(input_ids)
        inputs_embeds[:, -num_meta:] = table
        hidden = vlm(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            pixel_values=features.get("pixel_values"),
            image_grid_thw=features.get("image_grid_thw"),
            mm_token_type_ids=mm_token_type_ids,
            use_cache=False,
        ).last_hidden_state
        rows = hidden[:, -num_meta:-NUM_CANDIDATE_VECTORS] if task == "query" else hidden[:, -NUM_CANDIDATE_VECTORS:]
        if projection is not None:
            rows = F.linear(rows, *projection)
    return F.normalize(rows.float(), dim=-1)


@pytest.fixture(scope="module")
def expected(backbone_dir, trained_tensors, mixed_items) -> dict:
    """Reference-layout embeddings with the LoRA deltas merged by hand at scale alpha / r, for scales 1 and 2."""
    results = {}
    for scale in (1.0, 2.0):
        merged = make_model(backbone_dir)
        with torch.no_grad():
            for module_name, (down, up) in trained_tensors["lora"].items():
                merged.vlm.get_submodule(module_name).weight += scale * up @ down
        projection = (trained_tensors["projection_weight"], trained_tensors["projection_bias"])
        for task in ("query", "candidate"):
            results[scale, task] = reference_layout_embeddings(
                merged.vlm, merged.processor, trained_tensors["table"], projection, mixed_items, task
            )
    return results


def assert_matches_reference(model: MetaEmbedModel, expected: dict, scale: float, items: list) -> None:
    for task in ("query", "candidate"):
        actual = model.encode(items, task, batch_size=len(items))
        torch.testing.assert_close(actual, expected[scale, task], atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------------------------------------------------


def test_in_memory_state_dict_matches_reference_layout(
    backbone_dir, trained_tensors, expected, base_model, mixed_items
):
    state_dict = reference_state_dict(trained_tensors, "new")
    model = import_reference_checkpoint(
        state_dict, backbone_dir, NUM_QUERY_VECTORS, NUM_CANDIDATE_VECTORS, lora_alpha=LORA_RANK
    )
    assert not model.training and model.config.embedding_dim == EMBEDDING_DIM
    assert_matches_reference(model, expected, 1.0, mixed_items)
    # The LoRA deltas matter: without them the vectors differ.
    unmerged = reference_layout_embeddings(
        base_model.vlm,
        base_model.processor,
        trained_tensors["table"],
        (trained_tensors["projection_weight"], trained_tensors["projection_bias"]),
        mixed_items,
        "candidate",
    )
    assert (unmerged - expected[1.0, "candidate"]).abs().max() > 1e-2


def test_safetensors_file_with_legacy_names(backbone_dir, trained_tensors, expected, mixed_items, tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    save_file({key: value.contiguous() for key, value in reference_state_dict(trained_tensors, "legacy").items()}, path)
    # alpha = 2 r: every delta counts twice.
    model = import_reference_checkpoint(
        path, backbone_dir, NUM_QUERY_VECTORS, NUM_CANDIDATE_VECTORS, lora_alpha=2 * LORA_RANK
    )
    assert_matches_reference(model, expected, 2.0, mixed_items)


def test_adapter_folder_reads_adapter_config(backbone_dir, trained_tensors, expected, mixed_items, tmp_path):
    save_file(reference_state_dict(trained_tensors, "new"), tmp_path / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": LORA_RANK, "lora_alpha": 2 * LORA_RANK, "target_modules": "..."}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "optimizer.pt").write_bytes(b"training state, never read")
    model = import_reference_checkpoint(tmp_path, backbone_dir, NUM_QUERY_VECTORS, NUM_CANDIDATE_VECTORS)
    assert_matches_reference(model, expected, 2.0, mixed_items)
    with pytest.raises(ReferenceCheckpointError, match="lora_alpha=4"):
        import_reference_checkpoint(tmp_path, backbone_dir, NUM_QUERY_VECTORS, NUM_CANDIDATE_VECTORS, lora_alpha=4)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 2 * LORA_RANK}))
    with pytest.raises(ReferenceCheckpointError, match="rank 4"):
        import_reference_checkpoint(tmp_path, backbone_dir, NUM_QUERY_VECTORS, NUM_CANDIDATE_VECTORS)


def test_adapter_written_by_peft_matches_peft_merge(backbone_dir, base_model, mixed_items, tmp_path):
    """A LastQwen2_5-shaped model wrapped by peft with the reference LoraConfig (regex targets, modules_to_save),
    saved by peft; the expected vectors use peft's own merge_and_unload."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    class LastQwen2_5(Qwen2_5_VLForConditionalGeneration):
        def __init__(self, config):
            super().__init__(config)
            hidden = config.text_config.hidden_size
            self.custom_text_proj = nn.Linear(hidden, EMBEDDING_DIM)
            self.prompt_embed_tokens = nn.Embedding(NUM_META_TOKENS, hidden)

    torch.manual_seed(3)
    reference_model = LastQwen2_5.from_pretrained(backbone_dir)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=REFERENCE_TARGET_MODULES,
        modules_to_save=["prompt_embed_tokens", "custom_text_proj"],
    )
    peft_model = get_peft_model(reference_model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if parameter.requires_grad:  # LoRA A/B (B starts at zero), table and projection copies
                parameter.normal_(0.0, 0.3 if "lora_" in name else 1.0)
    peft_model.save_pretrained(tmp_path)
    merged = peft_model.merge_and_unload()
    table = merged.prompt_embed_tokens.weight.detach()
    projection = (merged.custom_text_proj.weight.detach(), merged.custom_text_proj.bias.detach())
    imported = import_reference_checkpoint(tmp_path, backbone_dir, NUM_QUERY_VECTORS, NUM_CANDIDATE_VECTORS)
    for task in ("query", "candidate"):
        expected = reference_layout_embeddings(merged.model, base_model.processor, table, projection, mixed_items, task)
        torch.testing.assert_close(imported.encode(mixed_items, task), expected, atol=ATOL, rtol=0)
    # LM layers and vision MLPs were adapted, the vision attention not (the regex does not reach attn.qkv).
    base_vlm = base_model.vlm
    assert not torch.equal(
        imported.vlm.get_submodule("visual.blocks.0.mlp.gate_proj").weight,
        base_vlm.get_submodule("visual.blocks.0.mlp.gate_proj").weight,
    )
    assert torch.equal(
        imported.vlm.get_submodule("visual.blocks.0.attn.qkv").weight,
        base_vlm.get_submodule("visual.blocks.0.attn.qkv").weight,
    )
    # The result saves and loads as an ordinary MetaEmbed folder.
    imported.save_pretrained(tmp_path / "hub")
    reloaded = MetaEmbedModel.from_pretrained(tmp_path / "hub")
    torch.testing.assert_close(
        reloaded.encode_candidates(mixed_items[:3]), imported.encode_candidates(mixed_items[:3]), atol=ATOL, rtol=0
    )


def test_full_model_checkpoint_replaces_backbone_tensors(backbone_dir, base_model, trained_tensors, tmp_path):
    """A merged / non-peft save: every backbone tensor (legacy names), LM head, the LastQwen2_5 embed alias."""
    generator = torch.Generator().manual_seed(11)
    new_weights = {
        name: torch.randn(tensor.shape, generator=generator) for name, tensor in base_model.vlm.state_dict().items()
    }
    # transformers <= 4.51 names: "model.*" for the text decoder, "visual.*" for the vision tower.
    state_dict = {
        (f"model.{name.removeprefix('language_model.')}" if name.startswith("language_model.") else name): tensor
        for name, tensor in new_weights.items()
    }
    state_dict["embed_tokens.weight"] = new_weights["language_model.embed_tokens.weight"].clone()
    state_dict["lm_head.weight"] = torch.zeros(1)
    state_dict["prompt_embed_tokens.weight"] = trained_tensors["table"]
    save_file(state_dict, tmp_path / "model.safetensors")
    model = import_reference_checkpoint(tmp_path, backbone_dir, NUM_QUERY_VECTORS, NUM_CANDIDATE_VECTORS)
    assert model.projection is None and model.config.embedding_dim is None
    for name, tensor in model.vlm.state_dict().items():
        torch.testing.assert_close(tensor, new_weights[name], atol=0, rtol=0)
    torch.testing.assert_close(model.meta_tokens.detach(), trained_tensors["table"], atol=0, rtol=0)

    state_dict["embed_tokens.weight"] = torch.zeros_like(state_dict["embed_tokens.weight"])
    with pytest.raises(ReferenceCheckpointError, match="differ"):
        import_reference_checkpoint(state_dict, backbone_dir, NUM_QUERY_VECTORS, NUM_CANDIDATE_VECTORS)


# ----------------------------------------------------------------------------------------------------------------
# Key names and errors
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reference_name,expected",
    [
        ("model.language_model.layers.3.self_attn.q_proj", "language_model.layers.3.self_attn.q_proj"),
        ("model.visual.blocks.0.mlp.up_proj", "visual.blocks.0.mlp.up_proj"),
        ("visual.blocks.0.attn.qkv.weight", "visual.blocks.0.attn.qkv.weight"),
        ("model.layers.2.mlp.gate_proj", "language_model.layers.2.mlp.gate_proj"),
        ("model.embed_tokens.weight", "language_model.embed_tokens.weight"),
        ("embed_tokens.weight", "language_model.embed_tokens.weight"),
        ("language_model.norm.weight", "language_model.norm.weight"),
        ("vision_tower.blocks.0", None),
    ],
)
def test_backbone_name_mapping(reference_name, expected):
    assert backbone_name(reference_name) == expected


def test_raw_peft_state_dict_names(trained_tensors):
    """A PeftModel.state_dict() (adapter name kept, modules_to_save copies, base_layer) sorts the same way."""
    table, weight = trained_tensors["table"], trained_tensors["projection_weight"]
    down, up = trained_tensors["lora"]["language_model.layers.0.self_attn.q_proj"]
    module = f"{PEFT_PREFIX}model.language_model.layers.0.self_attn.q_proj"
    state_dict = {
        f"{PEFT_PREFIX}prompt_embed_tokens.modules_to_save.default.weight": table,
        f"{PEFT_PREFIX}prompt_embed_tokens.original_module.weight": torch.zeros_like(table),
        f"{PEFT_PREFIX}custom_text_proj.modules_to_save.default.weight": weight,
        f"{PEFT_PREFIX}custom_text_proj.modules_to_save.default.bias": trained_tensors["projection_bias"],
        f"{PEFT_PREFIX}custom_text_proj.original_module.weight": torch.zeros_like(weight),
        f"{module}.base_layer.weight": torch.ones(up.shape[0], down.shape[1]),
        f"{module}.lora_A.default.weight": down,
        f"{module}.lora_B.default.weight": up,
    }
    parsed = parse_reference_state_dict(state_dict)
    assert parsed.wrapper_prefix == PEFT_PREFIX
    assert parsed.meta_tokens is table and parsed.projection_weight is weight
    assert list(parsed.lora) == ["model.language_model.layers.0.self_attn.q_proj"]
    assert list(parsed.backbone_tensors) == ["model.language_model.layers.0.self_attn.q_proj.weight"]
    assert len(parsed.ignored_keys) == 2
    state_dict[f"{module}.lora_A.other.weight"] = down
    with pytest.raises(ReferenceCheckpointError, match="several peft adapters"):
        parse_reference_state_dict(state_dict)


def test_unknown_keys_are_listed(backbone_dir, trained_tensors):
    state_dict = reference_state_dict(trained_tensors)
    state_dict[f"{PEFT_PREFIX}score_head.weight"] = torch.zeros(2, 2)
    state_dict[f"{PEFT_PREFIX}model.visual.extra.bias"] = torch.zeros(2)
    with pytest.raises(ReferenceCheckpointError, match=r"unknown keys.*model\.visual\.extra\.bias.*score_head\.weight"):
        import_reference_checkpoint(state_dict, backbone_dir, NUM_QUERY_VECTORS, NUM_CANDIDATE_VECTORS, lora_alpha=4)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda sd: sd.pop(f"{PEFT_PREFIX}prompt_embed_tokens.weight"), "no Meta Token table"),
        (
            lambda sd: sd.update({f"{PEFT_PREFIX}prompt_embed_tokens.weight": torch.zeros(NUM_META_TOKENS - 1, 64)}),
            "has 11 rows, expected R_q \\+ R_c = 4 \\+ 8 = 12",
        ),
        (
            lambda sd: sd.update({f"{PEFT_PREFIX}prompt_embed_tokens.weight": torch.zeros(NUM_META_TOKENS, 32)}),
            "hidden size 32",
        ),
        (lambda sd: sd.pop(f"{PEFT_PREFIX}custom_text_proj.bias"), "both weight and bias"),
        (lambda sd: sd.update({f"{PEFT_PREFIX}custom_text_proj.bias": torch.zeros(3)}), "do not fit Linear"),
        (lambda sd: sd.update({"prompt_embed_tokens.weight": torch.zeros(12, 64)}), "several Meta Token tables"),
        (lambda sd: sd.update({"stray.weight": torch.zeros(1)}), "outside the checkpoint's prefix"),
        (lambda sd: sd.pop(f"{PEFT_PREFIX}model.visual.blocks.0.attn.qkv.lora_B.weight"), "missing lora_A or lora_B"),
        (
            lambda sd: sd.update(
                {f"{PEFT_PREFIX}model.language_model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 5)}
            ),
            "LoRA tensors of the wrong shape",
        ),
        (
            lambda sd: sd.update(
                {
                    f"{PEFT_PREFIX}model.language_model.layers.7.mlp.up_proj.lora_A.weight": torch.zeros(4, 64),
                    f"{PEFT_PREFIX}model.language_model.layers.7.mlp.up_proj.lora_B.weight": torch.zeros(128, 4),
                }
            ),
            "not Linear layers of the backbone.*layers.7.mlp.up_proj",
        ),
        (
            lambda sd: sd.update(
                {f"{PEFT_PREFIX}model.language_model.embed_tokens.lora_embedding_A": torch.zeros(4, 9)}
            ),
            "unsupported tensors",
        ),
        (
            lambda sd: sd.update({f"{PEFT_PREFIX}model.language_model.norm.weight": torch.zeros(3)}),
            "wrong shape.*norm.weight",
        ),
    ],
    ids=[
        "missing-table",
        "rows",
        "hidden-size",
        "projection-without-bias",
        "projection-bias-shape",
        "two-tables",
        "key-outside-prefix",
        "lora-half-pair",
        "lora-shape",
        "lora-on-missing-layer",
        "lora-on-embedding",
        "backbone-tensor-shape",
    ],
)
def test_malformed_checkpoints_are_refused(backbone_dir, trained_tensors, edit, message):
    state_dict = reference_state_dict(trained_tensors)
    edit(state_dict)
    with pytest.raises(ReferenceCheckpointError, match=message):
        import_reference_checkpoint(state_dict, backbone_dir, NUM_QUERY_VECTORS, NUM_CANDIDATE_VECTORS, lora_alpha=4)


def test_shared_table_row_count_and_embedding_dim_conflict(backbone_dir, trained_tensors):
    state_dict = reference_state_dict(trained_tensors)
    with pytest.raises(ReferenceCheckpointError, match=r"max\(R_q, R_c\) = 8"):
        import_reference_checkpoint(
            state_dict, backbone_dir, NUM_QUERY_VECTORS, NUM_CANDIDATE_VECTORS, shared_meta_tokens=True
        )
    with pytest.raises(ReferenceCheckpointError, match="embedding_dim=32"):
        import_reference_checkpoint(
            state_dict, backbone_dir, NUM_QUERY_VECTORS, NUM_CANDIDATE_VECTORS, embedding_dim=32
        )


def test_pickle_only_checkpoints_are_refused_without_unpickling(backbone_dir, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", refuse)
    (tmp_path / "adapter_model.bin").write_bytes(b"not a pickle anyone should open")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 32, "lora_alpha": 32}))
    (tmp_path / "training_args.bin").write_bytes(b"")
    for checkpoint in (tmp_path, tmp_path / "adapter_model.bin"):
        with pytest.raises(ReferenceCheckpointError, match="only reads safetensors") as error:
            import_reference_checkpoint(checkpoint, backbone_dir, NUM_QUERY_VECTORS, NUM_CANDIDATE_VECTORS)
        command = str(error.value)
        assert f"torch.load('{tmp_path / 'adapter_model.bin'}'" in command and "weights_only=True" in command
        assert f"'{tmp_path / 'adapter_model.safetensors'}'" in command
    (tmp_path / "adapter_model.bin").unlink()
    with pytest.raises(ReferenceCheckpointError, match=r"no adapter_model\.safetensors"):
        import_reference_checkpoint(tmp_path, backbone_dir)
    with pytest.raises(FileNotFoundError):
        import_reference_checkpoint(tmp_path / "nowhere", backbone_dir)


# ------------------------------------------------------------------------------------------------------------
# The reference code's other classes: LastLlama3Vision (Llama-3.2-Vision) and LastPali (PaliGemma)
# ------------------------------------------------------------------------------------------------------------

# Bare-model name prefix -> reference prefix, per (family, transformers naming of the reference run).
REFERENCE_PREFIXES = {
    ("mllama", "legacy"): {"language_model.": "language_model.model.", "": ""},
    ("mllama", "new"): {"": "model."},
    ("paligemma2", "legacy"): {"language_model.": "model.language_model.model.", "": "model."},
    ("paligemma2", "new"): {"": "model.model."},
}
LM_HEAD_KEYS = {
    ("mllama", "legacy"): "language_model.lm_head.weight",
    ("mllama", "new"): "lm_head.weight",
    ("paligemma2", "legacy"): "model.language_model.lm_head.weight",
    ("paligemma2", "new"): "model.lm_head.weight",
}


def reference_key(name: str, prefixes: dict[str, str]) -> str:
    prefix = next(prefix for prefix in prefixes if name.startswith(prefix))  # longest first (dict order)
    return prefixes[prefix] + name[len(prefix) :]


@pytest.mark.parametrize(("family", "naming"), list(REFERENCE_PREFIXES))
def test_llama_vision_and_paligemma_reference_checkpoints(family, naming, family_backbone_dir):
    """A full LastLlama3Vision / LastPali state dict (every backbone tensor changed, LM head, table, projection)
    plus LoRA pairs on a language-model and a vision-tower Linear: every tensor lands where it belongs."""
    backbone = family_backbone_dir(family)
    base = make_model(backbone)
    generator = torch.Generator().manual_seed(3)
    prefixes = REFERENCE_PREFIXES[(family, naming)]
    decoder = {id(parameter) for parameter in base.vlm.get_decoder().parameters()}
    linears = {name: module for name, module in base.vlm.named_modules() if isinstance(module, nn.Linear)}
    text_q = next(name for name, m in linears.items() if "q_proj" in name and id(m.weight) in decoder)
    vision_q = next(name for name, m in linears.items() if "q_proj" in name and id(m.weight) not in decoder)
    expected = {
        name: tensor + 0.01 * torch.randn(tensor.shape, generator=generator)
        for name, tensor in base.vlm.state_dict().items()
        if tensor.is_floating_point()
    }
    state_dict = {reference_key(name, prefixes): tensor for name, tensor in expected.items()}
    hidden = base.config.hidden_size
    state_dict[LM_HEAD_KEYS[(family, naming)]] = torch.zeros(3, hidden)
    state_dict["prompt_embed_tokens.weight"] = torch.randn(NUM_META_TOKENS, hidden, generator=generator)
    state_dict["custom_text_proj.weight"] = torch.randn(EMBEDDING_DIM, hidden, generator=generator)
    state_dict["custom_text_proj.bias"] = torch.randn(EMBEDDING_DIM, generator=generator)
    for module in (text_q, vision_q):
        linear = linears[module]
        down = torch.randn(LORA_RANK, linear.in_features, generator=generator)
        up = torch.randn(linear.out_features, LORA_RANK, generator=generator)
        state_dict[f"{reference_key(module, prefixes)}.lora_A.weight"] = down
        state_dict[f"{reference_key(module, prefixes)}.lora_B.weight"] = up
        expected[f"{module}.weight"] = expected[f"{module}.weight"] + (32 / LORA_RANK) * (up @ down)

    imported = import_reference_checkpoint(state_dict, backbone, NUM_QUERY_VECTORS, NUM_CANDIDATE_VECTORS)
    assert torch.equal(imported.meta_tokens, state_dict["prompt_embed_tokens.weight"])
    assert torch.equal(imported.projection.weight, state_dict["custom_text_proj.weight"])
    imported_state = imported.vlm.state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(imported_state[name], tensor, rtol=1e-6, atol=1e-6, msg=name)
    assert imported.encode_queries(["a query"]).shape == (1, NUM_QUERY_VECTORS, EMBEDDING_DIM)


def test_backbones_without_a_reference_class_are_refused_before_loading(family_backbone_dir, monkeypatch):
    monkeypatch.setattr(MetaEmbedModel, "from_backbone", lambda *args, **kwargs: pytest.fail("loaded the backbone"))
    with pytest.raises(ReferenceCheckpointError, match=r"model_type 'idefics3'.*LastLlama3Vision, LastPali"):
        import_reference_checkpoint("/nonexistent/checkpoint.safetensors", family_backbone_dir("idefics3"))
