"""Small models trained on scikit-learn's bundled datasets (no downloads), for the build tests.

Each function trains one model and returns a :class:`Trained`: the fitted estimator, the feature
rows it was trained on (used as the build's reference data), and what the packager should make of
it (task and model family). Sizes are kept small so the whole set trains in a few seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn import datasets

SEED = 0


@dataclass(frozen=True)
class Trained:
    """A fitted model and the feature rows it was trained on."""

    name: str
    model: Any
    frame: pd.DataFrame
    task: str  # "classification" | "regression"
    family: str  # "tree" | "linear" | "neural"


def _frame(
    loader: Callable[..., Any], *, identifiers: bool = True
) -> tuple[pd.DataFrame, np.ndarray]:
    """A bundled dataset as a DataFrame; ``identifiers`` turns "sepal length (cm)" into
    "sepal_length" (per-column ONNX inputs are named after the columns)."""
    x, y = loader(return_X_y=True, as_frame=True)
    if identifiers:
        x.columns = [c.replace(" (cm)", "").replace(" ", "_").replace("/", "_") for c in x.columns]
    return x, y.to_numpy()


def random_forest() -> Trained:
    """RandomForestClassifier on iris (3 classes)."""
    from sklearn.ensemble import RandomForestClassifier

    x, y = _frame(datasets.load_iris)
    model = RandomForestClassifier(n_estimators=20, max_depth=6, random_state=SEED).fit(x, y)
    return Trained("random-forest", model, x, "classification", "tree")


def gradient_boosting_regressor() -> Trained:
    """GradientBoostingRegressor on diabetes."""
    from sklearn.ensemble import GradientBoostingRegressor

    x, y = _frame(datasets.load_diabetes)
    model = GradientBoostingRegressor(n_estimators=30, max_depth=3, random_state=SEED).fit(x, y)
    return Trained("gradient-boosting", model, x, "regression", "tree")


def scaled_logistic_regression() -> Trained:
    """StandardScaler → LogisticRegression on breast_cancer (2 classes)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = _frame(datasets.load_breast_cancer)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x, y)
    return Trained("scaled-logreg", model, x, "classification", "linear")


def mlp() -> Trained:
    """StandardScaler → a small MLPClassifier on wine (3 classes)."""
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = _frame(datasets.load_wine)
    model = make_pipeline(
        StandardScaler(),
        MLPClassifier(hidden_layer_sizes=(16,), max_iter=2000, random_state=SEED),
    ).fit(x, y)
    return Trained("mlp", model, x, "classification", "neural")


def bare_mlp() -> Trained:
    """A small MLPClassifier alone (no scaler in the pipeline) on standardized wine."""
    from sklearn.neural_network import MLPClassifier

    x, y = _frame(datasets.load_wine)
    x = (x - x.mean()) / x.std()
    model = MLPClassifier(hidden_layer_sizes=(16,), max_iter=2000, random_state=SEED).fit(x, y)
    return Trained("bare-mlp", model, x, "classification", "neural")


def column_transformer(*, identifiers: bool = True) -> Trained:
    """ColumnTransformer (scaled numbers + one-hot strings) → LogisticRegression, string labels.

    The numeric columns come from iris; two string columns are drawn from a seeded RNG, one of
    them carrying signal, so the one-hot branch matters to the prediction. ``identifiers=False``
    keeps iris's own column names ("sepal length (cm)").
    """
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    x, y = _frame(datasets.load_iris, identifiers=identifiers)
    rng = np.random.default_rng(SEED)
    colours = np.array(["red", "green", "blue"])
    # The colour agrees with the species 70% of the time; the region is noise.
    colour = np.where(rng.random(len(y)) < 0.7, colours[y], rng.choice(colours, len(y)))
    frame = x.assign(colour=colour, region=rng.choice(["north", "south", "east"], len(y)))
    labels = np.array(["setosa", "versicolor", "virginica"])[y]
    numeric = list(x.columns)
    model = make_pipeline(
        ColumnTransformer([
            ("num", StandardScaler(), numeric),
            ("cat", OneHotEncoder(handle_unknown="ignore"), ["colour", "region"]),
        ]),
        LogisticRegression(max_iter=1000),
    ).fit(frame, labels)  # fmt: skip
    return Trained("column-transformer", model, frame, "classification", "linear")


def scaled_tree() -> Trained:
    """StandardScaler → DecisionTreeClassifier on breast_cancer (the float32-flip pattern)."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.tree import DecisionTreeClassifier

    x, y = _frame(datasets.load_breast_cancer)
    model = make_pipeline(StandardScaler(), DecisionTreeClassifier(random_state=SEED)).fit(x, y)
    return Trained("scaled-tree", model, x, "classification", "tree")


def lightgbm_classifier() -> Trained:
    """lightgbm.LGBMClassifier on wine (3 classes)."""
    import lightgbm

    x, y = _frame(datasets.load_wine)
    model = lightgbm.LGBMClassifier(
        n_estimators=30, num_leaves=8, min_child_samples=5, random_state=SEED, verbose=-1
    ).fit(x, y)
    return Trained("lightgbm", model, x, "classification", "tree")


def xgboost_regressor() -> Trained:
    """xgboost.XGBRegressor on diabetes, trained on a plain array (features f0, f1, ...)."""
    import xgboost

    x, y = _frame(datasets.load_diabetes)
    model = xgboost.XGBRegressor(n_estimators=30, max_depth=4, random_state=SEED)
    model.fit(x.to_numpy(), y)
    return Trained("xgboost", model, x, "regression", "tree")


def xgboost_on_dataframe() -> Trained:
    """xgboost.XGBRegressor on diabetes, trained on the DataFrame (named features)."""
    import xgboost

    x, y = _frame(datasets.load_diabetes)
    model = xgboost.XGBRegressor(n_estimators=30, max_depth=4, random_state=SEED).fit(x, y)
    return Trained("xgboost-dataframe", model, x, "regression", "tree")


def hist_gradient_boosting() -> Trained:
    """HistGradientBoostingClassifier on iris."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    x, y = _frame(datasets.load_iris)
    model = HistGradientBoostingClassifier(max_iter=10, random_state=SEED).fit(x, y)
    return Trained("hist-gradient-boosting", model, x, "classification", "tree")


MODELS: dict[str, Callable[[], Trained]] = {
    "random-forest": random_forest,
    "gradient-boosting": gradient_boosting_regressor,
    "scaled-logreg": scaled_logistic_regression,
    "mlp": mlp,
    "column-transformer": column_transformer,
    "scaled-tree": scaled_tree,
    "lightgbm": lightgbm_classifier,
    "xgboost": xgboost_regressor,
}


def scaler_tree_flip() -> Trained:
    """StandardScaler → DecisionTreeRegressor where float32 scaling flips tree decisions.

    Every input value is exactly representable in float32 (integers below 2**24), so casting the
    input loses nothing. A quarter of the rows sit on a grid of consecutive integers near 1e7, the
    rest at 0: after scaling, the grid lies at about 1.7 where neighbouring integers are only two
    float32 ulps apart. The target alternates with the integer's parity, so the tree splits
    between every pair of neighbours; onnxruntime's float32 ``Scaler`` (offset and scale rounded
    to float32) lands some rows one ulp off, on the wrong side of a split, and the prediction
    jumps by the whole output range. Scaling in float64 and casting once (the skl2onnx cure) gives
    exactly the float32 values scikit-learn's tree sees.
    """
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.tree import DecisionTreeRegressor

    grid = 1e7 + np.tile(np.arange(300, dtype=np.float64), 2)
    x = np.concatenate([grid, np.zeros(3 * len(grid))])
    frame = pd.DataFrame({"x": x})
    y = np.where(x == 0, 0.5, x % 2)
    model = make_pipeline(StandardScaler(), DecisionTreeRegressor(random_state=SEED)).fit(frame, y)
    return Trained("scaler-tree-flip", model, frame, "regression", "tree")


def scaler_tree_offset() -> Trained:
    """StandardScaler → DecisionTreeRegressor on values 1e6 + noise far below float32 resolution.

    float32 has a step of 0.0625 near 1e6, so the model's float32 input already erases the noise
    the tree splits on. No rewrite inside the graph can bring it back; only the parity gate can
    notice.
    """
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.tree import DecisionTreeRegressor

    rng = np.random.default_rng(SEED)
    x = 1e6 + rng.normal(0.0, 0.01, size=(1000, 2))
    frame = pd.DataFrame(x, columns=["a", "b"])
    y = np.sin(x[:, 0] * 300.0)
    model = make_pipeline(
        StandardScaler(), DecisionTreeRegressor(max_depth=8, random_state=SEED)
    ).fit(frame, y)
    return Trained("scaler-tree-offset", model, frame, "regression", "tree")
