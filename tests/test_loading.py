"""Strict loading of saved MetaEmbed folders: weights the config does not use, a Meta Token id outside the
vocabulary, and missing or foreign tokenizer files are errors at load, never silently different vectors."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import make_model
from safetensors.torch import load_file, save_file

from modeling_metaembed import MetaEmbedModel


@pytest.fixture(scope="module")
def saved(backbone_dirs, tmp_path_factory):
    folders = {}
    for family, backbone in backbone_dirs.items():
        folder = tmp_path_factory.mktemp(family)
        make_model(backbone).save_pretrained(folder)
        folders[family] = folder
    return folders


def copy(folder, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(folder, target)
    return target


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_saved_folders_load_with_no_key_reported(saved, family):
    _, info = MetaEmbedModel.from_pretrained(saved[family], trust_remote_code=True, output_loading_info=True)
    assert not any(info.values()), info


def test_weights_the_config_does_not_use_are_an_error(saved, tmp_path):
    folder = copy(saved["qwen2_5_vl"], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "embedding_dim": None}))  # the weights hold one
    with pytest.raises(ValueError, match=r"unexpected_keys.*projection\.bias.*projection\.weight"):
        MetaEmbedModel.from_pretrained(folder, trust_remote_code=True)


def test_missing_weights_are_an_error(saved, tmp_path):
    folder = copy(saved["qwen2_5_vl"], tmp_path)
    weights = load_file(folder / "model.safetensors")
    del weights["meta_tokens"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing_keys.*meta_tokens"):
        MetaEmbedModel.from_pretrained(folder, trust_remote_code=True)


def test_a_meta_token_id_outside_the_vocabulary_fails_at_load(saved, tmp_path):
    folder = copy(saved["qwen2_vl"], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "meta_token_id": 10**6}))
    with pytest.raises(ValueError, match=r"meta_token_id 1000000 is outside the vocabulary \(0\.\.\d+\)"):
        MetaEmbedModel.from_pretrained(folder, trust_remote_code=True)


def test_a_folder_without_tokenizer_files_fails_naming_them(saved, tmp_path):
    folder = copy(saved["qwen2_5_vl"], tmp_path)
    os.remove(folder / "tokenizer.json")  # transformers would build a 14-token vocabulary from the config alone
    with pytest.raises(
        ValueError, match=r"has 14 tokens.*is missing tokenizer\.json \(or vocab\.json \+ merges\.txt\)"
    ):
        MetaEmbedModel.from_pretrained(folder, trust_remote_code=True)


def foreign_tokenizer_with_more_ids(folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens([f"<extra-{n}>" for n in range(500)])  # more ids than the embedding table has rows
    return tokenizer


def foreign_tokenizer_with_other_special_ids(folder):
    """A tokenizer of the same size with every template token, but the special tokens in another order."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from metaembed.testing import QWEN_SPECIAL_TOKENS

    vocab = {symbol: index for index, symbol in enumerate(bytes_to_unicode().values())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": list(reversed(QWEN_SPECIAL_TOKENS))})
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    return tokenizer


@pytest.mark.parametrize(
    ("make_tokenizer", "message"),
    [
        (foreign_tokenizer_with_more_ids, r"has 770 tokens, the model's embedding table 270 rows.*not this model's"),
        (
            foreign_tokenizer_with_other_special_ids,
            r"puts vision tokens at other ids than the model's config.*'<\|image_pad\|>': \(258, 268\)",
        ),
    ],
)
def test_a_tokenizer_of_another_model_fails(saved, tmp_path, make_tokenizer, message):
    folder = copy(saved["qwen2_5_vl"], tmp_path)
    tokenizer = make_tokenizer(folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(ValueError, match=message):
        MetaEmbedModel.from_pretrained(folder, trust_remote_code=True)


def test_a_tokenizer_that_gives_many_texts_the_same_ids_fails(saved, tmp_path):
    """The template tokens at the model's ids and the same size, but a vocabulary of single bytes looked up word by
    word: every word of two or more letters is the unknown token, so "zebra" and "apple" get the same vectors."""
    from transformers import AutoTokenizer

    folder = copy(saved["qwen2_5_vl"], tmp_path)
    tokenizer_file = json.loads((folder / "tokenizer.json").read_text())
    vocab = tokenizer_file["model"]["vocab"]
    tokenizer_file["model"] = {"type": "WordLevel", "vocab": vocab, "unk_token": next(iter(vocab))}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_file))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "TokenizersBackend"  # tokenizer.json as it is
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert len(tokenizer) == 270 and tokenizer.convert_tokens_to_ids("<|image_pad|>") == 268
    assert tokenizer("zebra")["input_ids"] == tokenizer("apple")["input_ids"]  # the failure mode is real
    with pytest.raises(ValueError, match=r"does not encode plain text losslessly.*not this model's"):
        MetaEmbedModel.from_pretrained(folder, trust_remote_code=True)
