"""ONNX models from any exporter: checked, normalized and down-converted where a profile needs it.

Exporters (PyTorch, TensorFlow/Keras through tf2onnx, skl2onnx, onnx.helper) differ in what they
leave in a graph: local functions, opset imports no operator uses, external-data tensors (read in
by :mod:`edgepack.packager._sources`), symbolic or fixed batch dimensions (a fixed batch runs in
chunks of it: :mod:`edgepack.packager._batch`). :meth:`convert` inlines functions, keeps one
import per used domain, and runs onnx's version converter when the model's opset is above the
profile's; a model that cannot go down says why. Inputs map onto the
reference columns by name when each takes one column, else by position (``tensors`` layout in
:mod:`edgepack.packager._reference`), and the user states the names.

The source model for the parity gate is the ONNX file itself, run on this machine's onnxruntime.
"""

from __future__ import annotations

from typing import Any, ClassVar

import onnx
import onnxruntime as ort
import pandas as pd
from onnx import version_converter

from edgepack.formats.manifest import TensorSpec
from edgepack.packager._batch import check_batch, fixed_batch, run_batched
from edgepack.packager._converters import Prediction
from edgepack.packager._graph import (
    DEFAULT_DOMAIN,
    classify_family,
    inline_functions,
    normalize_opsets,
    opsets_of,
)
from edgepack.packager._reference import InputLayout, columns_layout, tensors_layout
from edgepack.packager.exceptions import ConversionError, ReferenceDataError

_ELEM: dict[int, str] = {
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

    def _inputs(self, obj: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
        initializers = {i.name for i in obj.graph.initializer}
        return [i for i in obj.graph.input if i.name not in initializers]

    def _per_column(self, obj: onnx.ModelProto) -> bool:
        """Each input takes one column (``[batch, 1]``), so inputs are named after columns."""
        inputs = self._inputs(obj)
        return len(inputs) > 1 and all(_dims(i)[1:] in ([1], []) for i in inputs)

    def feature_names(self, obj: onnx.ModelProto) -> list[str] | None:
        return [i.name for i in self._inputs(obj)] if self._per_column(obj) else None

    def layout(self, obj: onnx.ModelProto, frame: pd.DataFrame) -> InputLayout:
        inputs = self._inputs(obj)
        dtypes = {}
        for value in inputs:
            dtype = _ELEM.get(value.type.tensor_type.elem_type)
            if dtype not in ("float32", "int64", "string"):
                raise ReferenceDataError(
                    f"input {value.name!r} has type {dtype}; edgepack feeds float32, int64 or "
                    "string inputs"
                )
            dtypes[value.name] = dtype
        if self._per_column(obj):
            return self._checked(
                obj, columns_layout(frame, [i.name for i in inputs], dtypes), frame
            )
        if any(dtypes[i.name] == "string" for i in inputs):
            raise ReferenceDataError(
                "a string input that takes several columns is not supported; export one "
                "[batch, 1] input per column"
            )
        shapes = []
        for value in inputs:
            dims = _dims(value)
            if len(dims) < 2:
                raise ReferenceDataError(
                    f"input {value.name!r} has shape {dims}: edgepack needs a batch dimension "
                    "and at least one feature dimension"
                )
            shapes.append((value.name, dtypes[value.name], (None, *dims[1:])))
        return self._checked(obj, tensors_layout(frame, shapes), frame)

    def _checked(
        self, obj: onnx.ModelProto, layout: InputLayout, frame: pd.DataFrame
    ) -> InputLayout:
        """``layout``, once a fixed batch (if any) is known to be safe to run in padded chunks.

        Raises:
            UnsupportedModelError: it is not (edgepack.packager._batch.check_batch).
        """
        batch = fixed_batch(obj)
        if batch is not None:
            names = [o.name for o in obj.graph.output]
            check_batch(_session(obj), layout.feeds(frame.iloc[: 2 * batch]), batch, names)
        return layout

    def convert(
        self, obj: onnx.ModelProto, layout: InputLayout, opset: int, ml_opset: int
    ) -> onnx.ModelProto:
        model = onnx.ModelProto()
        model.CopyFrom(obj)
        model = inline_functions(model)
        normalize_opsets(model, opset)
        current = opsets_of(model)[DEFAULT_DOMAIN]
        if current > opset:
            try:
                model = version_converter.convert_version(model, opset)
                onnx.checker.check_model(model)
            except Exception as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ConversionError(
                    f"the model uses opset {current} and onnx's version converter cannot take "
                    f"it down to {opset}, the most this profile's onnxruntime runs ({first}); "
                    f"re-export it at opset {opset} or lower"
                ) from e
            normalize_opsets(model, opset)
        return model

    def predict(self, obj: onnx.ModelProto, layout: InputLayout, frame: pd.DataFrame) -> Prediction:
        # a graph with a fixed batch (say 1) runs one batch at a time (edgepack.packager._batch)
        outputs = run_batched(_session(obj), layout.feeds(frame), fixed_batch(obj))
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
