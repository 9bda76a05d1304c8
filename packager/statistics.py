"""Reference statistics for on-device drift detection (the bundle's ``reference.json``).

Computed once per build from all reference rows and the source model's outputs on them:

* each numeric feature: quantile bin edges (inner edges; the outer bins are open-ended) and the
  reference count in each bin, aiming for about 25–50 reference rows per bin, at most 10 bins;
* each categorical feature: the top-K categories with their counts, plus an "other" count;
* the model's output: class counts (classification) or quantile bins of the prediction.

The agent keeps the same bins over live windows and compares them with these counts. The format
is documented in ``docs/bundle-format.md``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from packager.converters import Prediction
from packager.reference import InputLayout

__all__ = ["REFERENCE_FORMAT_VERSION", "reference_statistics", "to_json"]

REFERENCE_FORMAT_VERSION = 1
MAX_BINS = 10
MIN_PER_BIN = 25
TOP_K = 20


def _bins_for(n: int) -> int:
    return int(min(MAX_BINS, max(2, n // MIN_PER_BIN)))


def _numeric(values: np.ndarray) -> dict[str, Any]:
    values = values[np.isfinite(values)]
    bins = _bins_for(len(values))
    quantiles = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]) if len(values) else []
    edges = sorted({float(q) for q in quantiles})
    # A value equal to an edge falls in the bin to its right, as np.searchsorted(side="right").
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return {
        "kind": "numeric",
        "edges": edges,
        "counts": [int(c) for c in counts],
        "n": len(values),
        "min": float(values.min()) if len(values) else None,
        "max": float(values.max()) if len(values) else None,
        "mean": float(values.mean()) if len(values) else None,
        "std": float(values.std()) if len(values) else None,
    }


def _categorical(values: pd.Series) -> dict[str, Any]:
    counts = values.astype(str).value_counts()
    top = counts.iloc[:TOP_K]
    return {
        "kind": "categorical",
        "categories": [str(c) for c in top.index],
        "counts": [int(c) for c in top.to_numpy()],
        "other": int(counts.iloc[TOP_K:].sum()),
        "n": len(values),
    }


def reference_statistics(
    frame: pd.DataFrame, layout: InputLayout, task: str, prediction: Prediction
) -> dict[str, Any]:
    """Build the ``reference.json`` document.

    Args:
        frame: the feature columns of all reference rows.
        layout: the model's input layout (gives each feature its input tensor and index).
        task: ``classification``, ``regression`` or ``tensor``.
        prediction: the source model's outputs on ``frame``'s rows.
    """
    features = []
    for index, column in enumerate(layout.columns):
        series = frame[column]
        numeric = pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)
        stats = _numeric(series.to_numpy(np.float64)) if numeric else _categorical(series)
        spec = layout.specs[0] if layout.mode == "tensor" else layout.specs[index]
        features.append(
            {
                "name": column,
                "input": spec.name,
                "index": index if layout.mode == "tensor" else 0,
                **stats,
            }
        )
    if task == "classification" and prediction.labels is not None:
        output = _categorical(pd.Series(np.asarray(prediction.labels).ravel()))
        output["name"] = "label"
    elif task == "regression" and prediction.values is not None:
        output = _numeric(np.asarray(prediction.values, dtype=np.float64).ravel())
        output["name"] = "prediction"
    else:
        output = None
    return {
        "format_version": REFERENCE_FORMAT_VERSION,
        "rows": len(frame),
        "features": features,
        "output": output,
    }


def to_json(stats: dict[str, Any]) -> bytes:
    """Canonical JSON bytes for the bundle."""
    return (json.dumps(stats, indent=2, sort_keys=True) + "\n").encode()
