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

from edgepack.formats.drift import FeatureBins, calibrate_windows
from edgepack.formats.reference import (
    REFERENCE_FORMAT_VERSION,
    Calibration,
    ColumnKind,
    ColumnReference,
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
ALPHA = 0.01  # false alarms per window over all columns, before the 2-of-3 persistence rule
MAX_DRAWS = 20_000
PERSISTENCE = Persistence(alarms=2, of_windows=3)
CALIBRATION_SEED = 10  # with the column's index: one bootstrap stream per column


def _bins_for(n: int) -> int:
    return int(min(MAX_BINS, max(2, n // MIN_PER_BIN)))


def _numeric(values: np.ndarray, name: str) -> ColumnReference:
    values = values[np.isfinite(values)]
    bins = _bins_for(len(values))
    quantiles = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]) if len(values) else []
    edges = sorted({float(q) for q in quantiles})
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


def _thresholds(
    column: ColumnReference, holdout: Any, columns: int, windows: Sequence[int], index: int
) -> ColumnReference:
    bins = FeatureBins.from_reference(column)
    counts = bins.count(np.asarray(holdout))
    quantile = 1 - ALPHA / (2 * columns)  # two statistics per column (binned KS or PSI)
    draws = min(MAX_DRAWS, max(2000, math.ceil(10 * columns / ALPHA)))
    found = calibrate_windows(
        bins.reference,
        counts,
        windows,
        quantile,
        draws,
        ordered=bins.kind == "numeric",
        rng=np.random.default_rng((CALIBRATION_SEED, index)),
    )
    thresholds = {
        int(window): Thresholds(float(ks), float(psi))
        for window, (ks, psi) in zip(windows, found, strict=True)
    }
    return dataclasses.replace(column, thresholds=thresholds)


def _calibrate_all(
    jobs: Sequence[tuple[ColumnReference, Any]],
    columns: int,
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
                lambda job: _thresholds(job[1][0], job[1][1], columns, windows, job[0]),
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
    columns = len(layout.columns) + (1 if outputs is not None else 0)
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
    calibrated = _calibrate_all(jobs, columns, windows, workers)
    features = calibrated[: len(layout.columns)]
    output = calibrated[len(layout.columns)] if outputs is not None else None
    return Reference(
        rows=len(build),
        features=tuple(features),
        output=output,
        holdout_rows=len(holdout),
        calibration=Calibration(
            statistic="binned_ks or psi",
            alpha=ALPHA,
            correction="bonferroni",
            columns=columns,
            windows=tuple(windows),
            persistence=PERSISTENCE,
        ),
        format_version=REFERENCE_FORMAT_VERSION,
    )


def to_json(stats: Reference) -> bytes:
    """The bundle's ``reference.json`` bytes (:func:`edgepack.formats.reference.reference_json`)."""
    return reference_json(stats)
