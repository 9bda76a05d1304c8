"""The parity gate's arithmetic: metrics, pass/fail against a tolerance, worst rows."""

from __future__ import annotations

import numpy as np
import pytest

from edgepack.packager._converters import Prediction
from edgepack.packager._parity import compare
from edgepack.packager._profiles import Tolerance

STRICT = Tolerance(min_label_agreement=0.99, max_probability_error=0.01, max_relative_error=0.01)


def _probs(n: int, seed: int = 0) -> np.ndarray:
    raw = np.random.default_rng(seed).random((n, 3))
    return raw / raw.sum(axis=1, keepdims=True)


def test_identical_classification_passes_with_exact_metrics() -> None:
    p = _probs(200)
    labels = p.argmax(axis=1)
    result = compare(
        "classification", Prediction(labels, p), Prediction(labels, p.astype(np.float32)), STRICT
    )
    assert result.passed
    assert result.metrics["label_agreement"] == 1.0
    assert result.metrics["max_probability_error"] < 1e-7


def test_flipped_labels_fail_and_name_the_rows() -> None:
    p = _probs(200)
    labels = p.argmax(axis=1)
    flipped = labels.copy()
    flipped[[3, 50, 199]] = (flipped[[3, 50, 199]] + 1) % 3
    result = compare("classification", Prediction(labels, p), Prediction(flipped, p), STRICT)
    assert not result.passed
    assert result.metrics["label_mismatches"] == 3
    assert result.metrics["label_agreement"] == pytest.approx(197 / 200)
    assert [row["row"] for row in result.worst_rows] == [3, 50, 199]
    assert "3 of 200 rows differ" in result.failures[0]


def test_probability_error_above_tolerance_fails() -> None:
    p = _probs(100)
    q = p.copy()
    q[10] += [0.05, -0.05, 0.0]
    result = compare(
        "classification", Prediction(p.argmax(1), p), Prediction(p.argmax(1), q), STRICT
    )
    assert not result.passed
    assert result.metrics["max_probability_error"] == pytest.approx(0.05)
    assert result.worst_rows[0]["row"] == 10


def test_string_and_float_labels_compare_by_class() -> None:
    p = _probs(4)
    source = Prediction(np.array([1.0, 2.0, 0.0, 1.0]), p)
    packaged = Prediction(np.array([1, 2, 0, 1], dtype=np.int64), p)
    assert compare("classification", source, packaged, STRICT).passed


def test_regression_error_is_relative_to_the_output_range() -> None:
    y = np.linspace(25, 346, 500)
    off = y.copy()
    off[7] += 14.0  # the GradientBoosting-in-fp16 failure from the issue: 14 on a 321 range
    result = compare("regression", Prediction(values=y), Prediction(values=off), STRICT)
    assert not result.passed
    assert result.metrics["max_absolute_error"] == pytest.approx(14.0)
    assert result.metrics["max_relative_error"] == pytest.approx(14.0 / 321.0)
    assert result.worst_rows[0]["row"] == 7
    small = y + 0.5  # 0.16% of the range: within 1%
    assert compare("regression", Prediction(values=y), Prediction(values=small), STRICT).passed


def test_nan_in_packaged_output_fails() -> None:
    y = np.linspace(0, 1, 10)
    bad = y.copy()
    bad[4] = np.nan
    result = compare("regression", Prediction(values=y), Prediction(values=bad), STRICT)
    assert not result.passed
    assert result.worst_rows[0]["row"] == 4


def test_shape_mismatch_is_a_failure_not_a_crash() -> None:
    p = _probs(5)
    result = compare(
        "classification", Prediction(p.argmax(1), p), Prediction(p.argmax(1)[:4], p), STRICT
    )
    assert not result.passed
    assert "shape" in result.failures[0]


def test_tied_top_classes_in_the_source_are_not_disagreements() -> None:
    p = _probs(300)
    p[:5] = [0.5, 0.5, 0.0]  # a 20-tree forest voting 10/10
    source = Prediction(p.argmax(1), p)
    flipped = p.argmax(1).copy()
    flipped[:5] = 1  # the packaged model picks the other tied class
    result = compare("classification", source, Prediction(flipped, p), STRICT, classes=[0, 1, 2])
    assert result.passed
    assert result.metrics["tied_rows"] == 5
    assert result.metrics["label_agreement"] == 1.0
    wrong = flipped.copy()
    wrong[:5] = 2  # not one of the tied classes: a real disagreement
    result = compare("classification", source, Prediction(wrong, p), STRICT, classes=[0, 1, 2])
    assert not result.passed


def test_quantized_candidates_are_gated_on_the_99th_percentile() -> None:
    y = np.linspace(0, 100, 1000)
    off = y.copy()
    off[3] += 30.0  # one row in a thousand far off: the maximum fails, the p99 passes
    tolerance = Tolerance(0.995, 0.02, 0.01)
    on_max = compare("regression", Prediction(values=y), Prediction(values=off), tolerance)
    on_p99 = compare(
        "regression", Prediction(values=y), Prediction(values=off), tolerance, statistic="p99"
    )
    assert not on_max.passed
    assert on_p99.passed
    assert on_p99.metrics["max_relative_error"] == pytest.approx(0.3)  # still reported
    assert on_p99.metrics["gated_on"] == "p99"
    off[:20] += 5.0  # 2% of rows off by 5% of the range: the p99 fails too
    assert not compare(
        "regression", Prediction(values=y), Prediction(values=off), tolerance, statistic="p99"
    ).passed
