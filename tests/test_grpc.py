"""The Open Inference Protocol over gRPC, spoken by the official ``tritonclient.grpc``, unchanged.

One agent (real signed bundles, installed as on a device) serves iris v1 and ``mixed`` (a raw
ONNX graph taking an FP32 and an INT64 input) over HTTP and over gRPC on free 127.0.0.1 ports for
the whole module. The answers over gRPC (raw contents, as tritonclient sends them, and typed
contents through Triton's own generated stubs) must equal the in-process and the HTTP answers for
the same rows. Every bad request is a row of a table and must get its status code
(INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED) and a message naming the problem; the next good
request must still succeed. A runtime of its own serves a model that loops, for the request
deadline (DEADLINE_EXCEEDED) and the bound on concurrent calls. The service definition is checked
three ways: ``agent/grpc_predict_v2.proto``, the descriptors the agent builds at run time, and
Triton's generated ``service_pb2``, field by field.

Without the ``grpc`` extra the module's gRPC tests skip (the config tests and the check that the
agent says which extra to install still run).
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from build_helpers import build_file
from conftest import REPO, KeyPair, write_agent_config
from onnx import TensorProto, helper, numpy_helper
from test_agent_server import lookup_model
from test_probe import looping_model

from edgepack.agent._config import GrpcConfig, RuntimeConfig, load_config
from edgepack.agent._daemon import Agent
from edgepack.agent._grpc_protocol import METHODS, SCHEMA, SERVICE, messages
from edgepack.agent._runtime import Runtime, ServedModel
from edgepack.agent.exceptions import ConfigError, EdgepackError
from edgepack.formats.bundle import GOLDEN_FILE, MANIFEST_FILE, read_archive
from edgepack.formats.manifest import parse_manifest

try:
    import grpc
    import tritonclient.grpc as triton_grpc
    import tritonclient.http as triton_http
    from tritonclient.grpc import service_pb2, service_pb2_grpc
    from tritonclient.utils import InferenceServerException
except ImportError as missing:  # the grpc extra (grpcio, tritonclient[grpc]) is not installed
    grpc = None
    WHY = f"gRPC is not installed ({missing}); pip install -e '.[test]' brings it"
else:
    WHY = ""

needs_grpc = pytest.mark.skipif(grpc is None, reason=WHY or "grpc is installed")

MAX_MESSAGE_BYTES = 64 * 1024
MAX_ROWS = 64
ROW = [5.1, 3.5, 1.4, 0.2]  # one iris flower: an input, not an expected result


# --- fixtures -----------------------------------------------------------------------------------


def mixed_model() -> onnx.ModelProto:
    """x FP32 [N, 4] and n INT64 [N, 2] -> scores FP32 [N, 3] and their argmax, label INT64 [N]."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["hx"]),
        helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["nf", "v"], ["hn"]),
        helper.make_node("Add", ["hx", "hn"], ["scores"]),
        helper.make_node("ArgMax", ["scores"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "mixed",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4]),
            helper.make_tensor_value_info("n", TensorProto.INT64, [None, 2]),
        ],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, 3]),
        ],
        [
            numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.normal(size=(2, 3)).astype(np.float32), "v"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def mixed_bundle(tmp_path_factory: pytest.TempPathFactory, keys: KeyPair) -> Path:
    rng = np.random.default_rng(4)
    reference = np.hstack([rng.normal(size=(300, 4)), rng.integers(0, 10, size=(300, 2))])
    directory = tmp_path_factory.mktemp("mixed")
    [result] = build_file(mixed_model(), reference, directory, keys.private, name="mixed")
    assert result.ok, result.error
    assert result.bundle is not None
    return result.bundle


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
    keys: KeyPair,
    iris_bundles: dict[str, Path],
    mixed_bundle: Path,
) -> Iterator[Agent]:
    """One agent serving iris v1 and mixed v1 over HTTP and gRPC."""
    extra = (
        f"max_batch_rows = {MAX_ROWS}\n"
        f"[grpc]\nenabled = true\nport = 0\nmax_message_bytes = {MAX_MESSAGE_BYTES}\n"
    )
    config = load_config(write_agent_config(tmp_path_factory.mktemp("grpc"), keys, extra=extra))
    agent = Agent(config).start(serve_http=True)
    try:
        for bundle in (iris_bundles["v1"], mixed_bundle):
            outcome = agent.install(str(bundle))
            assert outcome.ok, outcome.reason
        yield agent
    finally:
        agent.stop()


@pytest.fixture(scope="module")
def address(served: Agent) -> str:
    assert served.grpc_server is not None
    return served.grpc_server.address


@pytest.fixture(scope="module")
def client(address: str) -> Iterator[Any]:
    c = triton_grpc.InferenceServerClient(url=address)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(address: str) -> Iterator[Any]:
    """Triton's own generated stub, for requests tritonclient's helpers never send."""
    with grpc.insecure_channel(address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def http(served: Agent) -> Iterator[Any]:
    assert served.server is not None
    c = triton_http.InferenceServerClient(url=served.server.url.removeprefix("http://"))
    yield c
    c.close()


@pytest.fixture(scope="module")
def golden(iris_bundles: dict[str, Path]) -> dict[str, np.ndarray]:
    _, files = read_archive(iris_bundles["v1"].read_bytes())
    with np.load(io.BytesIO(files[GOLDEN_FILE]), allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def grpc_input(name: str, array: np.ndarray, datatype: str) -> Any:
    tensor = triton_grpc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def http_input(name: str, array: np.ndarray, datatype: str) -> Any:
    tensor = triton_http.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def failure(call: Any) -> tuple[str, str]:
    """(status code name, message) of a call that must fail."""
    with pytest.raises(InferenceServerException) as caught:
        call()
    return str(caught.value.status()).removeprefix("StatusCode."), caught.value.message()


# --- health and metadata ------------------------------------------------------------------------


@needs_grpc
def test_health_and_readiness(client: Any) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("iris")
    assert client.is_model_ready("iris", "1")
    assert not client.is_model_ready("iris", "2")  # only the active version is served
    assert not client.is_model_ready("nope")  # as Triton says it: not ready, no error


@needs_grpc
def test_server_and_model_metadata_match_http(client: Any, served: Agent) -> None:
    import edgepack

    server = client.get_server_metadata(as_json=True)
    assert (server["name"], server["version"]) == ("edgepack-agent", edgepack.__version__)
    assert served.server is not None
    for model in ("iris", "mixed"):
        over_http = httpx.get(f"{served.server.url}/v2/models/{model}", timeout=10).json()
        got = client.get_model_metadata(model, as_json=True)
        assert (got["name"], got["versions"], got["platform"]) == (
            over_http["name"],
            over_http["versions"],
            over_http["platform"],
        )
        for key in ("inputs", "outputs"):
            assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in got[key]] == [
                (t["name"], t["datatype"], t["shape"]) for t in over_http[key]
            ]
    assert failure(lambda: client.get_model_metadata("nope"))[0] == "NOT_FOUND"
    code, message = failure(lambda: client.get_model_metadata("iris", "7"))
    assert (code, message) == ("NOT_FOUND", "iris v7 is not served; the active version is v1")


# --- inference ----------------------------------------------------------------------------------


@needs_grpc
def test_fp32_rows_over_grpc_equal_http_in_process_and_golden(
    client: Any, http: Any, served: Agent, golden: dict[str, np.ndarray]
) -> None:
    rows = golden["input.input"][:MAX_ROWS].astype(np.float32)
    result = client.infer("iris", [grpc_input("input", rows, "FP32")], request_id="req-7")
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("iris", "1", "req-7")
    assert len(response.raw_output_contents) == 2  # binary (raw) outputs, as Triton sends them
    in_process = served.infer("iris", {"input": rows})
    over_http = http.infer("iris", [http_input("input", rows, "FP32")])
    for name in ("label", "probabilities"):
        np.testing.assert_array_equal(result.as_numpy(name), in_process[name])
        np.testing.assert_array_equal(result.as_numpy(name), over_http.as_numpy(name))
    np.testing.assert_array_equal(result.as_numpy("label"), golden["output.label"][:MAX_ROWS])
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), golden["output.probabilities"][:MAX_ROWS], atol=1e-5
    )
    # one output asked for, one row without its batch dimension
    one = client.infer(
        "iris",
        [grpc_input("input", np.array(ROW, np.float32), "FP32")],
        outputs=[triton_grpc.InferRequestedOutput("label")],
    )
    assert [o.name for o in one.get_response().outputs] == ["label"]
    assert (
        one.as_numpy("label").tolist() == served.infer("iris", {"input": [ROW]})["label"].tolist()
    )


@needs_grpc
def test_fp32_and_int64_inputs(client: Any, http: Any, served: Agent) -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(9, 4)).astype(np.float32)
    n = rng.integers(-50, 50, size=(9, 2)).astype(np.int64)
    inputs = [grpc_input("x", x, "FP32"), grpc_input("n", n, "INT64")]
    result = client.infer("mixed", inputs)
    source = ort.InferenceSession(
        mixed_model().SerializeToString(), providers=["CPUExecutionProvider"]
    )
    label, scores = source.run(None, {"x": x, "n": n})
    in_process = served.infer("mixed", {"x": x, "n": n})
    over_http = http.infer("mixed", [http_input("x", x, "FP32"), http_input("n", n, "INT64")])
    assert result.as_numpy("label").dtype == np.int64
    np.testing.assert_array_equal(result.as_numpy("label"), label)
    np.testing.assert_allclose(result.as_numpy("scores"), scores, rtol=1e-5, atol=1e-5)
    for name in ("label", "scores"):
        np.testing.assert_array_equal(result.as_numpy(name), in_process[name])
        np.testing.assert_array_equal(result.as_numpy(name), over_http.as_numpy(name))


def typed_request(model: str, **tensors: tuple[str, list[int], str, list[Any]]) -> Any:
    """A ModelInferRequest with typed contents (not raw), built with Triton's own messages."""
    request = service_pb2.ModelInferRequest(model_name=model)
    for name, (datatype, shape, field, values) in tensors.items():
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        getattr(tensor.contents, field).extend(values)
    return request


@needs_grpc
def test_typed_contents_give_the_raw_answer(client: Any, stub: Any) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    n = np.array([[1, 2], [3, -4], [0, 9]], np.int64)
    request = typed_request(
        "mixed",
        x=("FP32", [3, 4], "fp32_contents", x.ravel().tolist()),
        n=("INT64", [3, 2], "int64_contents", n.ravel().tolist()),
    )
    typed = triton_grpc.InferResult(stub.ModelInfer(request, timeout=10))
    raw = client.infer("mixed", [grpc_input("x", x, "FP32"), grpc_input("n", n, "INT64")])
    for name in ("label", "scores"):
        np.testing.assert_array_equal(typed.as_numpy(name), raw.as_numpy(name))


@needs_grpc
def test_grpc_requests_are_counted_in_telemetry(client: Any, served: Agent) -> None:
    served.monitor.telemetry.report()  # start a fresh interval
    rows = np.array([ROW] * 3, np.float32)
    for _ in range(4):
        client.infer("iris", [grpc_input("input", rows, "FP32")])
    failure(lambda: client.infer("iris", [grpc_input("input", rows[:, :3], "FP32")]))
    (iris,) = [m for m in served.monitor.telemetry.report()["models"] if m["model"] == "iris"]
    assert (iris["requests"], iris["rows"], iris["errors"]) == (5, 12, {"bad_request": 1})


# --- bad requests -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    request: Any  # (client, stub) -> the call, which must fail
    code: str
    says: tuple[str, ...]


def _raw(model: str, name: str, datatype: str, shape: list[int], *blobs: bytes) -> Any:
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.extend(blobs)
    return request


def _via_client(
    model: str, *inputs: tuple[str, np.ndarray, str], outputs: Any = None, **kw: Any
) -> Any:
    def call(client: Any, stub: Any) -> Any:
        wanted = [triton_grpc.InferRequestedOutput(*o) for o in outputs] if outputs else None
        return client.infer(
            model, [grpc_input(n, a, d) for n, a, d in inputs], outputs=wanted, **kw
        )

    return call


def _via_stub(build: Callable[[], Any]) -> Any:
    def call(client: Any, stub: Any) -> Any:
        try:
            return stub.ModelInfer(build(), timeout=10)
        except grpc.RpcError as e:
            raise InferenceServerException(msg=e.details(), status=str(e.code())) from e

    return call


ONE = np.array([ROW], np.float32)
BAD = {
    "wrong-shape": Bad(
        _via_client("iris", ("input", ONE[:, :3], "FP32")),
        "INVALID_ARGUMENT",
        ("'input' dimension 1 must be 4", "got shape [1, 3]"),
    ),
    "text-for-a-number": Bad(
        _via_client("iris", ("input", np.array([["a", "b", "c", "d"]], object), "BYTES")),
        "INVALID_ARGUMENT",
        ("'input' must be float32",),
    ),
    "unknown-input": Bad(
        _via_client("iris", ("input", ONE, "FP32"), ("extra", ONE, "FP32")),
        "INVALID_ARGUMENT",
        ("unknown input(s) 'extra'",),
    ),
    "missing-input": Bad(
        _via_client("mixed", ("x", np.ones((1, 4), np.float32), "FP32")),
        "INVALID_ARGUMENT",
        ("missing input(s) 'n'",),
    ),
    "nan": Bad(
        _via_client("iris", ("input", np.array([[np.nan, 1, 2, 3]], np.float32), "FP32")),
        "INVALID_ARGUMENT",
        ("contains NaN or infinity",),
    ),
    "too-many-rows": Bad(
        _via_client("iris", ("input", np.ones((MAX_ROWS + 1, 4), np.float32), "FP32")),
        "INVALID_ARGUMENT",
        (f"{MAX_ROWS + 1} rows is above the limit of {MAX_ROWS}",),
    ),
    "unknown-output": Bad(
        _via_client("iris", ("input", ONE, "FP32"), outputs=[("nope",)]),
        "INVALID_ARGUMENT",
        ("unknown output(s) 'nope'",),
    ),
    "raw-size-wrong": Bad(
        _via_stub(lambda: _raw("iris", "input", "FP32", [1, 4], b"\0" * 12)),
        "INVALID_ARGUMENT",
        ("3 FP32 values do not fill shape [1, 4] (4 needed)",),
    ),
    "raw-not-whole-values": Bad(
        _via_stub(lambda: _raw("iris", "input", "FP32", [1, 4], b"\0" * 15)),
        "INVALID_ARGUMENT",
        ("15 bytes of raw FP32 data is not a whole number of 4-byte values",),
    ),
    "raw-count-wrong": Bad(
        _via_stub(lambda: _raw("iris", "input", "FP32", [1, 4], b"\0" * 16, b"\0" * 16)),
        "INVALID_ARGUMENT",
        ("raw_input_contents has 2 entries for 1 inputs",),
    ),
    "unknown-datatype": Bad(
        _via_stub(lambda: _raw("iris", "input", "FP128", [1, 4], b"\0" * 16)),
        "INVALID_ARGUMENT",
        ("unknown datatype 'FP128'",),
    ),
    "negative-dimension": Bad(
        _via_stub(lambda: _raw("iris", "input", "FP32", [-1, 4], b"")),
        "INVALID_ARGUMENT",
        ("non-negative dimensions",),
    ),
    "fp16-typed": Bad(
        _via_stub(lambda: typed_request("iris", input=("FP16", [1, 4], "fp32_contents", ROW))),
        "INVALID_ARGUMENT",
        ("FP16 data must be sent in raw_input_contents",),
    ),
    "int8-out-of-range": Bad(
        _via_stub(
            lambda: typed_request("iris", input=("INT8", [1, 4], "int_contents", [1, 2, 3, 300]))
        ),
        "INVALID_ARGUMENT",
        ("values outside the INT8 range -128..127",),
    ),
    "bad-version": Bad(
        _via_client("iris", ("input", ONE, "FP32"), model_version="v1"),
        "INVALID_ARGUMENT",
        ("model_version must be a whole number, got 'v1'",),
    ),
    "unknown-model": Bad(
        _via_client("nope", ("input", ONE, "FP32")),
        "NOT_FOUND",
        ("model 'nope' is not served here (serving: iris, mixed)",),
    ),
    "version-not-active": Bad(
        _via_client("iris", ("input", ONE, "FP32"), model_version="2"),
        "NOT_FOUND",
        ("iris v2 is not served; the active version is v1",),
    ),
    "a-name-no-model-has": Bad(
        _via_client("../etc/" + "x" * 500, ("input", ONE, "FP32")),
        "NOT_FOUND",
        ("no model is named '../etc/xxx",),
    ),
    "oversized": Bad(
        _via_client(
            "iris", ("input", np.ones((MAX_MESSAGE_BYTES // 16 + 64, 4), np.float32), "FP32")
        ),
        "RESOURCE_EXHAUSTED",
        ("larger than max",),
    ),
}


@needs_grpc
@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_requests_get_their_status_and_the_next_request_succeeds(
    client: Any, stub: Any, case: str
) -> None:
    bad = BAD[case]
    code, message = failure(lambda: bad.request(client, stub))
    assert code == bad.code, message
    for phrase in bad.says:
        assert phrase in message, message
    assert len(message) <= 2000
    again = client.infer("iris", [grpc_input("input", ONE, "FP32")])
    assert again.as_numpy("label").shape == (1,)


# --- a model that fails, a model that loops, and the bound on concurrent calls -----------------


@contextlib.contextmanager
def serving(
    model: bytes, manifest_of: Path, request_timeout: float = 60.0, **knobs: Any
) -> Iterator[str]:
    """A runtime of its own serving ``model`` as iris v1 (the manifest of the bundle
    ``manifest_of``), over gRPC on a free port with the ``[grpc]`` ``knobs``; its address."""
    from edgepack.agent._grpc_server import GrpcInferenceServer

    _, files = read_archive(manifest_of.read_bytes())
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    runtime = Runtime(RuntimeConfig(request_timeout=request_timeout))
    runtime.put(ServedModel(parse_manifest(files[MANIFEST_FILE]), session))
    server = GrpcInferenceServer(runtime, GrpcConfig(enabled=True, port=0, **knobs)).start()
    try:
        yield server.address
    finally:
        server.stop()


@needs_grpc
def test_a_model_failing_on_valid_inputs_is_internal(iris_bundles: dict[str, Path]) -> None:
    with (
        serving(lookup_model(), iris_bundles["v1"]) as address,
        triton_grpc.InferenceServerClient(url=address) as c,
    ):
        bad = np.array([[12.0, 3.5, 1.4, 0.2]], np.float32)  # past the model's table
        code, message = failure(lambda: c.infer("iris", [grpc_input("input", bad, "FP32")]))
        assert code == "INTERNAL"
        assert message.startswith("iris v1 failed while computing an answer: "), message
        assert "Gather" in message  # onnxruntime's own words
        good = c.infer("iris", [grpc_input("input", ONE, "FP32")])  # the server carries on
        assert good.as_numpy("label").shape == (1,)


@needs_grpc
def test_the_request_deadline_is_deadline_exceeded_and_calls_are_bounded(
    iris_bundles: dict[str, Path],
) -> None:
    """A model that loops on every input, a 1 s request timeout, one call admitted at a time:
    of two calls at once, one is refused at once and the other stopped at the deadline."""
    codes: dict[str, tuple[str, str]] = {}

    def call(address: str, slot: str) -> None:
        with triton_grpc.InferenceServerClient(url=address) as c:
            codes[slot] = failure(lambda: c.infer("iris", [grpc_input("input", ONE, "FP32")]))

    knobs = {"max_workers": 2, "max_concurrent_rpcs": 1}
    with serving(looping_model(), iris_bundles["v1"], request_timeout=1.0, **knobs) as address:
        first = threading.Thread(target=call, args=(address, "first"))
        first.start()
        threading.Event().wait(0.3)  # the first call is running (it runs for 1 s and more)
        call(address, "second")
        first.join(timeout=30)
    got = dict(codes.values())
    assert set(got) == {"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}, codes
    assert "iris v1 did not answer within 1 s, was stopped" in got["DEADLINE_EXCEEDED"]


# --- starting and stopping ----------------------------------------------------------------------


@needs_grpc
def test_a_second_server_on_the_same_port_is_refused(address: str, served: Agent) -> None:
    from edgepack.agent._grpc_server import GrpcInferenceServer

    port = int(address.rpartition(":")[2])
    with pytest.raises(EdgepackError, match=rf"cannot listen for gRPC on 127.0.0.1:{port}"):
        GrpcInferenceServer(served.runtime, GrpcConfig(enabled=True, port=port))


def test_without_the_extra_enabling_grpc_says_what_to_install(
    tmp_path: Path, keys: KeyPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "grpc", None)  # import grpc raises ImportError
    extra = "[grpc]\nenabled = true\nport = 0\n"
    agent = Agent(load_config(write_agent_config(tmp_path, keys, extra=extra)))
    with pytest.raises(ConfigError, match=re.escape("pip install 'edgepack[agent,grpc]'")):
        agent.start(serve_http=True)
    assert agent.server is None  # the HTTP server it had started is stopped again
    assert agent.grpc_server is None


def test_grpc_is_off_by_default_and_its_knobs_are_bounded(tmp_path: Path, keys: KeyPair) -> None:
    config = load_config(write_agent_config(tmp_path, keys))
    assert config.grpc == GrpcConfig()
    assert (config.grpc.enabled, config.grpc.host) == (False, "127.0.0.1")
    example = tmp_path / "example.toml"
    example.write_text((REPO / "scripts" / "agent.example.toml").read_text())
    assert load_config(example).grpc == GrpcConfig()  # the shipped example shows the defaults
    for line, says in (
        ("max_workers = 0", "[grpc].max_workers"),
        ("max_message_bytes = 4294967296", "[grpc].max_message_bytes"),
        ("max_concurrent_rpcs = 0", "[grpc].max_concurrent_rpcs"),
        ("prot = 1", "did you mean 'port'"),
    ):
        path = write_agent_config(tmp_path / line.split()[0], keys, extra=f"[grpc]\n{line}\n")
        with pytest.raises(ConfigError, match=re.escape(says)):
            load_config(path)


# --- one service definition -------------------------------------------------------------------


def _proto() -> tuple[dict[str, set[tuple[str, int, str]]], dict[str, tuple[str, str]]]:
    """Messages (name -> fields as (name, number, kind)) and rpcs of grpc_predict_v2.proto."""
    fields: dict[str, set[tuple[str, int, str]]] = {}
    rpcs: dict[str, tuple[str, str]] = {}
    stack: list[str] = []  # message names, or "oneof NAME"
    for raw in (REPO / "agent" / "grpc_predict_v2.proto").read_text().splitlines():
        line = raw.split("//")[0].strip()
        if match := re.fullmatch(r"message (\w+) \{(\})?", line):
            stack.append(match[1])
            fields[".".join(s for s in stack if " " not in s)] = set()
            if match[2]:
                stack.pop()
        elif match := re.fullmatch(r"oneof (\w+) \{", line):
            stack.append(f"oneof {match[1]}")
        elif match := re.fullmatch(r"rpc (\w+)\((\w+)\) returns \((\w+)\) \{\}", line):
            rpcs[match[1]] = (match[2], match[3])
        elif match := re.fullmatch(r"(repeated )?(map<string, \w+>|\w+) (\w+) = (\d+);", line):
            kind = f"{match[1] or ''}{match[2]}"
            if stack[-1].startswith("oneof "):
                kind = f"{stack[-1]} {kind}"
            message = ".".join(s for s in stack if " " not in s)
            fields[message].add((match[3], int(match[4]), kind))
        elif line == "}" and stack:
            stack.pop()
    return fields, rpcs


def test_the_proto_file_and_the_runtime_descriptors_agree() -> None:
    fields, rpcs = _proto()

    def short(kind: str) -> str:  # "repeated Outer.Inner" -> "repeated Inner", as written
        return " ".join(word.rpartition(".")[2] for word in kind.split(" "))

    assert {name: {(f, n, short(k)) for f, n, k in spec} for name, spec in SCHEMA.items()} == fields
    assert rpcs == METHODS
    assert SERVICE == "inference.GRPCInferenceService"


def _fields(descriptor: Any) -> dict[int, tuple[str, int, bool, str]]:
    return {
        f.number: (
            f.name,
            f.type,
            f.is_repeated if hasattr(f, "is_repeated") else f.label == f.LABEL_REPEATED,
            f.message_type.full_name if f.message_type else "",
        )
        for f in descriptor.fields
    }


@needs_grpc
def test_the_runtime_descriptors_are_wire_compatible_with_tritons() -> None:
    """Every field the agent knows has the same name, number, type and label in Triton's
    grpc_service.proto (which has more fields and messages), and every method the same types."""
    mine = next(iter(messages().values())).DESCRIPTOR.file
    theirs = service_pb2.DESCRIPTOR

    def walk(descriptor: Any, other: Any) -> None:
        assert other is not None, descriptor.full_name
        ours, triton = _fields(descriptor), _fields(other)
        for number, field in ours.items():
            assert triton.get(number) == field, (descriptor.full_name, field)
        for nested in descriptor.nested_types:
            walk(nested, other.nested_types_by_name.get(nested.name))

    for name, descriptor in mine.message_types_by_name.items():
        walk(descriptor, theirs.message_types_by_name.get(name))
    service = theirs.services_by_name["GRPCInferenceService"]
    for method, (request, response) in METHODS.items():
        found = service.methods_by_name[method]
        assert (found.input_type.name, found.output_type.name) == (request, response)


def test_a_split_experiment_routes_grpc_requests_by_caller(
    tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path]
) -> None:
    """gRPC requests are split like HTTP ones: the caller key (a request parameter, or the
    x-edgepack-caller metadata) keeps a caller on one version, and both versions answer."""
    extra = "[grpc]\nenabled = true\nport = 0\n"
    agent = Agent(load_config(write_agent_config(tmp_path, keys, extra=extra))).start()
    try:
        assert agent.install(str(iris_bundles["v1"])).ok
        assert agent.start_experiment(
            str(iris_bundles["v2"]), plan={"mode": "split", "share": 0.5}
        ).ok
        assert agent.grpc_server is not None
        client = triton_grpc.InferenceServerClient(url=agent.grpc_server.address)
        try:
            tensor = triton_grpc.InferInput("input", [1, 4], "FP32")
            tensor.set_data_from_numpy(np.array([ROW], dtype=np.float32))
            seen: dict[str, set[str]] = {}
            for _round in range(2):
                for i in range(40):
                    caller = f"till-{i}"
                    if i % 2:
                        result = client.infer("iris", [tensor], parameters={"caller": caller})
                    else:
                        metadata = {"x-edgepack-caller": caller}
                        result = client.infer("iris", [tensor], headers=metadata)
                    seen.setdefault(caller, set()).add(result.get_response().model_version)
            assert all(len(v) == 1 for v in seen.values())  # sticky per caller
            assert set().union(*seen.values()) == {"1", "2"}  # both variants answer
            with pytest.raises(InferenceServerException, match="caller"):
                client.infer("iris", [tensor], parameters={"caller": 7})
            with pytest.raises(InferenceServerException, match="256"):
                client.infer("iris", [tensor], parameters={"caller": "x" * 257})
            with pytest.raises(InferenceServerException, match="256"):
                client.infer("iris", [tensor], headers={"x-edgepack-caller": "x" * 257})
        finally:
            client.close()
    finally:
        agent.stop()
