"""The Open Inference Protocol (KServe v2) over gRPC: its messages, decoded and encoded.

The service is ``inference.GRPCInferenceService`` of ``grpc_predict_v2.proto`` (next to this
module; the same names and field numbers as KServe's and Triton's, so ``tritonclient.grpc`` works
unchanged). No protoc and no generated code: :func:`messages` builds the descriptors from
:data:`SCHEMA` at run time, in a private descriptor pool, so a process that also imports
Triton's generated modules (which register the same ``inference.*`` names in protobuf's default
pool) loads both without a clash. protobuf is imported on the first call, never at import time:
the agent without the ``grpc`` extra imports this module and loads nothing more.

Pure functions, no I/O, like :mod:`edgepack.agent._inference_protocol` for HTTP:
:mod:`edgepack.agent._grpc_server` hands in the parsed request message and sends what comes out.
:func:`decode_infer_request` is total over its input: whatever a client sends ends in a
:class:`GrpcInferRequest` or a :class:`~edgepack.agent.exceptions.RequestError` naming the field
(:class:`~edgepack.agent.exceptions.ModelNotFoundError` for a name no model can have).
"""

from __future__ import annotations

import functools
import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import edgepack
from edgepack.agent._inference_protocol import bytes_elements, model_metadata
from edgepack.agent.exceptions import ModelNotFoundError, RequestError
from edgepack.formats.manifest import TensorSpec

__all__ = [
    "METHODS",
    "SCHEMA",
    "SERVICE",
    "GrpcInferRequest",
    "decode_infer_request",
    "encode_infer_response",
    "messages",
    "model_and_version",
    "model_metadata_response",
    "server_metadata_response",
]

PACKAGE = "inference"
SERVICE = f"{PACKAGE}.GRPCInferenceService"
# method -> (request message, response message)
METHODS: dict[str, tuple[str, str]] = {
    "ServerLive": ("ServerLiveRequest", "ServerLiveResponse"),
    "ServerReady": ("ServerReadyRequest", "ServerReadyResponse"),
    "ModelReady": ("ModelReadyRequest", "ModelReadyResponse"),
    "ServerMetadata": ("ServerMetadataRequest", "ServerMetadataResponse"),
    "ModelMetadata": ("ModelMetadataRequest", "ModelMetadataResponse"),
    "ModelInfer": ("ModelInferRequest", "ModelInferResponse"),
}

_PARAMETERS = "map<string, InferParameter>"
# message (a nested one as Outer.Inner, after its outer) -> fields (name, number, kind); a kind
# is a scalar type, "repeated T", "map<string, T>", "oneof GROUP T", or a message of this file
SCHEMA: dict[str, tuple[tuple[str, int, str], ...]] = {
    "ServerLiveRequest": (),
    "ServerLiveResponse": (("live", 1, "bool"),),
    "ServerReadyRequest": (),
    "ServerReadyResponse": (("ready", 1, "bool"),),
    "ModelReadyRequest": (("name", 1, "string"), ("version", 2, "string")),
    "ModelReadyResponse": (("ready", 1, "bool"),),
    "ServerMetadataRequest": (),
    "ServerMetadataResponse": (
        ("name", 1, "string"),
        ("version", 2, "string"),
        ("extensions", 3, "repeated string"),
    ),
    "ModelMetadataRequest": (("name", 1, "string"), ("version", 2, "string")),
    "ModelMetadataResponse": (
        ("name", 1, "string"),
        ("versions", 2, "repeated string"),
        ("platform", 3, "string"),
        ("inputs", 4, "repeated ModelMetadataResponse.TensorMetadata"),
        ("outputs", 5, "repeated ModelMetadataResponse.TensorMetadata"),
    ),
    "ModelMetadataResponse.TensorMetadata": (
        ("name", 1, "string"),
        ("datatype", 2, "string"),
        ("shape", 3, "repeated int64"),
    ),
    "ModelInferRequest": (
        ("model_name", 1, "string"),
        ("model_version", 2, "string"),
        ("id", 3, "string"),
        ("parameters", 4, _PARAMETERS),
        ("inputs", 5, "repeated ModelInferRequest.InferInputTensor"),
        ("outputs", 6, "repeated ModelInferRequest.InferRequestedOutputTensor"),
        ("raw_input_contents", 7, "repeated bytes"),
    ),
    "ModelInferRequest.InferInputTensor": (
        ("name", 1, "string"),
        ("datatype", 2, "string"),
        ("shape", 3, "repeated int64"),
        ("parameters", 4, _PARAMETERS),
        ("contents", 5, "InferTensorContents"),
    ),
    "ModelInferRequest.InferRequestedOutputTensor": (
        ("name", 1, "string"),
        ("parameters", 2, _PARAMETERS),
    ),
    "ModelInferResponse": (
        ("model_name", 1, "string"),
        ("model_version", 2, "string"),
        ("id", 3, "string"),
        ("parameters", 4, _PARAMETERS),
        ("outputs", 5, "repeated ModelInferResponse.InferOutputTensor"),
        ("raw_output_contents", 6, "repeated bytes"),
    ),
    "ModelInferResponse.InferOutputTensor": (
        ("name", 1, "string"),
        ("datatype", 2, "string"),
        ("shape", 3, "repeated int64"),
        ("parameters", 4, _PARAMETERS),
        ("contents", 5, "InferTensorContents"),
    ),
    "InferParameter": (
        ("bool_param", 1, "oneof parameter_choice bool"),
        ("int64_param", 2, "oneof parameter_choice int64"),
        ("string_param", 3, "oneof parameter_choice string"),
    ),
    "InferTensorContents": (
        ("bool_contents", 1, "repeated bool"),
        ("int_contents", 2, "repeated int32"),
        ("int64_contents", 3, "repeated int64"),
        ("uint_contents", 4, "repeated uint32"),
        ("uint64_contents", 5, "repeated uint64"),
        ("fp32_contents", 6, "repeated float"),
        ("fp64_contents", 7, "repeated double"),
        ("bytes_contents", 8, "repeated bytes"),
    ),
}

_SCALARS = ("bool", "string", "bytes", "int32", "int64", "uint32", "uint64", "float", "double")


def _file_descriptor() -> Any:
    """:data:`SCHEMA` and :data:`METHODS` as a ``FileDescriptorProto``."""
    from google.protobuf import descriptor_pb2

    field_proto = descriptor_pb2.FieldDescriptorProto
    scalar_types = {name: getattr(field_proto, f"TYPE_{name.upper()}") for name in _SCALARS}
    file = descriptor_pb2.FileDescriptorProto(
        name="edgepack/grpc_predict_v2.proto", package=PACKAGE, syntax="proto3"
    )
    built: dict[str, Any] = {}
    for path, fields in SCHEMA.items():
        outer, _, inner = path.rpartition(".")
        parent = built[outer].nested_type if outer else file.message_type
        message = built[path] = parent.add(name=inner)
        oneofs: dict[str, int] = {}
        for name, number, kind in fields:
            field = message.field.add(name=name, number=number, json_name=_camel(name, False))
            field.label = field_proto.LABEL_OPTIONAL
            words = kind.split()
            if words[0] == "repeated":
                field.label = field_proto.LABEL_REPEATED
                words = words[1:]
            elif words[0] == "oneof":
                field.oneof_index = oneofs.setdefault(words[1], len(oneofs))
                words = words[2:]
            elif words[0].startswith("map<"):
                entry = message.nested_type.add(name=_camel(name, True) + "Entry")
                entry.options.map_entry = True
                key = entry.field.add(name="key", number=1, json_name="key")
                key.label, key.type = field_proto.LABEL_OPTIONAL, field_proto.TYPE_STRING
                value = entry.field.add(name="value", number=2, json_name="value")
                value.label, value.type = field_proto.LABEL_OPTIONAL, field_proto.TYPE_MESSAGE
                value.type_name = f".{PACKAGE}.{words[1].rstrip('>')}"
                field.label, field.type = field_proto.LABEL_REPEATED, field_proto.TYPE_MESSAGE
                field.type_name = f".{PACKAGE}.{path}.{entry.name}"
                continue
            (type_name,) = words
            if type_name in scalar_types:
                field.type = scalar_types[type_name]
            else:
                field.type = field_proto.TYPE_MESSAGE
                field.type_name = f".{PACKAGE}.{type_name}"
        for group in oneofs:
            message.oneof_decl.add(name=group)
    service = file.service.add(name=SERVICE.rpartition(".")[2])
    for method, (request, response) in METHODS.items():
        service.method.add(
            name=method, input_type=f".{PACKAGE}.{request}", output_type=f".{PACKAGE}.{response}"
        )
    return file


def _camel(name: str, upper: bool) -> str:
    words = name.split("_")
    head = words[0].capitalize() if upper else words[0]
    return head + "".join(w.capitalize() for w in words[1:])


@functools.cache
def messages() -> dict[str, Any]:
    """The message classes by name (``"ModelInferRequest"``), built once, in a private pool.

    Raises:
        ImportError: protobuf is not installed (the ``grpc`` extra).
    """
    from google.protobuf import descriptor_pool, message_factory

    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(_file_descriptor().SerializeToString())
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
        for name in SCHEMA
        if "." not in name
    }


# --- inference requests ---------------------------------------------------------------------

_NUMPY: dict[str, Any] = {
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "BOOL": np.bool_,
}
_RAW = {name: np.dtype(kind).newbyteorder("<") for name, kind in _NUMPY.items()}
_DATATYPE = {np.dtype(kind): name for name, kind in _NUMPY.items()}  # numpy dtype -> datatype
# datatype -> the InferTensorContents field that carries it (FP16 is sent raw only)
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_MAX_RANK = 16
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_VERSION = re.compile(r"^[0-9]{1,18}$", re.ASCII)
# features of Triton's protocol that this agent does not have: refused, not silently ignored
_UNSUPPORTED = {
    "shared_memory_region": "shared memory is not supported; send the tensor in the request",
    "classification": "the classification extension is not supported; ask for the outputs",
}


@dataclass(frozen=True)
class GrpcInferRequest:
    """A decoded ``ModelInferRequest``."""

    model: str
    version: int | None  # None: the active version
    id: str
    inputs: dict[str, np.ndarray]
    outputs: tuple[str, ...]  # empty: all
    caller: str | None = None  # parameters["caller"]: keeps a caller on one split variant


def model_and_version(name: str, version: str) -> tuple[str, int | None]:
    """The model name and version of a request (``""``: the active version).

    Raises:
        ModelNotFoundError: no model can have that name.
        RequestError: the version is not a whole number.
    """
    if not _MODEL_NAME.match(name):
        raise ModelNotFoundError(f"no model is named {name[:64]!r} (serving names match "
                                 "[A-Za-z0-9][A-Za-z0-9_.-]{0,63})")  # fmt: skip
    if not version:
        return name, None
    if not _VERSION.match(version):
        raise RequestError(f"model_version must be a whole number, got {version[:20]!r}")
    return name, int(version)


def decode_infer_request(request: Any) -> GrpcInferRequest:
    """Turn a ``ModelInferRequest`` into arrays the runtime validates against the manifest.

    Raises:
        ModelNotFoundError: no model can have the requested name.
        RequestError: bad shapes or datatypes, raw contents that do not add up, an input twice,
            a feature this agent does not have (shared memory, classification).
    """
    try:
        return _decode(request)
    except RequestError:
        raise
    except (TypeError, ValueError, OverflowError, UnicodeDecodeError, MemoryError) as e:
        raise RequestError(f"malformed request: {type(e).__name__}: {str(e)[:200]}") from e


def _decode(request: Any) -> GrpcInferRequest:
    model, version = model_and_version(request.model_name, request.model_version)
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise RequestError(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; send "
            "one per input, in order (or none, and every input's contents)"
        )
    _refuse_unsupported(request.parameters, "the request")
    inputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name in inputs:
            raise RequestError(f"input {tensor.name!r} appears twice")
        _refuse_unsupported(tensor.parameters, f"input {tensor.name!r}")
        inputs[tensor.name] = _input(tensor, raw[index] if raw else None)
    outputs = []
    for wanted in request.outputs:
        _refuse_unsupported(wanted.parameters, f"output {wanted.name!r}")
        outputs.append(wanted.name)
    caller = None
    if "caller" in request.parameters:
        value = request.parameters["caller"]
        if value.WhichOneof("parameter_choice") != "string_param" or len(value.string_param) > 256:
            raise RequestError("parameter 'caller' must be a string of at most 256 characters")
        caller = value.string_param or None
    return GrpcInferRequest(model, version, request.id[:256], inputs, tuple(outputs), caller)


def _refuse_unsupported(parameters: Mapping[str, Any], where: str) -> None:
    if not parameters:
        return
    for key, why in _UNSUPPORTED.items():
        if key in parameters:
            raise RequestError(f"{where}: parameter {key!r}: {why}")


def _input(tensor: Any, raw: bytes | None) -> np.ndarray:
    name, datatype, shape = tensor.name, tensor.datatype, tensor.shape[:]
    if len(shape) > _MAX_RANK or any(d < 0 for d in shape):
        raise RequestError(
            f"input {name!r}: shape must be at most {_MAX_RANK} non-negative dimensions, "
            f"got {shape[: _MAX_RANK + 1]}"
        )
    if datatype != "BYTES" and datatype not in _NUMPY:
        raise RequestError(f"input {name!r}: unknown datatype {datatype[:40]!r}")
    count = math.prod(shape)  # exact: a numpy product of huge dimensions would wrap around
    if raw is not None:
        if tensor.HasField("contents"):
            raise RequestError(
                f"input {name!r} has contents and raw_input_contents; send the tensor one way"
            )
        values = _from_raw(raw, datatype, name)
    else:
        values = _from_contents(tensor.contents, datatype, name)
    if values.size != count:
        raise RequestError(
            f"input {name!r}: {values.size} {datatype} values do not fill shape {shape} "
            f"({count} needed)"
        )
    return values.reshape(shape)


def _from_raw(blob: bytes, datatype: str, name: str) -> np.ndarray:
    if datatype == "BYTES":
        return _objects(bytes_elements(blob, name))
    dtype = _RAW[datatype]
    if len(blob) % dtype.itemsize:
        raise RequestError(
            f"input {name!r}: {len(blob)} bytes of raw {datatype} data is not a whole number of "
            f"{dtype.itemsize}-byte values"
        )
    if datatype == "BOOL" and blob and max(blob) > 1:
        raise RequestError(f"input {name!r}: raw BOOL bytes must be 0 or 1")
    return np.frombuffer(blob, dtype=dtype)


def _objects(items: Sequence[str]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)  # memory in proportion to the text
    array[:] = items
    return array


def _from_contents(contents: Any, datatype: str, name: str) -> np.ndarray:
    field = _CONTENTS.get(datatype)
    if field is None:
        raise RequestError(f"input {name!r}: {datatype} data must be sent in raw_input_contents")
    values = getattr(contents, field)
    if datatype == "BYTES":
        return _objects([item.decode("utf-8", errors="strict") for item in values])
    kind = np.dtype(_NUMPY[datatype])
    wide = np.array(values, dtype={"f": np.float64, "i": np.int64, "u": np.uint64}.get(kind.kind))
    if kind.kind in "iu" and kind.itemsize < 4 and wide.size:
        info = np.iinfo(kind)  # int_contents / uint_contents carry 32 bits
        if wide.min() < info.min or wide.max() > info.max:
            raise RequestError(
                f"input {name!r}: values outside the {datatype} range {info.min}..{info.max}"
            )
    return wide.astype(kind)


# --- responses ------------------------------------------------------------------------------


def _datatype(array: np.ndarray) -> str:
    """The datatype of an output (text is BYTES)."""
    name = _DATATYPE.get(array.dtype) or _DATATYPE.get(array.dtype.newbyteorder("="))
    if name is not None:
        return name
    if array.dtype.kind in "USO":
        return "BYTES"
    raise ValueError(f"no Open Inference Protocol datatype for {array.dtype}")


def _raw(array: np.ndarray) -> bytes:
    if array.dtype.kind in "USO":
        parts = []
        for item in array.ravel():
            data = item if isinstance(item, bytes) else str(item).encode()
            parts.append(struct.pack("<I", len(data)) + data)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def encode_infer_response(
    model: str, version: int, request_id: str, outputs: Mapping[str, np.ndarray]
) -> Any:
    """A ``ModelInferResponse``: every output in ``raw_output_contents``, in order (what Triton
    sends and ``tritonclient.grpc``'s ``as_numpy`` reads)."""
    response = messages()["ModelInferResponse"](
        model_name=model, model_version=str(version), id=request_id
    )
    for name, value in outputs.items():
        array = np.asarray(value)
        response.outputs.add(name=name, datatype=_datatype(array), shape=array.shape)
        response.raw_output_contents.append(_raw(array))
    return response


def model_metadata_response(
    name: str, versions: Sequence[int], inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
) -> Any:
    """A ``ModelMetadataResponse``: what ``GET /v2/models/{name}`` says, without the columns
    (the gRPC message has no tensor parameters)."""
    data = model_metadata(name, versions, inputs, outputs)
    response = messages()["ModelMetadataResponse"](
        name=data["name"], versions=data["versions"], platform=data["platform"]
    )
    for key in ("inputs", "outputs"):
        for tensor in data[key]:
            getattr(response, key).add(
                name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"]
            )
    return response


def server_metadata_response() -> Any:
    """A ``ServerMetadataResponse``: the agent's name and version (no protocol extensions)."""
    return messages()["ServerMetadataResponse"](name="edgepack-agent", version=edgepack.__version__)
