"""The Inference Endpoints custom handler (`handler.py`), called with exactly what the Inference Toolkit hands it:
the decoded JSON body (a dict), `{"inputs": <PIL image in RGB>}` for an image body, and URL query parameters as
"parameters" (digit strings as ints, "true"/"false" as booleans, anything else as strings)."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import logging
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from types import ModuleType
from typing import Any

import pytest
import torch
from conftest import NUM_CANDIDATE_VECTORS, NUM_QUERY_VECTORS, ROOT, make_model
from PIL import Image


def load_handler_module(folder) -> ModuleType:
    """Import handler.py from a model folder the way Inference Endpoints does (a file, not a package)."""
    spec = importlib.util.spec_from_file_location("handler.EndpointHandler", folder / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def served(backbone_dirs, tmp_path_factory):
    """(model, handler module, handler) for a tiny model saved as a Hub folder with handler.py beside it."""
    model = make_model(backbone_dirs["qwen2_5_vl"])
    folder = tmp_path_factory.mktemp("endpoint") / "metaembed-tiny"
    model.save_pretrained(folder)
    assert (folder / "handler.py").read_text() == (ROOT / "handler.py").read_text()  # shipped by save_pretrained
    module = load_handler_module(folder)
    return model, module, module.EndpointHandler(str(folder))


def encode_image(image: Image.Image, image_format: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def call(handler, request: Any) -> list:
    """Send `request` through a JSON round trip, as the toolkit would, and check the response is JSON."""
    response = handler(json.loads(json.dumps(request)))
    assert isinstance(response, list)
    json.dumps(response, allow_nan=False)
    return response


def call_error(handler, request: Any, *fragments: str) -> str:
    """The message of the client error `request` raises (the toolkit answers HTTP 400 with it)."""
    with pytest.raises(ValueError) as raised:
        handler(json.loads(json.dumps(request)))
    assert type(raised.value).__name__ == "RequestError"
    message = str(raised.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` (grayscale) followed by a tiny, wrong IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


# ----------------------------------------------------------------------------------------------------------
# Well-formed requests
# ----------------------------------------------------------------------------------------------------------


def test_candidates_by_default_equal_encode_candidates(served, images):
    model, _, handler = served
    items = [
        "a red circle in the top left corner",
        {"image": images["rgb"]},
        {"text": "what is in this picture?", "image": images["tall"]},
        {"image": images["gray"]},
        {"image": images["rgba"]},
        {"text": "tiny", "image": images["tiny"]},
        {"text": "only text in a dict"},
    ]
    wire = [
        item if isinstance(item, str) or "image" not in item else {**item, "image": encode_image(item["image"])}
        for item in items
    ]
    response = call(handler, {"inputs": wire})
    expected = model.encode_candidates(items)
    assert torch.equal(torch.tensor(response), expected)
    assert response == expected.tolist()
    assert expected.shape == (len(items), NUM_CANDIDATE_VECTORS, model.config.output_dim)


@pytest.mark.parametrize(
    ("task", "num_vectors", "expected_vectors"),
    [("query", None, NUM_QUERY_VECTORS), ("query", 2, 2), ("candidate", 3, 3), ("candidate", None, 8)],
)
def test_parameters_select_task_and_vectors(served, images, task, num_vectors, expected_vectors):
    model, _, handler = served
    items = ["a blue square", {"text": "same chart as", "image": images["rgb"]}]
    wire = [items[0], {"text": "same chart as", "image": encode_image(images["rgb"])}]
    response = call(handler, {"inputs": wire, "parameters": {"task": task, "num_vectors": num_vectors}})
    expected = model.encode(items, task, num_vectors)
    assert torch.equal(torch.tensor(response), expected)
    assert expected.shape[1] == expected_vectors


def test_parameters_optional_and_null(served):
    model, _, handler = served
    expected = model.encode_candidates(["hello"]).tolist()
    for request in (
        {"inputs": ["hello"]},
        {"inputs": ["hello"], "parameters": None},
        {"inputs": ["hello"], "parameters": {}},
        {"inputs": ["hello"], "parameters": {"task": "candidate", "num_vectors": None}},
    ):
        assert call(handler, request) == expected


def test_image_encodings_accepted(served, images):
    """Data URLs, line-wrapped base64 and other raster formats (JPEG) decode like the file would."""
    model, _, handler = served
    encoded = encode_image(images["rgb"])
    wrapped = "\n".join(encoded[start : start + 76] for start in range(0, len(encoded), 76))
    jpeg = encode_image(images["rgb"], "JPEG")
    response = call(
        handler,
        {
            "inputs": [
                {"image": f"data:image/png;base64,{encoded}"},
                {"image": wrapped},
                {"image": jpeg},
            ]
        },
    )
    decoded_jpeg = Image.open(io.BytesIO(base64.b64decode(jpeg)))
    expected = model.encode_candidates([images["rgb"], images["rgb"], decoded_jpeg])
    assert torch.equal(torch.tensor(response), expected)


def jpeg_with_corrupt_exif() -> tuple[bytes, Image.Image]:
    """A JPEG whose EXIF block (orientation 6) has a broken TIFF header, and its pixels as decoded."""
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes())
    data = bytearray(buffer.getvalue())
    data[data.find(b"Exif\0\0MM") + 7] = 7  # "MM" -> "M\x07": PIL cannot parse the block
    return bytes(data), Image.open(io.BytesIO(bytes(data))).convert("RGB")


def test_an_unparsable_exif_block_is_no_orientation_and_images_load_once(served, monkeypatch):
    """A JPEG whose EXIF does not parse is an upright image, not an internal error (the image used to be converted
    twice, the second time from a re-written, unparsable EXIF block); each image is converted once per call."""
    model, _, handler = served
    data, pixels = jpeg_with_corrupt_exif()
    processing = handler._processing
    loaded = []
    original = processing.load_image
    monkeypatch.setattr(processing, "load_image", lambda image, where: loaded.append(where) or original(image, where))
    response = call(handler, {"inputs": [{"image": base64.b64encode(data).decode()}, "text", {"image": PNG}]})
    assert loaded == ["inputs[0]['image']", "inputs[2]['image']"]
    expected = model.encode_candidates([pixels, "text", Image.open(io.BytesIO(base64.b64decode(PNG)))])
    assert torch.equal(torch.tensor(response), expected)


def test_empty_inputs(served):
    _, _, handler = served
    assert call(handler, {"inputs": []}) == []


def test_single_items_as_the_toolkit_passes_them(served, images):
    """The Hub widget's and InferenceClient's `{"inputs": "text"}`, a raw image body (the toolkit decodes it to
    `{"inputs": <PIL image in RGB>}`) and a single item dict answer `[num_vectors][dim]`, the bare nested list of
    the feature-extraction task."""
    model, _, handler = served
    text = call(handler, {"inputs": "a red circle"})
    assert text == model.encode_candidates(["a red circle"])[0].tolist()
    image = images["tall"].convert("RGB")  # what Imager.deserialize hands over for Content-Type: image/png
    response = handler({"inputs": image})  # not JSON: the toolkit passes the PIL object itself
    assert response == model.encode_candidates([image])[0].tolist()
    json.dumps(response, allow_nan=False)
    item = {"text": "same chart as", "image": encode_image(images["rgb"])}
    response = call(handler, {"inputs": item, "parameters": {"task": "query", "num_vectors": 2}})
    expected = model.encode_queries([{"text": "same chart as", "image": images["rgb"]}], num_vectors=2)[0]
    assert torch.equal(torch.tensor(response), expected) and expected.shape == (2, model.config.output_dim)
    # A PIL image inside a list (the handler's own callers) is size-checked like a decoded one.
    assert handler({"inputs": [image, "text"]}) == model.encode_candidates([image, "text"]).tolist()


@pytest.mark.parametrize(
    ("query_parameters", "task", "num_vectors"),
    [
        # What convert_params_to_int_or_bool gives for ?task=query&num_vectors=2: digits become ints ...
        ({"task": "query", "num_vectors": 2}, "query", 2),
        # ... and a JSON client may send the query string's text as it is.
        ({"task": "candidate", "num_vectors": "3"}, "candidate", 3),
        ({"num_vectors": "0004"}, "candidate", 4),
    ],
)
def test_query_string_parameters(served, query_parameters, task, num_vectors):
    model, _, handler = served
    response = call(handler, {"inputs": ["hello", "world"], "parameters": query_parameters})
    assert response == model.encode(["hello", "world"], task, num_vectors).tolist()


def test_inference_client_options(served):
    """InferenceClient.feature_extraction sends its options at the top level. Values MetaEmbed's output already
    satisfies are accepted; values asking for another output are refused, never ignored."""
    model, _, handler = served
    expected = model.encode_candidates(["hello"])[0].tolist()
    dim = model.config.output_dim
    accepted = {
        "normalize": True,
        "truncate": True,
        "truncation_direction": "right",
        "dimensions": dim,
        "encoding_format": "float",
        "prompt_name": None,
    }
    assert call(handler, {"inputs": "hello", **accepted}) == expected
    assert call(handler, {"inputs": "hello", "parameters": accepted}) == expected  # from a query string too
    refused = [
        ({"normalize": False}, "normalize=False", "always L2-normalised"),
        ({"truncate": False}, "truncate=False", "max_text_tokens"),
        ({"truncation_direction": "left"}, "truncation_direction='left'", "start"),
        ({"dimensions": dim // 2}, f"dimensions={dim // 2}", f"dimension is {dim}"),
        ({"dimensions": True}, "dimensions=True", "num_vectors"),
        ({"encoding_format": "base64"}, "encoding_format='base64'", "floats"),
        ({"prompt_name": "query"}, "prompt_name='query'", "parameters.task"),
        ({"normalize": "true"}, "normalize='true'"),
        ({"normalize": 1}, "normalize=1"),
    ]
    for options, *fragments in refused:
        call_error(handler, {"inputs": "hello", **options}, *fragments)
        call_error(handler, {"inputs": "hello", "parameters": options}, "parameters.", *fragments)


def test_text_byte_limit(served, monkeypatch):
    """Texts are bounded per request (UTF-8 bytes, all items together) before anything is tokenised."""
    _, module, handler = served
    small = module.EndpointHandler(handler.model.name_or_path, max_text_bytes=20)
    tokenized = []
    tokenizer = small.model.processor.tokenizer
    monkeypatch.setattr(type(tokenizer), "__call__", lambda *args, **kwargs: tokenized.append(args) or 1 / 0)
    call_error(small, {"inputs": "x" * 21}, "inputs:", "more than 20 bytes")
    call_error(small, {"inputs": ["a" * 10, {"text": "é" * 6}]}, "inputs[1]:", "more than 20 bytes")
    call_error(small, {"inputs": [{"image": PNG, "text": "b" * 21}]}, "inputs[0]:", "more than 20 bytes")
    assert tokenized == []
    monkeypatch.undo()
    assert len(call(small, {"inputs": ["a" * 10, "é" * 5]})) == 2  # exactly 20 bytes


def test_standalone_import_in_fresh_process(served, tmp_path):
    """handler.py works as the only extra file of a Hub folder, imported by path from elsewhere, with the
    default path (its own folder) and no checkout on sys.path."""
    model, _, handler = served
    folder = tmp_path / "repository"
    shutil.copytree(handler.model.name_or_path, folder)
    script = textwrap.dedent(
        f"""
        import importlib.util, json, sys
        assert not any(entry.rstrip("/") == {str(ROOT)!r} for entry in sys.path)
        spec = importlib.util.spec_from_file_location("handler.EndpointHandler", {str(folder / "handler.py")!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        handler = module.EndpointHandler()
        print(json.dumps(handler({{"inputs": ["hello"], "parameters": {{"task": "query", "num_vectors": 2}}}})))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,  # a guard against hangs only: loaded CI machines can be many times slower
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    response = json.loads(result.stdout.strip().splitlines()[-1])
    assert response == model.encode_queries(["hello"], num_vectors=2).tolist()


# ----------------------------------------------------------------------------------------------------------
# Malformed requests: an error that names the problem, never an exception
# ----------------------------------------------------------------------------------------------------------

PNG = encode_image(Image.new("RGB", (40, 40), "red"))


@pytest.mark.parametrize(
    ("request_body", "fragments"),
    [
        # the body and its keys
        (["hello"], ["JSON object", "array"]),
        ("hello", ["JSON object", "string"]),
        (None, ["JSON object", "null"]),
        ({}, ["no 'inputs'"]),
        ({"parameters": {"task": "query"}}, ["no 'inputs'"]),
        ({"inputs": ["a"], "options": {"wait_for_model": True}}, ["unknown request keys", "options"]),
        # inputs: one item or a list of items
        ({"inputs": None}, ["inputs is null", "expected a string (text), an object"]),
        ({"inputs": 3}, ["inputs is a number (3)", "expected a string"]),
        ({"inputs": True}, ["inputs is a boolean"]),
        ({"inputs": {"txt": "typo"}}, ["inputs has unknown keys", "txt"]),
        ({"inputs": ""}, ["inputs is an empty string"]),
        ({"inputs": {"image": "not base64!!"}}, ["inputs['image']", "not valid base64"]),
        ({"inputs": ["ok", 3]}, ["inputs[1]", "number", "expected a string (text), an object"]),
        ({"inputs": ["ok", ["nested"]]}, ["inputs[1]", "array"]),
        ({"inputs": [{"txt": "typo"}]}, ["inputs[0]", "unknown keys", "txt"]),
        ({"inputs": [{}]}, ["inputs[0]", "neither 'text' nor 'image'"]),
        ({"inputs": [{"text": None, "image": None}]}, ["inputs[0]", "neither 'text' nor 'image'"]),
        ({"inputs": ["ok", {"text": 5}]}, ["inputs[1]['text']", "expected str"]),
        ({"inputs": ["ok", "  "]}, ["inputs[1]", "empty string"]),
        # images
        ({"inputs": ["ok", {"image": 123}]}, ["inputs[1]['image']", "number", "base64"]),
        ({"inputs": [{"image": ["a", "b"]}]}, ["inputs[0]['image']", "array", "base64"]),
        ({"inputs": [{"image": "not base64!!"}]}, ["inputs[0]['image']", "not valid base64"]),
        ({"inputs": [{"image": PNG[:-3]}]}, ["inputs[0]['image']", "not valid base64"]),
        ({"inputs": [{"image": "héllo=="}]}, ["inputs[0]['image']", "not valid base64"]),
        ({"inputs": [{"image": ""}]}, ["inputs[0]['image']", "empty"]),
        ({"inputs": [{"image": "data:image/png,abc"}]}, ["inputs[0]['image']", "data URL"]),
        ({"inputs": [{"image": base64.b64encode(b"hello world").decode()}]}, ["inputs[0]['image']", "not a readable"]),
        # a truncated PNG: the header reads, the pixels do not
        (
            {"inputs": ["ok", {"image": base64.b64encode(base64.b64decode(PNG)[:60]).decode()}]},
            ["inputs[1]['image']", "could not be decoded"],
        ),
        # a file path is never opened: it is (invalid) base64
        ({"inputs": [{"image": str(ROOT / "README.md")}]}, ["inputs[0]['image']", "not valid base64"]),
        # parameters
        ({"inputs": ["a"], "parameters": ["query"]}, ["'parameters' must be an object", "array"]),
        ({"inputs": ["a"], "parameters": "query"}, ["'parameters' must be an object"]),
        ({"inputs": ["a"], "parameters": {"pool": True}}, ["unknown parameters", "pool"]),
        ({"inputs": ["a"], "parameters": {"task": "document"}}, ["task must be 'query' or 'candidate'", "document"]),
        ({"inputs": ["a"], "parameters": {"task": None}}, ["task must be 'query' or 'candidate'"]),
        ({"inputs": ["a"], "parameters": {"num_vectors": 0}}, ["num_vectors", "between 1 and 8"]),
        ({"inputs": ["a"], "parameters": {"num_vectors": 9}}, ["num_vectors", "between 1 and 8", "got 9"]),
        ({"inputs": ["a"], "parameters": {"task": "query", "num_vectors": 5}}, ["num_vectors", "between 1 and 4"]),
        ({"inputs": ["a"], "parameters": {"num_vectors": -1}}, ["num_vectors", "between 1 and 8"]),
        ({"inputs": ["a"], "parameters": {"num_vectors": 2.0}}, ["num_vectors must be an int", "float"]),
        ({"inputs": ["a"], "parameters": {"num_vectors": "2.0"}}, ["num_vectors must be an int", "decimal digits"]),
        ({"inputs": ["a"], "parameters": {"num_vectors": "-1"}}, ["num_vectors must be an int", "'-1'"]),
        ({"inputs": ["a"], "parameters": {"num_vectors": " 2"}}, ["num_vectors must be an int", "' 2'"]),
        ({"inputs": ["a"], "parameters": {"num_vectors": ""}}, ["num_vectors must be an int", "''"]),
        ({"inputs": ["a"], "parameters": {"num_vectors": "²"}}, ["num_vectors must be an int"]),
        ({"inputs": ["a"], "parameters": {"num_vectors": "9"}}, ["num_vectors", "between 1 and 8", "got 9"]),
        # A long digit string is quoted as sent (cut with "..." past 80 characters), not as a number cut to 18 digits.
        ({"inputs": ["a"], "parameters": {"num_vectors": "1" * 30}}, ["num_vectors", "out of range", repr("1" * 30)]),
        ({"inputs": ["a"], "parameters": {"num_vectors": "0" * 30 + "9"}}, ["num_vectors", "between 1 and 8", "got 9"]),
        ({"inputs": ["a"], "parameters": {"num_vectors": "9" * 5000}}, ["num_vectors", "out of range", "'9999", "..."]),
        ({"inputs": ["a"], "parameters": {"num_vectors": 10**4000}}, ["num_vectors is out of range"]),
        ({"inputs": ["a"], "parameters": {"task": 10**4000}}, ["task must be", "number"]),
        ({"inputs": ["a"], "parameters": {"num_vectors": True}}, ["num_vectors must be an int", "bool"]),
    ],
)
def test_malformed_requests_get_an_error(served, request_body, fragments):
    _, _, handler = served
    call_error(handler, request_body, *fragments)


def test_long_errors_are_cut(served):
    _, module, handler = served
    message = call_error(handler, {"inputs": ["a"], "parameters": {"task": "x" * 100_000}}, "task must be")
    assert len(message) == module.MAX_ERROR_CHARS and message.endswith("...")


def test_image_checks_from_the_package(served):
    """Images that decode but that the package refuses (aspect ratio over 200:1) are errors too."""
    _, _, handler = served
    request = {"inputs": ["ok", {"image": encode_image(Image.new("RGB", (1000, 4)))}]}
    call_error(handler, request, "inputs[1]['image']", "aspect ratio")


def test_formats_outside_the_allow_list_are_refused(served):
    """PIL can parse many formats (some, like EPS, through external programs); only raster ones are tried."""
    _, _, handler = served
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, format="PPM")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    for payload in (buffer.getvalue(), eps):
        request = {"inputs": [{"image": base64.b64encode(payload).decode()}]}
        call_error(handler, request, "inputs[0]['image']", "not a readable image", "PNG, JPEG")


def test_oversize_images(served, images):
    _, module, handler = served
    # Header says 8000 x 8000: over the default pixel limit, refused before the pixels are decoded.
    big = base64.b64encode(png_header(8000, 8000)).decode()
    call_error(handler, {"inputs": ["ok", {"image": big}]}, "inputs[1]['image']", "too large", "64000000")
    # Far over PIL's own decompression-bomb limit.
    bomb = base64.b64encode(png_header(30000, 30000)).decode()
    call_error(handler, {"inputs": [{"image": bomb}]}, "inputs[0]['image']", "too large", "decompression bomb")

    limits = [
        ({"max_image_pixels": 84 * 56 - 1}, "too large"),
        ({"max_image_bytes": 1000}, "too large"),
        ({"max_request_pixels": 84 * 56 + 56 * 140 - 1}, "together"),
    ]
    request = {"inputs": [{"image": encode_image(images["rgb"])}, "ok", {"image": encode_image(images["tall"])}]}
    assert len(call(handler, request)) == 3
    for limit, fragment in limits:
        message = call_error(module.EndpointHandler(handler.model.name_or_path, **limit), request, fragment)
        assert "inputs[0]['image']" in message or "inputs[2]['image']" in message


def test_too_many_items(served):
    _, module, handler = served
    small = module.EndpointHandler(handler.model.name_or_path, max_items=2)
    call_error(small, {"inputs": ["a", "b", "c"]}, "3 items", "at most 2")
    assert len(call(small, {"inputs": ["a", "b"]})) == 2


def test_bad_item_fails_before_images_are_decoded(served, monkeypatch):
    _, _, handler = served
    decoded = []
    original = handler._decode_image
    monkeypatch.setattr(handler, "_decode_image", lambda *args: decoded.append(args) or original(*args))
    call_error(handler, {"inputs": [{"image": PNG}, {"text": ""}]}, "inputs[1]['text']", "empty string")
    assert decoded == []


# ----------------------------------------------------------------------------------------------------------
# Unexpected failures: logged, generic message, the worker survives
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raised", "fragment"),
    [
        (RuntimeError("secret internal detail"), "internal error (RuntimeError)"),
        (ValueError("secret internal detail"), "internal error (ValueError)"),
        (torch.cuda.OutOfMemoryError("secret internal detail"), "out of memory"),
    ],
)
def test_compute_failures_are_logged_not_leaked(served, monkeypatch, caplog, raised, fragment):
    _, _, handler = served
    encode = handler.model.encode

    def failing_encode(items, *args, **kwargs):
        if items:
            raise raised
        return encode(items, *args, **kwargs)

    monkeypatch.setattr(handler.model, "encode", failing_encode)
    with caplog.at_level(logging.ERROR), pytest.raises(served[1].InternalError) as error:
        handler({"inputs": ["hello"]})
    assert fragment in str(error.value) and "secret" not in str(error.value)
    assert not isinstance(error.value, ValueError)  # not the client's fault
    assert error.value.__cause__ is None and error.value.__suppress_context__  # no internals chained
    assert any(record.levelno == logging.ERROR and record.exc_info for record in caplog.records)
    # The handler keeps serving.
    monkeypatch.undo()
    assert len(call(handler, {"inputs": ["hello"]})) == 1


def test_non_finite_embeddings_are_an_error(served, monkeypatch):
    _, _, handler = served
    encode = handler.model.encode
    monkeypatch.setattr(
        handler.model, "encode", lambda items, *args, **kwargs: encode(items, *args, **kwargs) * float("nan")
    )
    with pytest.raises(served[1].InternalError, match="non-finite"):
        handler({"inputs": ["hello"]})


def test_constructor_checks_its_arguments(served):
    _, module, _ = served
    for kwargs in (
        {"max_image_pixels": 0},
        {"max_items": True},
        {"batch_size": "8"},
        {"dtype": "float33"},
        {"max_text_bytes": -1},
    ):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            module.EndpointHandler("unused", **kwargs)
    with pytest.raises(ValueError, match="image_formats"):
        module.EndpointHandler("unused", image_formats=())


def test_device_and_dtype_overrides(served):
    model, module, handler = served
    assert handler.model.dtype == torch.float32 and handler.model.device.type == "cpu"
    half = module.EndpointHandler(handler.model.name_or_path, device="cpu", dtype="bfloat16")
    assert half.model.dtype == torch.bfloat16
    response = call(half, {"inputs": ["hello"], "parameters": {"num_vectors": 2}})
    assert torch.tensor(response).shape == (1, 2, model.config.output_dim)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_defaults(served, images):
    """On a GPU the handler picks CUDA and bfloat16 (float16 where bf16 is unsupported) by default; the
    vectors match the float32 CPU ones up to half-precision rounding."""
    model, module, handler = served
    gpu = module.EndpointHandler(handler.model.name_or_path)
    assert gpu.model.device.type == "cuda"
    assert gpu.model.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    items = ["a red circle", {"text": "what is this?", "image": images["tall"]}, {"image": images["rgba"]}]
    wire = [items[0], {**items[1], "image": encode_image(images["tall"])}, {"image": encode_image(images["rgba"])}]
    for task in ("query", "candidate"):
        embeddings = torch.tensor(call(gpu, {"inputs": wire, "parameters": {"task": task}}))
        expected = model.encode(items, task)
        assert embeddings.shape == expected.shape
        assert torch.allclose(embeddings.norm(dim=-1), torch.ones(expected.shape[:2]), atol=1e-3)
        assert (embeddings * expected).sum(-1).min() > 0.95


def test_device_map_without_accelerate_names_the_package(served, monkeypatch):
    """device_map (README quick start, handler model_kwargs) is placed by accelerate, an optional package."""
    _, module, handler = served
    monkeypatch.setitem(sys.modules, "accelerate", None)  # find_spec then reports it as not installed
    with pytest.raises(ImportError, match="pip install accelerate"):
        module.EndpointHandler(handler.model.name_or_path, model_kwargs={"device_map": "cpu"})
    monkeypatch.undo()
    placed = module.EndpointHandler(handler.model.name_or_path, model_kwargs={"device_map": "cpu"})
    assert placed.model.device.type == "cpu"
