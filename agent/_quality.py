"""Model quality on the device: delayed ground truth joined with recent predictions, and CBPE.

:class:`PredictionLog` keeps the predictions of recent requests by request id, bounded by rows
(oldest out first). Feedback (``POST /v2/models/NAME/feedback`` or :meth:`Agent.feedback`) is
joined with it; each model version's :class:`QualityTracker` gathers the joined rows into windows
of ``window`` labeled rows and judges each closed window against the bundle's ``quality.json``
(edgepack.formats.quality): the alarm threshold is the bootstrap ``alpha`` quantile of the metric
over windows of the same size drawn from the packager's held-out per-row results (lower for
accuracy and macro F1, upper for MAE). Two alarmed windows in a row make the verdict
``degraded``, one ``warning``.

For classifiers the tracker also estimates accuracy without labels (confidence-based performance
estimation, as NannyML's CBPE): the mean, over a window of ``estimate_window`` predictions, of the
top class probability mapped through the calibration the packager fitted on held-out rows. Its
alarm threshold is bootstrapped the same way from the held-out rows' calibrated confidences.
Without ``quality.json`` windows are reported but not judged and the estimate uses the raw
probabilities (``"calibrated": false``). numpy only: the agent stays light.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgepack.agent.exceptions import ModelNotFoundError, RequestError
from edgepack.formats.quality import QualityReference, label_key, macro_f1

__all__ = [
    "FeedbackError",
    "PredictionLog",
    "QualityTracker",
    "UnknownRequestError",
    "macro_f1",
    "metrics",
    "probabilities_of",
]

BOOTSTRAP_DRAWS = 2000
ALPHA = 0.01  # per-window false alarm rate of a stationary stream


class FeedbackError(RequestError):
    """Feedback that cannot be used (malformed, or the wrong number of rows)."""


class UnknownRequestError(ModelNotFoundError):
    """Feedback for a request id the agent does not remember (never seen, or expired)."""


def metrics(task: str, truth: Sequence[Any], predicted: Sequence[Any]) -> dict[str, float]:
    """``{"accuracy", "f1"}`` (classification, macro F1) or ``{"mae"}`` (regression)."""
    if task == "classification":
        t = [label_key(v) for v in truth]
        p = [label_key(v) for v in predicted]
        accuracy = float(np.mean(np.asarray(t) == np.asarray(p))) if t else 0.0
        return {"accuracy": accuracy, "f1": macro_f1(t, p)}
    errors = np.abs(np.asarray(truth, dtype=np.float64) - np.asarray(predicted, dtype=np.float64))
    return {"mae": float(np.mean(errors)) if errors.size else 0.0}


def _bootstrap_thresholds(reference: QualityReference, window: int) -> dict[str, float]:
    """The ``ALPHA`` quantile of each metric over ``window``-row draws of the held-out rows
    (lower for accuracy and F1, upper for MAE)."""
    rng = np.random.default_rng([reference.seed, window, 1])
    truth = np.asarray(reference.truth)
    predicted = np.asarray(reference.predicted)
    index = rng.integers(0, len(truth), size=(BOOTSTRAP_DRAWS, window))
    if reference.task == "regression":
        errors = np.abs(truth - predicted)[index].mean(axis=1)
        return {"mae": float(np.quantile(errors, 1 - ALPHA))}
    t = truth.astype(np.int64)[index]
    p = predicted.astype(np.int64)[index]
    accuracy = (t == p).mean(axis=1)
    classes = np.union1d(np.unique(truth), np.unique(predicted)).astype(np.int64)
    f1s = np.zeros(BOOTSTRAP_DRAWS)
    present = np.zeros(BOOTSTRAP_DRAWS)
    for c in classes:
        tp = ((t == c) & (p == c)).sum(axis=1)
        fp = ((t != c) & (p == c)).sum(axis=1)
        fn = ((t == c) & (p != c)).sum(axis=1)
        seen = (tp + fp + fn) > 0
        f1s += np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
        present += seen
    f1 = f1s / np.maximum(present, 1)
    return {
        "accuracy": float(np.quantile(accuracy, ALPHA)),
        "f1": float(np.quantile(f1, ALPHA)),
    }


@dataclass
class _Entry:
    version: int
    predicted: np.ndarray
    answered: bool = False


class PredictionLog:
    """Recent predictions by ``(model, request id)``, at most ``max_rows`` rows (thread-safe)."""

    def __init__(self, max_rows: int = 10_000) -> None:
        self.max_rows = max_rows
        self.rows = 0
        self.evicted = 0
        self._entries: collections.OrderedDict[tuple[str, str], _Entry] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, model: str, version: int, request_id: str, predicted: np.ndarray) -> None:
        rows = len(predicted)
        if rows > self.max_rows:
            return  # a batch larger than the whole log is not kept
        with self._lock:
            old = self._entries.pop((model, request_id), None)
            if old is not None:
                self.rows -= len(old.predicted)
            self._entries[(model, request_id)] = _Entry(version, predicted)
            self.rows += rows
            while self.rows > self.max_rows:
                _, gone = self._entries.popitem(last=False)
                self.rows -= len(gone.predicted)
                self.evicted += 1

    def claim(self, model: str, request_id: str, rows: int | None = None) -> _Entry | None:
        """The entry, marked answered (``None``: unknown or expired). An entry already answered
        is returned as it is: the caller sees ``answered`` and ignores the feedback. With
        ``rows`` the entry is marked only if it has that many rows (wrong feedback can be
        corrected)."""
        with self._lock:
            entry = self._entries.get((model, request_id))
            if entry is None:
                return None
            if entry.answered:
                return _Entry(entry.version, entry.predicted, True)
            if rows is None or rows == len(entry.predicted):
                entry.answered = True
            return _Entry(entry.version, entry.predicted, False)


@dataclass
class _Window:
    truth: list[Any] = field(default_factory=list)
    predicted: list[Any] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # when each row's feedback came


class QualityTracker:
    """The quality windows of one model version.

    Args:
        task: ``"classification"`` or ``"regression"`` (the manifest's).
        reference: the parsed ``quality.json``, or ``None`` (windows reported, not judged).
        window: labeled rows per window.
        estimate_window: predictions per CBPE window.
        clock: unix seconds (injected by tests).
    """

    def __init__(
        self,
        task: str,
        reference: QualityReference | None,
        window: int = 200,
        estimate_window: int = 500,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.task = reference.task if reference is not None else task
        self.reference = reference
        self.window = window
        self.estimate_window = estimate_window
        self.clock = clock
        self.thresholds = (
            _bootstrap_thresholds(reference, window) if reference is not None else None
        )
        self._labeled = _Window()
        self._confidence: list[np.ndarray] = []
        self._confidence_rows = 0
        self._estimate_start: float | None = None
        self._alarms = 0  # consecutive alarmed labeled windows
        self._estimate_alarms = 0
        self._lock = threading.Lock()
        self._closing = threading.Lock()  # one closer at a time: the alarm runs stay in order
        self.calibrated = reference is not None and reference.calibration is not None
        self.estimate_reference: float | None = None
        self.estimate_threshold: float | None = None
        if self.calibrated and reference is not None and reference.confidence:
            held_out = self._calibrate(np.asarray(reference.confidence))
            self.estimate_reference = float(held_out.mean())
            rng = np.random.default_rng([reference.seed, estimate_window, 2])
            draws = held_out[rng.integers(0, len(held_out), (BOOTSTRAP_DRAWS, estimate_window))]
            self.estimate_threshold = float(np.quantile(draws.mean(axis=1), ALPHA))

    def _calibrate(self, confidence: np.ndarray) -> np.ndarray:
        if self.reference is None or self.reference.calibration is None:
            return confidence
        xs, ys = self.reference.calibration
        return np.interp(confidence, xs, ys)

    # -- fed from the request path and from feedback -------------------------------------------

    def predicted(self, probabilities: np.ndarray) -> None:
        """Count a request's class probabilities (``[rows, classes]``, or the top probability
        per row) into the CBPE window; the maximum is taken when the window closes, off the
        request path."""
        with self._lock:
            if self._estimate_start is None:
                self._estimate_start = self.clock()
            self._confidence.append(probabilities)
            self._confidence_rows += len(probabilities)

    def labeled(self, truth: Sequence[Any], predicted: Sequence[Any]) -> None:
        with self._lock:
            now = self.clock()
            window = self._labeled
            window.truth.extend(truth)
            window.predicted.extend(predicted)
            window.times.extend([now] * len(truth))

    # -- closed by the monitor's thread --------------------------------------------------------

    def close_due(self) -> list[dict[str, Any]]:
        """Reports of the windows that are full (a labeled window, a CBPE window, or none)."""
        with self._closing:
            return self._close_due()

    def _close_due(self) -> list[dict[str, Any]]:
        reports = []
        while True:
            with self._lock:
                window = self._labeled
                if len(window.truth) < self.window:
                    break
                n = self.window
                truth, predicted, times = window.truth[:n], window.predicted[:n], window.times[:n]
                self._labeled = _Window(window.truth[n:], window.predicted[n:], window.times[n:])
            reports.append(self._judge(truth, predicted, times[0], times[-1]))
        windows = []
        with self._lock:
            if self._confidence_rows >= self.estimate_window:
                values = _top(self._confidence)
                start, end = self._estimate_start, self.clock()
                size = self.estimate_window
                full = len(values) // size * size
                windows = [values[i : i + size] for i in range(0, full, size)]
                rest = values[full:]
                self._confidence, self._confidence_rows = ([rest] if len(rest) else []), len(rest)
                self._estimate_start = end if len(rest) else None
        for values in windows:
            reports.append(self._estimate(values, start, end))
        return reports

    def _base(self, start: float | None, end: float | None) -> dict[str, Any]:
        reference = self.reference
        return {
            "task": self.task,
            "window_start": start,
            "window_end": end,
            "labeled": 0,
            "metrics": None,
            "reference": dict(reference.metrics) if reference is not None else None,
            "thresholds": dict(self.thresholds) if self.thresholds is not None else None,
            "alarm": False,
            "estimated": None,
            "status": "ok",
        }

    def _judge(
        self, truth: list[Any], predicted: list[Any], start: float | None, end: float | None
    ) -> dict[str, Any]:
        report = self._base(start, end)
        measured = metrics(self.task, truth, predicted)
        alarm = False
        if self.thresholds is not None:
            if self.task == "regression":
                alarm = measured["mae"] > self.thresholds["mae"]
            else:
                alarm = (
                    measured["accuracy"] < self.thresholds["accuracy"]
                    or measured["f1"] < self.thresholds["f1"]
                )
        self._alarms = self._alarms + 1 if alarm else 0
        report.update(
            labeled=len(truth),
            metrics=measured,
            alarm=alarm,
            status="degraded" if self._alarms >= 2 else "warning" if alarm else "ok",
        )
        return report

    def _estimate(self, confidence: np.ndarray, start: float | None, end: float) -> dict[str, Any]:
        report = self._base(start, end)
        value = float(self._calibrate(confidence).mean())
        alarm = self.estimate_threshold is not None and value < self.estimate_threshold
        self._estimate_alarms = self._estimate_alarms + 1 if alarm else 0
        report["estimated"] = {
            "accuracy": value,
            "reference": self.estimate_reference,
            "threshold": self.estimate_threshold,
            "alarm": alarm,
            "rows": len(confidence),
            "calibrated": self.calibrated,
        }
        report["status"] = "warning" if alarm else "ok"  # an estimate warns, labels decide
        return report


def _top(confidence: list[np.ndarray]) -> np.ndarray:
    """The top probability per row of the requests' ``[rows, classes]`` (or ``[rows]``) arrays,
    in order: one concatenation and one max for a model's same-shaped arrays (thousands of
    single-row requests), not a max per request."""
    widths = {p.shape[1] if p.ndim == 2 else 0 for p in confidence}
    if len(widths) == 1 and 0 not in widths:
        return np.concatenate(confidence).max(axis=1).astype(np.float64)
    return np.concatenate([p.max(axis=1) if p.ndim == 2 else p for p in confidence]).astype(
        np.float64
    )


def probabilities_of(outputs: Mapping[str, Any], first: str) -> np.ndarray | None:
    """The class probabilities ``[rows, classes]``: the first 2-D float output after ``first``."""
    for name, value in outputs.items():
        if name == first:
            continue
        if isinstance(value, np.ndarray) and value.ndim == 2 and value.dtype.kind == "f":
            return value if value.shape[1] >= 2 else None
    return None
