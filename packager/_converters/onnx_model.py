"""ONNX models: already converted; checked, down-converted if the profile needs an older opset.

The source model for the parity gate is the ONNX file itself, run on this machine's onnxruntime.
"""

from __future__ import annotations

from typing import Any, ClassVar

import onnx
import onnxruntime as ort
import pandas as pd
from onnx import version_converter

from edgepack.formats.manifest import TensorSpec
from edgepack.packager._converters import Prediction
from edgepack.packager._graph import DEFAULT_DOMAIN, classify_family, normalize_opsets, opsets_of
from edgepack.packager._reference import InputLayout, columns_layout, tensor_layout
from edgepack.packager.exceptions import ConversionError, ReferenceDataError

_ELEM = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.STRING: "string",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
}


def _dims(value: onnx.ValueInfoProto) -> list[int | None]:
    return [
        d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim
    ]


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


class OnnxConverter:
    """Accepts an ``onnx.ModelProto`` loaded from a ``.onnx`` file."""

    name: ClassVar[str] = "onnx"

    def accepts(self, obj: Any) -> bool:
        return isinstance(obj, onnx.ModelProto)

    def describe(self, obj: onnx.ModelProto) -> str:
        return f"ONNX model (producer {obj.producer_name or 'unknown'}, opset {opsets_of(obj)})"

    def task(self, obj: onnx.ModelProto) -> str:
        outputs = obj.graph.output
        if len(outputs) == 2:
            label, probs = outputs
            label_type = label.type.tensor_type.elem_type
            if (
                label_type in (onnx.TensorProto.INT64, onnx.TensorProto.STRING)
                and probs.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
                and len(_dims(probs)) == 2
            ):
                return "classification"
        return "tensor"

    def family(self, obj: onnx.ModelProto) -> str | None:
        return classify_family(obj)

    def class_labels(self, obj: onnx.ModelProto) -> list[Any]:
        return []

    def layout(self, obj: onnx.ModelProto, frame: pd.DataFrame) -> InputLayout:
        initializers = {i.name for i in obj.graph.initializer}
        inputs = [i for i in obj.graph.input if i.name not in initializers]
        if len(inputs) == 1 and len(_dims(inputs[0])) == 2:
            only = inputs[0]
            if _ELEM.get(only.type.tensor_type.elem_type) != "float32":
                raise ReferenceDataError(
                    f"input {only.name!r} is not float32; edgepack feeds 2-D inputs as float32"
                )
            n_features = _dims(only)[1]
            return tensor_layout(frame, None, n_features, input_name=only.name)
        dtypes = {}
        for value in inputs:
            dtype = _ELEM.get(value.type.tensor_type.elem_type)
            if dtype not in ("float32", "int64", "string"):
                raise ReferenceDataError(f"input {value.name!r} has unsupported type {dtype}")
            dtypes[value.name] = dtype
        return columns_layout(frame, [i.name for i in inputs], dtypes)

    def convert(
        self, obj: onnx.ModelProto, layout: InputLayout, opset: int, ml_opset: int
    ) -> onnx.ModelProto:
        model = onnx.ModelProto()
        model.CopyFrom(obj)
        normalize_opsets(model, opset)
        current = opsets_of(model)[DEFAULT_DOMAIN]
        if current > opset:
            try:
                model = version_converter.convert_version(model, opset)
            except Exception as e:
                raise ConversionError(
                    f"the model uses opset {current} and cannot be converted down to {opset} "
                    f"for this profile: {e}"
                ) from e
        return model

    def predict(self, obj: onnx.ModelProto, layout: InputLayout, frame: pd.DataFrame) -> Prediction:
        outputs = _session(obj).run(None, layout.feeds(frame))
        if self.task(obj) == "classification":
            return Prediction(labels=outputs[0], probabilities=outputs[1])
        return Prediction(tensors=tuple(outputs))


def tensor_specs(model: onnx.ModelProto, which: str) -> tuple[TensorSpec, ...]:
    """Output (or input) specs of a model as the manifest records them."""
    values = model.graph.output if which == "outputs" else model.graph.input
    specs = []
    for value in values:
        dtype = (
            _ELEM.get(value.type.tensor_type.elem_type)
            if value.type.HasField("tensor_type")
            else None
        )
        if dtype is None:
            raise ConversionError(
                f"model {which[:-1]} {value.name!r} is not a plain tensor of a supported type "
                "(a ZipMap or sequence output?); re-export classifiers with zipmap=False"
            )
        specs.append(TensorSpec(value.name, dtype, tuple(_dims(value))))
    return tuple(specs)
