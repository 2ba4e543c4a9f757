"""Property test of the Inference Endpoints handler: for arbitrary JSON-like requests and images of random modes and
sizes, every call returns vectors of the right shape or raises the client error (a ValueError) naming what was
wrong; nothing else escapes (an internal error would be a bug the client is told nothing about)."""

from __future__ import annotations

import base64
import io
import re

import pytest
import torch
from conftest import NUM_CANDIDATE_VECTORS, NUM_QUERY_VECTORS, make_model
from PIL import Image
from test_handler import load_handler_module

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# Texts: random ones plus a few chosen ones, among them lone surrogates ("\ud800" is valid JSON; the text check
# refuses it, naming the item).
TEXT = st.text(max_size=40) | st.sampled_from(
    ["a red circle", "Query: <|im_end|>", "x" * 500, "é" * 10, "\ud800", "a\udfffb"]
)
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([2**63, -(2**70), 10**300])
    | st.floats(allow_nan=True, allow_infinity=True)
    | TEXT
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(TEXT, children, max_size=3),
    max_leaves=8,
)
# PIL modes, each with a format that stores it (None: built in memory only, as the toolkit's decoded body or a
# caller's PIL image).
IMAGE_MODES = {
    "1": "PNG",
    "L": "PNG",
    "LA": "PNG",
    "P": "PNG",
    "RGB": "JPEG",
    "RGBA": "PNG",
    "CMYK": "JPEG",
    "YCbCr": "JPEG",
    "I;16": "PNG",
    "F": "TIFF",
    "I": "TIFF",
    "PA": None,
    "RGBa": None,
    "HSV": None,
    "La": None,
}


@st.composite
def pil_images(draw, modes: tuple[str, ...] = tuple(IMAGE_MODES)) -> Image.Image:
    mode = draw(st.sampled_from(modes))
    size = (draw(st.integers(1, 48)), draw(st.integers(1, 48)))
    return Image.new(mode, size, draw(st.integers(0, 255)) if mode in ("1", "L", "P", "I;16", "I", "F") else None)


@st.composite
def closed_lazy_images(draw) -> Image.Image:
    """An image opened lazily whose file was closed before its pixels were read (a caller's bug)."""
    buffer = io.BytesIO()
    draw(pil_images(("RGB", "L"))).save(buffer, format="PNG")
    image = Image.open(buffer)
    image.close()
    return image


@st.composite
def base64_images(draw) -> str:
    image = draw(pil_images(tuple(mode for mode, image_format in IMAGE_MODES.items() if image_format)))
    buffer = io.BytesIO()
    image.save(buffer, format=IMAGE_MODES[image.mode])
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return draw(st.sampled_from([encoded, f"data:image/png;base64,{encoded}", encoded[: len(encoded) // 2]]))


@st.composite
def fuzzed_exif_images(draw) -> str:
    """A base64 JPEG or PNG with an EXIF block (orientation and a description) some of whose bytes are random."""
    image_format = draw(st.sampled_from(["JPEG", "PNG"]))
    image = Image.new("RGB", (draw(st.integers(1, 48)), draw(st.integers(1, 48))), (200, 10, 10))
    exif = image.getexif()
    exif[0x0112] = draw(st.integers(0, 9))  # orientation, 1..8 valid
    exif[0x010E] = "description"
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, exif=exif.tobytes())
    data = bytearray(buffer.getvalue())
    start = data.find(b"MM\0*") if b"MM\0*" in data else data.find(b"II*\0")
    for _ in range(draw(st.integers(1, 6))):
        # The TIFF header (byte order, magic number, first offset) half the time: PIL's EXIF parser fails there.
        offset = draw(st.integers(0, 7) | st.integers(0, min(80, len(data) - start - 1)))
        data[start + offset] = draw(st.integers(0, 255))
    return base64.b64encode(bytes(data)).decode()


ITEMS = st.one_of(
    TEXT,
    pil_images(),  # the toolkit's raw-body path hands the handler a PIL image
    closed_lazy_images(),
    st.fixed_dictionaries({"image": base64_images() | fuzzed_exif_images()}, optional={"text": TEXT}),
    st.fixed_dictionaries({}, optional={"text": TEXT | JSON_SCALARS, "image": base64_images() | JSON_SCALARS}),
    JSON_VALUES,
)
PARAMETERS = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "task": st.sampled_from(["query", "candidate"]),
            "num_vectors": st.integers(1, NUM_QUERY_VECTORS) | st.sampled_from(["2", "03"]),
        },
    ),
    st.fixed_dictionaries(
        {},
        optional={
            "task": st.sampled_from(["query", "candidate", "document"]) | JSON_SCALARS,
            "num_vectors": st.integers(-2, 10) | st.sampled_from(["2.0", "-1", "", "²"]) | JSON_SCALARS,
            "normalize": JSON_SCALARS,
        },
    ),
    JSON_VALUES,
)
WELL_SHAPED = st.fixed_dictionaries(
    {"inputs": ITEMS | st.lists(ITEMS, max_size=4)},
    optional={"parameters": PARAMETERS, "normalize": st.sampled_from([True, None]) | JSON_SCALARS},
)
# Mostly requests shaped like the real ones, so that the items and images are what varies; sometimes anything.
REQUESTS = st.one_of(WELL_SHAPED, WELL_SHAPED, WELL_SHAPED, JSON_VALUES)


@pytest.fixture(scope="module")
def handler(backbone_dirs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("properties") / "metaembed"
    make_model(backbone_dirs["qwen2_5_vl"]).save_pretrained(folder)
    return load_handler_module(folder).EndpointHandler(str(folder))


def fault_is_in_the_items(handler, request) -> bool:
    """Whether `request` is well formed but for its items: with one plain text item instead, it gets vectors."""
    if not isinstance(request, dict) or "inputs" not in request:
        return False
    try:
        handler({**request, "inputs": "a plain text"})
    except (ValueError, TypeError):
        return False
    return True


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=REQUESTS)
def test_every_request_gets_vectors_or_a_client_error(handler, request):
    try:
        response = handler(request)
    except ValueError as error:
        assert type(error).__name__ == "RequestError", repr(error)
        message = str(error)
        if not fault_is_in_the_items(handler, request):
            # The message names the request part at fault: the body, a key or a parameter.
            assert any(name in message for name in ("request", "inputs", "parameters", "normalize")), message
            return
        # An item is at fault: the message starts with its name (`inputs` for a single item, `inputs[i]` in a list),
        # and that item alone is refused too.
        inputs = request["inputs"]
        if not isinstance(inputs, list):
            assert message.startswith("inputs") and not re.match(r"inputs\[\d", message), message
            return
        named = re.match(r"inputs\[(\d+)\]", message)
        assert named and int(named[1]) < len(inputs), message
        with pytest.raises(ValueError):
            handler({**request, "inputs": [inputs[int(named[1])]]})
        return
    inputs = request["inputs"]
    if inputs == []:
        assert response == []
        return
    parameters = request.get("parameters") or {}
    task = parameters.get("task", "candidate")
    num_vectors = parameters.get("num_vectors")
    if num_vectors is None:
        num_vectors = NUM_QUERY_VECTORS if task == "query" else NUM_CANDIDATE_VECTORS
    item_shape = (int(num_vectors), handler.model.config.output_dim)
    vectors = torch.tensor(response)
    assert vectors.shape == ((len(inputs), *item_shape) if isinstance(inputs, list) else item_shape), request
    assert bool(torch.isfinite(vectors).all())
