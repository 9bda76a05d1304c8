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
(Bonferroni, over the columns and the two statistics). The device's detector
(``edgepack.agent``) alarms on a column whose binned KS *or* PSI exceeds its threshold, and calls
it drifting when that happens in 2 of the last 3 windows. The bins come from a parsed
``reference.json`` (:mod:`edgepack.formats.reference`, which owns the file's format).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgepack.formats.reference import ColumnKind, ColumnReference

__all__ = [
    "FeatureBins",
    "binned_ks",
    "calibrate",
    "calibrate_windows",
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

    The one-window form of :func:`calibrate_windows` (same draws for the same seed).

    Returns:
        ``{"ks": threshold, "psi": threshold}``.
    """
    found = calibrate_windows(
        reference,
        holdout_counts,
        (window,),
        quantile,
        draws,
        ordered=ordered,
        rng=np.random.default_rng(seed),
    )
    return {"ks": float(found[0, 0]), "psi": float(found[0, 1])}


def calibrate_windows(
    reference: np.ndarray,
    holdout_counts: np.ndarray,
    windows: Sequence[int],
    quantile: float,
    draws: int,
    *,
    ordered: bool = True,
    rng: np.random.Generator,
) -> np.ndarray:
    """Thresholds for one feature at every window size at once, by bootstrap from held-out rows.

    Resampling ``window`` held-out rows with replacement puts Multinomial(window, p_holdout)
    counts in the bins, so the windows are drawn directly as counts: one
    ``(draws, windows, bins)`` array from ``rng``, then both statistics over it at once. PSI's
    per-bin term depends only on a bin's integer count, so it is looked up in a table of every
    possible count (the same values :func:`psi` computes, without a logarithm per window).

    Args:
        reference: the reference proportions the device will compare against.
        holdout_counts: bin counts of held-out reference rows (not used to make ``reference``).
        windows: the device's window sizes (rows).
        quantile: e.g. ``1 - alpha / features``.
        draws: bootstrap windows per size (at least ``10 * features / alpha`` for a stable
            quantile).
        ordered: numeric bins (cumulative KS) or categories (largest bin gap).
        rng: the feature's own random stream (the caller seeds it, so builds are reproducible).

    Returns:
        ``(len(windows), 2)`` thresholds: binned KS in column 0, PSI in column 1.
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
    terms = table.ravel()[flat[None, :, :] + counts]  # (draws, windows, bins)
    found = np.quantile(np.stack([ks, terms.sum(axis=-1)], axis=-1), quantile, axis=0)
    return np.asarray(found, dtype=np.float64)
