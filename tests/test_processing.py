"""MetaEmbedProcessor: reference prompts, left padding, image handling and input errors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from processing_metaembed import load_image, normalize_items


def decode(processor, batch, row: int) -> str:
    ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
    return processor.tokenizer.decode(ids, skip_special_tokens=False)


def test_reference_prompts(model, images):
    processor = model.processor
    queries = processor.process_queries(["hello", images["rgb"], {"text": "find this", "image": images["rgb"]}])
    candidates = processor.process_candidates(["hello"])
    grid = processor.image_processor(images=[images["rgb"]], return_tensors="pt")["image_grid_thw"][0]
    image_tokens = "<|image_pad|>" * int(grid.prod() // 4)
    vision = f"<|vision_start|>{image_tokens}<|vision_end|>"
    assert decode(processor, queries, 0) == (
        "<|im_start|>user\nQuery: helloSummarize above sentences in one word.<|im_end|><|endoftext|>"
    )
    assert decode(processor, queries, 1) == (
        f"<|im_start|>user\n{vision}Query: Summarize the above image in one word.<|im_end|><|endoftext|>"
    )
    assert decode(processor, queries, 2) == (
        f"<|im_start|>user\n{vision}Query: find this"
        "Summarize the above image and sentences in one word.<|im_end|><|endoftext|>"
    )
    assert decode(processor, candidates, 0) == (
        "<|im_start|>user\nhelloSummarize above sentences in one word.<|im_end|><|endoftext|>"
    )
    assert torch.equal(queries["mm_token_type_ids"], (queries["input_ids"] == processor.image_token_id).int())
    assert queries["image_grid_thw"].shape == (2, 3)


def test_simple_prompt_style(model):
    processor = type(model.processor)(model.processor.image_processor, model.processor.tokenizer, prompt_style="simple")
    batch = processor.process_candidates(["hello"])
    assert decode(processor, batch, 0) == "<|im_start|>user\nhello<|im_end|><|endoftext|>"
    with pytest.raises(ValueError, match="prompt_style"):
        type(model.processor)(model.processor.image_processor, model.processor.tokenizer, prompt_style="fancy")


def test_left_padding(model):
    batch = model.processor.process_queries(["a", "a much longer text"])
    mask = batch["attention_mask"]
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and mask[1].all()
    assert (batch["input_ids"][0][mask[0] == 0] == model.processor.tokenizer.pad_token_id).all()


def test_image_modes_and_paths(model, images, tmp_path):
    for name, image in images.items():
        path = tmp_path / f"{name}.png"
        image.save(path)
        from_path = model.processor.process_candidates([{"image": str(path)}])
        from_pil = model.processor.process_candidates([image])
        assert torch.equal(from_path["pixel_values"], from_pil["pixel_values"]), name
    assert load_image(images["tiny"], "x").size == (28, 50)  # shorter edge resized up to 28, ratio kept
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    assert load_image(rgba, "x").getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    embeddings = model.encode_candidates(
        [images["gray"], images["rgba"], images["tiny"], {"image": str(tmp_path / "gray.png")}]
    )
    assert torch.isfinite(embeddings).all()
    torch.testing.assert_close(embeddings[3], embeddings[0], atol=0, rtol=0)


@pytest.mark.parametrize(
    "inputs,error,message",
    [
        ("just a string", TypeError, "must be a list"),
        ({"text": "x"}, TypeError, "must be a list"),
        (None, TypeError, "must be a list"),
        (["ok", None], TypeError, r"inputs\[1\] is None"),
        (["ok", 3], TypeError, r"inputs\[1\] is int"),
        ([{"caption": "x"}], ValueError, r"inputs\[0\] has unknown keys \['caption'\]"),
        ([{}], ValueError, r"inputs\[0\] is a dict with neither"),
        ([{"text": None, "image": None}], ValueError, "neither"),
        ([{"text": 5}], TypeError, r"inputs\[0\]\['text'\] is int"),
        ([{"image": 5}], TypeError, r"inputs\[0\]\['image'\] is int"),
        (["ok", "   "], ValueError, r"inputs\[1\] is an empty string"),
        (["see <|image_pad|> here"], ValueError, "reserved token"),
        ([{"image": "/no/such/file.png"}], FileNotFoundError, r"inputs\[0\]\['image'\]: no image file"),
    ],
)
def test_bad_items_name_the_item(model, inputs, error, message):
    with pytest.raises(error, match=message):
        normalize_items(inputs)
    with pytest.raises(error, match=message):
        model.encode_candidates(inputs)


def test_corrupt_and_extreme_images(model, tmp_path, images):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"inputs\[1\]\['image'\]: cannot read image file"):
        model.encode_candidates(["fine", {"image": str(corrupt)}])
    truncated = tmp_path / "truncated.png"
    images["rgb"].save(tmp_path / "full.png")
    truncated.write_bytes((tmp_path / "full.png").read_bytes()[:200])
    with pytest.raises(ValueError, match=r"inputs\[2\]\['image'\]: cannot read image file"):
        model.encode_candidates(["a", "b", {"image": str(truncated)}])
    with pytest.raises(ValueError, match=r"inputs\[0\].*aspect ratio"):
        model.encode_candidates([Image.new("RGB", (2000, 3))])


def test_call_convention_gives_candidate_inputs(model, images):
    processor = model.processor
    items = ["hello", "a longer text"]
    for key, value in processor(text=items).items():
        assert torch.equal(value, processor.process_candidates(items)[key])
    pictures = [images["rgb"], images["gray"]]
    expected = processor.process_candidates(pictures)
    assert all(torch.equal(value, expected[key]) for key, value in processor(images=pictures).items())
    pairs = processor(text=items, images=pictures)
    expected = processor.process_candidates([{"text": t, "image": i} for t, i in zip(items, pictures)])
    assert all(torch.equal(value, expected[key]) for key, value in pairs.items())
    assert torch.equal(processor(text="hello")["input_ids"], processor.process_candidates(["hello"])["input_ids"])
    # Generic options that match MetaEmbed's fixed behaviour are accepted; others are refused.
    processor(text=items, padding=True, return_tensors="pt", text_kwargs={"truncation": "longest_first"})
    with pytest.raises(ValueError, match="padding='max_length'"):
        processor(text=items, padding="max_length")
    with pytest.raises(TypeError, match="unsupported option"):
        processor(text=items, do_resize=False)
    with pytest.raises(ValueError, match="2 texts and 1 images"):
        processor(text=items, images=pictures[:1])
    with pytest.raises(ValueError, match="text and/or images"):
        processor()
    with pytest.raises(TypeError, match="list of str"):
        processor(text=["ok", 3])
