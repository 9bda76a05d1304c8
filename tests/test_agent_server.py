"""The local Open Inference Protocol server and the in-process Python API, over real HTTP.

One agent serves iris v1 on 127.0.0.1 (a free port) for the whole module. Every endpoint is
checked with httpx and with the official ``tritonclient[http]``, unchanged; results must equal
in-process inference and the bundle's golden outputs. Every bad request is one row of a table: it
must get a 4xx whose JSON ``{"error": ...}`` names the problem, and the next good request on the
same connection pool must still succeed. Hot swaps get agents of their own: client threads keep
requesting while a new version is installed (in-process, then by the CLI in another process), and
not one request may fail or see an older version after a newer one.
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.client import HTTPResponse
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import bundle_forge
import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http
from conftest import BIN, KeyPair, write_agent_config
from tritonclient.utils import InferenceServerException

import edgepack
from edgepack.agent._config import RuntimeConfig, ServerConfig, load_config
from edgepack.agent._daemon import Agent
from edgepack.agent._http_server import InferenceServer
from edgepack.agent._runtime import Runtime
from edgepack.agent._session import run_session
from edgepack.agent.exceptions import (
    EdgepackError,
    InferenceError,
    ModelNotFoundError,
    RequestError,
)
from edgepack.formats.bundle import GOLDEN_FILE, MANIFEST_FILE, MODEL_FILE, read_archive
from edgepack.formats.manifest import parse_manifest

MAX_REQUEST_BYTES = 4096
MAX_ROWS = 16
INFER = "/v2/models/iris/infer"
ROW = [5.1, 3.5, 1.4, 0.2]  # one iris flower: an input, not an expected result
HEADER = "Inference-Header-Content-Length"
NUMPY = {"FP32": "<f4", "INT64": "<i8"}

# Hot-swap load: every client thread is bounded in requests and seconds, whatever happens.
LOAD_THREADS = 4
LOAD_MAX_REQUESTS = 5000
LOAD_MAX_SECONDS = 10.0


# --- fixtures and helpers -----------------------------------------------------------------------


def start_agent(directory: Path, keys: KeyPair, bundle: Path, extra: str = "") -> Agent:
    """A running agent on a free loopback port, serving ``bundle``."""
    agent = Agent(load_config(write_agent_config(directory, keys, extra=extra)))
    agent.start(serve_http=True)
    outcome = agent.install(str(bundle))
    assert outcome.ok, outcome.reason
    return agent


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, keys: KeyPair, iris_bundles: dict[str, Path]
) -> Iterator[Agent]:
    limits = f"max_request_bytes = {MAX_REQUEST_BYTES}\nmax_batch_rows = {MAX_ROWS}\n"
    agent = start_agent(tmp_path_factory.mktemp("server"), keys, iris_bundles["v1"], limits)
    yield agent
    agent.stop()


@pytest.fixture(scope="module")
def url(served: Agent) -> str:
    assert served.server is not None
    return served.server.url


@pytest.fixture(scope="module")
def http(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def triton(url: str) -> Iterator[triton_http.InferenceServerClient]:
    client = triton_http.InferenceServerClient(url=urlsplit(url).netloc, network_timeout=10)
    yield client
    client.close()


@pytest.fixture(scope="module")
def golden(iris_bundles: dict[str, Path]) -> dict[str, Any]:
    """golden.npz of the v1 bundle, and the manifest's health tolerance."""
    _, files = read_archive(iris_bundles["v1"].read_bytes())
    with np.load(io.BytesIO(files[GOLDEN_FILE]), allow_pickle=False) as data:
        arrays: dict[str, Any] = {key: data[key] for key in data.files}
    arrays["health"] = parse_manifest(files[MANIFEST_FILE]).health
    return arrays


def tensor(
    data: Any = ROW, shape: Any = (1, 4), name: str = "input", datatype: str = "FP32"
) -> dict[str, Any]:
    return {"name": name, "shape": list(shape), "datatype": datatype, "data": data}


def body(*inputs: dict[str, Any], **top: Any) -> bytes:
    return json.dumps({"inputs": list(inputs) if inputs else [tensor()], **top}).encode()


def json_request(rows: np.ndarray, **top: Any) -> dict[str, Any]:
    return {"inputs": [tensor(rows.ravel().tolist(), rows.shape)], **top}


def binary_request(
    rows: np.ndarray, size: int | None = None, **top: Any
) -> tuple[bytes, dict[str, str]]:
    """(body, headers) for FP32 ``rows`` sent with the binary tensor data extension."""
    blob = np.ascontiguousarray(rows, dtype="<f4").tobytes()
    entry = {"name": "input", "shape": list(rows.shape), "datatype": "FP32"}
    entry["parameters"] = {"binary_data_size": len(blob) if size is None else size}
    header = json.dumps({"inputs": [entry], **top}).encode()
    return header + blob, {HEADER: str(len(header))}


def outputs_of(response: httpx.Response) -> dict[str, np.ndarray]:
    """The outputs of a 200 response, JSON or binary."""
    assert response.status_code == 200, response.text
    content, blob = response.content, b""
    if HEADER in response.headers:
        length = int(response.headers[HEADER])
        content, blob = content[:length], content[length:]
        assert response.headers["content-type"] == "application/octet-stream"
    found, offset = {}, 0
    for out in json.loads(content)["outputs"]:
        dtype = np.dtype(NUMPY[out["datatype"]])
        if "parameters" in out:
            size = out["parameters"]["binary_data_size"]
            array = np.frombuffer(blob[offset : offset + size], dtype=dtype)
            offset += size
        else:
            array = np.asarray(out["data"], dtype=dtype)
        found[out["name"]] = array.reshape(out["shape"])
    assert offset == len(blob), "binary data not claimed by any output"
    return found


def error_of(response: httpx.Response, status: int) -> str:
    """The message of a JSON error response with ``status``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    data = response.json()
    assert set(data) == {"error"}, data
    assert isinstance(data["error"], str)
    assert data["error"]
    return data["error"]


def assert_same(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def assert_serving(client: httpx.Client, served: Agent, golden: dict[str, Any]) -> None:
    """A good request right after a bad one still gets the right answer."""
    rows = golden["input.input"]
    assert_same(
        outputs_of(client.post(INFER, json=json_request(rows))),
        served.infer("iris", {"input": rows}),
    )


def wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


# --- endpoints, with httpx ----------------------------------------------------------------------


def test_health_and_server_metadata(http: httpx.Client) -> None:
    live, ready, meta = http.get("/v2/health/live"), http.get("/v2/health/ready"), http.get("/v2")
    assert (live.status_code, live.json()) == (200, {"live": True})
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    assert meta.status_code == 200
    assert meta.json()["name"] == "edgepack-agent"
    assert meta.json()["version"] == edgepack.__version__
    assert "binary_tensor_data" in meta.json()["extensions"]


@pytest.mark.parametrize("path", ["/v2/models/iris", "/v2/models/iris/versions/1"])
def test_model_metadata(http: httpx.Client, served: Agent, path: str) -> None:
    response = http.get(path)
    assert response.status_code == 200, response.text
    meta = response.json()
    assert (meta["name"], meta["versions"]) == ("iris", ["1"])
    [spec] = served.runtime.get("iris").manifest.inputs
    [entry] = meta["inputs"]
    assert (entry["name"], entry["datatype"], entry["shape"]) == ("input", "FP32", [-1, 4])
    assert entry["parameters"]["columns"] == list(spec.columns)
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("label", "INT64", [-1]),
        ("probabilities", "FP32", [-1, 3]),
    ]


@pytest.mark.parametrize("path", ["/v2/models/iris/ready", "/v2/models/iris/versions/1/ready"])
def test_model_ready(http: httpx.Client, path: str) -> None:
    response = http.get(path)
    assert (response.status_code, response.json()) == (200, {"name": "iris", "ready": True})


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("/v2/models/iris/versions/9", ("iris v9 is not served", "active version is v1")),
        ("/v2/models/iris/versions/9/ready", ("v9", "active version is v1")),
        ("/v2/models/nope", ("'nope' is not served", "serving: iris")),
        ("/v2/models/nope/ready", ("'nope'",)),
        ("/v2/models/iris/infer", ("GET /v2/models/iris/infer",)),
        ("/v2/nothing", ("no such endpoint: GET /v2/nothing",)),
        ("/", ("no such endpoint",)),
    ],
)
def test_get_errors_are_404_json(http: httpx.Client, path: str, says: tuple[str, ...]) -> None:
    message = error_of(http.get(path), 404)
    for fragment in says:
        assert fragment in message


def test_binds_to_loopback_by_default(served: Agent, url: str) -> None:
    assert ServerConfig().host == "127.0.0.1"
    assert served.config.server.host == "127.0.0.1"  # the test config does not set one
    assert urlsplit(url).hostname == "127.0.0.1"
    # Another loopback address reaches 0.0.0.0 listeners but not a 127.0.0.1 one.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", urlsplit(url).port), timeout=2).close()


def test_not_ready_server_says_503() -> None:
    server = InferenceServer(Runtime(RuntimeConfig()), port=0, ready=lambda: False).start()
    try:
        ready = httpx.get(server.url + "/v2/health/ready", timeout=5)
        assert (ready.status_code, ready.json()) == (503, {"ready": False})
        assert httpx.get(server.url + "/v2/health/live", timeout=5).status_code == 200
        message = error_of(httpx.get(server.url + "/v2/models/iris/ready", timeout=5), 404)
        assert "(serving: none)" in message
        client = triton_http.InferenceServerClient(urlsplit(server.url).netloc)
        assert client.is_server_live()
        assert not client.is_server_ready()
        client.close()
    finally:
        server.stop()


# --- JSON and binary inference with httpx -------------------------------------------------------


def test_json_infer_matches_in_process_and_golden(
    http: httpx.Client, served: Agent, golden: dict[str, Any]
) -> None:
    rows = golden["input.input"]
    response = http.post(INFER, json=json_request(rows, id="req-7"))
    data = response.json()
    assert (data["model_name"], data["model_version"], data["id"]) == ("iris", "1", "req-7")
    got = outputs_of(response)
    assert_same(got, served.infer("iris", {"input": rows}))
    np.testing.assert_array_equal(got["label"], golden["output.label"])
    tolerance = {"atol": golden["health"]["atol"], "rtol": golden["health"]["rtol"]}
    np.testing.assert_allclose(got["probabilities"], golden["output.probabilities"], **tolerance)


def test_versioned_infer_and_requested_outputs(
    http: httpx.Client, served: Agent, golden: dict[str, Any]
) -> None:
    rows = golden["input.input"]
    request = json_request(rows, outputs=[{"name": "probabilities"}])
    response = http.post("/v2/models/iris/versions/1/infer", json=request)
    assert response.json()["model_version"] == "1"
    assert_same(outputs_of(response), served.infer("iris", {"input": rows}, 1, ["probabilities"]))


def test_single_row_without_batch_dimension(http: httpx.Client, golden: dict[str, Any]) -> None:
    row = golden["input.input"][0]
    got = outputs_of(http.post(INFER, json=json_request(row)))
    assert got["label"].tolist() == [golden["output.label"][0]]
    assert got["probabilities"].shape == (1, 3)


@pytest.mark.parametrize("binary_out", [False, True])
def test_binary_tensor_extension(
    http: httpx.Client, served: Agent, golden: dict[str, Any], binary_out: bool
) -> None:
    rows = golden["input.input"]
    content, headers = binary_request(rows, parameters={"binary_data_output": binary_out})
    response = http.post(INFER, content=content, headers=headers)
    assert (HEADER in response.headers) is binary_out
    assert_same(outputs_of(response), served.infer("iris", {"input": rows}))


# --- the official Triton client -----------------------------------------------------------------


def test_triton_client_health_and_metadata(triton: triton_http.InferenceServerClient) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready("iris")
    assert triton.is_model_ready("iris", "1")
    assert not triton.is_model_ready("iris", "9")
    assert not triton.is_model_ready("nope")
    assert triton.get_server_metadata()["name"] == "edgepack-agent"
    for version in ("", "1"):
        meta = triton.get_model_metadata("iris", version)
        assert meta["versions"] == ["1"]
        assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
            ("input", "FP32", [-1, 4])
        ]
        assert [o["name"] for o in meta["outputs"]] == ["label", "probabilities"]


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("binary_out", [None, True, False], ids=["all-out", "bin-out", "json-out"])
def test_triton_client_infer(
    triton: triton_http.InferenceServerClient,
    served: Agent,
    golden: dict[str, Any],
    binary_in: bool,
    binary_out: bool | None,
) -> None:
    rows = golden["input.input"]
    infer_input = triton_http.InferInput("input", list(rows.shape), "FP32")
    infer_input.set_data_from_numpy(rows, binary_data=binary_in)
    outputs = None
    if binary_out is not None:
        outputs = [
            triton_http.InferRequestedOutput(name, binary_data=binary_out)
            for name in ("label", "probabilities")
        ]
    result = triton.infer("iris", [infer_input], outputs=outputs, request_id="t-1")
    response = result.get_response()
    assert (response["model_version"], response["id"]) == ("1", "t-1")
    want = served.infer("iris", {"input": rows})
    assert_same({name: result.as_numpy(name) for name in want}, want)
    sent_binary = binary_out is None or binary_out
    assert all(("parameters" in o) is sent_binary for o in response["outputs"])


def test_triton_client_version_and_subset(
    triton: triton_http.InferenceServerClient, served: Agent, golden: dict[str, Any]
) -> None:
    rows = golden["input.input"][:3]
    infer_input = triton_http.InferInput("input", list(rows.shape), "FP32")
    infer_input.set_data_from_numpy(rows)
    wanted = [triton_http.InferRequestedOutput("label")]
    result = triton.infer("iris", [infer_input], model_version="1", outputs=wanted)
    np.testing.assert_array_equal(
        result.as_numpy("label"), served.infer("iris", {"input": rows})["label"]
    )
    assert result.as_numpy("probabilities") is None
    with pytest.raises(InferenceServerException) as caught:
        triton.infer("iris", [infer_input], model_version="9")
    assert caught.value.status() == "404"
    assert "active version is v1" in caught.value.message()


@pytest.mark.parametrize(
    ("model", "name", "status", "says"),
    [
        ("nope", "input", "404", "model 'nope' is not served here (serving: iris)"),
        ("iris", "features", "400", "unknown input(s) 'features'; the model takes 'input'"),
    ],
)
def test_triton_client_errors_carry_our_message(
    triton: triton_http.InferenceServerClient, model: str, name: str, status: str, says: str
) -> None:
    infer_input = triton_http.InferInput(name, [1, 4], "FP32")
    infer_input.set_data_from_numpy(np.asarray([ROW], dtype=np.float32))
    with pytest.raises(InferenceServerException) as caught:
        triton.infer(model, [infer_input])
    assert caught.value.status() == status
    assert says in caught.value.message()
    assert triton.is_model_ready("iris")


# --- bad requests: each gets a 4xx naming the problem, and the server keeps serving -------------


@dataclass(frozen=True)
class Bad:
    content: bytes
    status: int
    says: tuple[str, ...]
    path: str = INFER
    headers: Mapping[str, str] = field(default_factory=dict)


def _binary_bad(rows: Any, size: int | None = None, extra: bytes = b"") -> dict[str, Any]:
    content, headers = binary_request(np.asarray(rows, dtype=np.float32), size)
    return {"content": content + extra, "headers": headers}


NAN_ROW = [[float("nan"), 3.5, 1.4, 0.2]]
GOOD_HEADER = body()

BAD_REQUESTS = {
    "unknown-model": Bad(
        body(), 404, ("'nope' is not served", "(serving: iris)"), "/v2/models/nope/infer"
    ),
    "unknown-version": Bad(
        body(), 404, ("iris v9", "active version is v1"), "/v2/models/iris/versions/9/infer"
    ),
    "wrong-input-name": Bad(
        body(tensor(name="features")), 400, ("unknown input(s) 'features'", "takes 'input'")
    ),
    "missing-input": Bad(b'{"inputs": []}', 400, ("missing input(s) 'input'",)),
    "three-columns": Bad(
        body(tensor(ROW[:3] * 2, (2, 3))),
        400,
        ("'input' dimension 1 must be 4", "got shape [2, 3]"),
    ),
    "too-many-dimensions": Bad(
        body(tensor(ROW, (1, 1, 4))), 400, ("must have 2 dimensions", "[1, 1, 4]")
    ),
    "data-does-not-fill-shape": Bad(
        body(tensor(ROW, (2, 4))), 400, ("4 values do not fill shape [2, 4]",)
    ),
    "negative-shape": Bad(
        body(tensor(ROW, (-1, 4))), 400, ("'shape' must be a list", "non-negative integers")
    ),
    "strings-as-BYTES": Bad(
        body(tensor(list("abcd"), datatype="BYTES")), 400, ("'input' must be float32", "text")
    ),
    "strings-as-FP32": Bad(
        body(tensor(list("abcd"))), 400, ("'input'", "does not match datatype FP32")
    ),
    "unknown-datatype": Bad(body(tensor(datatype="FLOAT32")), 400, ("unknown datatype 'FLOAT32'",)),
    "NaN-json-token": Bad(body(tensor(NAN_ROW)), 400, ("'input' contains NaN or infinity",)),
    "NaN-binary": Bad(
        **_binary_bad(NAN_ROW), status=400, says=("'input' contains NaN or infinity",)
    ),
    "infinity-from-overflow": Bad(body(tensor([1e39, 3.5, 1.4, 0.2])), 400, ("NaN or infinity",)),
    "malformed-json": Bad(b'{"inputs": [', 400, ("not valid JSON",)),
    "not-utf8": Bad(b"\xff\xfe{}", 400, ("not valid JSON",)),
    "not-an-object": Bad(b"[1, 2]", 400, ("a JSON object with an 'inputs' list",)),
    "inputs-not-a-list": Bad(b'{"inputs": {"name": "input"}}', 400, ("an 'inputs' list",)),
    "input-not-an-object": Bad(
        b'{"inputs": [7]}', 400, ("each entry of 'inputs' must be an object",)
    ),
    "binary-size-past-body": Bad(
        **_binary_bad([ROW], size=1600),
        status=400,
        says=("binary_data_size 1600 runs past the body",),
    ),
    "binary-size-wrong-for-shape": Bad(
        **_binary_bad([ROW], size=12), status=400, says=("12 bytes", "needs 16")
    ),
    "binary-data-unclaimed": Bad(
        **_binary_bad([ROW], extra=b"\0" * 8),
        status=400,
        says=("8 bytes of binary data are not claimed",),
    ),
    "header-length-past-body": Bad(
        GOOD_HEADER,
        400,
        (f"{HEADER} is larger than the body",),
        headers={HEADER: str(len(GOOD_HEADER) + 1)},
    ),
    "duplicate-input": Bad(body(tensor(), tensor()), 400, ("input 'input' appears twice",)),
    "unknown-output": Bad(
        body(outputs=[{"name": "score"}]),
        400,
        ("unknown output(s) 'score'", "'label', 'probabilities'"),
    ),
    "output-without-name": Bad(body(outputs=[{"parameters": {}}]), 400, ("'outputs'", "'name'")),
    "too-many-rows": Bad(
        body(tensor(ROW * (MAX_ROWS + 1), (MAX_ROWS + 1, 4))),
        400,
        (f"{MAX_ROWS + 1} rows is above the limit of {MAX_ROWS}",),
    ),
    "oversized-body": Bad(
        b"{" + b" " * MAX_REQUEST_BYTES + b"}", 413, (f"above the limit of {MAX_REQUEST_BYTES}",)
    ),
    "oversized-body-1MiB": Bad(b" " * 2**20, 413, (f"{2**20} bytes, above the limit",)),
    "post-to-metadata": Bad(
        body(), 404, ("no such endpoint: POST /v2/models/iris",), "/v2/models/iris"
    ),
    "post-to-unknown-path": Bad(
        body(), 404, ("no such endpoint: POST /v2/repository/index",), "/v2/repository/index"
    ),
}


# Once product bugs (fixed): lossy integer data, overflow, deep nesting, odd parameters.
MORE_BAD_REQUESTS = {
    "INT64-non-integer-data": Bad(
        body(tensor([5.5, 3.5, 1.4, 0.2], datatype="INT64")), 400, ("'input'", "INT64")
    ),
    "INT64-out-of-range": Bad(
        body(tensor([2**70, 3, 1, 0], datatype="INT64")), 400, ("'input'", "INT64")
    ),
    "UINT8-out-of-range": Bad(
        body(tensor([300, 3, 1, 0], datatype="UINT8")), 400, ("'input'", "UINT8")
    ),
    "deeply-nested-json": Bad(b"[" * 2000, 400, ("not valid JSON",)),
    "output-parameters-not-an-object": Bad(
        body(outputs=[{"name": "label", "parameters": "binary"}]), 400, ("'outputs'",)
    ),
    "header-length-not-a-number": Bad(GOOD_HEADER, 400, (HEADER,), headers={HEADER: "abc"}),
    # found by an outside attack: every malformed field is a 4xx, never a 500
    "outputs-not-a-list": Bad(body(outputs=7), 400, ("'outputs' must be a list",)),
    "outputs-a-string": Bad(body(outputs="label"), 400, ("'outputs' must be a list",)),
    "binary-size-and-data": Bad(
        body({**tensor(), "parameters": {"binary_data_size": 16}}),
        400,
        ("both 'data' and binary_data_size",),
    ),
    "input-parameters-not-an-object": Bad(
        body({**tensor(), "parameters": [1]}), 400, ("'parameters' must be an object",)
    ),
    "request-parameters-not-an-object": Bad(
        body(parameters="yes"), 400, ("'parameters' must be an object",)
    ),
    "id-not-a-string": Bad(body(id={"a": 1}), 400, ("'id' must be a string",)),
    "shape-of-rank-17": Bad(body(tensor(ROW, (1,) * 17)), 400, ("at most 16 non-negative",)),
    "shape-with-a-zero": Bad(body(tensor(ROW, (2**40, 2**40, 0, 4))), 400, ("do not fill",)),
    "shape-huge-product": Bad(body(tensor(ROW, (2**62, 2**62))), 400, ("do not fill shape",)),
    "datatype-not-a-string": Bad(body(tensor(datatype=["FP32"])), 400, ("unknown datatype",)),
    "binary-size-a-bool": Bad(
        **_binary_bad([ROW], size=True), status=400, says=("binary_data_size True",)
    ),
}


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 1e39 as FP32
@pytest.mark.parametrize(
    "bad",
    [*BAD_REQUESTS.values(), *MORE_BAD_REQUESTS.values()],
    ids=[*BAD_REQUESTS, *MORE_BAD_REQUESTS],
)
def test_bad_request_gets_4xx_naming_the_problem(
    http: httpx.Client, served: Agent, golden: dict[str, Any], bad: Bad
) -> None:
    response = http.post(bad.path, content=bad.content, headers=dict(bad.headers))
    message = error_of(response, bad.status)
    for fragment in bad.says:
        assert fragment in message
    assert_serving(http, served, golden)


def raw_exchange(url: str, request: bytes) -> tuple[int, str]:
    """Send ``request`` bytes as they are; the status and the JSON error of the reply."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(request)
        response = HTTPResponse(sock)
        response.begin()
        assert response.getheader("Content-Type") == "application/json"
        data = json.loads(response.read())
        return response.status, data["error"]


@pytest.mark.parametrize(
    ("framing", "code", "says"),
    [
        ("", 411, "a Content-Length header is required"),
        ("Content-Length: many\r\n", 400, "Content-Length must be a byte count"),
        ("Content-Length: -5\r\n", 400, "Content-Length must be a byte count"),
        ("Content-Length: +5\r\n", 400, "Content-Length must be a byte count"),
        ("Transfer-Encoding: chunked\r\n", 411, "chunked request bodies are not supported"),
        ("Content-Length: 5\r\nContent-Length: 9\r\n", 400, "2 Content-Length headers"),
        ("Content-Length: 5\r\nContent-Length: 5\r\n", 400, "2 Content-Length headers"),
        ("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", 411, "chunked request bodies"),
    ],
    ids=[
        "missing",
        "not-a-number",
        "negative",
        "plus-sign",
        "chunked",
        "conflicting",
        "duplicate",
        "length-and-chunked",
    ],
)
def test_body_without_one_usable_length_is_refused(
    url: str,
    http: httpx.Client,
    served: Agent,
    golden: dict[str, Any],
    framing: str,
    code: int,
    says: str,
) -> None:
    request = f"POST {INFER} HTTP/1.1\r\nHost: 127.0.0.1\r\n{framing}\r\n".encode() + GOOD_HEADER
    status, message = raw_exchange(url, request)
    assert status == code
    assert says in message
    assert_serving(http, served, golden)


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "BREW"])
def test_other_methods_get_405_in_json(
    url: str, http: httpx.Client, served: Agent, golden: dict[str, Any], method: str
) -> None:
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(f"{method} {INFER} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        response = HTTPResponse(sock, method=method)
        response.begin()
        assert response.status == 405
        assert response.getheader("Allow") == "GET, POST"
        assert response.getheader("Content-Type") == "application/json"
        if method != "HEAD":
            assert f"method {method} is not allowed" in json.loads(response.read())["error"]
    assert_serving(http, served, golden)


def test_a_malformed_request_line_is_answered_in_json(url: str) -> None:
    status, message = raw_exchange(url, b"POST /v2 HTTP/9.9 extra\r\n\r\n")
    assert status == 400
    assert message


def test_stalled_client_does_not_block_others(
    url: str, http: httpx.Client, served: Agent, golden: dict[str, Any]
) -> None:
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as stalled:
        stalled.sendall(
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{".encode()
        )
        started = time.monotonic()
        assert_serving(http, served, golden)
        assert time.monotonic() - started < 2


# --- the in-process Python API ------------------------------------------------------------------


def test_python_api_single_row_and_lists(served: Agent, golden: dict[str, Any]) -> None:
    rows, labels = golden["input.input"], golden["output.label"]
    one = served.infer("iris", {"input": rows[0]})
    assert one["label"].tolist() == [labels[0]]
    assert one["probabilities"].shape == (1, 3)
    assert_same(
        served.infer("iris", {"input": rows.tolist()}), served.infer("iris", {"input": rows})
    )
    assert list(served.infer("iris", {"input": rows}, version=1, outputs=["label"])) == ["label"]
    np.testing.assert_array_equal(served.infer("iris", {"input": rows})["label"], labels)


@pytest.mark.parametrize(
    ("call", "error", "says"),
    [
        (
            lambda a: a.infer("iris", {"features": [ROW]}),
            RequestError,
            "unknown input(s) 'features'",
        ),
        (lambda a: a.infer("iris", {}), RequestError, "missing input(s) 'input'"),
        (lambda a: a.infer("iris", {"input": [ROW[:3]]}), RequestError, "dimension 1 must be 4"),
        (lambda a: a.infer("iris", {"input": [["a"] * 4]}), RequestError, "must be float32"),
        (lambda a: a.infer("iris", {"input": NAN_ROW}), RequestError, "NaN or infinity"),
        (
            lambda a: a.infer("iris", {"input": [ROW]}, outputs=["x"]),
            RequestError,
            "unknown output(s) 'x'",
        ),
        (
            lambda a: a.infer("nope", {"input": [ROW]}),
            ModelNotFoundError,
            "'nope' is not served",
        ),
        (
            lambda a: a.infer("iris", {"input": [ROW]}, version=9),
            ModelNotFoundError,
            "active version is v1",
        ),
    ],
    ids=["wrong-name", "missing", "shape", "strings", "nan", "output", "model", "version"],
)
def test_python_api_errors(
    served: Agent, call: Callable[[Agent], Any], error: type[Exception], says: str
) -> None:
    with pytest.raises(error) as caught:
        call(served)
    assert says in str(caught.value)


def test_embedded_agent_without_http(
    tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path], golden: dict[str, Any]
) -> None:
    config = load_config(write_agent_config(tmp_path, keys))
    with Agent(config).start(serve_http=False) as agent:
        assert agent.server is None
        assert agent.install(str(iris_bundles["v1"])).ok
        got = agent.infer("iris", {"input": golden["input.input"]})
        np.testing.assert_array_equal(got["label"], golden["output.label"])


# --- a model that fails at run time -------------------------------------------------------------


def lookup_model() -> bytes:
    """An iris-shaped model that answers from a 10-row table indexed by the first feature: right
    for every iris row (sepal length under 10 cm), while onnxruntime itself refuses a row whose
    first feature is 10 or more (Gather: index out of bounds) at run time."""
    from onnx import TensorProto, helper, numpy_helper

    table = np.random.default_rng(7).dirichlet(np.ones(3), size=10).astype(np.float32)
    nodes = [
        helper.make_node("Slice", ["input", "zero", "one", "one"], ["first"]),  # column 0
        helper.make_node("Cast", ["first"], ["index2d"], to=TensorProto.INT64),
        helper.make_node("Squeeze", ["index2d", "one"], ["index"]),
        helper.make_node("Gather", ["table", "index"], ["probabilities"], axis=0),
        helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "lookup",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 4])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 3]),
        ],
        [
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(np.array([0], dtype=np.int64), "zero"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.fixture(scope="module")
def lookup_bundle(
    tmp_path_factory: pytest.TempPathFactory, keys: KeyPair, iris_bundles: dict[str, Path]
) -> Path:
    """iris v5 with :func:`lookup_model` and golden outputs it reproduces, validly signed."""
    import onnxruntime as ort

    _, files = read_archive(iris_bundles["v1"].read_bytes())
    with np.load(io.BytesIO(files[GOLDEN_FILE]), allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    model = lookup_model()
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    label, probabilities = session.run(None, {"input": arrays["input.input"]})
    arrays.update({"output.label": label, "output.probabilities": probabilities})
    golden = io.BytesIO()
    np.savez(golden, **arrays)
    out = tmp_path_factory.mktemp("lookup")
    replace = {MODEL_FILE: model, GOLDEN_FILE: golden.getvalue()}
    return bundle_forge.resign(iris_bundles["v1"], keys.private, out, version=5, replace=replace)


def test_a_model_failing_at_run_time_is_a_500_and_an_inference_error(
    tmp_path: Path, keys: KeyPair, lookup_bundle: Path
) -> None:
    agent = start_agent(tmp_path, keys, lookup_bundle)  # healthy: the golden rows are iris rows
    try:
        assert agent.server is not None
        good, bad = [[5.1, 3.5, 1.4, 0.2]], [[12.0, 3.5, 1.4, 0.2]]
        with pytest.raises(InferenceError) as caught:
            agent.infer("iris", {"input": bad})
        message = str(caught.value)
        assert message.startswith("iris v5 failed while computing an answer: ")
        assert "Gather" in message  # onnxruntime's own words, first line
        assert caught.value.__cause__ is not None
        assert not isinstance(caught.value.__cause__, EdgepackError)  # onnxruntime's exception
        with httpx.Client(base_url=agent.server.url, timeout=10) as client:
            response = client.post(INFER, content=json.dumps(json_request(np.array(bad))))
            assert error_of(response, 500) == message
            again = client.post(INFER, content=json.dumps(json_request(np.array(good))))
            assert again.status_code == 200, again.text  # the server and the model carry on
            metrics = client.get("/metrics").text
        assert 'model="iris",version="5",kind="runtime_error"} 2' in metrics
    finally:
        agent.stop()


# --- hot swap under load ------------------------------------------------------------------------


class Load:
    """Client threads posting the golden rows on keep-alive connections, bounded in count and
    time; each records the model version of every answer and any failure."""

    def __init__(self, url: str, golden: dict[str, Any]) -> None:
        self.body = json.dumps(json_request(golden["input.input"])).encode()
        self.labels = golden["output.label"].tolist()
        self.url = url
        self.stop = threading.Event()
        self.seen: list[list[tuple[float, int]]] = [[] for _ in range(LOAD_THREADS)]
        self.failures: list[str] = []
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(LOAD_THREADS)
        ]

    def _run(self, index: int) -> None:
        deadline = time.monotonic() + LOAD_MAX_SECONDS
        with httpx.Client(base_url=self.url, timeout=5) as client:
            for _ in range(LOAD_MAX_REQUESTS):
                if self.stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    response = client.post(INFER, content=self.body)
                    if response.status_code != 200:
                        self.failures.append(f"{response.status_code}: {response.text}")
                        continue
                    data = response.json()
                    labels = next(o["data"] for o in data["outputs"] if o["name"] == "label")
                    if labels != self.labels:
                        self.failures.append(f"wrong labels {labels}")
                    self.seen[index].append((time.monotonic(), int(data["model_version"])))
                except httpx.HTTPError as e:
                    self.failures.append(repr(e))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        assert self.wait_all_see(1), "the load never got going"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=LOAD_MAX_SECONDS)
        if exc[0] is None:
            assert not any(t.is_alive() for t in self.threads)

    def wait_all_see(self, version: int, seconds: float = 5) -> bool:
        return wait_until(lambda: all(s and s[-1][1] == version for s in self.seen), seconds)

    def answered_between(self, start: float, end: float) -> int:
        return sum(start <= t <= end for seen in self.seen for t, _ in seen)

    def check(self, versions: list[int]) -> None:
        assert self.failures == [], self.failures[:5]
        for seen in self.seen:
            got = [v for _, v in seen]
            assert got == sorted(got), "a thread saw an older version after a newer one"
            assert sorted(set(got)) == versions


def test_hot_swap_in_process_under_load(
    tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path], golden: dict[str, Any]
) -> None:
    agent = start_agent(tmp_path, keys, iris_bundles["v1"])
    try:
        assert agent.server is not None
        with Load(agent.server.url, golden) as load:
            for version in (2, 3):
                start = time.monotonic()
                outcome = agent.install(str(iris_bundles[f"v{version}"]))
                end = time.monotonic()
                assert outcome.ok, outcome.reason
                assert load.answered_between(start, end) > 0, "no request ran during the install"
                assert load.wait_all_see(version), f"not every client got v{version}"
        load.check([1, 2, 3])
        assert httpx.get(agent.server.url + "/v2/models/iris").json()["versions"] == ["3"]
    finally:
        agent.stop()


def test_hot_swap_by_cli_in_another_process(
    tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path], golden: dict[str, Any]
) -> None:
    agent = start_agent(tmp_path, keys, iris_bundles["v1"])
    try:
        assert agent.server is not None
        assert agent.config.source is not None
        command = [BIN / "edgepack-agent", "--config", agent.config.source]
        with Load(agent.server.url, golden) as load:
            result = subprocess.run(
                [*map(str, command), "install", str(iris_bundles["v2"])],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            installed = time.monotonic()
            assert result.returncode == 0, result.stderr
            assert "installed: iris v2 (was v1)" in result.stdout
            assert load.wait_all_see(2, seconds=5), "the running agent did not pick up v2 in 5 s"
            assert time.monotonic() - installed <= 5
        load.check([1, 2])
    finally:
        agent.stop()


def test_request_holding_old_version_finishes_after_swap(
    tmp_path: Path,
    keys: KeyPair,
    iris_bundles: dict[str, Path],
    golden: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    agent = start_agent(tmp_path, keys, iris_bundles["v1"])
    try:
        assert agent.server is not None
        held = agent.runtime.get("iris")
        assert agent.install(str(iris_bundles["v2"])).ok
        real_get = agent.runtime.get
        calls: list[int | None] = []

        def get_just_before_swap(name: str, version: int | None = None) -> Any:
            # The request's first look-up happened just before the swap: it holds v1. The race
            # window is microseconds wide, so it is opened here on purpose, not waited for.
            calls.append(version)
            return held if len(calls) == 1 else real_get(name, version)

        monkeypatch.setattr(agent.runtime, "get", get_just_before_swap)
        response = httpx.post(agent.server.url + INFER, json=json_request(golden["input.input"]))
        assert response.status_code == 200, response.text
        assert response.json()["model_version"] == "1"
        np.testing.assert_array_equal(outputs_of(response)["label"], golden["output.label"])
    finally:
        agent.stop()


# --- the fast path for ready arrays -------------------------------------------------------------


def test_ready_arrays_skip_conversion_and_answer_as_the_careful_path(
    served: Agent, golden: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = np.ascontiguousarray(golden["input.input"], dtype=np.float32)
    careful = served.infer("iris", {"input": rows.tolist()})  # a list: converted and checked
    model = served.runtime.get("iris")
    assert model.direct  # a CPU session: called without onnxruntime's Python wrapper

    def refuse(*_args: Any) -> None:
        raise AssertionError("the careful path ran for ready arrays")

    monkeypatch.setattr(served.runtime, "prepare", refuse)
    assert_same(served.infer("iris", {"input": rows}), careful)
    assert_same(
        dict(zip(model.output_names, model.session.run(None, {"input": rows}), strict=True)),
        careful,
    )
    with pytest.raises(AssertionError, match="careful path"):  # anything else goes the slow way
        served.infer("iris", {"input": rows.tolist()})


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda r: np.where(np.arange(r.size).reshape(r.shape) == 3, np.nan, r), "NaN"),
        (lambda r: np.where(np.arange(r.size).reshape(r.shape) == 0, np.inf, r), "NaN or inf"),
        (lambda r: np.full_like(r, np.finfo(np.float32).max), None),  # huge, but finite
        (lambda r: r[:, :3], "dimension 1 must be 4"),
        (lambda r: np.repeat(r, MAX_ROWS, axis=0), "above the limit"),
        (lambda r: np.asfortranarray(np.repeat(r, 3, axis=1)[:, ::3]), None),  # not C-ordered
        (lambda r: r.astype(np.float64), None),  # converted, as before
    ],
)
def test_arrays_the_fast_path_declines_get_the_careful_answer(
    served: Agent,
    golden: dict[str, Any],
    make: Callable[[np.ndarray], np.ndarray],
    says: str | None,
) -> None:
    rows = make(np.ascontiguousarray(golden["input.input"], dtype=np.float32))
    if says is None:
        got = served.infer("iris", {"input": rows})
        want = served.infer("iris", {"input": np.ascontiguousarray(rows, dtype=np.float32)})
        assert_same(got, want)
    else:
        with pytest.raises(RequestError, match=says):
            served.infer("iris", {"input": rows})


@pytest.mark.parametrize("timeout", [0.0, 30.0])
def test_the_compiled_session_is_called_alike_with_and_without_a_deadline(
    served: Agent, golden: dict[str, Any], timeout: float
) -> None:
    model = served.runtime.get("iris")
    rows = np.ascontiguousarray(golden["input.input"], dtype=np.float32)
    want = model.session.run(model.output_names, {"input": rows})
    got = run_session(
        model.session, model.output_names, {"input": rows}, "iris v1", timeout, direct=True
    )
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
