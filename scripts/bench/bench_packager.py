"""Packager benchmark: the precision chosen by measurement over a zoo of models × 4 profiles.

Trains 16 models on scikit-learn's bundled datasets or seeded synthetic data (no downloads):
neural nets (scikit-learn MLPs, raw ONNX graphs from ``onnx.helper``: an MLP and a CNN), tree
ensembles (forests, gradient boosting, HistGradientBoosting, LightGBM, XGBoost), linear models,
outlier detectors, an imputer pipeline and the demo's churn model. Each is built for every
built-in profile with ``edgepack.packager._build.build``; per profile the table shows the
chosen candidate, how many were tried, the shipped model's size against fp32, its latency at
batch 1 and 64 against fp32 (ratios from the same alternating rounds, medians), the parity the
gate measured, and the profile's build time (plus the shared time: loading, predictions, drift
calibration). Written into BENCHMARKS.md between the ``<!-- packager -->`` markers.
Run: ``.venv/bin/python scripts/bench/bench_packager.py``.

``--calibration`` times only the drift calibration (``reference_statistics``) of synthetic
30- and 64-column references, against the per-column, per-window loop it replaced, and writes
the ``<!-- calibration -->`` section.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import onnx
import pandas as pd
from onnx import TensorProto, helper, numpy_helper
from sklearn import datasets

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import write_section  # noqa: E402

from edgepack.formats.keys import generate_private_key, private_key_pem  # noqa: E402
from edgepack.packager._build import BuildRequest, build  # noqa: E402
from edgepack.packager._precision import Timing  # noqa: E402

PROFILES = ("x86_64-cpu", "x86_64-vnni-cpu", "arm64-cpu", "nvidia-gpu")
MARK = "packager"
TIMING = Timing(seconds=0.3, rounds=6)
RNG = np.random.default_rng(0)


def _w(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(
        (RNG.normal(size=shape) / np.sqrt(shape[0])).astype(np.float32), name
    )


def onnx_mlp(width: int = 512) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("MatMul", ["r2", "w3"], ["y"]),
    ]
    inits = [
        _w("w1", 64, width),
        _w("b1", width),
        _w("w2", width, width),
        _w("b2", width),
        _w("w3", width, 10),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "mlp", [x], [y], inits),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    return model


def onnx_cnn() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])
    bn = [
        numpy_helper.from_array(v, n)
        for n, v in (
            ("s", np.ones(32, np.float32)),
            ("b", np.zeros(32, np.float32)),
            ("m", np.zeros(32, np.float32)),
            ("v", np.ones(32, np.float32)),
        )
    ]
    nodes = [
        helper.make_node("Conv", ["image", "k1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "s", "b", "m", "v"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "k2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w", "bias"], ["logits"]),
    ]
    inits = [_w("k1", 32, 1, 3, 3), *bn, _w("k2", 64, 32, 3, 3), _w("w", 1024, 10), _w("bias", 10)]
    model = helper.make_model(
        helper.make_graph(nodes, "cnn", [x], [y], inits),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    return model


def zoo() -> list[tuple[str, Any, pd.DataFrame]]:
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import (
        GradientBoostingRegressor,
        HistGradientBoostingClassifier,
        HistGradientBoostingRegressor,
        IsolationForest,
        RandomForestClassifier,
        RandomForestRegressor,
    )
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, LinearSVC, OneClassSVM
    from train_demo import churn_data

    digits, digits_y = datasets.load_digits(return_X_y=True, as_frame=True)
    digits.columns = [f"p{c}" for c in range(64)]
    cancer, cancer_y = datasets.load_breast_cancer(return_X_y=True, as_frame=True)
    cancer.columns = [f"c{i}" for i in range(cancer.shape[1])]
    diab, diab_y = datasets.load_diabetes(return_X_y=True, as_frame=True)
    wide = pd.DataFrame(RNG.normal(size=(3000, 10)), columns=[f"x{i}" for i in range(10)])
    wide_y = wide.to_numpy() @ RNG.normal(size=10) + np.sin(wide["x0"] * 3)
    holes = cancer.copy()
    holes.iloc[::6, 3] = np.nan
    churn, churned = churn_data()
    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import OneHotEncoder

    churn_model = make_pipeline(
        ColumnTransformer(
            [
                ("n", StandardScaler(), ["tenure_months", "monthly_spend", "support_calls"]),
                ("s", OneHotEncoder(handle_unknown="ignore"), ["plan", "region"]),
            ]
        ),
        MLPClassifier(hidden_layer_sizes=(32, 16), max_iter=600, random_state=0),
    ).fit(churn, churned)
    import lightgbm
    import xgboost

    pixels = pd.DataFrame(digits.to_numpy() / 16.0, columns=[f"f{i}" for i in range(64)])
    return [
        ("demo churn MLP (ColumnTransformer)", churn_model, churn),
        (
            "MLP 64→256→128→10 (digits)",
            make_pipeline(
                StandardScaler(),
                MLPClassifier(hidden_layer_sizes=(256, 128), max_iter=300, random_state=0),
            ).fit(digits, digits_y),
            digits,
        ),
        (
            "MLPRegressor 10→64→64 (synthetic)",
            make_pipeline(
                StandardScaler(),
                MLPRegressor(hidden_layer_sizes=(64, 64), max_iter=500, random_state=0),
            ).fit(wide, wide_y),
            wide,
        ),
        ("ONNX MLP 64→512→512→10", onnx_mlp(), pixels),
        ("ONNX CNN 2×conv (8×8 images)", onnx_cnn(), pixels),
        (
            "RandomForest 100 (digits)",
            RandomForestClassifier(n_estimators=100, random_state=0).fit(digits, digits_y),
            digits,
        ),
        (
            "RandomForestRegressor 50 (diabetes)",
            RandomForestRegressor(n_estimators=50, random_state=0).fit(diab, diab_y),
            diab,
        ),
        (
            "GradientBoostingRegressor (diabetes)",
            GradientBoostingRegressor(random_state=0).fit(diab, diab_y),
            diab,
        ),
        (
            "HistGradientBoosting clf (cancer, NaNs)",
            HistGradientBoostingClassifier(max_iter=50, random_state=0).fit(holes, cancer_y),
            holes,
        ),
        (
            "HistGradientBoosting reg (diabetes)",
            HistGradientBoostingRegressor(max_iter=50, random_state=0).fit(diab, diab_y),
            diab,
        ),
        (
            "LightGBM 3-class (digits)",
            lightgbm.LGBMClassifier(n_estimators=50, verbose=-1).fit(digits, digits_y % 3),
            digits,
        ),
        (
            "XGBoost regressor (diabetes)",
            xgboost.XGBRegressor(n_estimators=50).fit(diab, diab_y),
            diab,
        ),
        (
            "scaler → LogisticRegression (cancer)",
            make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(
                cancer, cancer_y
            ),
            cancer,
        ),
        (
            "imputer → LogisticRegression (cancer, NaNs)",
            make_pipeline(SimpleImputer(), StandardScaler(), LogisticRegression(max_iter=2000)).fit(
                holes, cancer_y
            ),
            holes,
        ),
        (
            "SVC rbf (cancer)",
            make_pipeline(StandardScaler(), SVC(probability=True, random_state=0)).fit(
                cancer, cancer_y
            ),
            cancer,
        ),
        (
            "CalibratedClassifierCV(LinearSVC) (cancer)",
            make_pipeline(StandardScaler(), CalibratedClassifierCV(LinearSVC(), cv=3)).fit(
                cancer, cancer_y
            ),
            cancer,
        ),
        (
            "IsolationForest (cancer)",
            IsolationForest(n_estimators=100, random_state=0).fit(cancer),
            cancer,
        ),
        (
            "OneClassSVM (cancer)",
            make_pipeline(StandardScaler(), OneClassSVM(nu=0.05)).fit(cancer),
            cancer,
        ),
    ]


def calibration() -> None:
    """Time the drift calibration of 30 and 64 columns (2,000 rows, 3-class labels)."""
    from edgepack.packager._converters import Prediction
    from edgepack.packager._reference import columns_layout
    from edgepack.packager._statistics import ALPHA, _draws, reference_statistics

    rows = []
    for width in (30, 64):
        rng = np.random.default_rng(width)
        names = [f"x{i}" for i in range(width)]
        frame = pd.DataFrame(rng.normal(size=(2_000, width)), columns=names)
        frame["x0"] = rng.choice(["a", "b", "c"], size=2_000)
        labels = rng.integers(0, 3, size=2_000)
        layout = columns_layout(frame, names)
        seconds = {}
        for workers in (None, 1):
            start = time.perf_counter()
            stats = reference_statistics(
                frame, layout, "classification", Prediction(labels=labels), workers=workers
            )
            seconds[workers] = time.perf_counter() - start
        joint = stats.multivariate
        share = ALPHA / (3 if joint else 1)  # the columns share a third of alpha beside it
        rows.append(
            f"| {width} + label | {len(joint.features) if joint else 0} | "
            f"{_draws(share / (width + 1)):,} | "
            f"{seconds[1]:.2f} | {seconds[None]:.2f} |"
        )
    table = "\n".join(
        [
            f"Machine: {platform.machine()}, {os.cpu_count()} cores (load average "
            f"{os.getloadavg()[0]:.2f}), numpy {np.__version__}. 2,000 reference rows (1,000 "
            "held out), 4 window sizes. Per column `formats.drift.calibrate_windows` (all sizes "
            "of a column in one multinomial draw, binned KS and PSI calibrated together), "
            "enough bootstrap windows for at least 10 beyond each column's threshold, at most "
            "40,000 (with 30 columns sharing a third of alpha, about 4 beyond); the "
            "multivariate test (reconstruction error, T² and the leading-axis shift over every "
            "numeric feature) by a sparse bootstrap. One thread, or one per CPU (numpy's sampler "
            "drops the GIL; each column has its own seeded stream, so the bytes are the same). "
            "Numbers from `scripts/bench/bench_packager.py --calibration`.",
            "",
            "| columns | multivariate features | draws per column | 1 thread s | threads s |",
            "| --- | ---: | ---: | ---: | ---: |",
            *rows,
        ]
    )
    write_section("calibration", "## Packager: drift calibration time", table)
    print(table)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def main() -> None:
    warnings.filterwarnings("ignore")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp, "k.key")
        key.write_bytes(private_key_pem(generate_private_key()))
        for index, (label, model, frame) in enumerate(zoo()):
            work = Path(tmp, str(index))
            work.mkdir()
            if isinstance(model, onnx.ModelProto):
                path, ref = work / "m.onnx", work / "r.npy"
                onnx.save(model, path)
                np.save(ref, frame.to_numpy())
            else:
                path, ref = work / "m.joblib", work / "r.csv"
                joblib.dump(model, path)
                frame.to_csv(ref, index=False)
            start = time.perf_counter()
            results = build(
                BuildRequest(
                    model=path,
                    name="bench",
                    version=1,
                    profiles=PROFILES,
                    reference=ref,
                    key=key,
                    out_dir=work / "dist",
                    trust_pickle=True,
                    timing=TIMING,
                )
            )
            total = time.perf_counter() - start
            print(f"{label}: {total:.1f}s", flush=True)
            shared = results[0].shared_seconds
            for r in results:
                if not r.ok:
                    rows.append(f"| {label} | {r.profile} | FAILED: {r.error} | | | | | | |")
                    continue
                cands = {c["name"]: c for c in r.candidates}
                fp32, chosen = cands["fp32"], cands[r.chosen or "fp32"]
                tried = sum(1 for c in r.candidates if c["error"] is None)
                passed = sum(1 for c in r.candidates if (c["parity"] or {}).get("passed"))
                speed = chosen["speedup"]
                rows.append(
                    f"| {label} | {r.profile} | {r.chosen} | {passed}/{tried} of "
                    f"{len(r.candidates)} | {fp32['model_bytes']:,} → {chosen['model_bytes']:,} | "
                    f"{speed.get('1', 0):.2f}x / {speed.get('64', 0):.2f}x | "
                    f"{_best_quantized(r.candidates)} | {r.parity.summary() if r.parity else ''} | "
                    f"{r.seconds:.1f} (+{shared:.1f}) |"
                )
    cpu = platform.processor() or platform.machine()
    table = "\n".join(
        [
            f"Machine: {platform.machine()} {cpu}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, onnxruntime {__import__('onnxruntime').__version__}; "
            "no GPU provider here, so nvidia-gpu latencies are CPU figures that the choice "
            "ignores (only size counts there). Reference rows: the training set. Speed-ups are "
            "fp32 latency / candidate latency at batch 1 and 64, timed in the same alternating "
            f"rounds ({TIMING.rounds} rounds, {TIMING.seconds}s per candidate and batch, "
            "medians). *passed/tried* counts the candidates that passed the parity gate among "
            "those that could be made. Numbers from `scripts/bench/bench_packager.py`.",
            "",
            "| model | profile | shipped | passed/tried | fp32 → shipped bytes | speed-up b1 / b64 "
            "| best quantized candidate (speed-up b1/b64, parity) | parity of shipped | build s "
            "(+shared) |",
            "| --- | --- | --- | --- | ---: | ---: | --- | --- | ---: |",
            *rows,
        ]
    )
    write_section(MARK, "## Packager: precision chosen by measurement, per profile", table)
    print(table)


def _best_quantized(candidates: Any) -> str:
    quantized = [c for c in candidates if c["precision"] != "fp32" and c["error"] is None]
    if not quantized:
        return "-"
    best = max(quantized, key=lambda c: sum(c["speedup"].values()))
    verdict = "pass" if (best["parity"] or {}).get("passed") else "fail"
    s = best["speedup"]
    return f"{best['name']} {s.get('1', 0):.2f}x/{s.get('64', 0):.2f}x, {verdict}"


if __name__ == "__main__":
    calibration() if "--calibration" in sys.argv else main()
