"""The parity gate: does the packaged model still say what the source model says?

The builder runs the source model (scikit-learn, LightGBM, XGBoost, or the original ONNX file)
and the packaged model (after conversion and quantization) on held-out reference rows, and
:func:`compare` measures:

* classification: label agreement (share of rows with the same class) and the absolute
  probability error per row (the largest over its classes), reported as its 99th percentile and
  its maximum. A row where the source model's top classes tie exactly (a 20-tree forest voting
  10/10) agrees whenever the packaged model picks any of the tied classes: both are right;
* anomaly detection: label agreement (inlier/outlier) and the score's error relative to the
  range of the source's scores;
* regression and plain tensors: the absolute error per row, and that error relative to the
  range of the source's outputs (a 0.5 error matters on a 0–1 target, not on 25–346), at the
  99th percentile and at the maximum.

A profile's tolerance for the precision decides pass or fail, on the statistic the builder asks
for: ``max`` for fp32 (a float32 conversion must be right on every row; one flipped tree split
is a bug), ``p99`` for quantized candidates (int8 and fp16 trade a little accuracy on a few rows
by design; the maximum is still reported). A failure lists the worst rows so the report shows
where the models diverged. The numbers go into the bundle's manifest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgepack.packager._converters import Prediction
from edgepack.packager._profiles import Tolerance

__all__ = ["MIN_PARITY_ROWS", "ParityResult", "compare", "packaged_prediction"]

_WORST = 5
STATISTICS = ("max", "p99")
# With fewer held-out rows a 99.5% label agreement or a 99th percentile means little.
MIN_PARITY_ROWS = 200
# Probabilities within this of the top one count as tied (float64 sums of votes or leaves).
_TIE = 1e-9


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
        if "error" in m:
            return str(m["error"])
        text = ""
        if "label_agreement" in m:
            text = f"labels {m['label_agreement']:.2%}"
            if m.get("max_probability_error") is not None:
                text += f", Δp p99 {m['p99_probability_error']:.1e}"
                text += f" max {m['max_probability_error']:.1e}"
            if "max_relative_error" not in m:
                return text
            text += ", "
        return text + (
            f"Δ p99 {m['p99_relative_error']:.1e} max {m['max_relative_error']:.1e} of range"
        )


def packaged_prediction(task: str, outputs: Sequence[np.ndarray]) -> Prediction:
    """Interpret onnxruntime outputs of a packaged model (label, probabilities / values)."""
    if task == "classification":
        probabilities = outputs[1] if len(outputs) > 1 else None
        return Prediction(labels=np.asarray(outputs[0]).ravel(), probabilities=probabilities)
    if task == "regression":
        return Prediction(values=np.asarray(outputs[0], dtype=np.float64))
    if task == "anomaly":
        return Prediction(
            labels=np.asarray(outputs[0]).ravel(),
            values=np.asarray(outputs[1], dtype=np.float64).ravel(),
        )
    return Prediction(tensors=tuple(np.asarray(o) for o in outputs))


def _as_text(labels: Any) -> np.ndarray:
    flat = np.asarray(labels).ravel()
    if flat.dtype.kind == "f" and np.all(np.mod(flat, 1) == 0):
        flat = flat.astype(np.int64)  # 1.0 and 1 are the same class
    return flat.astype(str)


def _numeric(
    source: np.ndarray, packaged: np.ndarray, name: str
) -> tuple[dict[str, Any], np.ndarray, list[dict[str, Any]]]:
    """Error metrics of one output, the per-row error, and the worst rows."""
    src = np.asarray(source, dtype=np.float64).reshape(len(source), -1)
    pkg = np.asarray(packaged, dtype=np.float64).reshape(len(packaged), -1)
    if src.shape != pkg.shape:
        raise ValueError(f"{name}: source shape {src.shape} vs packaged {pkg.shape}")
    diff = np.abs(src - pkg)
    finite = np.isfinite(src)
    value_range = float(np.ptp(src[finite])) if finite.any() else 0.0
    scale = value_range if value_range > 0 else max(float(np.abs(src[finite]).max(initial=0)), 1.0)
    diff = np.where(np.isnan(diff) & ~(np.isnan(src) & np.isnan(pkg)), np.inf, np.nan_to_num(diff))
    per_row = diff.max(axis=1) if diff.size else np.zeros(len(src))
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
    max_abs = float(per_row.max()) if per_row.size else 0.0
    p99_abs = float(np.quantile(per_row, 0.99, method="higher")) if per_row.size else 0.0
    return (
        {
            "max_absolute_error": max_abs,
            "p99_absolute_error": p99_abs,
            "max_relative_error": max_abs / scale,
            "p99_relative_error": p99_abs / scale,
            "mean_absolute_error": float(diff.mean()) if diff.size else 0.0,
            "output_range": value_range,
        },
        per_row,
        rows,
    )


def _tied(probabilities: np.ndarray | None, classes: Sequence[Any], n: int) -> list[set[str]]:
    """Per row, the classes tied for the source's top probability (empty: no tie)."""
    if probabilities is None:
        return [set() for _ in range(n)]
    p = np.asarray(probabilities, dtype=np.float64).reshape(n, -1)
    names = _as_text(np.asarray(list(classes))) if len(classes) == p.shape[1] else None
    if names is None:
        names = np.arange(p.shape[1]).astype(str)
    top = p.max(axis=1, keepdims=True)
    close = p >= top - _TIE
    return [set(names[row]) if row.sum() > 1 else set() for row in close]


def _labels(
    source: Prediction,
    packaged: Prediction,
    tolerance: Tolerance,
    classes: Sequence[Any],
    failures: list[str],
    worst: list[dict[str, Any]],
) -> dict[str, Any]:
    if source.labels is None or packaged.labels is None:
        raise ValueError("labels: a model gave no class labels")
    src, pkg = _as_text(source.labels), _as_text(packaged.labels)
    if src.shape != pkg.shape:
        raise ValueError(f"labels: source shape {src.shape} vs packaged {pkg.shape}")
    ties = _tied(source.probabilities, classes, len(src))
    same = (src == pkg) | np.array([p in t for p, t in zip(pkg, ties, strict=True)], dtype=bool)
    metrics = {
        "rows": len(src),
        "label_agreement": float(same.mean()) if len(same) else 1.0,
        "label_mismatches": int((~same).sum()),
        "tied_rows": sum(1 for t in ties if t),
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
    return metrics


def compare(
    task: str,
    source: Prediction,
    packaged: Prediction,
    tolerance: Tolerance,
    *,
    statistic: str = "max",
    classes: Sequence[Any] = (),
) -> ParityResult:
    """Measure how far ``packaged`` is from ``source`` and gate on ``tolerance``.

    Args:
        task: ``classification``, ``regression``, ``anomaly`` or ``tensor``.
        source: the source model's prediction on the held-out rows.
        packaged: the packaged model's prediction on the same rows.
        tolerance: the profile's bounds for the packaged precision.
        statistic: which per-row error the bounds apply to, ``max`` or ``p99``.
        classes: the class labels in the order of the probability columns (for ties).

    Shape mismatches between the two are a failure, not an exception.
    """
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}; expected one of {STATISTICS}")
    failures: list[str] = []
    worst: list[dict[str, Any]] = []
    metrics: dict[str, Any]
    gated = "max" if statistic == "max" else "p99"
    try:
        if task == "classification":
            metrics = _labels(source, packaged, tolerance, classes, failures, worst)
            metrics["max_probability_error"] = None
            if source.probabilities is not None and packaged.probabilities is not None:
                prob, _, prob_rows = _numeric(
                    source.probabilities, packaged.probabilities, "probabilities"
                )
                metrics["max_probability_error"] = prob["max_absolute_error"]
                metrics["p99_probability_error"] = prob["p99_absolute_error"]
                error = prob[f"{gated}_absolute_error"]
                if error > tolerance.max_probability_error:
                    failures.append(
                        f"probabilities differ by up to {prob['max_absolute_error']:.3g} "
                        f"(99th percentile {prob['p99_absolute_error']:.3g}), above the allowed "
                        f"{tolerance.max_probability_error:.3g}"
                        + (" at the 99th percentile" if gated == "p99" else "")
                    )
                    worst += prob_rows
        else:
            if task == "anomaly":
                metrics = _labels(source, packaged, tolerance, (), failures, worst)
                pairs = [(source.values, packaged.values)]
            else:
                metrics = {"rows": 0}
                pairs = (
                    [(source.values, packaged.values)]
                    if task == "regression"
                    else list(zip(source.tensors, packaged.tensors, strict=True))
                )
            best: dict[str, Any] = {"max_relative_error": -1.0}
            numeric_worst: list[dict[str, Any]] = []
            for index, (src_values, pkg_values) in enumerate(pairs):
                if src_values is None or pkg_values is None:
                    raise ValueError(f"output {index}: a model gave no values")
                one, _, rows = _numeric(src_values, pkg_values, f"output {index}")
                metrics["rows"] = len(src_values)
                if one[f"{gated}_relative_error"] >= best.get(f"{gated}_relative_error", -1.0):
                    best = one
                    numeric_worst = rows
            metrics.update(best)
            error = metrics[f"{gated}_relative_error"]
            if error > tolerance.max_relative_error:
                failures.append(
                    f"outputs differ by up to {metrics['max_absolute_error']:.4g} "
                    f"({metrics['max_relative_error']:.3%} of the output range "
                    f"{metrics.get('output_range', 0):.4g}; 99th percentile "
                    f"{metrics['p99_relative_error']:.3%}), above the allowed "
                    f"{tolerance.max_relative_error:.3%}"
                    + (" at the 99th percentile" if gated == "p99" else "")
                )
                worst = worst + numeric_worst
    except ValueError as e:
        return ParityResult(False, {"error": str(e)}, (str(e),))
    metrics["gated_on"] = gated
    return ParityResult(not failures, metrics, tuple(failures), tuple(worst))
