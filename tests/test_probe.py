"""The health check in a child process: a healthy model passes, a lying one fails with the golden
check's reason, a real ONNX graph that loops 2**62 times is stopped at the deadline, and a child
that dies natively (a crash onnxruntime cannot be made to produce on demand, so it is injected)
is reported as a crash. The daemon's process survives all of them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from bundle_forge import unpack, wrong_golden
from onnx import TensorProto, helper

from edgepack.agent._probe import check_in_child
from edgepack.agent.exceptions import HealthCheckError

ARGS = {"providers": [], "intra_op_threads": 1, "inter_op_threads": 1}


def staged(directory: Path, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


def looping_model(trips: int = 2**62) -> bytes:
    """input float[N,4] -> a Loop of ``trips`` iterations -> label, probabilities."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["v_in", "one"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [None, 4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [None, 4]),
        ],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Loop", ["trips", "cond", "input"], ["spun"], body=body),
            helper.make_node("ReduceMax", ["spun"], ["probabilities"], axes=[1], keepdims=1),
            helper.make_node("ArgMax", ["spun"], ["label"], axis=1, keepdims=0),
        ],
        "spin",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 4])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 1]),
        ],
        [
            helper.make_tensor("trips", TensorProto.INT64, [], [trips]),
            helper.make_tensor("cond", TensorProto.BOOL, [], [True]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_a_healthy_model_passes(tmp_path: Path, iris_bundles: dict[str, Path]) -> None:
    _, files = unpack(iris_bundles["v1"])
    rows = check_in_child(staged(tmp_path / "v1", files), deadline=60, what="iris v1", **ARGS)
    assert rows > 0


def test_a_lying_model_fails_with_the_golden_reason(
    tmp_path: Path, iris_bundles: dict[str, Path]
) -> None:
    _, files = unpack(iris_bundles["v1"])
    files["golden.npz"] = wrong_golden(files, "label")
    with pytest.raises(HealthCheckError, match="iris v1 failed its health check: output 'label'"):
        check_in_child(staged(tmp_path / "v1", files), deadline=60, what="iris v1", **ARGS)


def test_a_model_that_loops_is_stopped_at_the_deadline(
    tmp_path: Path, iris_bundles: dict[str, Path]
) -> None:
    _, files = unpack(iris_bundles["v1"])
    files["model.onnx"] = looping_model()
    started = time.monotonic()
    with pytest.raises(HealthCheckError, match="did not finish its health check within 3 s"):
        check_in_child(staged(tmp_path / "spin", files), deadline=3, what="spin v1", **ARGS)
    assert time.monotonic() - started < 30  # bounded: not the 2**62 iterations


def test_a_child_that_crashes_natively_is_reported(
    tmp_path: Path, iris_bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, files = unpack(iris_bundles["v1"])
    monkeypatch.setenv("EDGEPACK_FAULT_PROBE_SIGNAL", "SIGSEGV")
    with pytest.raises(HealthCheckError, match="crashed onnxruntime during its health check: "
                       "the check process was killed by signal SIGSEGV"):  # fmt: skip
        check_in_child(staged(tmp_path / "v1", files), deadline=60, what="iris v1", **ARGS)
    assert os.getpid()  # still here


def test_unreadable_staged_files_fail_cleanly(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(HealthCheckError, match="cannot read the staged files"):
        check_in_child(tmp_path / "empty", deadline=60, what="x v1", **ARGS)


def test_the_looping_model_really_loops_in_onnxruntime() -> None:
    import threading

    import onnxruntime as ort

    session = ort.InferenceSession(looping_model(), providers=["CPUExecutionProvider"])
    options = ort.RunOptions()
    threading.Timer(0.5, lambda: setattr(options, "terminate", True)).start()
    with pytest.raises(Exception, match=r"(?i)terminat"):
        session.run(None, {"input": np.ones((1, 4), np.float32)}, options)
