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
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgepack.formats.drift import FeatureBins, binned_ks, psi
from edgepack.formats.reference import Reference, Thresholds

__all__ = ["DriftDetector"]


@dataclass
class _Column:
    bins: FeatureBins
    thresholds: dict[int, Thresholds]
    counts: np.ndarray
    alarms: list[bool]
    output: bool  # the model's output (its first output tensor), not an input feature


_UNJUDGED = Thresholds(float("inf"), float("inf"))


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
        self.needed = reference.persistence.alarms
        self.over = reference.persistence.of_windows
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
        self.rows = 0
        self.opened = self._clock()
        self.opened_wall = self._wall()

    def _threshold(self, column: _Column, rows: int) -> tuple[int, Thresholds]:
        if not column.thresholds:
            return 0, _UNJUDGED
        sizes = sorted(column.thresholds)
        usable = [s for s in sizes if s <= rows]
        if usable:
            return usable[-1], column.thresholds[usable[-1]]
        # Fewer rows than the smallest calibrated window: no calibrated threshold applies, and
        # a guessed one would alarm all the time. Such a window is reported but not judged.
        return 0, _UNJUDGED

    def observe(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Count a batch of rows (already validated inputs, and the model's outputs)."""
        rows = 0
        for column in self.columns:
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
        self.rows += rows

    def due(self) -> bool:
        """Whether the current window should close now."""
        if self.rows >= self.window:
            return True
        return self.rows >= self.min_rows and self._clock() - self.opened >= self.max_age

    def close(self) -> dict[str, Any]:
        """Judge the window, start a new one, and return the report's statistics."""
        features = []
        for column in self.columns:
            size, threshold = self._threshold(column, self.rows)
            ordered = column.bins.kind == "numeric"
            ks = float(binned_ks(column.bins.reference, column.counts, ordered))
            value_psi = float(psi(column.bins.reference, column.counts))
            # either statistic; each was calibrated at alpha / (2 * columns): KS sees location
            # shifts best, PSI changes in spread and in the tails
            alarm = bool(self.rows > 0 and (ks > threshold.ks or value_psi > threshold.psi))
            column.alarms = ([*column.alarms, alarm])[-self.over :]
            drifting = sum(column.alarms) >= self.needed
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
                    "drifting": drifting,
                    "live": [round(float(x), 6) for x in live],
                    "reference": [round(float(x), 6) for x in column.bins.reference],
                    # bin labels for plots: inner edges, or the categories then "other"
                    "edges": [float(x) for x in column.bins.edges]
                    if column.bins.edges is not None
                    else None,
                    "categories": [*column.bins.categories, "other"]
                    if column.bins.kind == "categorical"
                    else None,
                }
            )
            column.counts[:] = 0
        drifting_features = [f for f in features if f["drifting"]]
        report = {
            "window_start": self.opened_wall,
            "window_end": self._wall(),
            "n": self.rows,
            "features": features,
            "drifted_share": round(len(drifting_features) / max(1, len(features)), 4),
            "status": "drift"
            if drifting_features
            else ("warning" if any(f["alarm"] for f in features) else "ok"),
        }
        self.rows = 0
        self.opened = self._clock()
        self.opened_wall = self._wall()
        return report
