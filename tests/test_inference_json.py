"""The Open Inference Protocol's JSON is read and written in C (orjson) when it is installed,
and by the standard library otherwise: both give the same requests, the same answers and the
same errors, and orjson's refusals (NaN, lone surrogates, huge integers) fall back to the
standard library's reading instead of turning into different errors."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from edgepack.agent import _inference_protocol as protocol
from edgepack.agent.exceptions import RequestError

pytest.importorskip("orjson")  # the agent extra installs it


@pytest.fixture(params=["orjson", "stdlib"])
def codec(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "stdlib":
        monkeypatch.setattr(protocol, "_orjson", None)
    return str(request.param)


def body(data: Any, datatype: str = "FP32", shape: Any = (2, 3), **extra: Any) -> bytes:
    tensor = {"name": "x", "shape": list(shape), "datatype": datatype, "data": data}
    return json.dumps({"inputs": [tensor], **extra}).encode()


def test_requests_decode_alike(codec: str) -> None:
    got = protocol.decode_infer_request(body([[1.5, 2, -3e-5], [4, 5, 6]], id="r1"), None)
    np.testing.assert_array_equal(
        got.inputs["x"], np.asarray([[1.5, 2, -3e-5], [4, 5, 6]], np.float32)
    )
    assert got.inputs["x"].dtype == np.float32
    assert got.id == "r1"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (b'{"inputs": [', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    ],
)
def test_refusals_read_the_same_either_way(codec: str, text: bytes, says: str) -> None:
    with pytest.raises(RequestError, match=says):
        protocol.decode_infer_request(text, None)


def test_what_orjson_refuses_is_read_as_before(codec: str) -> None:
    lone = b'{"id": "\\ud800", "inputs": [{"name": "x", "shape": [1], "datatype": "INT64", '
    huge = b'"data": [1]}], "parameters": {"n": 123456789012345678901234567890}}'
    got = protocol.decode_infer_request(lone + huge, None)
    assert got.id == "\ud800"
    np.testing.assert_array_equal(got.inputs["x"], [1])


@pytest.mark.parametrize(
    "array",
    [
        np.asarray([[0.1, 0.2, 0.7], [1e-30, 3.4e38, -0.0]], np.float32),
        np.asarray([1.0 / 3, 2.0 / 3], np.float64),
        np.asarray([3, -1, 2**40], np.int64),
        np.asarray([True, False]),
        np.asarray([1, 2], np.float16),
        np.asarray(["a", "ü"], object),
    ],
)
def test_answers_encode_to_the_same_values(codec: str, array: np.ndarray) -> None:
    request = protocol.decode_infer_request(body([[1, 2, 3], [4, 5, 6]], id="r"), None)
    payload, header = protocol.encode_infer_response("m", 3, request, {"y": array})
    assert header is None
    answer = json.loads(payload)
    assert (answer["model_name"], answer["model_version"], answer["id"]) == ("m", "3", "r")
    (entry,) = answer["outputs"]
    assert entry["shape"] == list(array.shape)
    if array.dtype.kind == "O":
        assert entry["data"] == list(array)
    else:
        np.testing.assert_array_equal(np.asarray(entry["data"], array.dtype), array.ravel())


def test_nan_in_a_request_is_read_alike_and_left_to_the_runtime_to_refuse(codec: str) -> None:
    text = b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [NaN, 1]}]}'
    got = protocol.decode_infer_request(text, None)  # orjson refuses NaN: the stdlib reads it
    assert np.isnan(got.inputs["x"][0])
    assert got.inputs["x"][1] == 1


def test_a_body_orjson_cannot_write_is_written_by_the_standard_library(codec: str) -> None:
    out = {"model_name": "m", "outputs": [{"name": "y", "data": np.arange(3)}], "n": 2**70}
    assert json.loads(protocol._dumps(out)) == {
        "model_name": "m", "outputs": [{"name": "y", "data": [0, 1, 2]}], "n": 2**70
    }  # fmt: skip


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"id": "a", "labels": [1', b"\xff\xfe", b"[]"])
def test_a_hostile_feedback_body_is_a_request_error(body: bytes) -> None:
    # the feedback endpoint parses with the same guarded reader as inference requests: deep
    # nesting (RecursionError in the standard library) is a 400, not a crashed handler
    from edgepack.agent._inference_protocol import decode_feedback

    with pytest.raises(RequestError):
        decode_feedback(body)
