"""Raw ONNX graphs, as exporters leave them, built for every profile (issue #10 item 1).

Graphs are made with ``onnx.helper`` here: an opset-17 MLP with only default-domain operators
(which failed for every CPU profile when quantization pre-processing added opset imports), a
small CNN (Conv → BatchNormalization → Relu → MaxPool → Gemm) taking ``[batch, 1, 8, 8]``, a
graph with two inputs and two outputs, a model whose tensors live in an external-data file, a
model built from a local ONNX function, an opset-19 model that must go down to the profiles'
17, and one that cannot (an ``ai.onnx.ml`` opset the profiles do not run). Every bundle's model is
rerun here against the source graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from build_helpers import ALL_PROFILES, build_file, bundle_files, manifest, run
from onnx import TensorProto, helper, numpy_helper

from edgepack.formats.bundle import MODEL_FILE

RNG = np.random.default_rng(0)


def _init(name: str, *shape: int, scale: float = 0.5) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.normal(size=shape) * scale).astype(np.float32), name)


def _model(nodes: list, inputs: list, outputs: list, inits: list, opset: int = 17, **kw: Any):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kw)
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def mlp(opset: int = 17) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 10])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    return _model(
        nodes, [x], [y], [_init("w1", 10, 32), _init("b1", 32), _init("w2", 32, 3)], opset
    )


def cnn() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])
    bn = [numpy_helper.from_array(v, n) for n, v in (
        ("scale", np.ones(4, np.float32)), ("bias", np.zeros(4, np.float32)),
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
    return _model(nodes, [x], [y], [_init("k", 4, 1, 3, 3), *bn, _init("w", 64, 4), _init("b", 4)])


def two_in_two_out() -> onnx.ModelProto:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, 4])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [None, 3])
    s = helper.make_tensor_value_info("sum", TensorProto.FLOAT, [None, 2])
    p = helper.make_tensor_value_info("prod", TensorProto.FLOAT, [None, 2])
    nodes = [
        helper.make_node("MatMul", ["a", "wa"], ["ha"]),
        helper.make_node("MatMul", ["b", "wb"], ["hb"]),
        helper.make_node("Add", ["ha", "hb"], ["sum"]),
        helper.make_node("Mul", ["ha", "hb"], ["prod"]),
    ]
    return _model(nodes, [a, b], [s, p], [_init("wa", 4, 2), _init("wb", 3, 2)])


def with_function() -> onnx.ModelProto:
    """An MLP whose hidden layer is a local function (as torch.onnx exports modules)."""
    dense = helper.make_function(
        "local", "Dense", ["x", "w"], ["y"],
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
        [helper.make_opsetid("", 17)],
    )  # fmt: skip
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 10])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    nodes = [
        helper.make_node("Dense", ["x", "w1"], ["h"], domain="local"),
        helper.make_node("MatMul", ["h", "w2"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y], [_init("w1", 10, 16), _init("w2", 16, 3)])
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
        functions=[dense],
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _rows(n: int, width: int) -> np.ndarray:
    return RNG.normal(size=(n, width))


def _check_against_source(source: onnx.ModelProto, result: Any, feeds: dict) -> None:
    """The bundle's model, rerun here, against the source graph on the same inputs."""
    want = run(source.SerializeToString(), feeds)
    got = run(bundle_files(result)[MODEL_FILE], feeds)
    m = manifest(result)
    tolerance = m["parity"]["tolerance"]["max_relative_error"]
    for w, g in zip(want, got, strict=True):
        per_row = np.abs(w - g).reshape(len(w), -1).max(axis=1) / max(np.ptp(w), 1e-12)
        gated = per_row.max() if m["precision"] == "fp32" else np.quantile(per_row, 0.99)
        assert gated <= tolerance


def test_plain_onnx_mlp_builds_for_every_profile(tmp_path: Path, keys: Any) -> None:
    """The issue's failure: 'model uses ai.onnx.ml opset 5 but the profile allows at most 3'."""
    model, x = mlp(), _rows(600, 10)
    results = build_file(model, x, tmp_path, keys.private, profiles=ALL_PROFILES)
    assert [r.profile for r in results] == list(ALL_PROFILES)
    for result in results:
        assert result.ok, (result.profile, result.error)
        m = manifest(result)
        assert m["task"] == "tensor"
        assert m["family"] == "neural"
        packaged = onnx.load_from_string(bundle_files(result)[MODEL_FILE])
        # only the domains the graph uses; no ai.onnx.ml import from quantization tooling
        used = {n.domain for n in packaged.graph.node}
        assert {o.domain for o in packaged.opset_import} == used | {""}
        names = [c["name"] for c in m["candidates"]]
        assert len(names) == (4 if result.profile == "nvidia-gpu" else 6)
        _check_against_source(model, result, {"x": x.astype(np.float32)})


def test_small_cnn_builds_with_its_image_input(tmp_path: Path, keys: Any) -> None:
    model, x = cnn(), _rows(300, 64)
    [cpu, gpu] = build_file(model, x, tmp_path, keys.private, profiles=("x86_64-cpu", "nvidia-gpu"))
    for result in (cpu, gpu):
        m = manifest(result)
        [spec] = m["inputs"]
        assert (spec["name"], spec["shape"], len(spec["columns"])) == ("image", [None, 1, 8, 8], 64)
        _check_against_source(model, result, {"image": x.reshape(-1, 1, 8, 8).astype(np.float32)})


def test_several_inputs_and_outputs_take_their_columns_in_order(tmp_path: Path, keys: Any) -> None:
    model, x = two_in_two_out(), _rows(300, 7)
    [result] = build_file(model, x, tmp_path, keys.private)
    m = manifest(result)
    assert [(s["name"], s["columns"]) for s in m["inputs"]] == [
        ("a", ["f0", "f1", "f2", "f3"]),
        ("b", ["f4", "f5", "f6"]),
    ]
    assert [o["name"] for o in m["outputs"]] == ["sum", "prod"]
    assert [o["shape"][0] for o in m["outputs"]] == [None, None]  # dynamic batch kept
    feeds = {"a": x[:, :4].astype(np.float32), "b": x[:, 4:].astype(np.float32)}
    _check_against_source(model, result, feeds)


def test_too_few_columns_for_the_inputs_is_refused(tmp_path: Path, keys: Any) -> None:
    from edgepack.packager.exceptions import ReferenceDataError

    with pytest.raises(
        ReferenceDataError, match=r"take at least 7 columns .* the reference data has 6"
    ):
        build_file(two_in_two_out(), _rows(50, 6), tmp_path, keys.private)


def test_external_data_is_read_in_and_hashed(tmp_path: Path, keys: Any) -> None:
    model = mlp()
    path = tmp_path / "model.onnx"
    stored = onnx.ModelProto.FromString(model.SerializeToString())  # save moves tensors out
    onnx.save(stored, path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    assert (tmp_path / "weights.bin").stat().st_size > 1000
    x = _rows(400, 10)
    [result] = build_file(path, x, tmp_path, keys.private)
    m = manifest(result)
    packaged = onnx.load_from_string(bundle_files(result)[MODEL_FILE])
    assert not any(t.data_location == TensorProto.EXTERNAL for t in packaged.graph.initializer)
    _check_against_source(model, result, {"x": x.astype(np.float32)})
    # the weights are part of the source's identity
    first = m["source"]["sha256"]
    (tmp_path / "weights.bin").write_bytes(b"\0" * (tmp_path / "weights.bin").stat().st_size)
    [again] = build_file(path, x, tmp_path / "again", keys.private)
    assert manifest(again)["source"]["sha256"] != first


def test_missing_external_data_says_which_file(tmp_path: Path, keys: Any) -> None:
    from edgepack.packager.exceptions import ModelLoadError

    path = tmp_path / "model.onnx"
    onnx.save(mlp(), path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(ModelLoadError, match=r"'weights.bin'"):
        build_file(path, _rows(50, 10), tmp_path, keys.private)


def test_local_functions_are_inlined(tmp_path: Path, keys: Any) -> None:
    model, x = with_function(), _rows(300, 10)
    [result] = build_file(model, x, tmp_path, keys.private)
    packaged = onnx.load_from_string(bundle_files(result)[MODEL_FILE])
    assert not packaged.functions
    assert "local" not in {o.domain for o in packaged.opset_import}
    _check_against_source(model, result, {"x": x.astype(np.float32)})


def test_a_newer_opset_is_converted_down_to_the_profiles(tmp_path: Path, keys: Any) -> None:
    model, x = mlp(opset=19), _rows(300, 10)
    [result] = build_file(model, x, tmp_path, keys.private)
    assert manifest(result)["compatibility"]["opset"][""] == 17
    _check_against_source(model, result, {"x": x.astype(np.float32)})


def test_an_ml_opset_the_profile_lacks_is_refused_with_the_reason(
    tmp_path: Path, keys: Any
) -> None:
    model = mlp()
    # a real ai.onnx.ml operator at opset 5: nothing converts it down, the profile runs 3
    model.graph.node.append(helper.make_node("Binarizer", ["y"], ["z"], domain="ai.onnx.ml"))
    model.graph.output[0].name = "z"
    model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 5))
    [result] = build_file(model, _rows(300, 10), tmp_path, keys.private)
    assert not result.ok
    assert "ai.onnx.ml opset 5 but the profile allows at most 3" in str(result.error)
