"""Load the model a user hands to ``edgepack build``, refusing to run untrusted pickles.

ONNX files are parsed and checked with ``onnx.checker``; tensors stored as external data (files
beside the model, as exporters write for large models) are read in, and hashed with the model, so
the bundle's single ``model.onnx`` holds them. Pickles (``.joblib``, ``.pkl``,
``.pickle``) execute code while they load, so they are only opened with ``trust_pickle=True``
(``--trust-pickle`` on the command line). The loaded object then goes to the converter registry.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.packager.exceptions import ModelLoadError, UntrustedPickleError, short_error

__all__ = ["PICKLE_SUFFIXES", "SourceModel", "load_model"]

PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")


@dataclass(frozen=True)
class SourceModel:
    """The model as the user gave it."""

    path: Path
    obj: Any
    sha256: str
    format: str  # "onnx" or "pickle"


def load_model(path: Path, *, trust_pickle: bool = False) -> SourceModel:
    """Load an ONNX file or (with ``trust_pickle``) a joblib/pickle file.

    Raises:
        ModelLoadError: the file is missing, unreadable, corrupt, or of an unknown kind.
        UntrustedPickleError: a pickle without ``trust_pickle``.
    """
    suffix = path.suffix.lower()
    if suffix not in (".onnx", *PICKLE_SUFFIXES):
        raise ModelLoadError(
            f"{path}: unknown model format {suffix!r}; give an .onnx file or a scikit-learn/"
            "LightGBM/XGBoost model saved with joblib (.joblib, .pkl)"
        )
    if suffix in PICKLE_SUFFIXES and not trust_pickle:
        raise UntrustedPickleError(
            f"{path} is a pickle, and loading a pickle runs any code inside it; pass "
            "--trust-pickle only for a file you or your own pipeline produced"
        )
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelLoadError(f"cannot read model {path}: {e.strerror or e}") from e
    digest = hashlib.sha256(data)
    if suffix == ".onnx":
        model = _load_onnx(path, data, digest)
        return SourceModel(path, model, digest.hexdigest(), "onnx")
    return SourceModel(path, _load_pickle(path), digest.hexdigest(), "pickle")


def _external_locations(model: Any) -> list[str]:
    """The external-data files a model's initializers point at (relative to the model file)."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    locations = {
        ExternalDataInfo(t).location for t in model.graph.initializer if uses_external_data(t)
    }
    return sorted(locations)


def _load_onnx(path: Path, data: bytes, digest: Any) -> Any:
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    try:
        model = onnx.load_from_string(data)
    except Exception as e:
        raise ModelLoadError(f"{path} is not a valid ONNX model: {e}") from e
    locations = _external_locations(model)
    for location in locations:
        external = (path.parent / location).resolve()
        if path.parent.resolve() not in external.parents:
            raise ModelLoadError(
                f"{path}: external data {location!r} lies outside the model's directory"
            )
        try:
            digest.update(external.read_bytes())
        except OSError as e:
            raise ModelLoadError(
                f"{path} keeps tensors in {location!r} beside it, which cannot be read: "
                f"{e.strerror or e}; copy that file next to the model"
            ) from e
    try:
        if locations:
            load_external_data_for_model(model, str(path.parent))
        onnx.checker.check_model(model)
    except Exception as e:
        raise ModelLoadError(f"{path} is not a valid ONNX model: {e}") from e
    if not model.graph.node:
        raise ModelLoadError(f"{path} is not a valid ONNX model: the graph is empty")
    return model


def _load_pickle(path: Path) -> Any:
    import joblib

    try:
        return joblib.load(path)
    except Exception as e:
        raise ModelLoadError(
            f"cannot load {path}: {short_error(e)} (is it a joblib/pickle file, saved with "
            "the same library versions as installed here?)"
        ) from e
