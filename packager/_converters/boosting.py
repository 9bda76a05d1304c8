"""LightGBM and XGBoost models (their scikit-learn wrappers), converted with onnxmltools.

Needs the ``boosting`` extra (onnxmltools, lightgbm, xgboost). onnxmltools' XGBoost output may
have no default-domain opset import, and its LightGBM classifiers declare ``label`` as ``[1]``
whatever the batch; the builder's :func:`edgepack.packager._graph.normalize_opsets` and
:func:`~edgepack.packager._graph.dynamic_batch` fix both after conversion.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import numpy as np
import onnx
import pandas as pd

from edgepack.packager._converters import Prediction
from edgepack.packager._reference import InputLayout, tensor_layout
from edgepack.packager.exceptions import UnsupportedModelError, short_error


class _BoostingConverter:
    name: ClassVar[str] = ""
    module: ClassVar[str] = ""

    def accepts(self, obj: Any) -> bool:
        return type(obj).__module__.split(".")[0] == self.module

    def describe(self, obj: Any) -> str:
        return f"{self.module}.{type(obj).__name__}"

    def task(self, obj: Any) -> str:
        return "classification" if hasattr(obj, "predict_proba") else "regression"

    def family(self, obj: Any) -> str | None:
        return "tree"

    def class_labels(self, obj: Any) -> list[Any]:
        classes = getattr(obj, "classes_", None)
        return (
            [c.item() if hasattr(c, "item") else c for c in classes] if classes is not None else []
        )

    def feature_names(self, obj: Any) -> list[str] | None:
        names = getattr(obj, "feature_names_in_", None)
        return [str(c) for c in names] if names is not None else None

    def layout(self, obj: Any, frame: pd.DataFrame) -> InputLayout:
        names = getattr(obj, "feature_names_in_", None)
        columns = [str(c) for c in names] if names is not None else None
        return tensor_layout(frame, columns, getattr(obj, "n_features_in_", None))

    def _onnxmltools(self) -> Any:
        try:
            import onnxmltools
        except ImportError as e:
            raise UnsupportedModelError(
                f"converting {self.module} models needs onnxmltools: "
                "pip install 'edgepack[boosting]'"
            ) from e
        return onnxmltools

    def _opset(self, wanted: int) -> int:
        """onnxmltools refuses opsets above what it was tested with (15 in 1.16)."""
        from onnxmltools.convert.common.onnx_ex import get_maximum_opset_supported

        return min(wanted, get_maximum_opset_supported())

    def predict(self, obj: Any, layout: InputLayout, frame: pd.DataFrame) -> Prediction:
        x = layout.select(frame)
        if getattr(obj, "feature_names_in_", None) is None:
            x = x.to_numpy()
        if self.task(obj) == "classification":
            return Prediction(labels=np.asarray(obj.predict(x)), probabilities=obj.predict_proba(x))
        return Prediction(values=np.asarray(obj.predict(x), dtype=np.float64))


class LightGBMConverter(_BoostingConverter):
    """``lightgbm.LGBMClassifier`` / ``LGBMRegressor``."""

    name: ClassVar[str] = "lightgbm"
    module: ClassVar[str] = "lightgbm"

    def convert(self, obj: Any, layout: InputLayout, opset: int, ml_opset: int) -> onnx.ModelProto:
        tools = self._onnxmltools()
        from onnxmltools.convert.common.data_types import FloatTensorType

        spec = layout.specs[0]
        try:
            return tools.convert_lightgbm(
                obj,
                initial_types=[(spec.name, FloatTensorType(list(spec.shape)))],
                target_opset=self._opset(opset),
                zipmap=False,
            )
        except Exception as e:
            raise UnsupportedModelError(
                f"onnxmltools cannot convert {self.describe(obj)}: {short_error(e)}"
            ) from e


class XGBoostConverter(_BoostingConverter):
    """``xgboost.XGBClassifier`` / ``XGBRegressor``."""

    name: ClassVar[str] = "xgboost"
    module: ClassVar[str] = "xgboost"

    def convert(self, obj: Any, layout: InputLayout, opset: int, ml_opset: int) -> onnx.ModelProto:
        tools = self._onnxmltools()
        from onnxmltools.convert.common.data_types import FloatTensorType

        spec = layout.specs[0]
        if getattr(obj, "feature_names_in_", None) is not None:
            # onnxmltools only understands XGBoost's default feature names f0, f1, ...; the
            # column order is fixed by the layout, so the names can go.
            obj = copy.deepcopy(obj)
            obj.get_booster().feature_names = None
        try:
            return tools.convert_xgboost(
                obj,
                initial_types=[(spec.name, FloatTensorType(list(spec.shape)))],
                target_opset=self._opset(opset),
            )
        except Exception as e:
            raise UnsupportedModelError(
                f"onnxmltools cannot convert {self.describe(obj)}: {short_error(e)}"
            ) from e
