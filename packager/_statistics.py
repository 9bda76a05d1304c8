"""Reference statistics for on-device drift detection (the bundle's ``reference.json``).

The reference rows are split in two halves: ``numpy.random.default_rng(1).permutation(rows)``,
first half and second half. The first half defines the reference:

* each numeric feature: quantile bin edges (inner edges; the outer bins are open-ended; a value
  equal to an edge goes right) and the reference count in each bin, aiming for 25–50 reference
  rows per bin, at most 10 bins;
* each categorical feature: the top-K categories with their counts, plus an "other" count;
* the model's output: class counts (classification) or quantile bins of the prediction.

The second half is held out to calibrate, per monitored column and per device window size, the
thresholds of the binned-KS statistic and of PSI by bootstrap
(:func:`edgepack.formats.drift.calibrate_windows`: every window size of a column in one numpy
draw), at the Bonferroni-corrected quantile ``1 - alpha / (2 * columns)`` (two statistics per
column). Each column has its own random stream, seeded from its index (features in order, then
the output), so identical inputs give identical thresholds and columns are independent; columns
run on threads. The device counts live windows into the same bins and compares
(edgepack.formats.drift). The result is a :class:`~edgepack.formats.reference.Reference`,
written into the bundle by :func:`~edgepack.formats.reference.reference_json`, the file's one
owner; the format is in ``docs/bundle-format.md`` §5.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd

from edgepack.formats.drift import (
    STRONG,
    FeatureBins,
    calibrate_windows,
    reconstruction_errors,
    standardized,
    strong_threshold,
    union_thresholds,
)
from edgepack.formats.reference import (
    REFERENCE_FORMAT_VERSION,
    Calibration,
    ColumnKind,
    ColumnReference,
    Multivariate,
    MultivariateThresholds,
    Persistence,
    Reference,
    Thresholds,
    reference_json,
)
from edgepack.packager._converters import Prediction
from edgepack.packager._reference import InputLayout

__all__ = [
    "REFERENCE_FORMAT_VERSION",
    "WINDOW_SIZES",
    "reference_json",
    "reference_statistics",
    "to_json",
]

MAX_BINS = 10
MIN_PER_BIN = 25
TOP_K = 20
WINDOW_SIZES = (100, 250, 500, 1000)
ALPHA = 0.01  # false alarms per window over all tests (columns and multivariate statistics)
DRAWS = 20_000  # bootstrap windows per column and size, at least
MIN_EXCEEDANCES = 10  # per test: more draws when there are many tests
MAX_DRAWS = 40_000  # beyond: the family's rate still rests on ALPHA / 3 * 40,000 exceedances
PERSISTENCE = Persistence(alarms=2, of_windows=3)
CALIBRATION_SEED = 10  # with the column's index: one bootstrap stream per column
MULTIVARIATE_SEED = 11
# the multivariate level's shares of reconstruction error, T² and axis shift: the axis shift,
# the test of correlated features moving together, gets two thirds; T² (a shift in any
# direction) and the reconstruction error (broken correlations) a sixth each
MULTIVARIATE_WEIGHTS = (1.0, 1.0, 4.0)
EXPLAINED_VARIANCE = 0.65  # principal components kept for the reconstruction (NannyML's default)


def _bins_for(n: int) -> int:
    return int(min(MAX_BINS, max(2, n // MIN_PER_BIN)))


def _edges(values: np.ndarray) -> list[float]:
    """Inner bin edges: one bin per level when there are at most :data:`TOP_K` distinct values
    (integer-coded categories, ratings, counts), else quantile edges, none on a value that
    occurs (a value on an edge goes right, so an edge on the smallest level would leave the
    bottom bin empty and merge two levels)."""
    levels = np.unique(values)
    if len(levels) <= TOP_K:
        return [float(x) for x in (levels[1:] + levels[:-1]) / 2]
    bins = _bins_for(len(values))
    edges = set()
    for quantile in np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]):
        at = int(np.searchsorted(levels, quantile))
        if at < len(levels) and levels[at] == quantile:  # on a level: just below it instead
            if at > 0:
                edges.add(float((levels[at - 1] + quantile) / 2))
        else:
            edges.add(float(quantile))
    return sorted(edges)


def _numeric(values: np.ndarray, name: str) -> ColumnReference:
    values = values[np.isfinite(values)]
    edges = _edges(values) if len(values) else []
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    some = len(values) > 0
    return ColumnReference(
        name=name,
        kind=ColumnKind.NUMERIC,
        counts=tuple(int(c) for c in counts),
        n=len(values),
        edges=tuple(edges),
        minimum=float(values.min()) if some else None,
        maximum=float(values.max()) if some else None,
        mean=float(values.mean()) if some else None,
        std=float(values.std()) if some else None,
    )


def _categorical(values: pd.Series, name: str) -> ColumnReference:
    counts = values.astype(str).value_counts()
    top = counts.iloc[:TOP_K]
    return ColumnReference(
        name=name,
        kind=ColumnKind.CATEGORICAL,
        counts=tuple(int(c) for c in top.to_numpy()),
        n=len(values),
        categories=tuple(str(c) for c in top.index),
        other=int(counts.iloc[TOP_K:].sum()),
    )


def _column(values: Any, name: str) -> ColumnReference:
    series = pd.Series(np.asarray(values).ravel()) if not isinstance(values, pd.Series) else values
    numeric = pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)
    return _numeric(series.to_numpy(np.float64), name) if numeric else _categorical(series, name)


def _draws(level: float) -> int:
    """Bootstrap windows per test at ``level``: :data:`DRAWS`, more when the level is so low that
    would see fewer than :data:`MIN_EXCEEDANCES` beyond its threshold."""
    return min(MAX_DRAWS, max(DRAWS, math.ceil(MIN_EXCEEDANCES / level)))


def _thresholds(
    column: ColumnReference, holdout: Any, level: float, windows: Sequence[int], index: int
) -> ColumnReference:
    bins = FeatureBins.from_reference(column)
    counts = bins.count(np.asarray(holdout))
    found = calibrate_windows(
        bins.reference,
        counts,
        windows,
        level,  # the column's Bonferroni share; binned KS and PSI are calibrated together
        _draws(level),
        ordered=bins.kind == "numeric",
        rng=np.random.default_rng((CALIBRATION_SEED, index)),
    )
    thresholds = {
        int(window): Thresholds(*(float(x) for x in row))
        for window, row in zip(windows, found, strict=True)
    }
    return dataclasses.replace(column, thresholds=thresholds)


def _multivariate_base(frame: pd.DataFrame, names: Sequence[str]) -> Multivariate | None:
    """Standardization, principal components and precision from the reference rows (no
    thresholds yet); ``None`` with fewer than two numeric features that vary."""
    values = frame[list(names)].to_numpy(np.float64)
    values = np.where(np.isfinite(values), values, np.nan)
    with np.errstate(all="ignore"):
        mean, scale = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
    keep = np.isfinite(mean) & np.isfinite(scale) & (scale > 1e-12)
    if keep.sum() < 2 or len(values) < 10:
        return None
    names = [n for n, k in zip(names, keep, strict=True) if k]
    mean, scale = mean[keep], scale[keep]
    z = standardized(values[:, keep], mean, scale)
    covariance = z.T @ z / len(z)
    eigenvalues, vectors = np.linalg.eigh(covariance)  # ascending
    eigenvalues, vectors = eigenvalues[::-1], vectors[:, ::-1]
    explained = np.cumsum(eigenvalues) / eigenvalues.sum()
    k = min(len(names) - 1, int(np.searchsorted(explained, EXPLAINED_VARIANCE)) + 1)
    usable = eigenvalues > eigenvalues[0] * 1e-9
    precision = (vectors[:, usable] / eigenvalues[usable]) @ vectors[:, usable].T
    return Multivariate(
        features=tuple(names),
        mean=tuple(float(x) for x in mean),
        scale=tuple(float(x) for x in scale),
        components=tuple(tuple(float(x) for x in row) for row in vectors[:, :k].T),
        precision=tuple(tuple(float(x) for x in row) for row in precision),
        whitening=tuple(
            tuple(float(x) for x in row)
            # the leading principal axis: where correlated features move together. (Every kept
            # axis, max-ed, paid a Bonferroni factor per axis for directions T² covers anyway.)
            for row in (vectors[:, :1] / np.sqrt(np.maximum(eigenvalues[:1], 1e-12))).T
        ),
    )


def _multivariate_thresholds(
    base: Multivariate, rows: pd.DataFrame, level: float, windows: Sequence[int]
) -> Multivariate:
    """Thresholds of the mean reconstruction error and of T² per window size, calibrated
    together (the window alarms on either) by bootstrap of held-out rows, on their own stream.

    A bootstrap window is a sparse (draws × rows) matrix of how often each row was drawn; one
    sparse product gives every window's sum of rows and of reconstruction errors. These are
    means, so the error of the held-out rows' own mean would move every threshold together:
    each window's mean also gets the uncertainty of that mean (Gaussian, variance / rows), so
    the thresholds are those of a new window's predictive distribution, not of this sample's.
    (Held-out rows only: the build rows' reconstruction errors are too small, the components
    being fitted to them.)
    """
    from scipy import sparse  # the packager's scikit-learn brings it

    z = standardized(
        rows[list(base.features)].to_numpy(np.float64), np.array(base.mean), np.array(base.scale)
    )
    columns = np.column_stack([z, reconstruction_errors(z, np.array(base.components))])
    precision = np.array(base.precision)
    whitening = np.array(base.whitening)
    draws = max(2000, math.ceil(MIN_EXCEEDANCES * 4 / level))
    rng = np.random.default_rng(MULTIVARIATE_SEED)
    centre = rng.multivariate_normal(
        np.zeros(columns.shape[1]), np.cov(columns, rowvar=False) / len(columns), size=draws
    )
    thresholds = {}
    for window in windows:
        chunk = max(1, 1_000_000 // window)
        sums = []
        for start in range(0, draws, chunk):
            n = min(chunk, draws - start)
            picked = sparse.csr_matrix(
                (
                    np.ones(n * window),
                    rng.integers(0, len(z), n * window),
                    np.arange(n + 1) * window,
                ),
                shape=(n, len(z)),
            )
            sums.append(picked @ columns)
        means = np.concatenate(sums) / window + centre
        t2 = window * np.einsum("ij,jk,ik->i", means[:, :-1], precision, means[:, :-1])
        shift = math.sqrt(window) * np.abs(means[:, :-1] @ whitening.T).max(axis=1)
        error, value_t2, value_shift = union_thresholds(
            np.column_stack([means[:, -1], t2, shift]), level, MULTIVARIATE_WEIGHTS
        )
        thresholds[int(window)] = MultivariateThresholds(
            float(error),
            strong_threshold(means[:, -1], float(error), STRONG * level),
            float(value_t2),
            strong_threshold(t2, float(value_t2), STRONG * level),
            float(value_shift),
            strong_threshold(shift, float(value_shift), STRONG * level),
        )
    return dataclasses.replace(base, thresholds=thresholds)


def _calibrate_all(
    jobs: Sequence[tuple[ColumnReference, Any]],
    level: float,
    windows: Sequence[int],
    workers: int | None,
) -> list[ColumnReference]:
    """Every column's thresholds; columns run on a thread each (numpy's sampler drops the GIL).

    Each column draws from its own stream (seeded by its index), so the result does not depend
    on how many threads ran or in which order they finished.
    """
    if workers is None:
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else ()
        workers = len(cpus) or os.cpu_count() or 1
    workers = max(1, min(len(jobs), workers))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(
            pool.map(
                lambda job: _thresholds(job[1][0], job[1][1], level, windows, job[0]),
                enumerate(jobs),
            )
        )


def reference_statistics(
    frame: pd.DataFrame,
    layout: InputLayout,
    task: str,
    prediction: Prediction,
    windows: Sequence[int] = WINDOW_SIZES,
    *,
    workers: int | None = None,
) -> Reference:
    """Build the bundle's drift reference (written with :func:`reference_json`).

    Args:
        frame: the feature columns of all reference rows.
        layout: the model's input layout (gives each feature its input tensor and index).
        task: ``classification``, ``regression`` or ``tensor``.
        prediction: the source model's outputs on ``frame``'s rows (same order).
        windows: device window sizes to calibrate thresholds for.
        workers: threads for the calibration (default: one per CPU); the result does not depend
            on it.

    Returns:
        The :class:`~edgepack.formats.reference.Reference`, at the current format version.
    """
    order = np.random.default_rng(1).permutation(len(frame))
    half = max(1, len(frame) // 2)
    build, holdout = order[:half], order[half:] if len(frame) > 1 else order
    outputs: np.ndarray | None = None
    if task == "classification" and prediction.labels is not None:
        outputs = np.asarray(prediction.labels).ravel()
    elif task in ("regression", "anomaly") and prediction.values is not None:  # anomaly: score
        outputs = np.asarray(prediction.values, dtype=np.float64).ravel()
    jobs: list[tuple[ColumnReference, Any]] = []  # each monitored column and its held-out values
    for column in layout.columns:
        series = frame[column].reset_index(drop=True)
        spec = next(s for s in layout.specs if column in s.columns)
        entry = dataclasses.replace(
            _column(series.iloc[build], column),
            input=spec.name,
            index=spec.columns.index(column),  # position along the input's (flattened) row
        )
        jobs.append((entry, series.iloc[holdout].to_numpy()))
    if outputs is not None:
        # class labels are categories even when they are numbers
        monitored = (
            _categorical(pd.Series(outputs[build]), "label")
            if task == "classification"
            else _numeric(outputs[build], "score" if task == "anomaly" else "prediction")
        )
        jobs.append((monitored, outputs[holdout]))
    numeric = [
        entry.name for entry, _ in jobs[: len(layout.columns)] if entry.kind is ColumnKind.NUMERIC
    ]
    multivariate = (
        _multivariate_base(frame.iloc[build].reset_index(drop=True), numeric)
        if len(numeric) >= 2
        else None
    )
    # ALPHA is shared by the tests (Bonferroni): the multivariate one (reconstruction error,
    # T² or axis shift), which sees joint shifts, takes two thirds; the columns (binned KS or
    # PSI each) share the third left, which is enough for their larger single-feature shifts
    shares = (ALPHA / 3, 2 * ALPHA / 3) if multivariate is not None else (ALPHA, 0.0)
    calibrated = _calibrate_all(jobs, shares[0] / len(jobs), windows, workers)
    if multivariate is not None:
        held = frame.iloc[holdout].reset_index(drop=True)
        multivariate = _multivariate_thresholds(multivariate, held, shares[1], windows)
    tests = len(jobs) + (1 if multivariate is not None else 0)
    features = calibrated[: len(layout.columns)]
    output = calibrated[len(layout.columns)] if outputs is not None else None
    return Reference(
        rows=len(build),
        features=tuple(features),
        output=output,
        holdout_rows=len(holdout),
        calibration=Calibration(
            statistic="binned_ks or psi; reconstruction error, hotelling t2, axis shift",
            alpha=ALPHA,
            correction="bonferroni",
            columns=tests,
            windows=tuple(windows),
            persistence=PERSISTENCE,
        ),
        format_version=REFERENCE_FORMAT_VERSION,
        multivariate=multivariate,
    )


def to_json(stats: Reference) -> bytes:
    """The bundle's ``reference.json`` bytes (:func:`edgepack.formats.reference.reference_json`)."""
    return reference_json(stats)
