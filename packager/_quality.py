"""The source model's quality on held-out rows with ground truth, for ``quality.json``.

``edgepack build --target COLUMN`` names the reference column that holds the true label
(classification) or value (regression). The column is taken out of the features; the source
model's predictions on the reference rows (which it must not have been trained on) are joined with
it row by row, up to :data:`~edgepack.formats.quality.MAX_ROWS` rows in the build's shuffled
order, and the metrics over them are the reference the device compares its windows with. For
classifiers the top class probability is calibrated against correctness with isotonic regression
(monotone, preserves the mean), the map confidence-based performance estimation uses on the
device. The per-row results go into the file: the agent bootstraps its thresholds from them at
its own window size (edgepack.agent._quality).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from edgepack.formats.quality import MAX_ROWS, QualityReference, label_key, macro_f1
from edgepack.packager._converters import Prediction
from edgepack.packager.exceptions import ReferenceDataError

__all__ = ["pop_target", "quality_reference"]

_TASKS = ("classification", "regression")


def pop_target(frame: pd.DataFrame, target: str) -> tuple[pd.DataFrame, pd.Series]:
    """The features without ``target``, and the target column.

    Raises:
        ReferenceDataError: no such column, or it has missing values.
    """
    if target not in frame.columns:
        raise ReferenceDataError(
            f"--target {target!r} is not a column of the reference data; it has "
            f"{', '.join(map(repr, list(frame.columns)[:10]))}"
        )
    truth = frame[target]
    if truth.isna().any():
        raise ReferenceDataError(
            f"target column {target!r} has missing values in row(s) "
            f"{', '.join(str(i) for i in np.flatnonzero(truth.isna().to_numpy())[:5])} "
            "(0 = first data row); drop those rows or fill them"
        )
    features = frame.drop(columns=[target])
    features.attrs = dict(frame.attrs)
    return features, truth.reset_index(drop=True)


def quality_reference(
    task: str, truth: pd.Series, prediction: Prediction, labels: list[Any], seed: int = 0
) -> QualityReference:
    """The held-out quality of the source model (``prediction`` is over all reference rows).

    Raises:
        ReferenceDataError: a task other than classification or regression, a target value that
            is not one of the model's classes, or a target that is not numeric for a regressor.
    """
    if task not in _TASKS:
        raise ReferenceDataError(
            f"--target measures classifiers and regressors; this model's task is {task}"
        )
    order = np.random.default_rng(seed).permutation(len(truth))[:MAX_ROWS]
    if task == "regression":
        if prediction.values is None:
            raise ReferenceDataError("the source model gave no values to compare --target with")
        try:
            true_values = truth.to_numpy().astype(np.float64)[order]
        except (TypeError, ValueError) as e:
            raise ReferenceDataError(f"the --target column is not numeric: {e}") from e
        values = np.asarray(prediction.values, dtype=np.float64).reshape(len(truth), -1)[:, 0]
        predicted = values[order]
        mae = float(np.mean(np.abs(true_values - predicted)))
        return QualityReference(
            task,
            {"mae": mae},
            tuple(true_values.tolist()),
            tuple(predicted.tolist()),
            seed=seed,
        )
    if prediction.labels is None:
        raise ReferenceDataError("the source model gave no labels to compare --target with")
    index = {label_key(label): i for i, label in enumerate(labels)}
    true_keys = [label_key(v) for v in truth.to_numpy()[order]]
    unknown = sorted({k for k in true_keys if k not in index})
    if unknown:
        raise ReferenceDataError(
            f"the --target column holds {', '.join(map(repr, unknown[:5]))}, not among the "
            f"model's classes ({', '.join(map(repr, list(index)[:10]))})"
        )
    t = np.array([index[k] for k in true_keys], dtype=np.int64)
    p = np.array(
        [index[label_key(v)] for v in np.asarray(prediction.labels)[order]], dtype=np.int64
    )
    correct = (t == p).astype(np.float64)
    confidence: tuple[float, ...] = ()
    calibration = None
    if prediction.probabilities is not None:
        top = np.asarray(prediction.probabilities, dtype=np.float64)[order].max(axis=1)
        top = np.clip(top, 0.0, 1.0)
        confidence = tuple(top.tolist())
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
        iso.fit(top, correct)
        calibration = (
            tuple(float(x) for x in iso.X_thresholds_),
            tuple(float(y) for y in iso.y_thresholds_),
        )
    return QualityReference(
        task,
        {"accuracy": float(correct.mean()), "f1": macro_f1(t, p)},
        tuple(float(v) for v in t),
        tuple(float(v) for v in p),
        labels=tuple(_json_label(v) for v in labels),
        confidence=confidence,
        calibration=calibration,
        seed=seed,
    )


def _json_label(value: Any) -> Any:
    if isinstance(value, (np.integer, np.bool_)):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value if isinstance(value, (int, float, str)) else str(value)
