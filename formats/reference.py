"""``reference.json``: the drift reference a bundle carries, written and read here only. No I/O.

The packager computes the statistics (``edgepack.packager._statistics``) into a :class:`Reference`
and writes it with :func:`reference_json`; the device reads it back with :func:`parse_reference`
when it starts serving a model version, and its drift detector (``edgepack.agent._drift``)
consumes the parsed object, never the raw JSON. The file carries a ``format_version``: ``2``
(bins, counts and the calibrated thresholds per window size) is written; ``1`` (bins and counts
only, from the first packager) is still read, and such a bundle's windows are reported but never
judged. Anything else, or a malformed field, is a
:class:`~edgepack.formats.exceptions.ReferenceFormatError` that says what to do. The statistics
themselves (bins, binned KS, PSI, calibration) are :mod:`edgepack.formats.drift`; the layout is
``docs/bundle-format.md`` §5.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgepack.formats._payload import TextEnum
from edgepack.formats.exceptions import ReferenceFormatError

__all__ = [
    "REFERENCE_FORMAT_VERSION",
    "Calibration",
    "ColumnKind",
    "ColumnReference",
    "Multivariate",
    "MultivariateThresholds",
    "Persistence",
    "Reference",
    "Thresholds",
    "parse_reference",
    "reference_json",
]

REFERENCE_FORMAT_VERSION = 2
_READABLE = (1, 2)
_REBUILD = "rebuild the bundle with `edgepack build`"


class ColumnKind(TextEnum):
    NUMERIC = "numeric"  # quantile bins: inner edges, open-ended outer bins
    CATEGORICAL = "categorical"  # the top-K categories, then "other"


@dataclass(frozen=True)
class Thresholds:
    """The alarm thresholds of one column at one window size.

    ``ks`` and ``psi`` are calibrated together: the column alarms when either is exceeded. The
    strong ones (``None`` in bundles from before them) mark a window so far out that it counts
    as drifting on its own.
    """

    ks: float
    psi: float
    ks_strong: float | None = None
    psi_strong: float | None = None


@dataclass(frozen=True)
class MultivariateThresholds:
    """The multivariate statistics' thresholds at one window size (:class:`Multivariate`)."""

    reconstruction: float
    reconstruction_strong: float
    t2: float
    t2_strong: float
    shift: float = math.inf  # the largest |mean| along a principal axis, in standard errors
    shift_strong: float = math.inf


@dataclass(frozen=True)
class Multivariate:
    """Every numeric feature together: how the device standardizes a row, the principal
    components that reconstruct it, and the inverse covariance for Hotelling's T².

    The window's statistics are the mean reconstruction error of its rows (a change in how
    the features relate), T² of its mean row (a joint shift in location), and the largest
    shift of its mean along one principal axis (features moving together, which T² spreads
    over every axis).
    """

    features: tuple[str, ...]  # names of numeric features, in :attr:`Reference.features`
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    components: tuple[tuple[float, ...], ...]  # (k, features), orthonormal rows
    precision: tuple[tuple[float, ...], ...]  # (features, features)
    whitening: tuple[
        tuple[float, ...], ...
    ] = ()  # (axes, features): eigenvectors / sqrt(eigenvalue)
    thresholds: Mapping[int, MultivariateThresholds] = field(default_factory=dict)


@dataclass(frozen=True)
class ColumnReference:
    """One monitored column: an input feature (``input`` set) or the model's output."""

    name: str
    kind: ColumnKind
    counts: tuple[int, ...]  # numeric: len(edges) + 1; categorical: one per category
    n: int
    edges: tuple[float, ...] = ()  # numeric
    categories: tuple[str, ...] = ()  # categorical
    other: int = 0  # categorical: values outside ``categories``
    minimum: float | None = None  # numeric summaries (None without values)
    maximum: float | None = None
    mean: float | None = None
    std: float | None = None
    input: str | None = None  # the model input carrying it; None for the output
    index: int = 0  # its column inside that input tensor
    thresholds: Mapping[int, Thresholds] = field(default_factory=dict)  # window rows -> ...


@dataclass(frozen=True)
class Persistence:
    """A column drifts when it alarmed in ``alarms`` of its last ``of_windows`` windows."""

    alarms: int = 2
    of_windows: int = 3


@dataclass(frozen=True)
class Calibration:
    """How the thresholds were made (format 2)."""

    statistic: str
    alpha: float
    correction: str
    columns: int
    windows: tuple[int, ...]
    persistence: Persistence = Persistence()


@dataclass(frozen=True)
class Reference:
    """A parsed ``reference.json``."""

    rows: int
    features: tuple[ColumnReference, ...]
    output: ColumnReference | None
    holdout_rows: int = 0
    calibration: Calibration | None = None  # None: format 1, no thresholds
    format_version: int = REFERENCE_FORMAT_VERSION
    multivariate: Multivariate | None = None  # None: fewer than two numeric features, or older

    @property
    def persistence(self) -> Persistence:
        return self.calibration.persistence if self.calibration else Persistence()

    @property
    def columns(self) -> tuple[ColumnReference, ...]:
        """Every monitored column: the features in input order, then the output."""
        return self.features + ((self.output,) if self.output is not None else ())


# -- writing -------------------------------------------------------------------------------------


def _column_json(column: ColumnReference, thresholds: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": column.name,
        "kind": column.kind.value,
        "counts": list(column.counts),
        "n": column.n,
    }
    if column.kind is ColumnKind.NUMERIC:
        entry["edges"] = list(column.edges)
        entry.update(min=column.minimum, max=column.maximum, mean=column.mean, std=column.std)
    else:
        entry["categories"] = list(column.categories)
        entry["other"] = column.other
    if column.input is not None:
        entry.update(input=column.input, index=column.index)
    if thresholds:
        entry["thresholds"] = {
            str(w): _thresholds_json(t) for w, t in sorted(column.thresholds.items())
        }
    return entry


def _thresholds_json(t: Thresholds) -> dict[str, float]:
    out = {"ks": t.ks, "psi": t.psi}
    if t.ks_strong is not None and t.psi_strong is not None:
        out.update(ks_strong=t.ks_strong, psi_strong=t.psi_strong)
    return out


def _multivariate_json(m: Multivariate) -> dict[str, Any]:
    return {
        "features": list(m.features),
        "mean": list(m.mean),
        "scale": list(m.scale),
        "components": [list(row) for row in m.components],
        "precision": [list(row) for row in m.precision],
        "whitening": [list(row) for row in m.whitening],
        "thresholds": {
            str(w): {
                "reconstruction": t.reconstruction,
                "reconstruction_strong": t.reconstruction_strong,
                "t2": t.t2,
                "t2_strong": t.t2_strong,
                "shift": t.shift,
                "shift_strong": t.shift_strong,
            }
            for w, t in sorted(m.thresholds.items())
        },
    }


def reference_json(reference: Reference) -> bytes:
    """The file's bytes: canonical JSON (sorted keys, two-space indent, trailing newline).

    Raises:
        ValueError: a format 2 reference without its calibration (a packager bug).
    """
    calibrated = reference.format_version >= 2
    document: dict[str, Any] = {
        "format_version": reference.format_version,
        "rows": reference.rows,
    }
    document["features"] = [_column_json(c, calibrated) for c in reference.features]
    output = reference.output
    document["output"] = _column_json(output, calibrated) if output is not None else None
    if calibrated:
        if reference.calibration is None:
            raise ValueError("a format 2 reference needs its calibration")
        c = reference.calibration
        document["holdout_rows"] = reference.holdout_rows
        document["calibration"] = {
            "statistic": c.statistic,
            "alpha": c.alpha,
            "correction": c.correction,
            "columns": c.columns,
            "windows": list(c.windows),
            "persistence": {"alarms": c.persistence.alarms, "of_windows": c.persistence.of_windows},
        }
        if reference.multivariate is not None:
            document["multivariate"] = _multivariate_json(reference.multivariate)
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


# -- reading -------------------------------------------------------------------------------------


def _bad(where: str, wanted: str, value: Any) -> ReferenceFormatError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return ReferenceFormatError(
        f"reference.json: field {where!r} must be {wanted}, not {shown}; {_REBUILD}"
    )


def _get(data: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise ReferenceFormatError(f"reference.json: missing field {where + key!r}; {_REBUILD}")
    return data[key]


def _int(data: Mapping[str, Any], key: str, where: str, minimum: int = 0) -> int:
    value = _get(data, key, where)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad(where + key, f"an integer >= {minimum}", value)
    return value


def _number(value: Any, where: str, *, finite: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(where, "a number", value)
    if finite and not math.isfinite(value):
        raise _bad(where, "a finite number", value)
    return float(value)


def _optional_number(data: Mapping[str, Any], key: str, where: str) -> float | None:
    value = data.get(key)
    return None if value is None else _number(value, where + key)


def _str(data: Mapping[str, Any], key: str, where: str) -> str:
    value = _get(data, key, where)
    if not isinstance(value, str):
        raise _bad(where + key, "a string", value)
    return value


def _list(data: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = _get(data, key, where)
    if not isinstance(value, list):
        raise _bad(where + key, "a list", value)
    return value


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _bad(where, "an object", value)
    return value


def _thresholds(raw: Any, where: str) -> Mapping[int, Thresholds]:
    out = {}
    for window, entry in _object(raw, where).items():
        if not window.isdigit() or int(window) <= 0:
            raise _bad(f"{where}.{window}", "keyed by a window size in rows", window)
        values = _object(entry, f"{where}.{window}")
        ks = _number(_get(values, "ks", f"{where}.{window}."), f"{where}.{window}.ks")
        value_psi = _number(_get(values, "psi", f"{where}.{window}."), f"{where}.{window}.psi")
        strong = [
            _optional_number(values, key, f"{where}.{window}.")
            for key in ("ks_strong", "psi_strong")
        ]
        out[int(window)] = Thresholds(ks, value_psi, strong[0], strong[1])
    return out


def _matrix(
    data: Mapping[str, Any], key: str, where: str, columns: int
) -> tuple[tuple[float, ...], ...]:
    rows = _list(data, key, where)
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != columns:
            raise _bad(f"{where}{key}[{i}]", f"a list of {columns} numbers", row)
        out.append(tuple(_number(x, f"{where}{key}[{i}][]", finite=True) for x in row))
    return tuple(out)


def _multivariate(raw: Any, features: tuple[ColumnReference, ...]) -> Multivariate:
    where = "multivariate."
    data = _object(raw, "multivariate")
    names = _list(data, "features", where)
    numeric = {f.name for f in features if f.kind is ColumnKind.NUMERIC}
    if len(names) < 2 or not all(isinstance(n, str) and n in numeric for n in names):
        raise _bad(where + "features", "two or more names of numeric features", names)
    d = len(names)
    vectors = []
    for key in ("mean", "scale"):
        values = _list(data, key, where)
        if len(values) != d:
            raise _bad(where + key, f"{d} numbers, one per feature", values)
        vectors.append(tuple(_number(x, f"{where}{key}[]", finite=True) for x in values))
    if any(x <= 0 for x in vectors[1]):
        raise _bad(where + "scale", "positive numbers", vectors[1])
    components = _matrix(data, "components", where, d)
    precision = _matrix(data, "precision", where, d)
    whitening = _matrix(data, "whitening", where, d)
    if not 1 <= len(whitening) <= d:
        raise _bad(where + "whitening", f"1 to {d} rows", whitening)
    if not 1 <= len(components) <= d or len(precision) != d:
        raise _bad(where + "components", f"1 to {d} rows (and precision {d} rows)", components)
    thresholds = {}
    for window, entry in _object(_get(data, "thresholds", where), where + "thresholds").items():
        at = f"{where}thresholds.{window}."
        if not window.isdigit() or int(window) <= 0:
            raise _bad(at.rstrip("."), "keyed by a window size in rows", window)
        limits = _object(entry, at.rstrip("."))
        thresholds[int(window)] = MultivariateThresholds(
            *(
                _number(_get(limits, key, at), at + key)
                for key in (
                    "reconstruction",
                    "reconstruction_strong",
                    "t2",
                    "t2_strong",
                    "shift",
                    "shift_strong",
                )
            )
        )
    return Multivariate(
        tuple(names), vectors[0], vectors[1], components, precision, whitening, thresholds
    )


def _column(raw: Any, where: str, *, output: bool, version: int) -> ColumnReference:
    data = _object(raw, where.rstrip("."))
    try:
        kind = ColumnKind(_get(data, "kind", where))
    except ValueError as e:
        raise _bad(where + "kind", "'numeric' or 'categorical'", data["kind"]) from e
    counts = _list(data, "counts", where)
    for i, count in enumerate(counts):
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise _bad(f"{where}counts[{i}]", "an integer >= 0", count)
    extra: dict[str, Any] = {}
    if kind is ColumnKind.NUMERIC:
        edges = tuple(
            _number(e, f"{where}edges[]", finite=True) for e in _list(data, "edges", where)
        )
        if list(edges) != sorted(edges) or len(counts) != len(edges) + 1:
            raise _bad(where + "edges", f"sorted, one fewer than the {len(counts)} counts", edges)
        extra.update(edges=edges)
        for key, name in (("min", "minimum"), ("max", "maximum"), ("mean", "mean"), ("std", "std")):
            extra[name] = _optional_number(data, key, where)
    else:
        categories = _list(data, "categories", where)
        if not all(isinstance(c, str) for c in categories) or len(categories) != len(counts):
            raise _bad(where + "categories", f"{len(counts)} strings, one per count", categories)
        extra.update(categories=tuple(categories), other=_int(data, "other", where))
    if not output:
        extra.update(input=_str(data, "input", where), index=_int(data, "index", where))
    if version >= 2:
        extra["thresholds"] = _thresholds(_get(data, "thresholds", where), where + "thresholds")
    return ColumnReference(
        name=_str(data, "name", where),
        kind=kind,
        counts=tuple(counts),
        n=_int(data, "n", where),
        **extra,
    )


def _calibration(raw: Any) -> Calibration:
    data = _object(raw, "calibration")
    windows = _list(data, "windows", "calibration.")
    if not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in windows):
        raise _bad("calibration.windows", "a list of window sizes", windows)
    persistence = _object(_get(data, "persistence", "calibration."), "calibration.persistence")
    alarms = _int(persistence, "alarms", "calibration.persistence.", minimum=1)
    of_windows = _int(persistence, "of_windows", "calibration.persistence.", minimum=alarms)
    return Calibration(
        statistic=_str(data, "statistic", "calibration."),
        alpha=_number(_get(data, "alpha", "calibration."), "calibration.alpha"),
        correction=_str(data, "correction", "calibration."),
        columns=_int(data, "columns", "calibration."),
        windows=tuple(windows),
        persistence=Persistence(alarms, of_windows),
    )


def parse_reference(raw: bytes) -> Reference:
    """Read a bundle's ``reference.json``.

    Args:
        raw: the file's bytes.

    Returns:
        The validated :class:`Reference`.

    Raises:
        ReferenceFormatError: not a JSON object, no ``format_version``, a version this edgepack
            does not know (a newer one: upgrade edgepack), or a malformed field (named).
    """
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ReferenceFormatError(f"reference.json is not valid JSON: {e}; {_REBUILD}") from e
    if not isinstance(data, dict):
        raise ReferenceFormatError(f"reference.json must be a JSON object; {_REBUILD}")
    version = data.get("format_version")
    if version is None:
        raise ReferenceFormatError(f"reference.json has no format_version; {_REBUILD}")
    if isinstance(version, int) and not isinstance(version, bool) and version > _READABLE[-1]:
        raise ReferenceFormatError(
            f"reference.json has format_version {version}, newer than this edgepack understands "
            f"({_READABLE[-1]}): upgrade edgepack on the device"
        )
    if version not in _READABLE or isinstance(version, bool):
        raise ReferenceFormatError(
            f"reference.json has format_version {version!r}, which this edgepack does not know "
            f"(it reads {', '.join(map(str, _READABLE))}); {_REBUILD}"
        )
    features = _list(data, "features", "")
    output = data.get("output")
    parsed = tuple(
        _column(f, f"features[{i}].", output=False, version=version) for i, f in enumerate(features)
    )
    multivariate = data.get("multivariate")
    return Reference(
        rows=_int(data, "rows", ""),
        features=parsed,
        output=None if output is None else _column(output, "output.", output=True, version=version),
        holdout_rows=_int(data, "holdout_rows", "") if version >= 2 else 0,
        calibration=_calibration(_get(data, "calibration", "")) if version >= 2 else None,
        format_version=version,
        multivariate=None
        if multivariate is None or version < 2
        else _multivariate(multivariate, parsed),
    )
