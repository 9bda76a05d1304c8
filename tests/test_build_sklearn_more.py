"""More of scikit-learn, LightGBM's label shape, and the parity gate's ties (issue #10 items 2, 4).

HistGradientBoosting classifier and regressor (on rows with NaNs, which they handle natively),
outlier detectors as an ``anomaly`` task with label and score, SimpleImputer pipelines whose
reference rows hold NaNs, CalibratedClassifierCV, a 3-class LightGBM model, and a 20-tree forest
whose votes tie. Each bundle's model is rerun here against the source model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from build_helpers import build_file, bundle_files, manifest, run
from sklearn import datasets

from edgepack.formats.bundle import MODEL_FILE, REFERENCE_FILE
from edgepack.packager.exceptions import ReferenceDataError, UnsupportedModelError


def _iris(nan_every: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    x, y = datasets.load_iris(return_X_y=True, as_frame=True)
    x.columns = ["sl", "sw", "pl", "pw"]
    if nan_every:
        x.iloc[::nan_every, 1] = np.nan
    return x, y.to_numpy()


def _outputs(result: Any, frame: pd.DataFrame) -> list[np.ndarray]:
    return run(bundle_files(result)[MODEL_FILE], {"input": frame.to_numpy(np.float32)})


@pytest.mark.parametrize("kind", ["classifier", "regressor"])
def test_hist_gradient_boosting_builds_on_rows_with_nans(
    tmp_path: Path, keys: Any, kind: str
) -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    x, y = _iris(nan_every=7)
    if kind == "classifier":
        model = HistGradientBoostingClassifier(max_iter=20, random_state=0).fit(x, y)
    else:
        model = HistGradientBoostingRegressor(max_iter=20, random_state=0).fit(x, x["pl"].fillna(0))
    [result] = build_file(model, x, tmp_path, keys.private)
    assert result.ok, result.error
    outputs = _outputs(result, x)
    if kind == "classifier":
        assert (outputs[0] == model.predict(x)).all()
        assert np.abs(outputs[1] - model.predict_proba(x)).max() < 1e-4
    else:
        want = model.predict(x)
        assert np.abs(outputs[0].ravel() - want).max() / np.ptp(want) < 1e-4


@pytest.mark.parametrize("detector", ["isolation-forest", "one-class-svm", "lof-novelty"])
def test_outlier_detectors_are_an_anomaly_task(tmp_path: Path, keys: Any, detector: str) -> None:
    from sklearn.ensemble import IsolationForest
    from sklearn.neighbors import LocalOutlierFactor
    from sklearn.svm import OneClassSVM

    x, _ = _iris()
    if detector == "lof-novelty":
        # Iris is measured to 1 mm, so many rows tie at the 20th-neighbour distance, and which
        # tied neighbour counts is arbitrary (sklearn's tree vs ONNX TopK): scores then differ by
        # ~1.7% of their range in float32 *and* float64 alike. That is not precision: on
        # measurements without ties skl2onnx's float32 LOF is within 3e-7 of the range.
        x = x + np.random.default_rng(0).normal(scale=1e-3, size=x.shape)
    model = {
        "isolation-forest": lambda: IsolationForest(n_estimators=20, random_state=0),
        "one-class-svm": lambda: OneClassSVM(nu=0.1),
        "lof-novelty": lambda: LocalOutlierFactor(novelty=True),
    }[detector]().fit(x)
    [result] = build_file(model, x, tmp_path, keys.private)
    m = manifest(result)
    assert m["task"] == "anomaly"
    metrics = m["parity"]["metrics"]
    assert metrics["label_agreement"] >= 0.995
    assert metrics["max_relative_error"] <= m["parity"]["tolerance"]["max_relative_error"]
    labels, scores = _outputs(result, x)
    assert set(np.unique(labels)) <= {-1, 1}
    assert (labels.ravel() == model.predict(x)).mean() >= 0.995
    score = model.decision_function(x)
    assert np.abs(scores.ravel() - score).max() / np.ptp(score) <= 1e-3
    # drift watches the score
    reference = json.loads(bundle_files(result)[REFERENCE_FILE])
    assert reference["output"]["name"] == "score"
    assert reference["output"]["kind"] == "numeric"


def test_local_outlier_factor_without_novelty_is_one_clear_line(tmp_path: Path, keys: Any) -> None:
    from sklearn.neighbors import LocalOutlierFactor

    x, _ = _iris()
    with pytest.raises(UnsupportedModelError, match=r"novelty=True"):
        build_file(LocalOutlierFactor().fit(x), x, tmp_path, keys.private)


def test_imputer_pipeline_takes_reference_rows_with_nans(tmp_path: Path, keys: Any) -> None:
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    x, y = _iris(nan_every=5)
    model = make_pipeline(SimpleImputer(), LogisticRegression(max_iter=1000)).fit(x, y)
    [result] = build_file(model, x, tmp_path, keys.private)
    labels, probabilities = _outputs(result, x)
    assert (labels == model.predict(x)).all()
    assert np.abs(probabilities - model.predict_proba(x)).max() < 1e-4


def test_nans_the_model_cannot_take_name_the_column(tmp_path: Path, keys: Any) -> None:
    from sklearn.linear_model import LogisticRegression

    x, y = _iris()
    model = LogisticRegression(max_iter=1000).fit(x, y)
    with pytest.raises(ReferenceDataError, match=r"column\(s\) 'sw' hold missing values"):
        build_file(model, _iris(nan_every=5)[0], tmp_path, keys.private)


def test_text_in_a_numeric_column_names_column_and_row(tmp_path: Path, keys: Any) -> None:
    from sklearn.linear_model import LogisticRegression

    x, y = _iris()
    model = LogisticRegression(max_iter=1000).fit(x, y)
    bad = x.astype(object)
    bad.iloc[3, 2] = "twelve"
    with pytest.raises(ReferenceDataError, match=r"'pl'.* not numeric"):
        build_file(model, bad, tmp_path, keys.private)


def test_calibrated_classifier_builds(tmp_path: Path, keys: Any) -> None:
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.svm import LinearSVC

    x, y = _iris()
    model = CalibratedClassifierCV(LinearSVC(), cv=3).fit(x, y)
    [result] = build_file(model, x, tmp_path, keys.private)
    labels, probabilities = _outputs(result, x)
    assert (labels == model.predict(x)).mean() >= 0.995
    assert np.abs(probabilities - model.predict_proba(x)).max() < 1e-3


def test_lightgbm_three_classes_declares_a_batch_of_labels(tmp_path: Path, keys: Any) -> None:
    lightgbm = pytest.importorskip("lightgbm")
    x, y = _iris()
    model = lightgbm.LGBMClassifier(n_estimators=10, verbose=-1).fit(x, y)
    [result] = build_file(model, x, tmp_path, keys.private)
    m = manifest(result)
    assert [o["shape"] for o in m["outputs"]] == [[None], [None, 3]]
    labels, _ = _outputs(result, x)
    assert labels.shape == (len(x),)


def test_tied_forest_votes_are_not_disagreements(tmp_path: Path, keys: Any) -> None:
    """A 20-tree forest on iris ties 10/10 on some rows: the gate accepts either tied class."""
    from sklearn.ensemble import RandomForestClassifier

    x, y = _iris()
    model = RandomForestClassifier(n_estimators=20, random_state=4).fit(x, y)
    probabilities = model.predict_proba(x)
    top = np.sort(probabilities, axis=1)
    assert (np.abs(top[:, -1] - top[:, -2]) < 1e-12).any(), "premise: some votes tie"
    [result] = build_file(model, x, tmp_path, keys.private)
    m = manifest(result)
    assert m["parity"]["metrics"]["label_agreement"] == 1.0
    held_out = m["parity"]["metrics"]["rows"]
    assert 0 <= m["parity"]["metrics"]["tied_rows"] <= held_out
