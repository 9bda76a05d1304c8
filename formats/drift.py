"""Drift statistics, shared by the packager (calibration) and the device (detection). No I/O.

A feature's reference distribution is a set of bins: quantile bins for numbers (inner edges;
the outer bins are open-ended; a value equal to an edge goes to the bin on its right) and the
top-K categories plus "other" for strings. A live window is counted into the same bins, and two
statistics compare the window with the reference:

* the **binned Kolmogorov–Smirnov** statistic, the largest gap between the cumulative
  proportions (categories are compared as the largest bin gap, since they have no order);
* the **population stability index** (PSI), ``Σ (live - ref) · ln(live / ref)`` with a small
  floor on empty bins.

Fixed cut-offs (PSI ≥ 0.1 …) are really a function of window size, so each column gets
thresholds calibrated at build time by bootstrap (:func:`calibrate_windows`): windows of the
device's sizes drawn from held-out reference rows, binned KS and PSI calibrated together as the
one alarm the device raises (:func:`union_thresholds`), at the column's share of ``alpha``
(Bonferroni), plus strong thresholds far rarer still (:func:`strong_threshold`). Every numeric
feature together gets a multivariate test: the mean PCA reconstruction error of a window's
standardized rows (:func:`reconstruction_errors`, as NannyML computes it) and Hotelling's T² of
its mean row (:func:`hotelling`). The device's detector (``edgepack.agent._drift``) alarms on a
column or on the multivariate test when a statistic exceeds its threshold, and calls it drifting
at once beyond a strong threshold, or when one of the two windows before an alarm alarmed too.
The bins come from a parsed ``reference.json`` (:mod:`edgepack.formats.reference`, which owns
the file's format).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgepack.formats.reference import ColumnKind, ColumnReference

__all__ = [
    "FeatureBins",
    "binned_ks",
    "calibrate_windows",
    "count_categorical",
    "count_numeric",
    "hotelling",
    "psi",
    "STRONG",
    "reconstruction_errors",
    "standardized",
    "strong_threshold",
    "union_thresholds",
]

PSI_FLOOR = 1e-4
STRONG = 0.1  # a strong threshold is this many times rarer than the level squared


@dataclass(frozen=True)
class FeatureBins:
    """One monitored column (an input feature, or the model's output) and its reference."""

    name: str
    kind: str  # "numeric" | "categorical"
    reference: np.ndarray  # reference proportion per bin (sums to 1)
    edges: np.ndarray | None = None  # numeric: inner edges
    categories: tuple[str, ...] = ()  # categorical: the tracked categories; last bin is "other"
    input: str = ""  # which model input carries it ("" for the output)
    index: int = 0  # column index inside that tensor

    @property
    def bins(self) -> int:
        return len(self.reference)

    @classmethod
    def from_reference(cls, column: ColumnReference) -> FeatureBins:
        """The bins of one parsed ``reference.json`` column (a feature or the output)."""
        counts = np.asarray(column.counts, dtype=np.float64)
        if column.kind is ColumnKind.CATEGORICAL:
            counts = np.append(counts, float(column.other))
        total = counts.sum()
        reference = counts / total if total > 0 else np.full(len(counts), 1 / len(counts))
        numeric = column.kind is ColumnKind.NUMERIC
        return cls(
            name=column.name,
            kind=column.kind.value,
            reference=reference,
            edges=np.asarray(column.edges, dtype=np.float64) if numeric else None,
            categories=column.categories,
            input=column.input or "",
            index=column.index,
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


def union_thresholds(
    statistics: np.ndarray, level: float, weights: Sequence[float] | None = None
) -> np.ndarray:
    """Thresholds for several statistics over the same draws, calibrated as one alarm.

    The device alarms when *any* of a column's statistics exceeds its threshold, so the union is
    what is calibrated: every statistic's threshold is its ``j``-th largest draw, for the largest
    ``j`` whose union of exceedances (strictly above, as the device compares) is at most
    ``level`` of the draws. Exceedances are counted, not interpolated, so a statistic that takes
    few distinct values (a small window) cannot push the rate above ``level``.

    With ``weights``, statistic ``i`` takes its ``floor(j · weights[i] / max(weights))``-th
    largest draw instead: its own share of the level in that proportion (the statistic with the
    largest weight gets the most).

    Args:
        statistics: ``(draws, statistics)`` values under the null.
        level: the share of draws allowed to alarm.
        weights: each statistic's share of the level, relative (default: all equal).

    Returns:
        ``(statistics,)`` thresholds.
    """
    values = np.asarray(statistics, dtype=np.float64)
    draws = len(values)
    allowed = math.floor(level * draws)
    ranked = -np.sort(-values, axis=0)  # each statistic, largest first
    share = np.ones(values.shape[1]) if weights is None else np.asarray(weights, dtype=np.float64)
    share = share / share.max()
    columns = np.arange(values.shape[1])

    def at(j: int) -> np.ndarray:
        return ranked[np.floor(j * share).astype(np.intp), columns]

    def union(j: int) -> int:
        return int(np.any(values > at(j), axis=1).sum())

    low, high = 0, min(allowed, draws - 1)
    while low < high:  # the largest j with union(j) <= allowed (union grows with j)
        middle = (low + high + 1) // 2
        if union(middle) <= allowed:
            low = middle
        else:
            high = middle - 1
    return np.asarray(at(low), dtype=np.float64)


def strong_threshold(values: np.ndarray, threshold: float, ratio: float) -> float:
    """A threshold ``ratio`` times rarer than ``threshold``, by an exponential tail.

    The draws beyond ``threshold`` are too few to read a far rarer quantile directly, so the tail
    is extended as exponential with the mean excess over ``threshold``:
    ``threshold + mean_excess · ln(1 / ratio)``. KS and PSI (and the multivariate statistics)
    have tails lighter than exponential (Gaussian- and chi-square-like), whose mean excess falls
    further out, so this errs on the side of fewer alarms.
    """
    values = np.asarray(values, dtype=np.float64)
    beyond = values[values > threshold]
    if len(beyond) >= 3:
        excess = float((beyond - threshold).mean())
    else:  # (almost) nothing beyond: the spread of the upper tail stands in
        excess = float(np.quantile(values, 0.999) - np.quantile(values, 0.99)) or float(
            values.std()
        )
    return float(threshold + max(excess, 1e-12) * math.log(1 / ratio))


def calibrate_windows(
    reference: np.ndarray,
    holdout_counts: np.ndarray,
    windows: Sequence[int],
    level: float,
    draws: int,
    *,
    ordered: bool = True,
    rng: np.random.Generator,
) -> np.ndarray:
    """One column's thresholds at every window size, by bootstrap from held-out rows.

    Resampling ``window`` held-out rows with replacement puts Multinomial(window, p_holdout)
    counts in the bins, so the windows are drawn directly as counts: one
    ``(draws, windows, bins)`` array from ``rng``, then both statistics over it at once. PSI's
    per-bin term depends only on a bin's integer count, so it is looked up in a table of every
    possible count (the same values :func:`psi` computes, without a logarithm per window).
    Binned KS and PSI are calibrated together (:func:`union_thresholds`): the column alarms in
    at most ``level`` of stationary windows. The strong thresholds are ``STRONG * level`` times
    rarer again (:func:`strong_threshold`): a window beyond one is rarer under no drift than
    two alarms in a row.

    Args:
        reference: the reference proportions the device will compare against.
        holdout_counts: bin counts of held-out reference rows (not used to make ``reference``).
        windows: the device's window sizes (rows).
        level: the column's false alarms per window (``alpha / tests``).
        draws: bootstrap windows per size (at least ``10 / level`` for a stable threshold).
        ordered: numeric bins (cumulative KS) or categories (largest bin gap).
        rng: the column's own random stream (the caller seeds it, so builds are reproducible).

    Returns:
        ``(len(windows), 4)`` thresholds: binned KS, PSI, strong binned KS, strong PSI.
    """
    reference = np.asarray(reference, dtype=np.float64)
    holdout_counts = np.asarray(holdout_counts, dtype=np.float64)
    sizes = np.asarray(windows, dtype=np.int64)
    total = holdout_counts.sum()
    p = holdout_counts / total if total > 0 else reference
    counts = rng.multinomial(sizes, p, size=(draws, len(sizes)))  # (draws, windows, bins)
    ks = binned_ks(reference, counts, ordered)  # (draws, windows)
    # PSI: table[w, b, c] = the term of bin b holding c of window w's rows
    bins = len(reference)
    c = np.arange(int(sizes.max()) + 1, dtype=np.float64)
    live = np.maximum(c[None, :] / sizes[:, None].astype(np.float64), PSI_FLOOR)  # (windows, c)
    ref = np.maximum(reference, PSI_FLOOR)[None, :, None]
    table = (live[:, None, :] - ref) * np.log(live[:, None, :] / ref)  # (windows, bins, c)
    flat = (np.arange(len(sizes))[:, None] * bins + np.arange(bins)[None, :]) * len(c)
    value_psi = table.ravel()[flat[None, :, :] + counts].sum(axis=-1)  # (draws, windows)
    found = np.empty((len(sizes), 4))
    for i in range(len(sizes)):
        found[i, :2] = union_thresholds(np.stack([ks[:, i], value_psi[:, i]], axis=1), level)
        found[i, 2] = strong_threshold(ks[:, i], found[i, 0], STRONG * level)
        found[i, 3] = strong_threshold(value_psi[:, i], found[i, 1], STRONG * level)
    return found


# -- multivariate: every numeric feature together ---------------------------------------------


CLIP = 4.0  # standardized values beyond ±CLIP count as ±CLIP in the multivariate statistics


def standardized(values: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Rows ``(n, features)`` in reference units, clipped to ±:data:`CLIP`; a missing value is
    the reference mean (0). Clipping bounds what one row can add to a window's sums, so a
    heavy-tailed feature (a lognormal, a rare huge value) cannot give the window means tails
    that a bootstrap of the held-out rows never sees (its thresholds would be too low)."""
    z = (np.asarray(values, dtype=np.float64) - mean) / scale
    return np.clip(np.where(np.isfinite(z), z, 0.0), -CLIP, CLIP)


def reconstruction_errors(z: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Each standardized row's distance from its reconstruction by the principal ``components``
    (``(k, features)``, orthonormal), as NannyML's data-reconstruction drift computes it."""
    return np.asarray(np.linalg.norm(z - (z @ components.T) @ components, axis=1))


def hotelling(mean_z: np.ndarray, rows: int, precision: np.ndarray) -> float:
    """Hotelling's T² of a window's mean standardized row against the reference mean (0):
    ``rows · z̄ᵀ Σ⁻¹ z̄``; about chi-square with ``features`` degrees of freedom under no drift."""
    return float(rows * mean_z @ precision @ mean_z)
