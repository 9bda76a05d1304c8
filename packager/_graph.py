"""ONNX graph facts and fixes the builder needs, independent of where the model came from.

* :func:`normalize_opsets` repairs ``opset_import`` after conversion: skl2onnx lists the default
  domain twice for ``ai.onnx.ml``-only graphs (``quantize_dynamic`` then fails with "Failed to find
  proper ai.onnx domain") and onnxmltools' XGBoost output may lack it entirely. It also drops
  imports of domains no operator uses: onnxruntime's ``quant_pre_process`` adds nine of them
  (``ai.onnx.ml`` at opset 5 among them) to a plain neural network, which a profile's opset check
  would then refuse.
* :func:`inline_functions` expands a model's local ONNX functions (exporters emit them for
  custom blocks) into plain nodes, so quantizers and opset checks see every operator.
* :func:`dynamic_batch` gives outputs a dynamic first dimension where a converter declared a
  fixed one for a dynamic-batch input (onnxmltools declares a 3-class LightGBM ``label`` ``[1]``).
* :func:`classify_family` says whether a graph is a tree ensemble, a linear model or a neural
  network, which decides its precision under a profile's policy.
* :func:`check_limits` refuses a graph that needs a newer opset or IR version than a profile allows.
* :func:`repack_fp16` moves float16 initializers from varint ``int32_data`` to ``raw_data``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from edgepack.packager.exceptions import ConversionError

__all__ = [
    "DEFAULT_DOMAIN",
    "ML_DOMAIN",
    "check_limits",
    "classify_family",
    "dynamic_batch",
    "graph_ops",
    "inline_functions",
    "normalize_opsets",
    "opsets_of",
    "rename_inputs",
    "repack_fp16",
]

DEFAULT_DOMAIN = ""
ML_DOMAIN = "ai.onnx.ml"

_TREE_OPS = frozenset({"TreeEnsembleClassifier", "TreeEnsembleRegressor", "TreeEnsemble"})
_LINEAR_OPS = frozenset(
    {"LinearClassifier", "LinearRegressor", "SVMClassifier", "SVMRegressor", "Scaler", "Normalizer"}
)
_NEURAL_OPS = frozenset(
    {"MatMul", "Gemm", "Conv", "ConvTranspose", "LSTM", "GRU", "RNN", "Attention", "Einsum"}
)


def _walk(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _walk(attr.g)
            for sub in attr.graphs:
                yield from _walk(sub)


def graph_ops(model: onnx.ModelProto) -> set[str]:
    """Every operator type used in the model, subgraphs included."""
    return {node.op_type for node in _walk(model.graph)}


def opsets_of(model: onnx.ModelProto) -> dict[str, int]:
    """``{domain: version}`` of the model's (normalized) opset imports."""
    return {op.domain: op.version for op in model.opset_import}


def used_domains(model: onnx.ModelProto) -> set[str]:
    """Operator domains the graph, its subgraphs and its local functions use."""
    domains = {node.domain for node in _walk(model.graph)}
    for function in model.functions:
        domains.add(function.domain)
        domains |= {node.domain for node in function.node}
    return domains


def normalize_opsets(model: onnx.ModelProto, default_opset: int) -> onnx.ModelProto:
    """Leave exactly one ``opset_import`` per used domain, and always one for the default domain.

    Duplicates keep the highest version; imports of domains no operator uses are dropped. A
    missing default domain gets ``default_opset``. The model is changed in place and returned.
    """
    used = used_domains(model)
    versions: dict[str, int] = {}
    for op in model.opset_import:
        if op.domain in used or op.domain == DEFAULT_DOMAIN:
            versions[op.domain] = max(versions.get(op.domain, 0), op.version)
    versions.setdefault(DEFAULT_DOMAIN, default_opset)
    del model.opset_import[:]
    for domain in sorted(versions):
        model.opset_import.append(onnx.helper.make_opsetid(domain, versions[domain]))
    return model


def inline_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its local functions expanded into plain nodes (unchanged without any)."""
    if not model.functions:
        return model
    from onnx import inliner

    try:
        return inliner.inline_local_functions(model)
    except Exception as e:
        raise ConversionError(f"cannot inline the model's ONNX functions: {e}") from e


def dynamic_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """Make outputs' fixed first dimension dynamic when the first input's batch is dynamic.

    Changed in place and returned; a model with a fixed batch input is left alone.
    """
    weights = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    if not inputs:
        return model
    dims = inputs[0].type.tensor_type.shape.dim
    if not dims or dims[0].HasField("dim_value"):
        return model
    batch = dims[0].dim_param or "N"
    for output in model.graph.output:
        out_dims = output.type.tensor_type.shape.dim
        if out_dims and out_dims[0].HasField("dim_value"):
            out_dims[0].dim_param = batch  # clears dim_value (a oneof)
    return model


def classify_family(model: onnx.ModelProto) -> str:
    """``tree``, ``linear``, ``neural`` or ``other`` from the operators the graph uses.

    Trees win over everything: a scaler or a small MatMul in front of a tree ensemble does not
    make the model safe to quantize, and fp16 flips tree thresholds.
    """
    ops = graph_ops(model)
    if ops & _TREE_OPS:
        return "tree"
    if ops & _NEURAL_OPS:
        return "neural"
    if ops & _LINEAR_OPS:
        return "linear"
    return "other"


def check_limits(model: onnx.ModelProto, max_opset: int, max_ml_opset: int, max_ir: int) -> None:
    """Raise :class:`ConversionError` if the model needs more than the profile's runtime offers."""
    opsets = opsets_of(model)
    if opsets.get(DEFAULT_DOMAIN, 0) > max_opset:
        raise ConversionError(
            f"model uses opset {opsets[DEFAULT_DOMAIN]} but the profile allows at most "
            f"{max_opset}; "
            "re-export the model with a lower opset or use a profile with a newer onnxruntime"
        )
    if opsets.get(ML_DOMAIN, 0) > max_ml_opset:
        raise ConversionError(
            f"model uses ai.onnx.ml opset {opsets[ML_DOMAIN]} but the profile allows at most "
            f"{max_ml_opset}"
        )
    if model.ir_version > max_ir:
        raise ConversionError(
            f"model has IR version {model.ir_version} but the profile allows at most {max_ir}"
        )


def rename_inputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """Give the graph's inputs ``names`` (in order), rewiring every node that reads them."""
    inputs = [
        i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}
    ]
    if len(inputs) != len(names):
        raise ConversionError(f"converter made {len(inputs)} inputs for {len(names)} columns")
    mapping = {
        value.name: new for value, new in zip(inputs, names, strict=True) if value.name != new
    }
    if not mapping:
        return model
    for value in inputs:
        value.name = mapping.get(value.name, value.name)
    for node in _walk(model.graph):
        node.input[:] = [mapping.get(name, name) for name in node.input]
    return model


def repack_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Store float16 initializers as ``raw_data`` (2 bytes each, not a varint per value)."""

    def fix(tensor: TensorProto) -> None:
        if tensor.data_type == TensorProto.FLOAT16 and len(tensor.int32_data):
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))

    for tensor in model.graph.initializer:
        fix(tensor)
    for node in _walk(model.graph):
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                fix(attr.t)
    return model


def as_float32(array: np.ndarray) -> np.ndarray:
    """Contiguous float32 copy (the dtype onnxruntime's float inputs want)."""
    return np.ascontiguousarray(array, dtype=np.float32)
