"""Reference data: load it, match it to the model's inputs, and split it for its four jobs.

The reference rows a user passes with ``--reference`` (CSV, Parquet or ``.npy``) feed the parity
check, int8 calibration, drift statistics and the golden samples. This module loads them into a
pandas DataFrame, decides the model's input layout from them (:class:`InputLayout`), turns rows
into onnxruntime feeds, and splits the rows deterministically into a calibration and a parity part.

Two layouts exist, the ones skl2onnx uses:

* ``tensor``: one 2-D input ``[batch, n_features]`` of float32 (numeric models);
* ``columns``: one ``[batch, 1]`` input per column, float32, int64 or string (models that take a
  DataFrame with string columns, e.g. a ColumnTransformer with a OneHotEncoder).
"""

from __future__ import annotations

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
    "load_reference",
    "split_reference",
    "tensor_layout",
]

TENSOR_INPUT = "input"


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

    mode: str  # "tensor" or "columns"
    columns: tuple[str, ...]
    specs: tuple[TensorSpec, ...]

    def select(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The feature columns of ``frame``, in the model's order."""
        return frame.loc[:, list(self.columns)]

    def feeds(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        """onnxruntime feeds for ``frame``'s rows."""
        if self.mode == "tensor":
            return {self.specs[0].name: frame.loc[:, list(self.columns)].to_numpy(np.float32)}
        feeds: dict[str, np.ndarray] = {}
        for spec, column in zip(self.specs, self.columns, strict=True):
            values = frame[column].to_numpy()
            if spec.dtype == "string":
                feeds[spec.name] = values.astype(str).reshape(-1, 1)
            elif spec.dtype == "int64":
                feeds[spec.name] = values.astype(np.int64).reshape(-1, 1)
            else:
                feeds[spec.name] = values.astype(np.float32).reshape(-1, 1)
        return feeds


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
        ReferenceDataError: fewer than 2 rows, or missing values in a feature column.
    """
    features = layout.select(frame).reset_index(drop=True)
    if len(features) < 2:
        raise ReferenceDataError("reference data needs at least 2 rows (ideally 1,000 or more)")
    nulls = [c for c in features.columns if features[c].isna().any()]
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
