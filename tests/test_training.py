"""Training glue: the data collator, train_metaembed (full and LoRA), the `metaembed train` command."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import make_model
from safetensors.torch import load_file
from transformers import AutoModel

from metaembed.cli import main, read_jsonl_rows
from metaembed.testing import save_tiny_backbone
from metaembed.training import MetaEmbedDataCollator, train_metaembed


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


def test_collator_matches_processor(model, images):
    batch_rows = rows(images, 4)
    batch = MetaEmbedDataCollator(model.processor)(batch_rows)
    processor = model.processor
    expected_queries = processor.process_queries([row["query"] for row in batch_rows])
    assert all(torch.equal(batch["query_features"][key], value) for key, value in expected_queries.items())
    positives = [{k: v for k, v in row["positive"].items() if v is not None} for row in batch_rows]
    assert torch.equal(batch["candidate_features"]["input_ids"], processor.process_candidates(positives)["input_ids"])
    assert batch["hard_negative_features"]["input_ids"].shape[0] == 8  # 4 queries x 2, query-major
    no_negatives = MetaEmbedDataCollator(model.processor, negatives_column=None)(batch_rows)
    assert "hard_negative_features" not in no_negatives


def test_collator_errors_name_the_cell(model, images):
    collator = MetaEmbedDataCollator(model.processor)
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


def test_train_command_from_jsonl(backbone_dirs, images, tmp_path):
    images["rgb"].save(tmp_path / "scene.png")
    lines = [
        {"query": "red circle", "positive": {"image": "scene.png"}, "negatives": ["plain text"]},
        {"query": {"text": "find", "image": "scene.png"}, "positive": "a document", "negatives": ["other"]},
    ] * 2
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    assert read_jsonl_rows(str(tmp_path / "train.jsonl"))[0]["positive"]["image"] == str(tmp_path / "scene.png")
    main([
        "train", "--backbone", backbone_dirs["qwen2_vl"], "--train-file", str(tmp_path / "train.jsonl"),
        "--output-dir", str(tmp_path / "out"), "--num-query-vectors", "16", "--num-candidate-vectors", "64",
        "--embedding-dim", "8", "--lora-rank", "4", "--batch-size", "2", "--max-steps", "1",
    ])  # fmt: skip
    trained = AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert trained.encode_candidates(["x"], num_vectors=2).shape == (1, 2, 8)
    (tmp_path / "bad.jsonl").write_text('{"query": "q", "positive": "p"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not valid JSON"):
        read_jsonl_rows(str(tmp_path / "bad.jsonl"))


@pytest.mark.parametrize(
    ("family", "initializer_range"), [("qwen2_5_vl", 0.02), ("qwen2_vl", 0.1), ("qwen2_5_vl", 0.1), ("qwen3_vl", 0.1)]
)
def test_tiny_backbone_initializer_range(tmp_path, family, initializer_range):
    folder = save_tiny_backbone(tmp_path, family, initializer_range=initializer_range)
    weights = load_file(os.path.join(folder, "model.safetensors"))
    for name in ("language_model.layers.0.mlp.up_proj.weight", "visual.blocks.0.attn.qkv.weight"):
        assert weights[name].std().item() == pytest.approx(initializer_range, rel=0.1), name
