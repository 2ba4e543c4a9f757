"""Property-based: arbitrary JSON-like values and images of random PIL modes and sizes given to the processor and
the model either give vectors or raise a TypeError / ValueError (FileNotFoundError for a missing image path)
naming the item; nothing else escapes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from processing_metaembed import normalize_items

MODES = ["1", "L", "La", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "F"]
texts = st.one_of(st.text(max_size=30), st.sampled_from(["", "   ", "\ud800", "a\udfff", "<|image_pad|>", "x" * 5000]))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | texts,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)
images = st.builds(
    lambda mode, width, height, fill: Image.new(mode, (width, height), fill % 256 if mode != "F" else fill / 7),
    st.sampled_from(MODES),
    st.integers(1, 300),
    st.integers(1, 64),
    st.integers(0, 70000),
)
items = st.one_of(
    texts,
    images,
    json_values,
    st.fixed_dictionaries({}, optional={"text": st.one_of(texts, json_values), "image": st.one_of(images, texts)}),
)
inputs = st.one_of(json_values, st.lists(items, max_size=3))
EXPECTED = (TypeError, ValueError, FileNotFoundError)


def names_the_item(error: Exception) -> bool:
    message = str(error)
    return "inputs" in message or "at least one item" in message


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(inputs=inputs)
def test_processor_and_model_give_vectors_or_name_the_item(model, inputs):
    try:
        checked = normalize_items(inputs)
    except EXPECTED as error:
        assert names_the_item(error), error
        with pytest.raises(type(error)):
            model.encode_candidates(inputs, num_vectors=1)
        return
    try:
        features = model.processor.process_items(checked, "candidate")
        assert features["input_ids"].shape[0] == len(checked)
    except EXPECTED as error:
        assert names_the_item(error), error
    try:
        vectors = model.encode_candidates(inputs, num_vectors=1)
    except EXPECTED as error:
        assert names_the_item(error), error
        return
    assert vectors.shape == (len(checked), 1, 16) and torch.isfinite(vectors).all()
