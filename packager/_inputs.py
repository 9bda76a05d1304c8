"""What all profiles of one build share: the request, the model, its reference rows and predictions.

:func:`prepare` does the work that is the same for all of a build's profiles, once: it loads the
model (a file, or an MLflow ``models:/`` or ``runs:/`` URI through
:mod:`edgepack.packager._mlflow`), finds its converter, loads the reference rows and matches them
to the model's columns (``--columns``, or the MLflow signature's names), decides the input layout,
splits the rows into calibration and held-out parity rows, runs the source model on them, and
computes the drift statistics (``reference.json``) and, with ``--target``, ``quality.json``.
:func:`convert` then gives each profile its ONNX graph at the profile's opsets, converted once per
opset pair and copied for each profile. :mod:`edgepack.packager._build` drives a profile through
the rest; :mod:`edgepack.packager._record` writes down what it made.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import pandas as pd

from edgepack.formats.manifest import check_model_name
from edgepack.formats.quality import quality_json
from edgepack.packager._converters import Converter, Prediction, find_converter
from edgepack.packager._graph import check_limits, dynamic_batch, normalize_opsets
from edgepack.packager._parity import MIN_PARITY_ROWS
from edgepack.packager._precision import Timing
from edgepack.packager._profiles import Profile
from edgepack.packager._quality import pop_target, quality_reference
from edgepack.packager._reference import (
    InputLayout,
    ReferenceSplit,
    load_reference,
    match_columns,
    split_reference,
)
from edgepack.packager._sources import SourceModel, load_model
from edgepack.packager._statistics import reference_statistics, to_json
from edgepack.packager.exceptions import ConversionError, ReferenceDataError, short_error

if TYPE_CHECKING:
    from edgepack.packager._mlflow import MlflowModel

__all__ = ["CALIBRATION_ROWS", "BuildRequest", "Shared", "convert", "prepare"]

CALIBRATION_ROWS = 200
# Highest opsets the converters are known to produce correctly; profiles may allow more.
MAX_CONVERTER_OPSET = 18
MAX_CONVERTER_ML_OPSET = 3


@dataclass(frozen=True)
class BuildRequest:
    """Everything ``edgepack build`` was asked to do.

    ``model`` is a file path or an MLflow URI (``models:/NAME/VERSION``, ``runs:/RUN/PATH``).
    ``columns`` names the model's input columns in order, for a model trained without names.
    ``force`` replaces an existing bundle of the same name, version and profile whose content
    differs. ``timing`` bounds how long each precision candidate is timed.
    """

    model: Path | str
    name: str
    version: int
    profiles: Sequence[str]
    reference: Path
    key: Path
    out_dir: Path
    trust_pickle: bool = False
    profile_dirs: Sequence[Path] = ()
    columns: Sequence[str] | None = None
    force: bool = False
    timing: Timing = field(default_factory=Timing)
    target: str | None = None  # the reference column with the ground truth: quality.json


@dataclass
class Shared:
    """What every profile's build reuses."""

    source: SourceModel
    converter: Converter
    task: str
    layout: InputLayout
    split: ReferenceSplit
    source_parity: Prediction
    reference_json: bytes
    labels: list[Any]
    notes: list[str]
    mlflow: MlflowModel | None = None
    seconds: float = 0.0
    quality_json: bytes | None = None
    converted: dict[tuple[int, int], onnx.ModelProto] = field(default_factory=dict)


def _load_source(request: BuildRequest) -> tuple[SourceModel, MlflowModel | None]:
    """The model, and what MLflow says about it (``None`` for a file)."""
    text = str(request.model)
    if text.startswith(("models:/", "runs:/")):
        from edgepack.packager._mlflow import load_mlflow_model

        loaded = load_mlflow_model(text, trust_pickle=request.trust_pickle)
        return loaded.source, loaded
    return load_model(Path(request.model), trust_pickle=request.trust_pickle), None


def prepare(request: BuildRequest) -> Shared:
    """Load, match, split and predict what every profile of ``request`` reuses.

    Raises:
        EdgepackError: the model or the reference rows cannot be used (the message says why).
    """
    start = time.perf_counter()
    check_model_name(request.name)
    if request.version < 0:
        raise ValueError("--version must be a non-negative integer release counter")
    source, from_mlflow = _load_source(request)
    signature_columns = from_mlflow.columns if from_mlflow else None
    converter = find_converter(source.obj)
    frame = load_reference(request.reference)
    truth = None
    if request.target:
        frame, truth = pop_target(frame, request.target)
    model_names = converter.feature_names(source.obj)
    # --columns as given; else the MLflow signature's names, unless the model has its own
    stated = (
        list(request.columns)
        if request.columns
        else (signature_columns if model_names is None else None)
    )
    frame = match_columns(frame, model_names, stated)
    if from_mlflow is not None:
        from edgepack.packager._mlflow import check_signature_types

        check_signature_types(frame, from_mlflow.column_types)
    layout = converter.layout(source.obj, frame)
    split = split_reference(frame, layout, calibration_rows=CALIBRATION_ROWS)
    task = converter.task(source.obj)
    try:
        source_all = converter.predict(source.obj, layout, split.all)
    except Exception as e:
        hint = _value_hint(split.all)
        raise ReferenceDataError(
            f"the source model failed on the reference rows: {short_error(e)}{hint}"
        ) from e
    notes = []
    if len(split.parity) < MIN_PARITY_ROWS:
        notes.append(
            f"only {len(split.parity)} reference rows are held out for the parity gate "
            f"(of {len(split.all)}; {len(split.calibration)} calibrate int8): too few for a "
            f"99.5% label agreement or a 99th percentile to mean much; give "
            f"{MIN_PARITY_ROWS + CALIBRATION_ROWS:,} rows or more"
        )
    stats = reference_statistics(split.all, layout, task, source_all)
    labels = converter.class_labels(source.obj)
    quality = (
        None
        if truth is None
        else quality_json(quality_reference(task, truth, source_all, list(labels)))
    )
    return Shared(
        source=source,
        converter=converter,
        task=task,
        layout=layout,
        split=split,
        source_parity=converter.predict(source.obj, layout, split.parity),
        reference_json=to_json(stats),
        labels=labels,
        notes=notes,
        mlflow=from_mlflow,
        seconds=time.perf_counter() - start,
        quality_json=quality,
    )


def _value_hint(frame: pd.DataFrame) -> str:
    """Which column (and row) holds the value a source model choked on, if one can tell."""
    for column in frame.columns:
        values = frame[column]
        if not pd.api.types.is_numeric_dtype(values):
            numbers = pd.to_numeric(values, errors="coerce")
            bad = numbers.isna() & values.notna()
            if bad.any() and bad.mean() < 0.5:  # a numeric column with a stray text value
                row = int(np.flatnonzero(bad.to_numpy())[0])
                return (
                    f" (reference column {column!r}, row {row} (0 = first data row): value "
                    f"{values.iloc[row]!r} is not numeric)"
                )
    nulls = [c for c in frame.columns if frame[c].isna().any()]
    if nulls:
        return (
            f" (reference column(s) {', '.join(map(repr, nulls))} hold missing values the model "
            "does not accept: fill or drop them, or put a SimpleImputer in the pipeline)"
        )
    return ""


def convert(shared: Shared, profile: Profile) -> onnx.ModelProto:
    """The model as ONNX at ``profile``'s opsets (a copy: callers may change it).

    Raises:
        ConversionError: the converted graph is invalid or needs more than the profile allows.
    """
    opset = min(profile.max_opset, MAX_CONVERTER_OPSET)
    ml_opset = min(profile.max_ml_opset, MAX_CONVERTER_ML_OPSET)
    key = (opset, ml_opset)
    if key not in shared.converted:
        model = shared.converter.convert(shared.source.obj, shared.layout, opset, ml_opset)
        normalize_opsets(model, opset)
        dynamic_batch(model)
        # skl2onnx names each graph with a random uuid; the same inputs must give the same bytes
        model.graph.name = f"edgepack-{shared.source.sha256[:16]}"
        model.ir_version = min(model.ir_version, profile.max_ir_version)
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as e:
            raise ConversionError(f"the converted model is not valid ONNX: {e}") from e
        shared.converted[key] = model
    model = onnx.ModelProto()
    model.CopyFrom(shared.converted[key])
    check_limits(model, profile.max_opset, profile.max_ml_opset, profile.max_ir_version)
    return model
