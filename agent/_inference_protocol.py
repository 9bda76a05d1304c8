"""The Open Inference Protocol (KServe v2 / Triton HTTP) messages, encoded and decoded.

Pure functions, no I/O: :mod:`edgepack.agent._http_server` hands request bodies in and writes what
comes out. Both the JSON form and Triton's binary tensor data extension are spoken, so the official
``tritonclient[http]`` works unchanged with its defaults (binary inputs and outputs): the
``Inference-Header-Content-Length`` header says how long the JSON part is, and raw tensors follow
it in order (BYTES elements as a 4-byte little-endian length then the bytes).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgepack.agent.exceptions import RequestError
from edgepack.formats.manifest import TensorSpec

__all__ = [
    "DATATYPES",
    "InferRequest",
    "decode_infer_request",
    "encode_infer_response",
    "model_metadata",
    "oip_datatype",
]

# manifest dtype -> OIP datatype
DATATYPES: dict[str, str] = {
    "float32": "FP32",
    "float64": "FP64",
    "float16": "FP16",
    "int64": "INT64",
    "int32": "INT32",
    "int8": "INT8",
    "uint8": "UINT8",
    "bool": "BOOL",
    "string": "BYTES",
}
_NUMPY: dict[str, Any] = {
    "FP32": np.float32,
    "FP64": np.float64,
    "FP16": np.float16,
    "INT64": np.int64,
    "INT32": np.int32,
    "INT16": np.int16,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "BOOL": np.bool_,
}


_MAX_RANK = 16


def oip_datatype(array: np.ndarray) -> str:
    """The OIP datatype of a numpy array (text is BYTES)."""
    if array.dtype.kind in "USO":
        return "BYTES"
    for name, kind in _NUMPY.items():
        if array.dtype == kind:
            return name
    raise ValueError(f"no Open Inference Protocol datatype for {array.dtype}")


@dataclass(frozen=True)
class InferRequest:
    """A decoded inference request."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: tuple[str, ...]  # empty: all
    binary_outputs: frozenset[str]
    binary_default: bool
    caller: str | None = None  # parameters.caller: keeps a caller on one variant of a split


def bytes_elements(blob: bytes, name: str) -> list[str]:
    """BYTES elements as Triton clients serialize them (HTTP binary extension and gRPC raw
    contents alike): a 4-byte little-endian length, then the UTF-8 bytes."""
    items, offset = [], 0
    while offset < len(blob):
        if offset + 4 > len(blob):
            raise RequestError(f"input {name!r}: truncated BYTES element length")
        (size,) = struct.unpack_from("<I", blob, offset)
        offset += 4
        if offset + size > len(blob):
            raise RequestError(f"input {name!r}: BYTES element runs past the data")
        items.append(blob[offset : offset + size].decode("utf-8", errors="strict"))
        offset += size
    return items


def _strings(data: Any, name: str) -> np.ndarray:
    """JSON BYTES data (nested lists of strings) as a flat object array: memory in proportion
    to the text, whatever the mix of long and short strings."""
    flat: list[str] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, str):
            flat.append(item)
        else:
            kind = type(item).__name__
            raise RequestError(f"input {name!r}: BYTES data must be strings, got {kind}")
    array = np.empty(len(flat), dtype=object)
    array[:] = flat
    return array


def _json_values(data: Any, datatype: str, name: str) -> np.ndarray:
    """JSON data as ``datatype``, refusing lossy conversions (5.5 as INT64, 300 as UINT8)."""
    if datatype == "BYTES":
        return _strings(data, name)
    kind = np.dtype(_NUMPY[datatype])
    raw = np.asarray(data)
    if raw.dtype.kind in "USO":
        raise RequestError(f"input {name!r}: data does not match datatype {datatype}: got text")
    if kind.kind in "iub":
        if raw.dtype.kind == "f" and not np.all(np.mod(raw, 1) == 0):
            raise RequestError(f"input {name!r}: {datatype} data must be whole numbers")
        if kind.kind in "iu" and raw.size:
            info = np.iinfo(kind)
            if raw.min() < info.min or raw.max() > info.max:
                raise RequestError(
                    f"input {name!r}: values outside the {datatype} range {info.min}..{info.max}"
                )
        if kind.kind == "b" and raw.size and not np.isin(raw, (0, 1)).all():
            raise RequestError(f"input {name!r}: BOOL data must be true/false")
    return raw.astype(kind)


def _decode_input(item: Any, binary: bytes, offset: int) -> tuple[str, np.ndarray, int]:
    if not isinstance(item, dict):
        raise RequestError("each entry of 'inputs' must be an object")
    name, shape, datatype = item.get("name"), item.get("shape"), item.get("datatype")
    if not isinstance(name, str):
        raise RequestError("an input has no 'name'")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_RANK
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise RequestError(
            f"input {name!r}: 'shape' must be a list of at most {_MAX_RANK} non-negative integers"
        )
    if not isinstance(datatype, str) or (datatype != "BYTES" and datatype not in _NUMPY):
        raise RequestError(f"input {name!r}: unknown datatype {str(datatype)[:40]!r}")
    count = math.prod(shape)  # exact: a numpy product of huge dimensions would wrap around
    parameters = item.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RequestError(f"input {name!r}: 'parameters' must be an object")
    size = parameters.get("binary_data_size")
    if size is not None and "data" in item:
        raise RequestError(
            f"input {name!r} has both 'data' and binary_data_size; send the tensor one way"
        )
    try:
        if size is not None:
            if (
                not isinstance(size, int)
                or isinstance(size, bool)
                or size < 0
                or offset + size > len(binary)
            ):
                raise RequestError(f"input {name!r}: binary_data_size {size!r} runs past the body")
            blob = binary[offset : offset + size]
            offset += size
            if datatype == "BYTES":
                items = bytes_elements(blob, name)
                values: Any = np.empty(len(items), dtype=object)
                values[:] = items
            else:
                dtype = np.dtype(_NUMPY[datatype]).newbyteorder("<")
                if size != count * dtype.itemsize:
                    raise RequestError(
                        f"input {name!r}: {size} bytes of binary data for shape {shape} of "
                        f"{datatype} (needs {count * dtype.itemsize})"
                    )
                values = np.frombuffer(blob, dtype=dtype)
        else:
            if "data" not in item:
                raise RequestError(f"input {name!r} has no 'data'")
            values = _json_values(item["data"], datatype, name)
        if values.size != count:
            raise RequestError(
                f"input {name!r}: {values.size} values do not fill shape {shape} ({count})"
            )
        return name, values.reshape(shape), offset
    except (TypeError, ValueError, OverflowError, UnicodeDecodeError) as e:
        raise RequestError(f"input {name!r}: data does not match datatype {datatype}: {e}") from e


def decode_infer_request(body: bytes, header_length: int | None) -> InferRequest:
    """Parse an infer request body (JSON, or JSON header + binary tensors).

    Total over its input: whatever a client sends ends in an :class:`InferRequest` or a
    :class:`RequestError` (HTTP 400) naming the field, never in another exception (a 500).

    Raises:
        RequestError: malformed JSON, bad shapes or datatypes, binary sizes that do not add up,
            a field of the wrong type.
    """
    try:
        return _decode(body, header_length)
    except RequestError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError, MemoryError) as e:
        raise RequestError(f"malformed request: {type(e).__name__}: {str(e)[:200]}") from e


def _decode(body: bytes, header_length: int | None) -> InferRequest:
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise RequestError("Inference-Header-Content-Length is larger than the body")
        header, binary = body[:header_length], body[header_length:]
    else:
        header, binary = body, b""
    data = _parse_json(header, "request body")
    if not isinstance(data, dict) or not isinstance(data.get("inputs"), list):
        raise RequestError("request must be a JSON object with an 'inputs' list")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for item in data["inputs"]:
        name, array, offset = _decode_input(item, binary, offset)
        if name in inputs:
            raise RequestError(f"input {name!r} appears twice")
        inputs[name] = array
    if offset != len(binary):
        raise RequestError(f"{len(binary) - offset} bytes of binary data are not claimed by inputs")
    outputs, binary_outputs = [], set()
    requested = data.get("outputs")
    if requested is not None and not isinstance(requested, list):
        raise RequestError("'outputs' must be a list of objects with a 'name'")
    for item in requested or []:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise RequestError("each entry of 'outputs' must be an object with a 'name'")
        outputs.append(item["name"])
        out_parameters = item.get("parameters") or {}
        if not isinstance(out_parameters, dict):
            raise RequestError(f"'outputs' entry {item['name']!r}: 'parameters' must be an object")
        if out_parameters.get("binary_data"):
            binary_outputs.add(item["name"])
    parameters = data.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RequestError("'parameters' must be an object")
    request_id = data.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError("'id' must be a string")
    caller = parameters.get("caller")
    if caller is not None and (not isinstance(caller, str) or len(caller) > 256):
        raise RequestError("parameters 'caller' must be a string of at most 256 characters")
    return InferRequest(
        id=request_id[:256] if request_id is not None else None,
        inputs=inputs,
        outputs=tuple(outputs),
        binary_outputs=frozenset(binary_outputs),
        binary_default=bool(parameters.get("binary_data_output")),
        caller=caller,
    )


MAX_FEEDBACK_ITEMS = 10_000


def decode_feedback(body: bytes) -> list[tuple[str, Any, Any]]:
    """``POST …/feedback``: ``{"id", "labels"|"targets"}`` or ``{"feedback": [those...]}``.

    Returns ``(id, labels, targets)`` per item (one of the two is ``None``).

    Raises:
        RequestError: not JSON, no id, neither or both of labels and targets, too many items.
    """
    data = _parse_json(body, "feedback body")
    if not isinstance(data, dict):
        raise RequestError("feedback must be a JSON object")
    items = data.get("feedback", [data])
    if not isinstance(items, list) or not items or len(items) > MAX_FEEDBACK_ITEMS:
        raise RequestError(
            f"'feedback' must be a list of 1 to {MAX_FEEDBACK_ITEMS} objects with an id"
        )
    decoded = []
    for n, item in enumerate(items):
        where = f"feedback[{n}]" if "feedback" in data else "feedback"
        if not isinstance(item, dict):
            raise RequestError(f"{where} must be an object")
        request_id = item.get("id")
        if not isinstance(request_id, str) or not request_id:
            raise RequestError(f"{where}: 'id' must be the request's id, a non-empty string")
        labels, targets = item.get("labels"), item.get("targets")
        if (labels is None) == (targets is None):
            raise RequestError(f"{where}: give exactly one of 'labels' or 'targets'")
        decoded.append((request_id[:256], labels, targets))
    return decoded


def _binary(array: np.ndarray) -> bytes:
    if array.dtype.kind in "USO":
        parts = []
        for item in array.ravel():
            raw = item if isinstance(item, bytes) else str(item).encode()
            parts.append(struct.pack("<I", len(raw)) + raw)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


_orjson: Any
try:  # optional (the agent extra has it): JSON in C, numpy arrays without a list in between
    import orjson as _orjson
except ImportError:  # pragma: no cover - the standard library does the same, slower
    _orjson = None

_SLOW = object()
# little-endian and single-byte dtypes orjson writes from the array itself (float16 and
# anything big-endian go through tolist())
_ORJSON_DTYPES = frozenset(
    {"<f4", "<f8", "<i8", "<i4", "<i2", "|i1", "<u8", "<u4", "<u2", "|u1", "|b1"}
)


def _parse_json(text: bytes, what: str) -> Any:
    """Every body the server parses: orjson when it can, else the standard library (NaN, lone
    surrogates); anything unreadable, nested too deep included, is a :class:`RequestError`."""
    data = _fast_loads(text)
    if data is _SLOW:
        try:
            data = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise RequestError(f"{what} is not valid JSON: {e}") from e
    return data


def _fast_loads(text: bytes) -> Any:
    """orjson's parse, or ``_SLOW`` when there is no orjson or it refuses the text (the
    standard library then parses it, or says what is wrong, exactly as before)."""
    if _orjson is None:
        return _SLOW
    try:
        return _orjson.loads(text)
    except _orjson.JSONDecodeError:
        return _SLOW


def _dumps(body: dict[str, Any]) -> bytes:
    if _orjson is not None:
        try:
            return _orjson.dumps(body, option=_orjson.OPT_SERIALIZE_NUMPY)
        except TypeError:  # an id orjson cannot write (an integer past 64 bits, say)
            pass
    return json.dumps(_lists(body), separators=(",", ":")).encode()


def _lists(body: dict[str, Any]) -> dict[str, Any]:
    entries = [
        {**e, "data": e["data"].tolist()} if isinstance(e.get("data"), np.ndarray) else e
        for e in body["outputs"]
    ]
    return {**body, "outputs": entries}


def encode_infer_response(
    model: str, version: int, request: InferRequest, outputs: Mapping[str, np.ndarray]
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header length when binary outputs follow it."""
    entries, blobs = [], []
    for name, value in outputs.items():
        array = np.asarray(value)
        entry: dict[str, Any] = {
            "name": name,
            "datatype": oip_datatype(array),
            "shape": list(array.shape),
        }
        if name in request.binary_outputs or (request.binary_default and not request.outputs):
            blob = _binary(array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif array.dtype.kind in "USO":
            entry["data"] = [str(x) for x in array.ravel()]
        elif _orjson is not None and array.dtype.str in _ORJSON_DTYPES:
            entry["data"] = np.ascontiguousarray(array).ravel()  # serialized in C, as float32
        else:
            entry["data"] = array.ravel().tolist()
        entries.append(entry)
    body: dict[str, Any] = {"model_name": model, "model_version": str(version), "outputs": entries}
    if request.id is not None:
        body["id"] = request.id
    header = _dumps(body)
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


def _tensor(spec: TensorSpec) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": spec.name,
        "datatype": DATATYPES.get(spec.dtype, "FP32"),
        "shape": [-1 if d is None else d for d in spec.shape],
    }
    if spec.columns:
        out["parameters"] = {"columns": list(spec.columns)}
    return out


def model_metadata(
    name: str, versions: Sequence[int], inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
) -> dict[str, Any]:
    """``GET /v2/models/{name}``: name, versions, platform, inputs and outputs."""
    return {
        "name": name,
        "versions": [str(v) for v in versions],
        "platform": "onnxruntime_onnx",
        "inputs": [_tensor(s) for s in inputs],
        "outputs": [_tensor(s) for s in outputs],
    }
