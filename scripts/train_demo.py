"""Train the demo's churn model: a ColumnTransformer (scaled numbers, one-hot strings) + MLP.

Synthetic data from a fixed seed, so the demo needs no download. Writes ``churn.joblib`` and
``reference.csv`` (the training rows, used as reference data) into ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler


def churn_data(rows: int = 3000, seed: int = 7) -> tuple[pd.DataFrame, np.ndarray]:
    """Customers with tenure, spend, support calls, plan and region; churn depends on them."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "tenure_months": rng.integers(1, 72, rows).astype(float),
            "monthly_spend": rng.gamma(4.0, 12.0, rows).round(2),
            "support_calls": rng.poisson(1.5, rows).astype(float),
            "plan": rng.choice(["basic", "plus", "pro"], rows, p=[0.5, 0.3, 0.2]),
            "region": rng.choice(["north", "south", "east", "west"], rows),
        }
    )
    score = (
        -0.04 * frame.tenure_months
        + 0.6 * frame.support_calls
        + 0.01 * frame.monthly_spend
        + frame.plan.map({"basic": 0.8, "plus": 0.0, "pro": -0.7})
        + rng.normal(0, 0.5, rows)
    )
    return frame, (score > score.median()).astype(int).to_numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    frame, churned = churn_data()
    features = ColumnTransformer(
        [
            ("numbers", StandardScaler(), ["tenure_months", "monthly_spend", "support_calls"]),
            ("strings", OneHotEncoder(handle_unknown="ignore"), ["plan", "region"]),
        ]
    )
    model = make_pipeline(features, MLPClassifier((32, 16), max_iter=600, random_state=0))
    model.fit(frame, churned)
    joblib.dump(model, args.out / "churn.joblib")
    frame.to_csv(args.out / "reference.csv", index=False)
    print(f"trained churn model: accuracy {model.score(frame, churned):.3f} on {len(frame)} rows")


if __name__ == "__main__":
    main()
