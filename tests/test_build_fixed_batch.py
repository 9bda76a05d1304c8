"""ONNX exports whose batch is fixed (issue #10): built, gated and served one batch at a time.

PyTorch's tracer without ``dynamic_axes`` and TensorFlow signatures leave inputs whose first
dimension is the value 1 (or 8). Graphs made with ``onnx.helper`` here: an MLP taking ``[1, 10]``
and a CNN (Conv → BatchNormalization → Relu → MaxPool → Gemm) taking ``[8, 1, 8, 8]``, each
built (source predictions, every precision candidate's parity and timing, int8 calibration and
the golden rows run in fixed batches), installed by a real agent (its health check runs the
golden rows in batches) and asked for 1, 5 and 64 rows, which must give what onnxruntime gives
row by row. Models for which padding would change the answer are refused with the reason.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from build_helpers import build_file, bundle_files, manifest
from click.testing import CliRunner
from conftest import KeyPair, write_agent_config
from onnx import TensorProto, helper, numpy_helper

from edgepack.agent._config import RuntimeConfig, load_config
from edgepack.agent._daemon import Agent
from edgepack.agent._runtime import Runtime, ServedModel
from edgepack.agent._session import open_session
from edgepack.formats.bundle import MANIFEST_FILE, MODEL_FILE
from edgepack.formats.exceptions import ManifestError
from edgepack.formats.manifest import parse_manifest
from edgepack.packager._cli import cli
from edgepack.packager.exceptions import UnsupportedModelError

RNG = np.random.default_rng(7)


def _init(name: str, *shape: int, scale: float = 0.5) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.normal(size=shape) * scale).astype(np.float32), name)


def _model(nodes: list, inputs: list, outputs: list, inits: list) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def mlp_batch_1() -> onnx.ModelProto:
    """As ``torch.onnx.export`` leaves an MLP traced on one example row."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    return _model(nodes, [x], [y], [_init("w1", 10, 32), _init("b1", 32), _init("w2", 32, 3)])


def cnn_fixed(batch: int) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 1, 8, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 4])
    bn = [numpy_helper.from_array(v, n) for n, v in (
        ("scale", np.full(4, 1.5, np.float32)), ("bias", np.full(4, 0.1, np.float32)),
        ("mean", np.zeros(4, np.float32)), ("var", np.ones(4, np.float32)),
    )]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["image", "k"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["n"]),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w", "b"], ["logits"]),
    ]
    inits = [_init("k", 4, 1, 3, 3), *bn, _init("w", 64, 4), _init("b", 4)]
    return _model(nodes, [x], [y], inits)


def _row_by_row(model_bytes: bytes, name: str, rows: np.ndarray, batch: int) -> np.ndarray:
    """Each row alone through onnxruntime, in a batch of copies of itself."""
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    outs = [session.run(None, {name: np.repeat(row[None], batch, axis=0)})[0][0] for row in rows]
    return np.stack(outs)


def _served(result: Any) -> tuple[Runtime, dict[str, bytes]]:
    """A real agent runtime serving the bundle's model, its session opened as the agent does."""
    files = bundle_files(result)
    parsed = parse_manifest(files[MANIFEST_FILE])
    session = open_session(files[MODEL_FILE], parsed, RuntimeConfig())
    runtime = Runtime(RuntimeConfig(request_timeout=30.0))
    runtime.put(ServedModel(parsed, session))
    return runtime, files


def _check_serving(runtime: Runtime, files: dict[str, bytes], name: str, rows: np.ndarray) -> None:
    batch = parse_manifest(files[MANIFEST_FILE]).fixed_batch
    assert batch is not None
    want = _row_by_row(files[MODEL_FILE], name, rows, batch)
    for n in (1, 5, 64, 0):
        [got] = runtime.infer("m", {name: rows[:n]}).values()
        assert got.shape == want[:n].shape
        np.testing.assert_allclose(got, want[:n], rtol=1e-5, atol=1e-6)


def test_a_batch_1_mlp_builds_gates_every_candidate_and_serves_any_rows(
    tmp_path: Path, keys: KeyPair
) -> None:
    model = mlp_batch_1()
    x = RNG.normal(size=(500, 10))
    [result] = build_file(model, x, tmp_path, keys.private, profiles=("x86_64-cpu",))
    assert result.ok, result.error
    m = manifest(result)
    assert m["fixed_batch"] == 1
    assert result.fixed_batch == 1
    shown = CliRunner().invoke(cli, ["inspect", str(result.bundle)])
    assert shown.exit_code == 0, shown.output
    [row] = [line for line in shown.output.splitlines() if line.strip().startswith("batch")]
    assert "fixed at 1 row per run" in row
    assert [s["shape"] for s in m["inputs"]] == [[None, 10]]  # what the device accepts
    assert [s["shape"] for s in m["outputs"]] == [[None, 3]]
    assert m["parity"]["passed"]
    assert m["parity"]["rows"] == 300
    # every candidate was made, gated on all its held-out rows and timed at batch 1 and 64
    # (whether int8 passes the gate is the model's business; that it ran is ours)
    for candidate in m["candidates"]:
        assert candidate["error"] is None, candidate
        assert candidate["parity"] is not None, candidate
        assert set(candidate["latency_ms"]) == {"1", "64"}
    assert all(c["parity"]["passed"] for c in m["candidates"] if c["precision"] == "fp32")
    static = [c for c in m["candidates"] if c["name"].startswith("int8-static")]
    assert static
    assert all(c["quantization"]["mode"] == "static" for c in static)
    # the packaged model still takes exactly one row, as exported
    packaged = onnx.load_from_string(bundle_files(result)[MODEL_FILE])
    assert packaged.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    # source vs bundle, row by row
    rows = x[:64].astype(np.float32)
    source = _row_by_row(model.SerializeToString(), "x", rows, 1)
    runtime, files = _served(result)
    _check_serving(runtime, files, "x", rows)
    if m["precision"] == "fp32":
        [got] = runtime.infer("m", {"x": rows}).values()
        np.testing.assert_allclose(got, source, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def cnn8(tmp_path_factory: pytest.TempPathFactory, keys: KeyPair) -> Any:
    """A CNN exported with a batch of 8, built for x86_64-cpu (shared by two tests)."""
    x = RNG.normal(size=(300, 64))
    [result] = build_file(
        cnn_fixed(8), x, tmp_path_factory.mktemp("cnn8"), keys.private, profiles=("x86_64-cpu",)
    )
    return result, x


def test_a_fixed_batch_cnn_pads_its_last_chunk_and_a_real_agent_serves_it(
    tmp_path: Path, keys: KeyPair, cnn8: Any
) -> None:
    result, x = cnn8
    assert result.ok, result.error
    m = manifest(result)
    assert m["fixed_batch"] == 8
    assert m["inputs"][0]["shape"] == [None, 1, 8, 8]
    assert m["outputs"][0]["shape"] == [None, 4]
    assert all(c["error"] is None for c in m["candidates"]), m["candidates"]
    # a real agent: install (verify, golden rows through the health check in batches), serve
    agent = Agent(load_config(write_agent_config(tmp_path / "device", keys))).start(
        serve_http=False
    )
    try:
        assert result.bundle is not None
        outcome = agent.install(str(result.bundle))
        assert outcome.ok, outcome.reason
        images = x[:64].reshape(-1, 1, 8, 8).astype(np.float32)
        _check_serving(agent.runtime, bundle_files(result), "image", images)
    finally:
        agent.stop()


def test_concurrent_requests_batched_together_are_chunked_too(cnn8: Any) -> None:
    result, _ = cnn8
    files = bundle_files(result)
    parsed = parse_manifest(files[MANIFEST_FILE])
    # the batcher runs once all 9 rows wait (or after 5 s): one run of 2 chunks, the last padded
    config = RuntimeConfig(batch_delay_ms=5000.0, batch_rows=9)
    runtime = Runtime(config)
    served = ServedModel(parsed, open_session(files[MODEL_FILE], parsed, config))
    runtime.put(served)
    images = RNG.normal(size=(9, 1, 8, 8)).astype(np.float32)
    want = _row_by_row(files[MODEL_FILE], "image", images, 8)
    answers: dict[int, Any] = {}
    done = threading.Event()
    sizes = (1, 3, 5)

    def answer(index: int) -> Any:
        def callback(result: dict[str, np.ndarray] | None, error: BaseException | None) -> None:
            answers[index] = error if error is not None else result
            if len(answers) == len(sizes):
                done.set()

        return callback

    start = 0
    for index, n in enumerate(sizes):
        rows = {"image": images[start : start + n]}
        assert runtime.run_async(served, rows, None, answer(index))
        start += n
    assert done.wait(30)
    (batcher,) = runtime._batchers.values()
    assert (batcher.batches, batcher.requests) == (1, 3)  # stacked, then chunked
    start = 0
    for index, n in enumerate(sizes):
        got = answers[index]
        assert isinstance(got, dict), got
        np.testing.assert_allclose(got["logits"], want[start : start + n], rtol=1e-5, atol=1e-6)
        start += n


def test_a_fixed_batch_graph_that_mixes_rows_is_refused(tmp_path: Path, keys: KeyPair) -> None:
    """Centering over the batch axis: padding the last chunk would change every real row."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[0], keepdims=1),
        helper.make_node("Sub", ["x", "mean"], ["y"]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    with pytest.raises(UnsupportedModelError, match="changes with the other rows of the batch"):
        build_file(model, RNG.normal(size=(50, 3)), tmp_path, keys.private)


def test_an_output_without_the_batch_is_refused(tmp_path: Path, keys: KeyPair) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("total", TensorProto.FLOAT, [])
    nodes = [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0)]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    with pytest.raises(UnsupportedModelError, match=r"output 'total' has shape \[\]"):
        build_file(model, RNG.normal(size=(50, 3)), tmp_path, keys.private)


def test_the_manifest_field_is_optional_and_checked() -> None:
    from edgepack.formats.manifest import Manifest

    base = Manifest(
        name="m", version=1, profile="p", task="tensor", family="neural", precision="fp32",
        inputs=(), outputs=(), compatibility={}, runtime={}, parity={}, health={}, source={},
        created="2026-01-01T00:00:00+00:00", packager_version="0",
    )  # fmt: skip
    assert "fixed_batch" not in base.to_dict()  # older readers see the same manifest
    data = base.to_dict()
    data["inputs"] = data["outputs"] = [{"name": "x", "dtype": "float32", "shape": [None, 2]}]
    import json

    assert parse_manifest(json.dumps(data).encode()).fixed_batch is None  # old bundles: dynamic
    for good in (1, 8):
        parsed = parse_manifest(json.dumps({**data, "fixed_batch": good}).encode())
        assert parsed.fixed_batch == good
    for bad in (0, -1, True, "1", 1.5):
        with pytest.raises(ManifestError, match="fixed_batch"):
            parse_manifest(json.dumps({**data, "fixed_batch": bad}).encode())
