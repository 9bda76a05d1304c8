"""Packager benchmark: build time, model size and parity per profile for a few model kinds.

Trains models on scikit-learn's bundled datasets (no downloads), builds every built-in profile
with ``edgepack.packager._build.build`` and writes a table into BENCHMARKS.md between the
``<!-- packager -->`` markers. Run: ``.venv/bin/python scripts/bench/bench_packager.py``.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
from sklearn.datasets import load_diabetes, load_digits
from sklearn.ensemble import GradientBoostingRegressor, RandomForestClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import write_section  # noqa: E402

from edgepack.formats.keys import generate_private_key, private_key_pem  # noqa: E402
from edgepack.packager._build import BuildRequest, build  # noqa: E402

PROFILES = ("x86_64-cpu", "x86_64-vnni-cpu", "arm64-cpu", "nvidia-gpu")
MARK = "packager"


def models() -> list[tuple[str, object, pd.DataFrame]]:
    digits_x, digits_y = load_digits(return_X_y=True, as_frame=True)
    digits_x.columns = [str(c) for c in digits_x.columns]
    diab_x, diab_y = load_diabetes(return_X_y=True, as_frame=True)
    return [
        (
            "MLP 64→256→128→10 (digits)",
            make_pipeline(
                StandardScaler(), MLPClassifier((256, 128), max_iter=300, random_state=0)
            ).fit(digits_x, digits_y),
            digits_x,
        ),
        (
            "RandomForest 100 trees (digits)",
            RandomForestClassifier(n_estimators=100, random_state=0).fit(digits_x, digits_y),
            digits_x,
        ),
        (
            "GradientBoostingRegressor (diabetes)",
            GradientBoostingRegressor(random_state=0).fit(diab_x, diab_y),
            diab_x,
        ),
    ]


def fp32_size(model: object, frame: pd.DataFrame) -> int:
    from edgepack.packager._converters import find_converter

    converter = find_converter(model)
    return len(converter.convert(model, converter.layout(model, frame), 17, 3).SerializeToString())


def main() -> None:
    warnings.filterwarnings("ignore")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp, "k.key")
        key.write_bytes(private_key_pem(generate_private_key()))
        for label, model, frame in models():
            joblib.dump(model, Path(tmp, "m.joblib"))
            frame.to_csv(Path(tmp, "r.csv"), index=False)
            start = time.perf_counter()
            results = build(
                BuildRequest(
                    model=Path(tmp, "m.joblib"),
                    name="bench",
                    version=1,
                    profiles=PROFILES,
                    reference=Path(tmp, "r.csv"),
                    key=key,
                    out_dir=Path(tmp, "dist"),
                    trust_pickle=True,
                )
            )
            total = time.perf_counter() - start
            base = fp32_size(model, frame)
            for r in results:
                parity = r.parity.summary() if r.parity else f"FAILED: {r.error}"
                ratio = f"{base / r.model_bytes:.2f}x" if r.model_bytes else "-"
                rows.append(
                    f"| {label} | {r.profile} | {r.precision} | {base:,} | "
                    f"{r.model_bytes or 0:,} | {ratio} | {parity} | "
                    f"{'yes' if r.target_verified else 'no'} | {r.seconds:.2f} |"
                )
            rows.append(f"| {label} | *all four, one command* | | | | | | | {total:.2f} |")
    cpu = platform.processor() or platform.machine()
    table = "\n".join(
        [
            f"Machine: {platform.machine()} {cpu}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, onnxruntime {__import__('onnxruntime').__version__}. "
            f"Reference rows: the training set. Numbers from `scripts/bench/bench_packager.py`.",
            "",
            "| model | profile | precision | fp32 ONNX bytes | shipped bytes | smaller by | parity "
            "(held-out rows) | checked on target | build s |",
            "| --- | --- | --- | ---: | ---: | ---: | --- | --- | ---: |",
            *rows,
        ]
    )
    write_section(MARK, "## Packager: build time, size and parity per profile", table)
    print(table)


if __name__ == "__main__":
    np.random.seed(0)
    main()
