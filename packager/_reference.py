"""Reference data: load it, match it to the model's inputs, and split it for its four jobs.

The reference rows a user passes with ``--reference`` (CSV, Parquet or ``.npy``) feed the parity
check, int8 calibration, drift statistics and the golden samples. This module loads them into a
pandas DataFrame, decides the model's input layout from them (:class:`InputLayout`), turns rows
into onnxruntime feeds, and splits the rows deterministically into a calibration and a parity part.

Three layouts exist, the two skl2onnx uses and one for raw ONNX graphs:

* ``tensor``: one 2-D input ``[batch, n_features]`` of float32 (numeric models);
* ``columns``: one ``[batch, 1]`` input per column, float32, int64 or string (models that take a
  DataFrame with string columns, e.g. a ColumnTransformer with a OneHotEncoder);
* ``tensors``: several numeric inputs of any rank (an exported network with two inputs, a CNN
  taking ``[batch, 1, 8, 8]``); each takes the next ``prod(shape[1:])`` columns, in order.

Columns are matched by name. A ``.npy`` file has no names, and a model trained without names
knows only positions: then the user says which column is which (``--columns``, or the MLflow
signature), and a named file that does not say is refused rather than taken by position. Numeric
columns may hold missing values (NaN) when the model handles them (an imputer, or a
HistGradientBoosting model); an error about a value names its column and row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from edgepack.formats.manifest import TensorSpec
from edgepack.packager.exceptions import ReferenceDataError

__all__ = [
    "InputLayout",
    "ReferenceSplit",
    "columns_layout",
    "is_positional",
    "load_reference",
    "match_columns",
    "split_reference",
    "tensor_layout",
    "tensors_layout",
]

TENSOR_INPUT = "input"
_POSITIONAL = "edgepack_positional"


def is_positional(frame: pd.DataFrame) -> bool:
    """Whether the frame's column names are made up (``f0``, ``f1``, ... from a ``.npy`` file)."""
    return bool(frame.attrs.get(_POSITIONAL, False))


def match_columns(
    frame: pd.DataFrame, model_names: Sequence[str] | None, stated: Sequence[str] | None
) -> pd.DataFrame:
    """Reconcile the reference columns with the names the model knows and those the user stated.

    Args:
        frame: the loaded reference rows.
        model_names: the model's own feature names, or ``None`` if it knows only positions.
        stated: ``--columns`` (or an MLflow signature): the model's inputs in order.

    Returns:
        The frame, its columns renamed (a ``.npy`` file with ``stated`` names) or narrowed to
        ``stated`` in that order.

    Raises:
        ReferenceDataError: the stated names disagree with the model's own, are missing from the
            file, or a model without names meets a file with named columns and nothing says
            which is which.
    """
    if stated:
        stated = [str(c) for c in stated]
        if len(set(stated)) != len(stated):
            raise ReferenceDataError(f"--columns names a column twice: {', '.join(stated)}")
        if model_names is not None and list(model_names) != stated:
            raise ReferenceDataError(
                "--columns disagrees with the names the model was trained with "
                f"({', '.join(map(str, model_names))}); leave --columns out or correct it"
            )
        if is_positional(frame):
            if frame.shape[1] != len(stated):
                raise ReferenceDataError(
                    f"--columns names {len(stated)} columns but the .npy reference has "
                    f"{frame.shape[1]}"
                )
            renamed = frame.set_axis(stated, axis=1)
            renamed.attrs = {}
            return renamed
        _require_columns(frame, stated)
        return frame.loc[:, stated]
    if model_names is None and not is_positional(frame):
        shown = ", ".join(map(repr, list(frame.columns)[:8]))
        raise ReferenceDataError(
            "the model was trained without feature names, so it knows its inputs only by "
            f"position, and the reference file names its columns ({shown}"
            f"{', ...' if frame.shape[1] > 8 else ''}); say which columns the model takes, in "
            "its order, with --columns a,b,c"
        )
    return frame


def load_reference(path: Path) -> pd.DataFrame:
    """Load reference rows from CSV, Parquet or a 2-D ``.npy`` array.

    ``.npy`` arrays have no column names; their columns are called ``f0``, ``f1``, ...

    Raises:
        ReferenceDataError: missing or unreadable file, unknown suffix, empty data.
    """
    suffix = path.suffix.lower()
    if not path.is_file():
        raise ReferenceDataError(f"reference data {path} does not exist")
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path)
        elif suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        elif suffix == ".npy":
            array = np.load(path, allow_pickle=False)
            if array.ndim != 2:
                raise ReferenceDataError(
                    f"{path}: a .npy reference must be a 2-D array of rows, got shape {array.shape}"
                )
            frame = pd.DataFrame(array, columns=[f"f{i}" for i in range(array.shape[1])])
            frame.attrs[_POSITIONAL] = True
        else:
            raise ReferenceDataError(
                f"{path}: unknown reference format {suffix!r}; use .csv, .parquet or .npy"
            )
    except ReferenceDataError:
        raise
    except Exception as e:
        raise ReferenceDataError(f"cannot read reference data {path}: {e}") from e
    if frame.empty:
        raise ReferenceDataError(f"{path} holds no rows")
    frame.columns = [str(c) for c in frame.columns]
    return frame


def _is_numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


@dataclass(frozen=True)
class InputLayout:
    """How reference columns map onto the ONNX model's inputs."""

    mode: str  # "tensor", "columns" or "tensors"
    columns: tuple[str, ...]
    specs: tuple[TensorSpec, ...]

    def select(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The feature columns of ``frame``, in the model's order."""
        return frame.loc[:, list(self.columns)]

    def feeds(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        """onnxruntime feeds for ``frame``'s rows: each input takes its ``columns``, reshaped.

        Raises:
            ReferenceDataError: a value does not fit its input's type (names column and row).
        """
        feeds: dict[str, np.ndarray] = {}
        for spec in self.specs:
            arrays = [_column_values(frame, c, spec.dtype) for c in spec.columns]
            stacked = np.stack(arrays, axis=1) if len(arrays) > 1 else arrays[0].reshape(-1, 1)
            feeds[spec.name] = np.ascontiguousarray(stacked.reshape((-1, *_item_shape(spec))))
        return feeds


def _item_shape(spec: TensorSpec) -> tuple[int, ...]:
    """One row's shape for an input: its static dims after the batch, or (columns,)."""
    rest = spec.shape[1:]
    if rest and all(isinstance(d, int) for d in rest):
        return tuple(int(d) for d in rest)  # type: ignore[arg-type]
    return (len(spec.columns),)


def _column_values(frame: pd.DataFrame, column: str, dtype: str) -> np.ndarray:
    values = frame[column].to_numpy()
    if dtype == "string":
        return values.astype(str)
    kind = np.int64 if dtype == "int64" else np.float32
    try:
        converted = values.astype(kind)
    except (TypeError, ValueError) as e:
        bad = next((i for i, v in enumerate(values) if not _fits(v, kind)), None)
        where = f", row {bad} (0 = first data row)" if bad is not None else ""
        shown = f" value {values[bad]!r}" if bad is not None else ""
        raise ReferenceDataError(
            f"reference column {column!r}{where}:{shown} is not a "
            f"{'whole number' if kind is np.int64 else 'number'} ({e})"
        ) from e
    if kind is np.int64 and pd.isna(frame[column]).any():
        raise ReferenceDataError(
            f"reference column {column!r} has missing values, but the model takes it as int64"
        )
    return converted


def _fits(value: object, kind: type) -> bool:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return kind is not np.int64 or (math.isfinite(number) and number == int(number))


def tensor_layout(
    frame: pd.DataFrame,
    columns: Sequence[str] | None,
    n_features: int | None,
    input_name: str = TENSOR_INPUT,
) -> InputLayout:
    """A single float tensor input over ``columns`` (or all of ``frame``'s columns, in order).

    Raises:
        ReferenceDataError: a named column is missing, the count differs from ``n_features``, or a
            column is not numeric.
    """
    if columns is None:
        if n_features is not None and frame.shape[1] != n_features:
            raise ReferenceDataError(
                f"the model takes {n_features} features but the reference data has "
                f"{frame.shape[1]} columns ({', '.join(list(frame.columns)[:8])}"
                f"{', ...' if frame.shape[1] > 8 else ''}); pass exactly the model's input columns"
            )
        columns = list(frame.columns)
    _require_columns(frame, columns)
    if n_features is not None and len(columns) != n_features:
        raise ReferenceDataError(
            f"the model takes {n_features} features, the reference data matches {len(columns)}"
        )
    bad = [c for c in columns if not _is_numeric(frame[c])]
    if bad:
        raise ReferenceDataError(
            f"reference column(s) {', '.join(map(repr, bad))} are not numeric, but the model takes "
            "one numeric tensor"
        )
    spec = TensorSpec(input_name, "float32", (None, len(columns)), tuple(columns))
    return InputLayout("tensor", tuple(columns), (spec,))


def tensors_layout(
    frame: pd.DataFrame, inputs: Sequence[tuple[str, str, tuple[int | None, ...]]]
) -> InputLayout:
    """Several numeric inputs ``(name, dtype, shape)``; each takes the next columns, in order.

    An input's width is the product of its static dimensions after the batch (a 2-D input with a
    dynamic width takes what is left, if it is the last).

    Raises:
        ReferenceDataError: the widths do not add up to the frame's columns, or a column is not
            numeric.
    """
    columns = list(frame.columns)
    specs: list[TensorSpec] = []
    start = 0
    for position, (name, dtype, shape) in enumerate(inputs):
        rest = shape[1:]
        if rest and all(isinstance(d, int) for d in rest):
            width = math.prod(int(d) for d in rest if d is not None)
        elif position == len(inputs) - 1 and len(shape) == 2:
            width = len(columns) - start
        else:
            raise ReferenceDataError(
                f"input {name!r} has shape {list(shape)}: edgepack needs fixed dimensions after "
                "the batch to know how many reference columns it takes"
            )
        taken = columns[start : start + width]
        if len(taken) < width:
            raise ReferenceDataError(
                f"the model's inputs take at least {start + width} columns "
                f"({', '.join(f'{n} {list(sh)}' for n, _, sh in inputs)}), the reference data "
                f"has {len(columns)}"
            )
        specs.append(TensorSpec(name, dtype, tuple(shape), tuple(taken)))
        start += width
    if start != len(columns):
        raise ReferenceDataError(
            f"the model's inputs take {start} columns, the reference data has {len(columns)}; "
            "pass exactly the model's input columns"
        )
    bad = [c for c in columns if not _is_numeric(frame[c])]
    if bad:
        raise ReferenceDataError(
            f"reference column(s) {', '.join(map(repr, bad))} are not numeric, but the model's "
            "inputs are numeric tensors"
        )
    return InputLayout("tensors", tuple(columns), tuple(specs))


def columns_layout(
    frame: pd.DataFrame, columns: Sequence[str], dtypes: Mapping[str, str] | None = None
) -> InputLayout:
    """One ``[batch, 1]`` input per column; dtype from ``dtypes`` or from the data.

    Raises:
        ReferenceDataError: a column is missing.
    """
    _require_columns(frame, columns)
    specs = []
    for column in columns:
        dtype = (dtypes or {}).get(column)
        if dtype is None:
            series = frame[column]
            if pd.api.types.is_integer_dtype(series):
                dtype = "int64"
            elif _is_numeric(series):
                dtype = "float32"
            else:
                dtype = "string"
        specs.append(TensorSpec(column, dtype, (None, 1), (column,)))
    return InputLayout("columns", tuple(columns), tuple(specs))


def _require_columns(frame: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ReferenceDataError(
            f"reference data lacks the model's input column(s) {', '.join(map(repr, missing))}; "
            f"it has {', '.join(map(repr, list(frame.columns)[:10]))}"
        )


@dataclass(frozen=True)
class ReferenceSplit:
    """Reference rows split for their jobs; all three are feature-only frames whose index is the
    row's position in the reference data (0 = first data row)."""

    all: pd.DataFrame
    calibration: pd.DataFrame
    parity: pd.DataFrame


def split_reference(
    frame: pd.DataFrame,
    layout: InputLayout,
    calibration_rows: int,
    max_parity_rows: int = 5000,
    seed: int = 0,
) -> ReferenceSplit:
    """Shuffle once with a fixed seed; calibration rows come first and parity rows are held out.

    With few rows (less than twice ``calibration_rows``) calibration takes half and parity the
    other half, so the parity check never runs on the rows int8 was calibrated on.

    Raises:
        ReferenceDataError: fewer than 2 rows, or missing values in a non-numeric column
            (numeric NaNs pass: the source model says whether it accepts them).
    """
    features = layout.select(frame).reset_index(drop=True)
    if len(features) < 2:
        raise ReferenceDataError("reference data needs at least 2 rows (ideally 1,000 or more)")
    nulls = [
        c for c in features.columns if not _is_numeric(features[c]) and features[c].isna().any()
    ]
    if nulls:
        raise ReferenceDataError(
            f"reference column(s) {', '.join(map(repr, nulls))} have missing values; "
            "fill or drop them first"
        )
    order = np.random.default_rng(seed).permutation(len(features))
    shuffled = features.iloc[order]  # the index keeps each row's position in the reference file
    n_cal = min(calibration_rows, len(shuffled) // 2)
    calibration = shuffled.iloc[:n_cal]
    parity = shuffled.iloc[n_cal : n_cal + max_parity_rows]
    return ReferenceSplit(all=features, calibration=calibration, parity=parity)
