"""Drift detection on the device: one model version's live rows, counted into windows and judged.

The statistics and the bins are the shared ones (:mod:`edgepack.formats.drift`, the same code the
packager calibrated the thresholds with), built from the bundle's parsed ``reference.json``
(:func:`edgepack.formats.reference.parse_reference`); this module adds what only the device does:
counting live inputs and outputs into the current window with O(features × bins) memory, closing
a window when it is full or old, and judging it against the thresholds calibrated for its size.
The monitor (``_monitor``) owns one :class:`DriftDetector` per served model version.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgepack.formats.drift import (
    FeatureBins,
    binned_ks,
    hotelling,
    psi,
    reconstruction_errors,
    standardized,
)
from edgepack.formats.reference import Multivariate, MultivariateThresholds, Reference, Thresholds

__all__ = ["DriftDetector"]


@dataclass
class _Column:
    bins: FeatureBins
    thresholds: dict[int, Thresholds]
    counts: np.ndarray  # a view into its input's count matrix when counted with others
    alarms: list[bool]
    output: bool  # the model's output (its first output tensor), not an input feature
    sizes: list[int] = field(default_factory=list)  # calibrated window sizes, ascending
    static: dict[str, Any] = field(default_factory=dict)  # the report's unchanging part

    def __post_init__(self) -> None:
        self.sizes = sorted(self.thresholds)
        bins = self.bins
        self.static = {
            "reference": [round(float(x), 6) for x in bins.reference],
            # bin labels for plots: inner edges, or the categories then "other"
            "edges": [float(x) for x in bins.edges] if bins.edges is not None else None,
            "categories": [*bins.categories, "other"] if bins.kind == "categorical" else None,
        }


class _Block:
    """The numeric columns of one 2-D input, counted and judged together: one comparison
    against every column's edges and one ``bincount`` per batch, one KS and one PSI per window
    for all of them (a window of a 64-column input costs a few numpy calls, not 64 × 5).

    Edges are padded with NaN (no value is ``>=`` NaN) and counts and reference proportions with
    zeros, which add nothing to either statistic, so the results are the per-column ones.
    """

    CHUNK = 1024  # rows compared at once: bounded temporary memory for any window size

    def __init__(self, input_name: str, columns: list[_Column]) -> None:
        self.input = input_name
        self.columns = columns
        self.index = np.array([c.bins.index for c in columns], dtype=np.intp)
        width = max(len(c.bins.edges) for c in columns if c.bins.edges is not None)
        self.edges = np.full((len(columns), width), np.nan)
        self.reference = np.zeros((len(columns), width + 1))
        self.counts = np.zeros((len(columns), width + 1), dtype=np.int64)
        for j, column in enumerate(columns):
            edges = column.bins.edges
            assert edges is not None
            self.edges[j, : len(edges)] = edges
            self.reference[j, : len(edges) + 1] = column.bins.reference
            column.counts = self.counts[j, : len(edges) + 1]  # a view: one matrix is counted
        self.offsets = (np.arange(len(columns)) * (width + 1))[None, :]

    def observe(self, array: np.ndarray) -> int:
        for start in range(0, len(array), self.CHUNK):
            values = np.asarray(array[start : start + self.CHUNK, self.index], dtype=np.float64)
            bins = (values[:, :, None] >= self.edges[None, :, :]).sum(axis=2)  # searchsorted right
            keep = ~np.isnan(values)
            flat = np.bincount((bins + self.offsets)[keep], minlength=self.counts.size)
            self.counts += flat.reshape(self.counts.shape)
        return len(array)

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """Binned KS and PSI of every column's window."""
        return binned_ks(self.reference, self.counts, True), psi(self.reference, self.counts)


_UNJUDGED = Thresholds(float("inf"), float("inf"))


def _drifting(alarms: list[bool], strong: bool) -> bool:
    """The verdict: a window beyond a strong threshold drifts at once; an alarm drifts when one
    of the two windows before it alarmed too. Under no drift both are about as rare as the old
    2-of-3 rule (the strong level is a tenth of the alarm level squared), but a clear shift is
    flagged in its first window and any other within two."""
    return strong or (alarms[-1] and any(alarms[-3:-1]))


class _Joint:
    """The multivariate test over every numeric feature: sums only, O(features) memory."""

    def __init__(self, reference: Multivariate, features: dict[str, tuple[str, int]]) -> None:
        self.reference = reference
        self.where = [features[name] for name in reference.features]  # (input, column index)
        self.mean = np.array(reference.mean)
        self.scale = np.array(reference.scale)
        self.components = np.array(reference.components)
        self.precision = np.array(reference.precision)
        self.whitening = np.array(reference.whitening)
        self.sum_z = np.zeros(len(self.where))
        self.sum_error = 0.0
        self.rows = 0
        self.alarms: list[bool] = []

    def observe(self, inputs: dict[str, np.ndarray]) -> None:
        single = {name for name, _ in self.where}
        if len(single) == 1:  # every feature in one 2-D input: one gather, no column stack
            values = inputs.get(next(iter(single)))
            if values is not None and np.ndim(values) == 2:
                try:
                    rows = np.asarray(values)[:, [i for _, i in self.where]].astype(np.float64)
                except (TypeError, ValueError, IndexError):
                    return
                self._add(rows)
                return
        columns = []
        for name, index in self.where:
            values = inputs.get(name)
            if values is None:
                return
            array = np.asarray(values)
            columns.append(array[:, index] if array.ndim == 2 else array.reshape(-1))
        if len({len(c) for c in columns}) != 1:
            return
        try:
            rows = np.column_stack(columns).astype(np.float64)
        except (TypeError, ValueError):
            return
        self._add(rows)

    def _add(self, rows: np.ndarray) -> None:
        z = standardized(rows, self.mean, self.scale)
        self.sum_z += z.sum(axis=0)
        self.sum_error += float(reconstruction_errors(z, self.components).sum())
        self.rows += len(z)

    def close(self) -> dict[str, Any]:
        rows = self.rows
        sizes = [s for s in sorted(self.reference.thresholds) if s <= rows]
        limits: MultivariateThresholds | None = (
            self.reference.thresholds[sizes[-1]] if sizes else None
        )
        error = self.sum_error / rows if rows else 0.0
        t2 = hotelling(self.sum_z / rows, rows, self.precision) if rows else 0.0
        shift = (
            float(np.abs(self.whitening @ self.sum_z).max() / np.sqrt(rows))
            if rows and len(self.whitening)
            else 0.0
        )
        alarm = strong = False
        if limits is not None:
            alarm = bool(error > limits.reconstruction or t2 > limits.t2 or shift > limits.shift)
            strong = bool(
                error > limits.reconstruction_strong
                or t2 > limits.t2_strong
                or shift > limits.shift_strong
            )
        self.alarms = [*self.alarms, alarm][-3:]
        drifting = _drifting(self.alarms, strong)
        # which features moved: each one's window mean in standard errors of a window mean
        moved = self.sum_z / np.sqrt(rows) if rows else self.sum_z
        self.sum_z = np.zeros(len(self.where))
        self.sum_error, self.rows = 0.0, 0

        def entry(name: str, value: float, at: float | None, strong_at: float | None) -> Any:
            return {
                "name": name,
                "value": round(value, 6),
                "threshold": None if at is None else round(at, 6),
                "strong_threshold": None if strong_at is None else round(strong_at, 6),
                "alarm": bool(at is not None and value > at),
            }

        return {
            "features": list(self.reference.features),
            "statistics": [
                entry(
                    "reconstruction_error",
                    error,
                    limits.reconstruction if limits else None,
                    limits.reconstruction_strong if limits else None,
                ),
                entry(
                    "hotelling_t2",
                    t2,
                    limits.t2 if limits else None,
                    limits.t2_strong if limits else None,
                ),
                entry(
                    "axis_shift",
                    shift,
                    limits.shift if limits else None,
                    limits.shift_strong if limits else None,
                ),
            ],
            "shift_z": {
                n: round(float(v), 3) for n, v in zip(self.reference.features, moved, strict=True)
            },
            "threshold_window": sizes[-1] if sizes else 0,
            "alarm": alarm,
            "strong": strong,
            "drifting": drifting,
        }


class DriftDetector:
    """Counts one model's live inputs and outputs into windows and judges each window.

    ``observe`` only counts (O(features × bins) memory); a window closes when it holds
    ``window`` rows, or when ``max_age`` seconds passed and it holds at least ``min_rows``
    (an older, smaller window is compared with the threshold of the nearest calibrated size
    that is not larger, so small windows are never judged by a too-strict threshold).

    Args:
        reference: the parsed ``reference.json``
            (:func:`~edgepack.formats.reference.parse_reference`).
        window: rows per window (nearest calibrated size is used for thresholds).
        min_rows: the fewest rows a time-flushed window may have.
        max_age: seconds after which a window closes if it has ``min_rows``.
    """

    def __init__(
        self,
        reference: Reference,
        window: int = 500,
        min_rows: int = 100,
        max_age: float = 3600.0,
        clock: Any = None,
    ) -> None:
        self._clock = clock or time.monotonic
        self._wall = time.time
        self.window = window
        self.min_rows = min_rows
        self.max_age = max_age
        self.columns = [
            _Column(
                FeatureBins.from_reference(column),
                dict(column.thresholds),
                np.zeros(
                    len(column.counts) + (1 if column.kind == "categorical" else 0), dtype=np.int64
                ),
                [],
                output=column is reference.output,
            )
            for column in reference.columns
        ]
        blocks: dict[str, list[_Column]] = {}
        for column in self.columns:
            numeric = column.bins.kind == "numeric" and column.bins.edges is not None
            if numeric and not column.output:
                blocks.setdefault(column.bins.input, []).append(column)
        self.blocks = [_Block(name, columns) for name, columns in blocks.items()]
        places = {c.name: (c.input or "", c.index) for c in reference.features}
        self.joint = (
            _Joint(reference.multivariate, places)
            if reference.multivariate is not None
            and all(name in places for name in reference.multivariate.features)
            else None
        )
        self.rows = 0
        self.opened = self._clock()
        self.opened_wall = self._wall()

    def _threshold(self, column: _Column, rows: int) -> tuple[int, Thresholds]:
        if not column.thresholds:
            return 0, _UNJUDGED
        usable = [s for s in column.sizes if s <= rows]
        if usable:
            return usable[-1], column.thresholds[usable[-1]]
        # Fewer rows than the smallest calibrated window: no calibrated threshold applies, and
        # a guessed one would alarm all the time. Such a window is reported but not judged.
        return 0, _UNJUDGED

    def observe(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Count a batch of rows (already validated inputs, and the model's outputs)."""
        rows = 0
        blocked: set[int] = set()
        for block in self.blocks:
            array = inputs.get(block.input)
            if array is not None and np.ndim(array) == 2:
                rows = max(rows, block.observe(np.asarray(array)))
                blocked.update(id(c) for c in block.columns)
        for column in self.columns:
            if id(column) in blocked:
                continue
            if column.output:
                values = next(iter(outputs.values()), None)  # the first output: label/prediction
            else:
                values = inputs.get(column.bins.input)
            if values is None:
                continue
            array = np.asarray(values)
            if array.ndim == 2 and not column.output:
                array = array[:, column.bins.index]
            column.counts += column.bins.count(array)
            rows = max(rows, len(array))
        if self.joint is not None:
            self.joint.observe(inputs)
        self.rows += rows

    def due(self) -> bool:
        """Whether the current window should close now."""
        if self.rows >= self.window:
            return True
        return self.rows >= self.min_rows and self._clock() - self.opened >= self.max_age

    def close(self) -> dict[str, Any]:
        """Judge the window, start a new one, and return the report's statistics."""
        features = []
        computed: dict[int, tuple[float, float]] = {}
        for block in self.blocks:
            for column, ks, value in zip(block.columns, *block.statistics(), strict=True):
                computed[id(column)] = (float(ks), float(value))
        for column in self.columns:
            size, threshold = self._threshold(column, self.rows)
            if id(column) in computed:
                ks, value_psi = computed[id(column)]
            else:
                ordered = column.bins.kind == "numeric"
                ks = float(binned_ks(column.bins.reference, column.counts, ordered))
                value_psi = float(psi(column.bins.reference, column.counts))
            # either statistic; each was calibrated at alpha / (2 * columns): KS sees location
            # shifts best, PSI changes in spread and in the tails
            alarm = bool(self.rows > 0 and (ks > threshold.ks or value_psi > threshold.psi))
            strong = bool(
                alarm
                and threshold.ks_strong is not None
                and threshold.psi_strong is not None
                and (ks > threshold.ks_strong or value_psi > threshold.psi_strong)
            )
            column.alarms = ([*column.alarms, alarm])[-3:]
            drifting = _drifting(column.alarms, strong)
            live = column.counts / max(1, column.counts.sum())
            features.append(
                {
                    "name": column.bins.name,
                    "kind": column.bins.kind,
                    "output": column.output,
                    "ks": round(ks, 6),
                    "psi": round(value_psi, 6),
                    "threshold": round(threshold.ks, 6) if size else None,
                    "psi_threshold": round(threshold.psi, 6) if size else None,
                    "threshold_window": size,
                    "alarm": alarm,
                    "strong": strong,
                    "drifting": drifting,
                    "live": np.round(live, 6).tolist(),
                    **column.static,
                }
            )
            column.counts[:] = 0
        drifting_features = [f for f in features if f["drifting"]]
        joint = self.joint.close() if self.joint is not None else None
        drifting = bool(drifting_features) or bool(joint and joint["drifting"])
        alarmed = any(f["alarm"] for f in features) or bool(joint and joint["alarm"])
        report = {
            "window_start": self.opened_wall,
            "window_end": self._wall(),
            "n": self.rows,
            "features": features,
            "multivariate": joint,
            "drifted_share": round(len(drifting_features) / max(1, len(features)), 4),
            "status": "drift" if drifting else ("warning" if alarmed else "ok"),
        }
        self.rows = 0
        self.opened = self._clock()
        self.opened_wall = self._wall()
        return report
