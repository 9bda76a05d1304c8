"""The converter registry: one module per model framework.

A converter knows one framework: whether it accepts a loaded model object, what task and family
the model has, which input layout it needs, how to convert it to ONNX at a given opset, and how
to run the *source* model so the parity gate can compare against it. ``feature_names`` is
``None`` for a model that knows its inputs only by position (then the user names the reference
columns). Adding a framework
(PyTorch, say) is one new module here with a class that satisfies :class:`Converter`, plus one
line in ``_REGISTRY``. Modules are imported lazily, so a missing optional extra (lightgbm,
xgboost, onnxmltools) only matters to models that need it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import onnx
import pandas as pd

from edgepack.packager._reference import InputLayout
from edgepack.packager.exceptions import UnsupportedModelError

__all__ = ["Converter", "Prediction", "find_converter"]


@dataclass(frozen=True)
class Prediction:
    """What a model said for a batch of rows, in a form the parity gate compares.

    Classification fills ``labels`` and ``probabilities``; regression fills ``values``; an
    anomaly detector fills ``labels`` (1 inlier, -1 outlier) and ``values`` (its score);
    anything else fills ``tensors`` (every output, in order).
    """

    labels: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    values: np.ndarray | None = None
    tensors: tuple[np.ndarray, ...] = ()


class Converter(Protocol):
    """What the builder needs from a framework."""

    name: ClassVar[str]

    def accepts(self, obj: Any) -> bool: ...
    def describe(self, obj: Any) -> str: ...
    def task(self, obj: Any) -> str: ...
    def family(self, obj: Any) -> str | None: ...
    def class_labels(self, obj: Any) -> list[Any]: ...
    def feature_names(self, obj: Any) -> list[str] | None: ...
    def layout(self, obj: Any, frame: pd.DataFrame) -> InputLayout: ...
    def convert(
        self, obj: Any, layout: InputLayout, opset: int, ml_opset: int
    ) -> onnx.ModelProto: ...
    def predict(self, obj: Any, layout: InputLayout, frame: pd.DataFrame) -> Prediction: ...


# Order matters: LightGBM/XGBoost estimators are scikit-learn estimators too.
_REGISTRY = (
    ("edgepack.packager._converters.onnx_model", "OnnxConverter"),
    ("edgepack.packager._converters.boosting", "LightGBMConverter"),
    ("edgepack.packager._converters.boosting", "XGBoostConverter"),
    ("edgepack.packager._converters.sklearn", "SklearnConverter"),
)


def find_converter(obj: Any) -> Converter:
    """The first registered converter that accepts ``obj``.

    Raises:
        UnsupportedModelError: nothing accepts it; the message names the object's type.
    """
    for module_name, class_name in _REGISTRY:
        converter = getattr(importlib.import_module(module_name), class_name)()
        if converter.accepts(obj):
            return converter
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    raise UnsupportedModelError(
        f"edgepack cannot convert a {kind}; supported: ONNX files, scikit-learn estimators and "
        "pipelines, LightGBM and XGBoost models"
    )
