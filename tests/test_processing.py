"""MetaEmbedProcessor: reference prompts, left padding, image handling and input errors, bounded text work."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

from processing_metaembed import PROMPT_TEMPLATES, load_image, normalize_items


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
        (["ok", "bad \ud800 text"], ValueError, r"inputs\[1\] contains a lone surrogate '\\ud800' at character 4"),
        ([{"text": "\udfff", "image": Image.new("RGB", (30, 30))}], ValueError, r"inputs\[0\]\['text'\].*surrogate"),
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
    # max_length cuts each item's text for this call, as max_text_tokens does (never silently ignored).
    short = type(processor)(processor.image_processor, processor.tokenizer, max_text_tokens=3)
    for options in ({"max_length": 3}, {"text_kwargs": {"max_length": 3}}):
        assert torch.equal(processor(text=items, **options)["input_ids"], short(text=items)["input_ids"])
    assert processor.max_text_tokens == 4096  # unchanged: the cut applied to that call only
    assert processor(text=items)["input_ids"].shape != short(text=items)["input_ids"].shape
    with pytest.raises(ValueError, match="max_length"):
        processor(text=items, max_length=0)
    with pytest.raises(ValueError, match="2 texts and 1 images"):
        processor(text=items, images=pictures[:1])
    with pytest.raises(ValueError, match="text and/or images"):
        processor()
    with pytest.raises(TypeError, match="list of str"):
        processor(text=["ok", 3])


# ------------------------------------------------------------------------------------------------------------
# Image modes: content kept, orientation applied, errors name the item
# ------------------------------------------------------------------------------------------------------------


def gray_values(image: Image.Image) -> np.ndarray:
    rgb = np.asarray(image)
    assert rgb.dtype == np.uint8 and rgb.shape[2] == 3 and (rgb == rgb[..., :1]).all()
    return rgb[..., 0].astype(int)


def test_16_bit_and_float_images_are_scaled_not_clipped():
    ramp = (np.arange(40 * 30).reshape(30, 40) * 54).astype(np.uint16)  # 0 .. 64746
    expected = np.round(ramp / 65535 * 255).astype(int)  # the 16-bit range onto 0..255
    for mode in ("I;16", "I;16B"):
        image = Image.frombytes(mode, (40, 30), ramp.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
        assert np.abs(gray_values(load_image(image, "x")) - expected).max() == 0, mode
    assert np.abs(gray_values(load_image(Image.fromarray(ramp.astype(np.int32)), "x")) - expected).max() == 0
    unit = ramp.astype(np.float32) / 65535  # floats in 0..1
    assert np.abs(gray_values(load_image(Image.fromarray(unit), "x")) - expected).max() <= 1
    wide = ramp.astype(np.float32) * 3.5 - 1000  # any other range: its minimum and maximum
    minmax = np.round((wide - wide.min()) / (wide.max() - wide.min()) * 255).astype(int)
    assert np.abs(gray_values(load_image(Image.fromarray(wide), "x")) - minmax).max() <= 1
    flat = Image.fromarray(np.full((30, 40), 7.0, dtype=np.float32))
    assert (gray_values(load_image(flat, "x")) == 0).all()  # a constant image has no range to stretch


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 30), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 20, 30))  # blue left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "rotated.png", exif=exif.tobytes())
    expected = image.transpose(Image.Transpose.ROTATE_270)
    for source in (str(tmp_path / "rotated.png"), Image.open(tmp_path / "rotated.png")):
        loaded = load_image(source, "x")
        assert loaded.size == (30, 40) and np.array_equal(np.asarray(loaded), np.asarray(expected))


def test_an_unparsable_exif_block_means_no_orientation():
    image = Image.new("RGB", (30, 40), (10, 20, 30))
    image.info["exif"] = b"Exif\0\0M\x07\0*\0\0\0\x08"  # a broken TIFF header
    loaded = load_image(image, "x")
    assert loaded.size == (30, 40) and np.array_equal(np.asarray(loaded), np.asarray(image))


def test_an_oriented_image_loads_without_its_exif_so_loading_again_changes_nothing():
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    image.putpixel((0, 0), (0, 0, 255))
    exif = image.getexif()
    exif[0x0112] = 6
    image.info["exif"] = exif.tobytes()
    loaded = load_image(image, "x")
    assert loaded.size == (30, 40) and "exif" not in loaded.info and image.info["exif"]  # the caller's is kept
    again = load_image(loaded, "x")
    assert again.size == (30, 40) and np.array_equal(np.asarray(again), np.asarray(loaded))


@pytest.mark.parametrize("mode", ["La", "LA", "PA", "RGBa", "RGBA", "CMYK", "1", "P", "L", "YCbCr", "HSV", "LAB"])
def test_every_pil_mode_gives_rgb(mode):
    image = Image.new(mode, (30, 30))
    loaded = load_image(image, "x")
    assert loaded.mode == "RGB" and loaded.size == (30, 30)


def test_transparency_is_composited_on_white():
    premultiplied = Image.new("La", (30, 30), (100, 128))  # premultiplied: over white is 100 + (255 - 128)
    assert load_image(premultiplied, "x").getpixel((0, 0)) == (227, 227, 227)
    palette = Image.new("P", (30, 30), 3)
    palette.info["transparency"] = 3
    assert load_image(palette, "x").getpixel((0, 0)) == (255, 255, 255)


def test_a_closed_lazy_image_and_a_decompression_bomb_name_the_item(model, tmp_path, monkeypatch):
    Image.new("RGB", (40, 40), (9, 9, 9)).save(tmp_path / "image.png")
    lazy = Image.open(tmp_path / "image.png")
    lazy.close()
    with pytest.raises(ValueError, match=r"inputs\[1\]\['image'\]: cannot read RGB image"):
        model.encode_candidates(["fine", lazy])
    Image.new("L", (100, 100)).save(tmp_path / "bomb.png")
    for limit in (6000, 2000):  # PIL warns past the limit and raises past twice the limit: both refused
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        path = str(tmp_path / "bomb.png")
        with pytest.raises(ValueError, match=rf"inputs\[0\]\['image'\]: cannot read image file '{path}'.*pixels"):
            normalize_items([{"image": path}])


# ------------------------------------------------------------------------------------------------------------
# Long text: bounded work
# ------------------------------------------------------------------------------------------------------------


class TokenizerSpy:
    """Passes everything to the tokenizer and records the length of each text it is asked to tokenise (also through
    the processor's plain-text encoder, which `spy_on_tokenisation` wraps too)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def __call__(self, text, *arguments, **options):
        self.lengths.append(len(text))
        return self.tokenizer(text, *arguments, **options)

    def encode(self, text, *arguments, **options):
        self.lengths.append(len(text))
        return self.tokenizer.encode(text, *arguments, **options)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def spy_on_tokenisation(processor, monkeypatch) -> TokenizerSpy:
    """Record every text the processor tokenises (the tokenizer and its plain-text encoder share the lengths)."""
    spy = TokenizerSpy(processor.tokenizer)
    encoder_spy = TokenizerSpy(processor._plain_encoder)
    encoder_spy.lengths = spy.lengths
    monkeypatch.setattr(processor, "tokenizer", spy)
    monkeypatch.setattr(processor, "_plain_encoder", encoder_spy)
    return spy


def test_the_tokenizer_never_sees_more_than_the_character_bound(model, monkeypatch):
    processor = model.processor
    monkeypatch.setattr(processor, "max_text_tokens", 50)
    bound = processor.max_text_characters
    assert bound == 50 * max(map(len, processor.tokenizer.get_vocab()))
    text = "word " * 2_000_000  # 10 MB
    spy = spy_on_tokenisation(processor, monkeypatch)
    features = processor.process_queries([text, {"text": text, "image": Image.new("RGB", (30, 30))}])
    template = max(len(template) for templates in PROMPT_TEMPLATES.values() for template in templates.values())
    assert spy.lengths and max(spy.lengths) <= bound + template + len(processor.query_prefix)
    # The same tokens as cutting the whole text to max_text_tokens tokens (the reference, on a shorter text).
    monkeypatch.setattr(processor, "tokenizer", spy.tokenizer)
    reference_text = spy.tokenizer.decode(spy.tokenizer(text[: 10 * bound], add_special_tokens=False)["input_ids"][:50])
    reference = processor.process_queries([reference_text])
    assert torch.equal(features["input_ids"][0][features["attention_mask"][0].bool()], reference["input_ids"][0])


LONG_ENTRY = "x" * 5000  # a vocabulary entry far longer than any real one


@pytest.fixture()
def long_entry_processor(model, backbone_dirs):
    """A processor (max_text_tokens=50) whose tokenizer has one 5,000-character vocabulary entry."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(backbone_dirs["qwen2_5_vl"])
    tokenizer.add_tokens([LONG_ENTRY])
    return type(model.processor)(model.processor.image_processor, tokenizer, max_text_tokens=50)


def old_truncation(processor, text: str) -> str:
    """The cut before prefix tokenisation: the whole `max_text_characters` tokenised, then cut to max_text_tokens."""
    text, limit = text[: processor.max_text_characters], processor.max_text_tokens
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    return processor.tokenizer.decode(ids[:limit]) if len(ids) > limit else text


def test_a_long_vocabulary_entry_does_not_widen_what_is_tokenised(long_entry_processor, monkeypatch):
    """The character bound (max_text_tokens x the longest entry) is 250,000 characters here; a long text of
    ordinary tokens is cut from a prefix of about 8 x (max_text_tokens + 256) + the longest entry, to the same
    tokens."""
    processor = long_entry_processor
    assert processor.max_text_characters == 50 * len(LONG_ENTRY)
    text = "word " * 2_000_000  # 10 MB
    spy = spy_on_tokenisation(processor, monkeypatch)
    cut = processor.truncate_text(text)
    assert spy.lengths and max(spy.lengths) <= (50 + 256) * 8 + len(LONG_ENTRY)  # the old bound: 250,000
    monkeypatch.setattr(processor, "tokenizer", spy.tokenizer)
    assert cut == old_truncation(processor, text) == "word " * 10


@pytest.mark.parametrize(
    "text",
    [
        "short text",
        "word " * 3000,
        LONG_ENTRY * 400,  # 1 token per 5,000 characters: the prefix grows to max_text_characters
        (LONG_ENTRY + " and some words") * 30,
        "数据" * 20_000 + "<|im_end|>" * 10,
        "é\u0301 x 42 " * 5000,
    ],
    ids=["short", "words", "long-entries", "long-entries-and-words", "cjk-and-special-tokens", "combining"],
)
def test_prefix_truncation_gives_the_tokens_of_the_whole_text(long_entry_processor, text):
    assert long_entry_processor.truncate_text(text) == old_truncation(long_entry_processor, text)


MEMORY_SCRIPT = """
import json, resource, sys
sys.path.insert(0, sys.argv[2])
from conftest import make_model
model = make_model(sys.argv[1])
normal, huge = "a short caption of a picture " * 4, "word " * 2_000_000  # 10 MB
def peak_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model.encode_candidates([normal])  # warm up
model.encode_candidates([normal])
after_normal = peak_kib()
model.encode_candidates([huge])
print(json.dumps({"normal": after_normal, "huge": peak_kib()}))
"""


def test_a_10_mb_text_costs_about_the_memory_of_a_normal_one(backbone_dirs):
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, backbone_dirs["qwen2_5_vl"], str(ROOT / "tests")],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": ""},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    peaks = json.loads(result.stdout.splitlines()[-1])
    assert peaks["huge"] - peaks["normal"] < 64 * 1024, peaks  # KiB; the whole text tokenised took +2.2 GB
