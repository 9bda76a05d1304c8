"""Make one candidate of a converted model: fp32 graph-optimized, int8 quantized, fp16 or mixed.

Which candidates a profile tries, and which one ships, is decided by measurement in
:mod:`edgepack.packager._precision`; this module only makes them. ``fp32-opt`` is onnxruntime's
offline basic-level optimization (constant folding, redundant-node elimination: standard ONNX
operators only, valid for every execution provider). For int8 the graph first
goes through ``quant_pre_process`` (shape inference and fusions), then static QDQ quantization
calibrated on reference rows when the profile asks for it and rows exist (a row a step, or one
fixed batch for a model whose batch is fixed), else dynamic quantization. fp16 uses
``onnxruntime.transformers.float16`` with float32 inputs and outputs kept, then stores the fp16
weights as ``raw_data``; *mixed* keeps the numerically sensitive operators (softmax,
normalizations, exponentials, reductions) and the first and last weight-bearing layers in fp32.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgepack.packager._graph import ML_DOMAIN, normalize_opsets, opsets_of, repack_fp16
from edgepack.packager._profiles import Quantization
from edgepack.packager.exceptions import OptimizationError, short_error

__all__ = ["Optimized", "graph_optimize", "optimize"]

log = logging.getLogger(__name__)

# Only the weight-bearing operators: quantizing the activation/softmax tail of converted
# scikit-learn MLPs fails inside onnxruntime and buys nothing.
_QUANTIZED_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
# After quant_pre_process, tensors fed by ai.onnx.ml operators lose their inferred type; they are
# float. Only MatMuls with a constant weight are worth quantizing.
# QDQDisableWeightAdjustForInt32Bias: onnxruntime 1.32's bias-scale adjustment crashes on
# per-channel MatMul weights ("truth value of an array is ambiguous").
_EXTRA_OPTIONS = {
    "MatMulConstBOnly": True,
    "DefaultTensorType": onnx.TensorProto.FLOAT,
    "QDQDisableWeightAdjustForInt32Bias": True,
}


@dataclass(frozen=True)
class Optimized:
    """The model to ship and what was done to it."""

    model: onnx.ModelProto
    precision: str
    quantization: dict[str, Any] | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


class _Reader:
    """onnxruntime's CalibrationDataReader over a list of feed dicts (one row per feed)."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._iter: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization logs type-inference chatter on the root logger and prints its
    histogram settings to stdout; hide the first and send the second to our log."""
    import onnxruntime as ort

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    ort.set_default_logger_severity(3)  # "removing unused initializer" warnings from pre-process
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        root.setLevel(level)
        ort.set_default_logger_severity(2)
        if printed.getvalue().strip():
            log.info("onnxruntime.quantization: %s", " ".join(printed.getvalue().split()))


def _steps(feeds: dict[str, np.ndarray], batch: int) -> list[dict[str, np.ndarray]]:
    """Calibration feeds of ``batch`` rows each (a fixed-batch model's last one padded)."""
    n = len(next(iter(feeds.values())))
    steps = []
    for start in range(0, n, batch):
        step = {}
        for k, v in feeds.items():
            part = v[start : start + batch]
            if len(part) < batch:  # copies of the last row, as edgepack.packager._batch pads
                part = np.concatenate([part, np.repeat(part[-1:], batch - len(part), axis=0)])
            step[k] = part
        steps.append(step)
    return steps


def _quantize(
    model: onnx.ModelProto,
    settings: Quantization,
    calibration: dict[str, np.ndarray] | None,
    batch: int,
) -> Optimized:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    static = settings.mode == "static" and calibration is not None
    notes = []
    if settings.mode == "static" and calibration is None:
        notes.append("no reference rows for calibration: used dynamic int8 quantization")
    default_opset = opsets_of(model).get("", 17)
    with tempfile.TemporaryDirectory(prefix="edgepack-quant-") as tmp, _quiet_root_logger():
        src, pre, out = Path(tmp, "in.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "out.onnx")
        onnx.save(model, src)
        if any(op.domain == ML_DOMAIN for op in model.opset_import):
            # After pre-processing, tensors fed by ai.onnx.ml operators (skl2onnx pipelines) lose
            # their types, and the quantizer then leaves every activation in float.
            pre = src
        else:
            try:
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            except Exception as e:  # noqa: BLE001 - pre-processing is an optimization
                log.warning("quant_pre_process failed (%s); quantizing the model as converted", e)
                notes.append(f"quant_pre_process skipped: {e}")
                pre = src
        try:
            if static:
                assert calibration is not None
                quantize_static(
                    str(pre),
                    str(out),
                    _Reader(_steps(calibration, batch)),
                    quant_format=QuantFormat.QDQ
                    if settings.format == "qdq"
                    else QuantFormat.QOperator,
                    activation_type=types[settings.activation_type],
                    weight_type=types[settings.weight_type],
                    per_channel=settings.per_channel,
                    reduce_range=settings.reduce_range,
                    calibrate_method=methods[settings.calibration_method],
                    op_types_to_quantize=list(_QUANTIZED_OPS),
                    extra_options=_EXTRA_OPTIONS,
                )
            else:
                quantize_dynamic(
                    str(pre),
                    str(out),
                    weight_type=types[settings.weight_type],
                    per_channel=settings.per_channel,
                    reduce_range=settings.reduce_range,
                    op_types_to_quantize=list(_QUANTIZED_OPS),
                )
            quantized = onnx.load(out)
        except Exception as e:
            raise OptimizationError(f"int8 quantization failed: {short_error(e)}") from e
    normalize_opsets(quantized, default_opset)
    used = {
        "mode": "static" if static else "dynamic",
        "format": settings.format if static else "qoperator",
        "weight_type": settings.weight_type,
        "activation_type": settings.activation_type if static else "uint8 (dynamic)",
        "per_channel": settings.per_channel,
        "reduce_range": settings.reduce_range,
        "calibration_method": settings.calibration_method if static else None,
        "calibration_rows": len(next(iter(calibration.values()))) if static and calibration else 0,
    }
    return Optimized(quantized, "int8", used, tuple(notes))


_SENSITIVE_OPS = (
    "Softmax", "LogSoftmax", "LayerNormalization", "BatchNormalization", "InstanceNormalization",
    "Exp", "Log", "Pow", "Sqrt", "ReduceMean", "ReduceSum", "ReduceL2", "Sigmoid", "Erf",
)  # fmt: skip


def _fp16(model: onnx.ModelProto, *, mixed: bool = False) -> Optimized:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    # Concat joining an fp32 branch (e.g. a OneHotEncoder, kept fp32) with an fp16 one gets mixed
    # input types; keeping Concat in fp32 makes the converter insert casts.
    op_block = [*DEFAULT_OP_BLOCK_LIST, "Concat"]
    node_block: list[str] = []
    if mixed:
        op_block += list(_SENSITIVE_OPS)
        weighted = [n.name for n in model.graph.node if n.op_type in _QUANTIZED_OPS and n.name]
        node_block = list(dict.fromkeys(weighted[:1] + weighted[-1:]))
    try:
        converted = convert_float_to_float16(
            model, keep_io_types=True, op_block_list=op_block, node_block_list=node_block
        )
    except Exception as e:
        raise OptimizationError(f"fp16 conversion failed: {short_error(e)}") from e
    used: dict[str, Any] = {"keep_io_types": True}
    if mixed:
        used |= {"mixed": True, "fp32_ops": sorted(_SENSITIVE_OPS), "fp32_nodes": node_block}
    return Optimized(repack_fp16(converted), "fp16", used)


def graph_optimize(model: onnx.ModelProto) -> Optimized:
    """onnxruntime's basic (provider-independent) graph optimizations, saved as a plain model.

    Raises:
        OptimizationError: onnxruntime could not load or save the model.
    """
    import onnxruntime as ort

    default_opset = opsets_of(model).get("", 17)
    with tempfile.TemporaryDirectory(prefix="edgepack-opt-") as tmp:
        out = Path(tmp, "optimized.onnx")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(out)
        try:
            ort.InferenceSession(
                model.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
            optimized = onnx.load(out)
        except Exception as e:
            raise OptimizationError(f"graph optimization failed: {short_error(e)}") from e
    optimized.ir_version = min(optimized.ir_version, model.ir_version)
    return Optimized(normalize_opsets(optimized, default_opset), "fp32", {"graph": "basic"})


def optimize(
    model: onnx.ModelProto,
    precision: str,
    settings: Quantization,
    calibration: dict[str, np.ndarray] | None,
    *,
    mixed: bool = False,
    batch: int = 1,
) -> Optimized:
    """Return the model at ``precision`` (``fp32`` returns it unchanged).

    Args:
        model: the converted fp32 model.
        precision: ``fp32``, ``int8`` or ``fp16``.
        settings: the quantization parameters of this candidate.
        calibration: onnxruntime feeds of the calibration rows (``None`` without reference data).
        mixed: for fp16, keep sensitive operators and the first and last layers in fp32.
        batch: rows per calibration step: 1, or the model's fixed batch.

    Raises:
        OptimizationError: the quantizer or fp16 converter failed; the message says which.
    """
    if precision == "fp32":
        return Optimized(model, "fp32")
    if precision == "int8":
        return _quantize(model, settings, calibration, batch)
    if precision == "fp16":
        return _fp16(model, mixed=mixed)
    raise ValueError(f"unknown precision {precision!r}")
