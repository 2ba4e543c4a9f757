"""Training glue: the data collator, train_metaembed (full and LoRA), the `metaembed train` command."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch
from conftest import make_model
from safetensors.torch import load_file
from transformers import AutoModel

from metaembed.cli import main
from metaembed.testing import SUPPORTED_FAMILIES, save_tiny_backbone
from metaembed.training import MetaEmbedDataCollator, train_metaembed
from metaembed.training.data import read_training_jsonl


def rows(images, count: int = 8) -> list[dict]:
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    return [
        {
            "query": f"a {colors[index % 8]} thing" if index % 3 else images["rgb"],
            "positive": {"text": f"document {index}", "image": None if index % 2 else images["gray"]},
            "negatives": [f"negative {index}", {"image": images["tall"], "text": None}],
        }
        for index in range(count)
    ]


def test_collator_keeps_checked_items_that_process_like_the_rows(model, images):
    batch_rows = rows(images, 4)
    batch = MetaEmbedDataCollator()(batch_rows)
    processor = model.processor
    assert batch["queries"].item_names == ("query[0]", "query[1]", "query[2]", "query[3]")
    expected_queries = processor.process_queries([row["query"] for row in batch_rows])
    queries = batch["queries"].process(processor, "query")
    assert queries.keys() == expected_queries.keys()
    assert all(torch.equal(queries[key], value) for key, value in expected_queries.items())
    positives = [{k: v for k, v in row["positive"].items() if v is not None} for row in batch_rows]
    candidates = batch["candidates"].process(processor, "candidate")
    assert torch.equal(candidates["input_ids"], processor.process_candidates(positives)["input_ids"])
    assert len(batch["hard_negatives"]) == 8  # 4 queries x 2, query-major
    assert batch["hard_negatives"].item_names[:3] == ("negatives[0]", "negatives[1]", "negatives[2]")
    no_negatives = MetaEmbedDataCollator(negatives_column=None)(batch_rows)
    assert "hard_negatives" not in no_negatives


def test_collator_errors_name_the_cell(model, images):
    collator = MetaEmbedDataCollator()
    with pytest.raises(KeyError, match="'positive'"):
        collator([{"query": "q"}])
    with pytest.raises(ValueError, match="same number of 'negatives'"):
        collator(
            [{"query": "q", "positive": "p", "negatives": ["a"]}, {"query": "q", "positive": "p", "negatives": []}]
        )
    with pytest.raises(TypeError, match=r"positive\[1\] is int"):
        collator([{"query": "q", "positive": "p"}, {"query": "q", "positive": 3}])
    with pytest.raises(ValueError, match=r"query\[0\] has neither text nor image"):
        collator([{"query": {"text": None, "image": None}, "positive": "p"}])


def test_train_full_logs_group_losses_and_saves_a_hub_folder(backbone_dirs, images, tmp_path):
    model = make_model(backbone_dirs["qwen2_5_vl"])
    before = {name: value.detach().clone() for name, value in model.named_parameters()}
    history = []

    class Recorder(__import__("transformers").TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            history.append(dict(logs or {}))

    groups = ((1, 1), (2, 4), (4, 8))
    trained = train_metaembed(
        model, rows(images), str(tmp_path / "full"), groups=groups, lora_rank=None, max_steps=2,
        per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, disable_tqdm=True, callbacks=[Recorder()],
    )  # fmt: skip
    logged = [entry for entry in history if "loss" in entry]
    assert len(logged) == 2 and all({"loss_1x1", "loss_2x4", "loss_4x8"} <= entry.keys() for entry in logged)
    changed = [name for name, value in trained.named_parameters() if not torch.equal(value, before[name])]
    assert "meta_tokens" in changed and any(name.startswith("vlm.language_model") for name in changed)
    assert not trained.training
    loaded = AutoModel.from_pretrained(tmp_path / "full", trust_remote_code=True)
    items = ["a red thing", images["rgb"]]
    assert torch.equal(loaded.encode_candidates(items), trained.encode_candidates(items))


def test_train_lora_merges_and_trains_the_new_parts_fully(backbone_dirs, images, tmp_path):
    model = make_model(backbone_dirs["qwen2_5_vl"])
    before = {name: value.detach().clone() for name, value in model.named_parameters()}
    trained = train_metaembed(
        model, rows(images), str(tmp_path / "lora"), groups=((1, 1), (4, 8)), lora_rank=4, lora_alpha=8,
        max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, disable_tqdm=True,
        gradient_checkpointing=True,
    )  # fmt: skip
    assert type(trained).__name__ == "MetaEmbedModel"
    state = dict(trained.named_parameters())
    assert not any("lora" in name for name in state)
    assert state.keys() == before.keys()

    def changed(name: str) -> bool:
        return not torch.equal(state[name], before[name])

    assert changed("meta_tokens") and changed("projection.weight")
    assert changed("vlm.language_model.layers.0.self_attn.q_proj.weight")  # LoRA merged in
    assert changed("vlm.visual.blocks.0.attn.qkv.weight")
    assert not changed("vlm.language_model.embed_tokens.weight")  # not a LoRA target: frozen
    assert not changed("vlm.language_model.layers.0.input_layernorm.weight")
    loaded = AutoModel.from_pretrained(tmp_path / "lora", trust_remote_code=True)
    assert torch.equal(loaded.encode_queries(["a red thing"]), trained.encode_queries(["a red thing"]))


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_train_one_step_on_every_family_with_lora_hard_negatives_and_the_gradient_cache(
    family, family_backbone_dir, images, tmp_path, num2words_stand_in
):
    """`train_metaembed` with MMR over two budgets, hard negatives, `CachedMMRLoss` over mini-batches of 2 items
    and LoRA on the family's targets: one step on the tiny backbone, then the merged model is saved and reloads."""
    model = make_model(family_backbone_dir(family))
    before = {name: value.detach().clone() for name, value in model.named_parameters()}
    decoder_parameters = {id(parameter) for parameter in model.vlm.get_decoder().parameters()}
    in_decoder = {name: id(parameter) in decoder_parameters for name, parameter in model.named_parameters()}
    history = []

    class Recorder(__import__("transformers").TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            history.append(dict(logs or {}))

    trained = train_metaembed(
        model, rows(images, 4), str(tmp_path / "out"), groups=((1, 1), (4, 8)), lora_rank=4, lora_alpha=8,
        cached_mini_batch_size=2, max_steps=1, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, disable_tqdm=True, callbacks=[Recorder()],
    )  # fmt: skip
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 1 and math.isfinite(losses[0]) and losses[0] > 0
    assert type(trained).__name__ == "MetaEmbedModel"
    state = dict(trained.named_parameters())
    assert state.keys() == before.keys()  # LoRA merged away
    changed = {name for name in state if not torch.equal(state[name], before[name])}
    assert {"meta_tokens", "projection.weight"} <= changed
    lora_targets = model.backbone_adapter.lora_target_modules
    backbone_changes = {name for name in changed if name.startswith("vlm.")}
    # Only LoRA target weights moved (merged adapters); embeddings and norms stay frozen.
    assert all(re.fullmatch(lora_targets, name.rsplit(".", 1)[0]) for name in backbone_changes), sorted(
        name for name in backbone_changes if not re.fullmatch(lora_targets, name.rsplit(".", 1)[0])
    )
    assert any(in_decoder[name] for name in backbone_changes), "LoRA did not reach the language model"
    assert any(not in_decoder[name] for name in backbone_changes), "LoRA did not reach the vision tower"
    loaded = AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True)
    items = ["a red thing", {"text": "and this", "image": images["rgb"]}]
    # The same weights; merged LoRA weights may be laid out differently in memory than loaded ones (float rounding).
    torch.testing.assert_close(loaded.encode_queries(items), trained.encode_queries(items), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen2_vl", "mllama"])
def test_train_command_from_jsonl(family, family_backbone_dir, images, tmp_path):
    images["rgb"].save(tmp_path / "scene.png")
    lines = [
        {"query": "red circle", "positive": {"image": "scene.png"}, "negatives": ["plain text"]},
        {"query": {"text": "find", "image": "scene.png"}, "positive": "a document", "negatives": ["other"]},
    ] * 2
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    assert read_training_jsonl(str(tmp_path / "train.jsonl"))[0]["positive"]["image"] == str(tmp_path / "scene.png")
    main([
        "train", "--backbone", family_backbone_dir(family), "--train-file", str(tmp_path / "train.jsonl"),
        "--output-dir", str(tmp_path / "out"), "--num-query-vectors", "16", "--num-candidate-vectors", "64",
        "--embedding-dim", "8", "--lora-rank", "4", "--batch-size", "2", "--max-steps", "1",
        "--cached-mini-batch-size", "1",
    ])  # fmt: skip
    trained = AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert trained.encode_candidates(["x"], num_vectors=2).shape == (1, 2, 8)
    (tmp_path / "bad.jsonl").write_text('{"query": "q", "positive": "p"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not valid JSON"):
        read_training_jsonl(str(tmp_path / "bad.jsonl"))


@pytest.mark.parametrize(
    ("family", "initializer_range"), [("qwen2_5_vl", 0.02), ("qwen2_vl", 0.1), ("qwen2_5_vl", 0.1), ("qwen3_vl", 0.1)]
)
def test_tiny_backbone_initializer_range(tmp_path, family, initializer_range):
    folder = save_tiny_backbone(tmp_path, family, initializer_range=initializer_range)
    weights = load_file(os.path.join(folder, "model.safetensors"))
    for name in ("language_model.layers.0.mlp.up_proj.weight", "visual.blocks.0.attn.qkv.weight"):
        assert weights[name].std().item() == pytest.approx(initializer_range, rel=0.1), name
