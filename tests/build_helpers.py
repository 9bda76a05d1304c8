"""Shared by the packager's build tests: build a model or an ONNX graph and open its bundles."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import onnxruntime as ort
import pandas as pd

from edgepack.formats.bundle import MANIFEST_FILE, ArchiveLimits, read_archive
from edgepack.packager._build import BuildRequest, ProfileResult, build
from edgepack.packager._precision import Timing

ALL_PROFILES = ("x86_64-cpu", "x86_64-vnni-cpu", "arm64-cpu", "nvidia-gpu")
QUICK = Timing(seconds=0.02, rounds=2)


def build_file(
    model: Any,
    reference: pd.DataFrame | np.ndarray,
    directory: Path,
    key: Path,
    *,
    profiles: Sequence[str] = ("x86_64-cpu",),
    name: str = "m",
    version: int = 1,
    **options: Any,
) -> list[ProfileResult]:
    """Save ``model`` (an ONNX proto, or anything joblib can dump) and its reference, and build."""
    import onnx

    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(model, onnx.ModelProto):
        path = directory / "model.onnx"
        if not path.exists():
            onnx.save(model, path)
    elif isinstance(model, Path):
        path = model
    else:
        path = directory / "model.joblib"
        joblib.dump(model, path)
    if isinstance(reference, np.ndarray):
        ref = directory / "reference.npy"
        np.save(ref, reference)
    else:
        ref = directory / "reference.csv"
        reference.to_csv(ref, index=False)
    return build(
        BuildRequest(
            model=path,
            name=name,
            version=version,
            profiles=profiles,
            reference=ref,
            key=key,
            out_dir=directory / "out",
            trust_pickle=True,
            timing=QUICK,
            **options,
        )
    )


def bundle_files(result: ProfileResult) -> dict[str, bytes]:
    assert result.ok, result.error
    assert result.bundle is not None
    return read_archive(result.bundle.read_bytes(), ArchiveLimits())[1]


def manifest(result: ProfileResult) -> dict[str, Any]:
    return json.loads(bundle_files(result)[MANIFEST_FILE])


def run(model_bytes: bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)
