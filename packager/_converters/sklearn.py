"""scikit-learn estimators and pipelines, converted with skl2onnx.

Classifiers are converted with ``zipmap=False`` so they output a ``label`` tensor and a
``probabilities`` tensor. A StandardScaler directly followed by a tree model is rewritten before
conversion to scale in float64 (``CastTransformer`` → scaler with ``div_cast`` → cast back), the
skl2onnx-documented cure for float32 rounding flipping tree decisions. The parity gate still
checks every build, whether or not this pattern applies.

Outlier detectors (IsolationForest, OneClassSVM, LocalOutlierFactor with ``novelty=True``) are an
``anomaly`` task: skl2onnx gives them a ``label`` (1 inlier, -1 outlier) and a ``scores`` output
(``decision_function``); the parity gate checks both and drift watches the score.

HistGradientBoosting models: skl2onnx 1.20 passes a Python ``False`` as a leaf's
``nodes_missing_value_tracks_true`` and onnx ≥ 1.18 refuses booleans in integer attributes
("Expected an int, got a boolean"); :func:`_hist_gradient_boosting_fix` casts it while
converting. Estimators skl2onnx has no converter for are refused up front, by name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import onnx
import pandas as pd

from edgepack.packager._converters import Prediction
from edgepack.packager._graph import rename_inputs
from edgepack.packager._reference import InputLayout, columns_layout, tensor_layout
from edgepack.packager.exceptions import UnsupportedModelError, short_error

_TREE_MODULES = ("sklearn.ensemble", "sklearn.tree")
_LINEAR_MODULES = ("sklearn.linear_model", "sklearn.svm", "sklearn.discriminant_analysis")
_NEURAL_MODULES = ("sklearn.neural_network",)


def _final(obj: Any) -> Any:
    from sklearn.pipeline import Pipeline

    while isinstance(obj, Pipeline):
        obj = obj.steps[-1][1]
    return obj


def _walk(obj: Any) -> list[Any]:
    """Every estimator inside ``obj`` (pipelines and column transformers opened), ``obj`` first."""
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import FeatureUnion, Pipeline

    found = [obj]
    if isinstance(obj, Pipeline):
        for _, step in obj.steps:
            found += _walk(step)
    elif isinstance(obj, ColumnTransformer):
        for _, step, _ in obj.transformers_:
            if not isinstance(step, str):
                found += _walk(step)
    elif isinstance(obj, FeatureUnion):
        for _, step in obj.transformer_list:
            found += _walk(step)
    return found


def _is_tree(obj: Any) -> bool:
    return type(obj).__module__.startswith(_TREE_MODULES)


def _cure_scaler_before_tree(obj: Any, options: dict[int, dict[str, Any]]) -> Any:
    """Rewrite ``StandardScaler → tree`` to scale in float64; returns the (maybe new) pipeline."""
    from skl2onnx.sklapi import CastTransformer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    if not isinstance(obj, Pipeline):
        return obj
    steps: list[tuple[str, Any]] = []
    changed = False
    for i, (name, step) in enumerate(obj.steps):
        following = obj.steps[i + 1][1] if i + 1 < len(obj.steps) else None
        if isinstance(step, StandardScaler) and following is not None and _is_tree(following):
            steps += [
                (f"{name}__cast64", CastTransformer(dtype=np.float64)),
                (name, step),
                (f"{name}__cast32", CastTransformer(dtype=np.float32)),
            ]
            options[id(step)] = {"div": "div_cast"}
            changed = True
        else:
            steps.append((name, _cure_scaler_before_tree(step, options)))
    if not changed:
        return obj
    rebuilt = Pipeline(steps)
    for _, step in rebuilt.steps:
        if isinstance(step, CastTransformer):
            step.fit(np.zeros((1, 1)))  # stateless; fit only marks it fitted
    return rebuilt


@contextlib.contextmanager
def _hist_gradient_boosting_fix() -> Iterator[None]:
    """While converting, pass skl2onnx's boolean missing-value flags to onnx as 0/1."""
    from skl2onnx.common import tree_ensemble

    original = tree_ensemble.add_node

    def add_node(*args: Any, nodes_missing_value_tracks_true: Any = 0, **kwargs: Any) -> Any:
        return original(
            *args, nodes_missing_value_tracks_true=int(nodes_missing_value_tracks_true), **kwargs
        )

    tree_ensemble.add_node = add_node
    try:
        yield
    finally:
        tree_ensemble.add_node = original


def _unconvertible(obj: Any) -> list[str]:
    """Names of the estimators inside ``obj`` that skl2onnx has no converter for."""
    from skl2onnx._supported_operators import sklearn_operator_name_map
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import FeatureUnion, Pipeline

    containers = (Pipeline, ColumnTransformer, FeatureUnion)
    return [
        type(step).__name__
        for step in _walk(obj)
        if not isinstance(step, containers) and type(step) not in sklearn_operator_name_map
    ]


def _is_outlier_detector(obj: Any) -> bool:
    from sklearn.base import is_outlier_detector

    return bool(is_outlier_detector(_final(obj)))


class SklearnConverter:
    """Any fitted scikit-learn estimator or Pipeline that skl2onnx can convert."""

    name: ClassVar[str] = "sklearn"

    def accepts(self, obj: Any) -> bool:
        try:
            from sklearn.base import BaseEstimator
        except ImportError:  # pragma: no cover - the packager extra brings scikit-learn
            return False
        return isinstance(obj, BaseEstimator)

    def describe(self, obj: Any) -> str:
        from sklearn.pipeline import Pipeline

        if isinstance(obj, Pipeline):
            return "Pipeline(" + " → ".join(type(s).__name__ for _, s in obj.steps) + ")"
        return type(obj).__name__

    def task(self, obj: Any) -> str:
        from sklearn.base import is_classifier, is_regressor

        if is_classifier(obj):
            return "classification"
        if is_regressor(obj):
            return "regression"
        return "anomaly" if _is_outlier_detector(obj) else "tensor"

    def feature_names(self, obj: Any) -> list[str] | None:
        names = getattr(obj, "feature_names_in_", None)
        return [str(c) for c in names] if names is not None else None

    def family(self, obj: Any) -> str | None:
        module = type(_final(obj)).__module__
        if module.startswith(_TREE_MODULES):
            return "tree"
        if module.startswith(_LINEAR_MODULES):
            return "linear"
        if module.startswith(_NEURAL_MODULES):
            return "neural"
        return None

    def class_labels(self, obj: Any) -> list[Any]:
        classes = getattr(_final(obj), "classes_", None)
        return (
            [c.item() if hasattr(c, "item") else c for c in classes] if classes is not None else []
        )

    def layout(self, obj: Any, frame: pd.DataFrame) -> InputLayout:
        from sklearn.compose import ColumnTransformer
        from sklearn.exceptions import NotFittedError
        from sklearn.utils.validation import check_is_fitted

        try:
            check_is_fitted(_final(obj))
        except NotFittedError as e:
            raise UnsupportedModelError(
                f"{self.describe(obj)} is not fitted; train it first"
            ) from e
        missing = _unconvertible(obj)
        if missing:
            raise UnsupportedModelError(
                f"edgepack cannot convert {self.describe(obj)}: skl2onnx has no converter for "
                f"{', '.join(dict.fromkeys(missing))}; supported are the estimators in "
                "skl2onnx.supported_converters() (most of scikit-learn, HistGradientBoosting and "
                "outlier detectors included), LightGBM, XGBoost and ONNX files"
            )
        final = _final(obj)
        if type(final).__name__ == "LocalOutlierFactor" and not getattr(final, "novelty", False):
            raise UnsupportedModelError(
                "LocalOutlierFactor without novelty=True only labels its training rows and cannot "
                "score new ones; refit it with LocalOutlierFactor(novelty=True)"
            )
        names = getattr(obj, "feature_names_in_", None)
        if names is None:
            return tensor_layout(frame, None, getattr(obj, "n_features_in_", None))
        columns = [str(c) for c in names]
        wants_columns = any(isinstance(s, ColumnTransformer) for s in _walk(obj))
        numeric = all(
            c in frame.columns and pd.api.types.is_numeric_dtype(frame[c]) for c in columns
        )
        if wants_columns or not numeric:
            return columns_layout(frame, columns)
        return tensor_layout(frame, columns, len(columns))

    def convert(self, obj: Any, layout: InputLayout, opset: int, ml_opset: int) -> onnx.ModelProto:
        from skl2onnx import convert_sklearn
        from skl2onnx.common.data_types import FloatTensorType, Int64TensorType, StringTensorType

        kinds = {"float32": FloatTensorType, "int64": Int64TensorType, "string": StringTensorType}
        initial_types = [(s.name, kinds[s.dtype](list(s.shape))) for s in layout.specs]
        options: dict[int, dict[str, Any]] = {}
        model = _cure_scaler_before_tree(obj, options)
        from sklearn.base import is_classifier

        for step in _walk(model):
            if is_classifier(step):
                options.setdefault(id(step), {})["zipmap"] = False
        try:
            with _hist_gradient_boosting_fix():
                converted = convert_sklearn(
                    model,
                    initial_types=initial_types,
                    target_opset={"": opset, "ai.onnx.ml": ml_opset},
                    options=options,
                )
        except Exception as e:
            raise UnsupportedModelError(
                f"skl2onnx cannot convert {self.describe(obj)}: {short_error(e)}"
            ) from e
        # skl2onnx turns column names into identifiers ('sepal length (cm)' → 'sepal_length__cm_');
        # the bundle keeps the names the data has.
        return rename_inputs(converted, [s.name for s in layout.specs])

    def _inputs(self, obj: Any, layout: InputLayout, frame: pd.DataFrame) -> Any:
        features = layout.select(frame)
        if getattr(obj, "feature_names_in_", None) is not None:
            return features
        return features.to_numpy()

    def predict(self, obj: Any, layout: InputLayout, frame: pd.DataFrame) -> Prediction:
        x = self._inputs(obj, layout, frame)
        task = self.task(obj)
        if task == "classification":
            probabilities = obj.predict_proba(x) if hasattr(obj, "predict_proba") else None
            return Prediction(labels=np.asarray(obj.predict(x)), probabilities=probabilities)
        if task == "regression":
            return Prediction(values=np.asarray(obj.predict(x), dtype=np.float64))
        if task == "anomaly":
            return Prediction(
                labels=np.asarray(obj.predict(x)),
                values=np.asarray(obj.decision_function(x), dtype=np.float64),
            )
        return Prediction(tensors=(np.asarray(obj.transform(x)),))
