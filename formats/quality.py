"""``quality.json``: the model quality reference a bundle carries, written and read here only.

The packager writes it when the reference rows carry the ground truth (``edgepack build
--target COLUMN``): the source model's predictions on those held-out rows joined with the truth,
row by row (capped at :data:`MAX_ROWS`), the metrics over all of them, and for classifiers the
confidence calibration that confidence-based performance estimation (CBPE) needs: a monotone map
from the model's top class probability to the chance that the prediction is right (isotonic,
fitted on the held-out rows). The device (``edgepack.agent._quality``) bootstraps its alarm
thresholds from the per-row results at its own window size, so one bundle serves every window.
No I/O. Anything malformed is a :class:`QualityFormatError` that says what is wrong. Layout:
``docs/bundle-format.md`` (quality.json) and ``docs/quality.md``.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgepack.formats.bundle import QUALITY_FILE
from edgepack.formats.exceptions import BundleError

__all__ = [
    "MAX_ROWS",
    "QUALITY_FILE",
    "QUALITY_FORMAT_VERSION",
    "QualityFormatError",
    "QualityReference",
    "label_key",
    "macro_f1",
    "parse_quality",
    "quality_json",
]

QUALITY_FORMAT_VERSION = 1
MAX_ROWS = 5000
_TASKS = ("classification", "regression")
_REBUILD = "rebuild the bundle with `edgepack build --target COLUMN`"


class QualityFormatError(BundleError):
    """The bundle's quality.json is malformed or of an unknown version."""


@dataclass(frozen=True)
class QualityReference:
    """What the packager measured on held-out rows with known ground truth.

    Classification: ``truth`` and ``predicted`` are class indices into ``labels``, ``confidence``
    the top class probability of each row (empty when the model gives no probabilities), and
    ``calibration`` the map ``(confidence points, accuracy points)`` for CBPE (``None``: none).
    Regression: ``truth`` and ``predicted`` are the values; the other fields are empty.
    ``metrics`` are over all rows: ``accuracy`` and ``f1`` (macro), or ``mae``.
    """

    task: str
    metrics: dict[str, float]
    truth: tuple[float, ...]
    predicted: tuple[float, ...]
    labels: tuple[Any, ...] = ()
    confidence: tuple[float, ...] = ()
    calibration: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    seed: int = 0


# -- the metrics both sides compute (the packager's reference, the device's windows) --------


def label_key(value: Any) -> str:
    """A class label as text, as the packager and the device both compare them: 1, 1.0, "1"
    and numpy's int64(1) are the same class."""
    if isinstance(value, (bytes, np.bytes_)):
        value = bytes(value).decode(errors="replace")
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, float, np.integer, np.floating)):
        number = float(value)
        if math.isfinite(number) and number == int(number):
            return str(int(number))
        return repr(number)
    return str(value)


def macro_f1(truth: Sequence[Any] | np.ndarray, predicted: Sequence[Any] | np.ndarray) -> float:
    """Macro F1 over the classes in either list (a class never seen nor predicted: not counted)."""
    t = np.asarray(truth)
    p = np.asarray(predicted)
    scores = []
    for c in np.union1d(t, p):
        tp = float(np.sum((t == c) & (p == c)))
        fp = float(np.sum((t != c) & (p == c)))
        fn = float(np.sum((t == c) & (p != c)))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def quality_json(quality: QualityReference) -> bytes:
    """The file's bytes (compact, keys sorted: the same reference gives the same bytes)."""
    doc: dict[str, Any] = {
        "format_version": QUALITY_FORMAT_VERSION,
        "task": quality.task,
        "metrics": quality.metrics,
        "rows": {
            "truth": list(quality.truth),
            "predicted": list(quality.predicted),
            **({"confidence": list(quality.confidence)} if quality.confidence else {}),
        },
        "seed": quality.seed,
    }
    if quality.task == "classification":
        doc["labels"] = list(quality.labels)
        doc["calibration"] = (
            None
            if quality.calibration is None
            else {
                "confidence": list(quality.calibration[0]),
                "accuracy": list(quality.calibration[1]),
            }
        )
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _fail(message: str) -> QualityFormatError:
    return QualityFormatError(f"quality.json: {message}; {_REBUILD}")


def _numbers(
    value: Any, where: str, *, low: float | None = None, high: float | None = None
) -> tuple[float, ...]:
    if not isinstance(value, list):
        raise _fail(f"{where} must be a list of numbers")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
            raise _fail(f"{where}[{i}] must be a finite number, got {item!r}")
        if (low is not None and item < low) or (high is not None and item > high):
            raise _fail(f"{where}[{i}] = {item} is outside [{low}, {high}]")
        out.append(float(item))
    return tuple(out)


def parse_quality(raw: bytes) -> QualityReference:
    """Parse and check ``quality.json``.

    Raises:
        QualityFormatError: not JSON, an unknown ``format_version``, or a missing or wrong field
            (the message names it).
    """
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise _fail(f"not valid JSON ({e})") from e
    if not isinstance(doc, dict):
        raise _fail("must be a JSON object")
    version = doc.get("format_version")
    if version != QUALITY_FORMAT_VERSION:
        raise _fail(
            f"format_version {version!r} is not one this agent reads ({QUALITY_FORMAT_VERSION})"
        )
    task = doc.get("task")
    if task not in _TASKS:
        raise _fail(f"task must be one of {', '.join(_TASKS)}, got {task!r}")
    keys = ("accuracy", "f1") if task == "classification" else ("mae",)
    metrics = doc.get("metrics")
    if not isinstance(metrics, dict) or set(metrics) != set(keys):
        raise _fail(f"metrics must be an object with exactly {', '.join(keys)}")
    checked = {k: _numbers([metrics[k]], f"metrics.{k}", low=0.0)[0] for k in keys}
    rows = doc.get("rows")
    if not isinstance(rows, dict):
        raise _fail("rows must be an object with truth and predicted")
    truth = _numbers(rows.get("truth"), "rows.truth")
    predicted = _numbers(rows.get("predicted"), "rows.predicted")
    if not truth or len(truth) != len(predicted):
        raise _fail(
            f"rows.truth ({len(truth)}) and rows.predicted ({len(predicted)}) must be equally "
            "long and not empty"
        )
    if len(truth) > MAX_ROWS:
        raise _fail(f"{len(truth)} rows is above the limit of {MAX_ROWS}")
    seed = doc.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise _fail(f"seed must be an integer, got {seed!r}")
    if task == "regression":
        return QualityReference(task, checked, truth, predicted, seed=seed)
    labels = doc.get("labels")
    if not isinstance(labels, list) or not labels:
        raise _fail("labels must be a non-empty list of the model's classes")
    for where, values in (("rows.truth", truth), ("rows.predicted", predicted)):
        bad = next((v for v in values if v != int(v) or not 0 <= v < len(labels)), None)
        if bad is not None:
            raise _fail(f"{where} holds {bad}, not an index into the {len(labels)} labels")
    confidence = _numbers(rows.get("confidence", []), "rows.confidence", low=0.0, high=1.0)
    if confidence and len(confidence) != len(truth):
        raise _fail(f"rows.confidence has {len(confidence)} entries for {len(truth)} rows")
    calibration = None
    raw_cal = doc.get("calibration")
    if raw_cal is not None:
        if not isinstance(raw_cal, dict):
            raise _fail("calibration must be an object with confidence and accuracy, or null")
        xs = _numbers(raw_cal.get("confidence"), "calibration.confidence", low=0.0, high=1.0)
        ys = _numbers(raw_cal.get("accuracy"), "calibration.accuracy", low=0.0, high=1.0)
        if not xs or len(xs) != len(ys):
            raise _fail("calibration.confidence and calibration.accuracy must be equally long")
        if any(b < a for a, b in itertools.pairwise(xs)) or any(
            b < a for a, b in itertools.pairwise(ys)
        ):
            raise _fail("calibration points must be in increasing order (a monotone map)")
        calibration = (xs, ys)
    return QualityReference(
        task,
        checked,
        truth,
        predicted,
        labels=tuple(labels),
        confidence=confidence,
        calibration=calibration,
        seed=seed,
    )
