"""The parity gate: does the packaged model still say what the source model says?

The builder runs the source model (scikit-learn, LightGBM, XGBoost, or the original ONNX file)
and the packaged model (after conversion and quantization) on held-out reference rows, and
:func:`compare` measures:

* classification: label agreement (share of rows with the same class) and the largest absolute
  probability error over all rows and classes;
* regression and plain tensors: the largest absolute error, and that error relative to the
  range of the source's outputs (a 0.5 error matters on a 0–1 target, not on 25–346).

A profile's tolerance for the precision decides pass or fail; a failure lists the worst rows so
the report shows where the models diverged. The numbers go into the bundle's manifest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgepack.packager._converters import Prediction
from edgepack.packager._profiles import Tolerance

__all__ = ["ParityResult", "compare", "packaged_prediction"]

_WORST = 5


@dataclass(frozen=True)
class ParityResult:
    """Outcome of the gate: metrics for the manifest, failures in words, the worst rows."""

    passed: bool
    metrics: dict[str, Any]
    failures: tuple[str, ...] = ()
    worst_rows: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    def summary(self) -> str:
        """A short human line: the metric that matters for the task."""
        m = self.metrics
        if "label_agreement" in m:
            text = f"labels {m['label_agreement']:.2%}"
            if m.get("max_probability_error") is not None:
                text += f", Δp {m['max_probability_error']:.1e}"
            return text
        return f"Δ {m['max_absolute_error']:.2g} ({m['max_relative_error']:.1e} of range)"


def packaged_prediction(task: str, outputs: Sequence[np.ndarray]) -> Prediction:
    """Interpret onnxruntime outputs of a packaged model (label, probabilities / values)."""
    if task == "classification":
        probabilities = outputs[1] if len(outputs) > 1 else None
        return Prediction(labels=np.asarray(outputs[0]).ravel(), probabilities=probabilities)
    if task == "regression":
        return Prediction(values=np.asarray(outputs[0], dtype=np.float64))
    return Prediction(tensors=tuple(np.asarray(o) for o in outputs))


def _as_text(labels: np.ndarray) -> np.ndarray:
    flat = np.asarray(labels).ravel()
    if flat.dtype.kind == "f" and np.all(np.mod(flat, 1) == 0):
        flat = flat.astype(np.int64)  # 1.0 and 1 are the same class
    return flat.astype(str)


def _numeric(
    source: np.ndarray, packaged: np.ndarray, name: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    src = np.asarray(source, dtype=np.float64).reshape(len(source), -1)
    pkg = np.asarray(packaged, dtype=np.float64).reshape(len(packaged), -1)
    if src.shape != pkg.shape:
        raise ValueError(f"{name}: source shape {src.shape} vs packaged {pkg.shape}")
    diff = np.abs(src - pkg)
    finite = np.isfinite(src)
    value_range = float(np.ptp(src[finite])) if finite.any() else 0.0
    scale = value_range if value_range > 0 else max(float(np.abs(src[finite]).max(initial=0)), 1.0)
    diff = np.where(np.isnan(diff) & ~(np.isnan(src) & np.isnan(pkg)), np.inf, np.nan_to_num(diff))
    per_row = diff.max(axis=1)
    worst = np.argsort(-per_row, kind="stable")[:_WORST]
    rows = [
        {
            "row": int(i),
            "source": src[i].tolist(),
            "packaged": pkg[i].tolist(),
            "error": float(per_row[i]),
        }
        for i in worst
        if per_row[i] > 0
    ]
    max_abs = float(diff.max()) if diff.size else 0.0
    return {
        "max_absolute_error": max_abs,
        "max_relative_error": max_abs / scale,
        "mean_absolute_error": float(diff.mean()) if diff.size else 0.0,
        "output_range": value_range,
    }, rows


def compare(
    task: str, source: Prediction, packaged: Prediction, tolerance: Tolerance
) -> ParityResult:
    """Measure how far ``packaged`` is from ``source`` and gate on ``tolerance``.

    Shape mismatches between the two are a failure, not an exception.
    """
    failures: list[str] = []
    worst: list[dict[str, Any]] = []
    metrics: dict[str, Any]
    try:
        if task == "classification":
            if source.labels is None or packaged.labels is None:
                raise ValueError("labels: a model gave no class labels")
            src, pkg = _as_text(source.labels), _as_text(packaged.labels)
            if src.shape != pkg.shape:
                raise ValueError(f"labels: source shape {src.shape} vs packaged {pkg.shape}")
            same = src == pkg
            metrics = {
                "rows": len(src),
                "label_agreement": float(same.mean()),
                "label_mismatches": int((~same).sum()),
                "max_probability_error": None,
            }
            if not same.all():
                worst += [
                    {"row": int(i), "source": src[i], "packaged": pkg[i]}
                    for i in np.flatnonzero(~same)[:_WORST]
                ]
            if metrics["label_agreement"] < tolerance.min_label_agreement:
                failures.append(
                    f"label agreement {metrics['label_agreement']:.4%} is below the required "
                    f"{tolerance.min_label_agreement:.4%} ({metrics['label_mismatches']} of "
                    f"{len(src)} rows differ)"
                )
            if source.probabilities is not None and packaged.probabilities is not None:
                prob, prob_rows = _numeric(
                    source.probabilities, packaged.probabilities, "probabilities"
                )
                metrics["max_probability_error"] = prob["max_absolute_error"]
                if prob["max_absolute_error"] > tolerance.max_probability_error:
                    failures.append(
                        f"probabilities differ by up to {prob['max_absolute_error']:.3g}, above "
                        "the "
                        f"allowed {tolerance.max_probability_error:.3g}"
                    )
                    worst += prob_rows
        else:
            pairs = (
                [(source.values, packaged.values)]
                if task == "regression"
                else list(zip(source.tensors, packaged.tensors, strict=True))
            )
            metrics = {"rows": 0, "max_absolute_error": 0.0, "max_relative_error": 0.0}
            for index, (src_values, pkg_values) in enumerate(pairs):
                if src_values is None or pkg_values is None:
                    raise ValueError(f"output {index}: a model gave no values")
                one, rows = _numeric(src_values, pkg_values, f"output {index}")
                metrics["rows"] = len(src_values)
                if one["max_relative_error"] >= metrics["max_relative_error"]:
                    metrics.update(one)
                    worst = rows
            if metrics["max_relative_error"] > tolerance.max_relative_error:
                failures.append(
                    f"outputs differ by up to {metrics['max_absolute_error']:.4g} "
                    f"({metrics['max_relative_error']:.3%} of the output range "
                    f"{metrics.get('output_range', 0):.4g}), above the allowed "
                    f"{tolerance.max_relative_error:.3%}"
                )
    except ValueError as e:
        return ParityResult(False, {"error": str(e)}, (str(e),))
    return ParityResult(not failures, metrics, tuple(failures), tuple(worst))
