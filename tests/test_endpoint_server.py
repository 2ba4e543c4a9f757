"""End to end: `EndpointHandler` behind a small HTTP server that forwards requests the way the Hugging Face
Inference Toolkit does, called with `huggingface_hub.InferenceClient` and with raw HTTP requests.

The toolkit's `predict` route (huggingface-inference-toolkit, webservice_starlette.py), reproduced here with the
standard library: a JSON body is decoded to a dict; an `image/*` body becomes `{"inputs": <PIL image in RGB>}`; URL
query parameters become "parameters" when the body has none (digit strings as ints, "true"/"false" as booleans);
the handler's result is answered as JSON with 200, any exception as 400 `{"error": str(exception)}`.
"""

from __future__ import annotations

import io
import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from conftest import make_model
from huggingface_hub import InferenceClient
from huggingface_hub.errors import BadRequestError
from PIL import Image
from test_handler import encode_image, load_handler_module

IMAGE_CONTENT_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "image/tiff")


def toolkit_parameters(query: str) -> dict[str, Any]:
    """The toolkit's convert_params_to_int_or_bool: numeric strings to int, "true"/"false" to bool."""
    parameters: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if value.isnumeric():
            parameters[key] = int(value)
        elif value in ("true", "false"):
            parameters[key] = value == "true"
        else:
            parameters[key] = value
    return parameters


def toolkit_server(handler) -> HTTPServer:
    """An HTTP server on 127.0.0.1 (a free port) that serves `handler` as the Inference Toolkit would."""

    class Route(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            url = urlsplit(self.path)
            try:
                if url.path not in ("/", "/predict"):
                    raise ValueError(f"no route {url.path}")
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                content_type = self.headers.get("Content-Type")
                if content_type == "application/json":
                    data = json.loads(body)
                elif content_type in IMAGE_CONTENT_TYPES:
                    data = {"inputs": Image.open(io.BytesIO(body)).convert("RGB")}
                else:
                    raise ValueError(f"content type {content_type!r} is not supported")
                if "inputs" not in data and "instances" not in data:
                    raise ValueError("Body needs to provide a inputs key")
                if url.query and "parameters" not in data:
                    data["parameters"] = toolkit_parameters(url.query)
                status, answer = 200, handler(data)
            except Exception as error:  # the toolkit answers every exception with 400
                status, answer = 400, {"error": str(error)}
            payload = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:  # keep the test output quiet
            pass

    return HTTPServer(("127.0.0.1", 0), Route)


@pytest.fixture(scope="module")
def endpoint(backbone_dirs, tmp_path_factory):
    """(model, base URL) of a tiny MetaEmbed folder served through its own handler.py."""
    model = make_model(backbone_dirs["qwen2_5_vl"])
    folder = tmp_path_factory.mktemp("served") / "metaembed-tiny"
    model.save_pretrained(folder)
    handler = load_handler_module(folder).EndpointHandler(str(folder))
    server = toolkit_server(handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield model, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def post(url: str, body: bytes, content_type: str | None) -> tuple[int, Any]:
    """(status, decoded JSON answer) of a raw POST."""
    request = urllib.request.Request(url, data=body, method="POST")
    if content_type is not None:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_inference_client_feature_extraction(endpoint, monkeypatch):
    model, url = endpoint
    # The tests run with HF_HUB_OFFLINE=1, which blocks every huggingface_hub request; this client only talks to
    # the 127.0.0.1 server above.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    client = InferenceClient(base_url=url)
    vectors = client.feature_extraction("a red circle in the top left corner")
    expected = model.encode_candidates(["a red circle in the top left corner"])[0]
    assert vectors.dtype == np.float32 and torch.equal(torch.from_numpy(vectors), expected)
    batch = client.feature_extraction(["a red circle", "a blue square"], normalize=True, truncate=True)
    assert torch.equal(torch.from_numpy(batch), model.encode_candidates(["a red circle", "a blue square"]))
    # An image item as a dict with base64 (the client sends `inputs` as given).
    image = Image.new("RGB", (64, 48), "teal")
    vectors = client.feature_extraction({"text": "teal", "image": encode_image(image)})
    assert torch.equal(torch.from_numpy(vectors), model.encode_candidates([{"text": "teal", "image": image}])[0])
    # Options MetaEmbed cannot honour are a 400 with the handler's message, not silently different vectors.
    with pytest.raises(BadRequestError) as error:
        client.feature_extraction("a red circle", dimensions=4)
    assert error.value.response.status_code == 400 and "dimensions=4" in error.value.server_message
    with pytest.raises(BadRequestError, match="normalize=False"):
        client.feature_extraction("a red circle", normalize=False)
    # The server keeps answering.
    assert client.feature_extraction("short").shape == (model.config.num_candidate_vectors, 16)
    # Query vectors and budgets through the URL's query string (the README's recipe).
    queries = InferenceClient(base_url=f"{url}/?task=query&num_vectors=2").feature_extraction(["hello", "world"])
    assert torch.equal(torch.from_numpy(queries), model.encode_queries(["hello", "world"], num_vectors=2))


def test_raw_requests(endpoint):
    model, url = endpoint
    # The image widget: the raw file as the body.
    image = Image.new("P", (90, 60), 3)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    status, answer = post(url, buffer.getvalue(), "image/png")
    assert status == 200
    assert torch.equal(torch.tensor(answer), model.encode_candidates([image.convert("RGB")])[0])
    # Parameters from the query string, as strings on the wire.
    status, answer = post(
        f"{url}/predict?task=query&num_vectors=2", b'{"inputs": ["hello", "world"]}', "application/json"
    )
    assert status == 200 and answer == model.encode_queries(["hello", "world"], num_vectors=2).tolist()
    status, answer = post(f"{url}?num_vectors=3", buffer.getvalue(), "image/png")
    assert status == 200 and answer == model.encode_candidates([image.convert("RGB")], num_vectors=3)[0].tolist()


@pytest.mark.parametrize(
    ("path", "body", "content_type", "fragment"),
    [
        ("/", b'{"inputs": [{"image": "not base64!!"}]}', "application/json", "inputs[0]['image']"),
        ("/", b'{"inputs": ["ok", 3]}', "application/json", "inputs[1]"),
        ("/", b'{"inputs": "hello", "parameters": {"num_vectors": 99}}', "application/json", "num_vectors"),
        ("/", b'{"inputs": "hello", "normalize": false}', "application/json", "normalize=False"),
        ("/?num_vectors=2.5", b'{"inputs": "hello"}', "application/json", "decimal digits"),
        ("/?num_vectors=-1", b'{"inputs": "hello"}', "application/json", "'-1'"),
        ("/?num_vectors=true", b'{"inputs": "hello"}', "application/json", "bool"),
        ("/?task=document", b'{"inputs": "hello"}', "application/json", "task must be"),
        ("/?pool=true", b'{"inputs": "hello"}', "application/json", "unknown parameters ['pool']"),
        ("/", b'{"parameters": {}}', "application/json", "inputs"),
        ("/", b"not json", "application/json", ""),
        ("/", b"\x89PNG\r\n\x1a\nbroken", "image/png", ""),  # the toolkit's own decoding fails
        ("/", b"hello", "text/plain", "content type"),
    ],
)
def test_malformed_requests_get_400_and_the_server_keeps_answering(endpoint, path, body, content_type, fragment):
    model, url = endpoint
    status, answer = post(url + path, body, content_type)
    assert status == 400 and set(answer) == {"error"} and fragment in answer["error"], (status, answer)
    status, answer = post(url, b'{"inputs": "still here"}', "application/json")
    assert status == 200 and answer == model.encode_candidates(["still here"])[0].tolist()
