"""Drift statistics, shared by the packager (calibration) and the device (detection). No I/O.

A feature's reference distribution is a set of bins: quantile bins for numbers (inner edges;
the outer bins are open-ended; a value equal to an edge goes to the bin on its right) and the
top-K categories plus "other" for strings. A live window is counted into the same bins, and two
statistics compare the window with the reference:

* the **binned Kolmogorov–Smirnov** statistic, the largest gap between the cumulative
  proportions (categories are compared as the largest bin gap, since they have no order);
* the **population stability index** (PSI), ``Σ (live - ref) · ln(live / ref)`` with a small
  floor on empty bins.

Fixed cut-offs (PSI ≥ 0.1 …) are really a function of window size, so each feature gets a
threshold calibrated at build time by bootstrap (:func:`calibrate`): windows of the device's size
drawn from held-out reference rows, the ``1 - alpha / features`` quantile of the statistic
(Bonferroni, over the columns and the two statistics). The device alarms on a column whose
binned KS *or* PSI exceeds its threshold, and calls it drifting when that happens in 2 of the
last 3 windows.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "DriftMonitor",
    "FeatureBins",
    "binned_ks",
    "calibrate",
    "count_categorical",
    "count_numeric",
    "psi",
]

PSI_FLOOR = 1e-4


@dataclass(frozen=True)
class FeatureBins:
    """One monitored column (an input feature, or the model's output) and its reference."""

    name: str
    kind: str  # "numeric" | "categorical"
    reference: np.ndarray  # reference proportion per bin (sums to 1)
    edges: np.ndarray | None = None  # numeric: inner edges
    categories: tuple[str, ...] = ()  # categorical: the tracked categories; last bin is "other"
    input: str = ""  # which model input (or output) carries it
    index: int = 0  # column index inside that tensor

    @property
    def bins(self) -> int:
        return len(self.reference)

    @classmethod
    def from_reference(cls, entry: dict[str, Any]) -> FeatureBins:
        """Build from one ``features[]`` (or ``output``) entry of ``reference.json``."""
        counts = np.asarray(entry["counts"], dtype=np.float64)
        if entry["kind"] == "categorical":
            counts = np.append(counts, float(entry.get("other", 0)))
        total = counts.sum()
        reference = counts / total if total > 0 else np.full(len(counts), 1 / len(counts))
        return cls(
            name=str(entry["name"]),
            kind=str(entry["kind"]),
            reference=reference,
            edges=np.asarray(entry.get("edges", []), dtype=np.float64)
            if entry["kind"] == "numeric"
            else None,
            categories=tuple(str(c) for c in entry.get("categories", [])),
            input=str(entry.get("input", "")),
            index=int(entry.get("index", 0)),
        )

    def count(self, values: np.ndarray) -> np.ndarray:
        """Bin counts of ``values`` in this feature's bins."""
        if self.kind == "numeric":
            assert self.edges is not None
            return count_numeric(values, self.edges)
        return count_categorical(values, self.categories)


def count_numeric(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per bin for inner ``edges`` (len(edges) + 1 bins); NaN values are not counted."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    flat = flat[~np.isnan(flat)]
    return np.bincount(np.searchsorted(edges, flat, side="right"), minlength=len(edges) + 1)


def count_categorical(values: np.ndarray, categories: Sequence[str]) -> np.ndarray:
    """Counts per category, then one "other" bin for everything else."""
    lookup = {c: i for i, c in enumerate(categories)}
    other = len(categories)
    indices = [lookup.get(str(v), other) for v in np.asarray(values).ravel()]
    return np.bincount(np.asarray(indices, dtype=np.int64), minlength=other + 1)


def binned_ks(reference: np.ndarray, counts: np.ndarray, ordered: bool = True) -> np.ndarray:
    """Binned KS of live ``counts`` (…, bins) against ``reference`` proportions (bins,).

    Works on one window (1-D counts) or many at once (2-D: windows × bins).
    """
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.sum(axis=-1, keepdims=True)
    live = np.divide(counts, n, out=np.zeros_like(counts), where=n > 0)
    if ordered:
        return np.abs(np.cumsum(live - reference, axis=-1)).max(axis=-1)
    return np.abs(live - reference).max(axis=-1)


def psi(reference: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Population stability index of live ``counts`` (…, bins) against ``reference``."""
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.sum(axis=-1, keepdims=True)
    live = np.divide(counts, n, out=np.zeros_like(counts), where=n > 0)
    ref = np.maximum(reference, PSI_FLOOR)
    live = np.maximum(live, PSI_FLOOR)
    return ((live - ref) * np.log(live / ref)).sum(axis=-1)


def calibrate(
    reference: np.ndarray,
    holdout_counts: np.ndarray,
    window: int,
    quantile: float,
    draws: int,
    *,
    ordered: bool = True,
    seed: int = 0,
) -> dict[str, float]:
    """Thresholds for one feature at one window size, by bootstrap from held-out rows.

    Resampling ``window`` held-out rows with replacement puts Multinomial(window, p_holdout)
    counts in the bins, so the windows are drawn directly as counts.

    Args:
        reference: the reference proportions the device will compare against.
        holdout_counts: bin counts of held-out reference rows (not used to make ``reference``).
        window: the device's window size (rows).
        quantile: e.g. ``1 - alpha / features``.
        draws: bootstrap windows (at least ``10 * features / alpha`` for a stable quantile).

    Returns:
        ``{"ks": threshold, "psi": threshold}``.
    """
    total = holdout_counts.sum()
    p = holdout_counts / total if total > 0 else reference
    windows = np.random.default_rng(seed).multinomial(window, p, size=draws)
    return {
        "ks": float(np.quantile(binned_ks(reference, windows, ordered), quantile)),
        "psi": float(np.quantile(psi(reference, windows), quantile)),
    }


@dataclass
class _Column:
    bins: FeatureBins
    thresholds: dict[int, dict[str, float]]
    counts: np.ndarray
    alarms: list[bool]


class DriftMonitor:
    """Counts one model's live inputs and outputs into windows and judges each window.

    ``observe`` only counts (O(features × bins) memory); a window closes when it holds
    ``window`` rows, or when ``max_age`` seconds passed and it holds at least ``min_rows``
    (an older, smaller window is compared with the threshold of the nearest calibrated size
    that is not larger, so small windows are never judged by a too-strict threshold).

    Args:
        reference: the parsed ``reference.json``.
        window: rows per window (nearest calibrated size is used for thresholds).
        min_rows: the fewest rows a time-flushed window may have.
        max_age: seconds after which a window closes if it has ``min_rows``.
    """

    def __init__(
        self,
        reference: dict[str, Any],
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
        persistence = reference.get("calibration", {}).get("persistence", {})
        self.needed = int(persistence.get("alarms", 2))
        self.over = int(persistence.get("of_windows", 3))
        entries = list(reference.get("features", []))
        if reference.get("output"):
            entries.append({**reference["output"], "input": "__output__"})
        self.columns = [
            _Column(
                FeatureBins.from_reference(e),
                {int(w): t for w, t in e.get("thresholds", {}).items()},
                np.zeros(
                    len(e["counts"]) + (1 if e["kind"] == "categorical" else 0), dtype=np.int64
                ),
                [],
            )
            for e in entries
        ]
        self.rows = 0
        self.opened = self._clock()
        self.opened_wall = self._wall()

    def _threshold(self, column: _Column, rows: int) -> tuple[int, dict[str, float]]:
        if not column.thresholds:
            return 0, {"ks": float("inf"), "psi": float("inf")}
        sizes = sorted(column.thresholds)
        usable = [s for s in sizes if s <= rows]
        if usable:
            return usable[-1], column.thresholds[usable[-1]]
        # Fewer rows than the smallest calibrated window: no calibrated threshold applies, and
        # a guessed one would alarm all the time. Such a window is reported but not judged.
        return 0, {"ks": float("inf"), "psi": float("inf")}

    def observe(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Count a batch of rows (already validated inputs, and the model's outputs)."""
        rows = 0
        for column in self.columns:
            source = outputs if column.bins.input == "__output__" else inputs
            if column.bins.input == "__output__":
                values = next(iter(source.values()), None)  # the first output: label/prediction
            else:
                values = source.get(column.bins.input)
            if values is None:
                continue
            array = np.asarray(values)
            if array.ndim == 2 and column.bins.input != "__output__":
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
            alarm = bool(self.rows > 0 and (ks > threshold["ks"] or value_psi > threshold["psi"]))
            column.alarms = ([*column.alarms, alarm])[-self.over :]
            drifting = sum(column.alarms) >= self.needed
            live = column.counts / max(1, column.counts.sum())
            features.append(
                {
                    "name": column.bins.name,
                    "kind": column.bins.kind,
                    "output": column.bins.input == "__output__",
                    "ks": round(ks, 6),
                    "psi": round(value_psi, 6),
                    "threshold": round(threshold["ks"], 6) if size else None,
                    "psi_threshold": round(threshold["psi"], 6) if size else None,
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
        drifting = [f for f in features if f["drifting"]]
        report = {
            "window_start": self.opened_wall,
            "window_end": self._wall(),
            "n": self.rows,
            "features": features,
            "drifted_share": round(len(drifting) / max(1, len(features)), 4),
            "status": "drift"
            if drifting
            else ("warning" if any(f["alarm"] for f in features) else "ok"),
        }
        self.rows = 0
        self.opened = self._clock()
        self.opened_wall = self._wall()
        return report
