"""MLflow as a source and a record: ``edgepack build models:/NAME/VERSION`` (or ``runs:/RUN/PATH``).

Needs the ``mlflow`` extra (MLflow's own client, ``mlflow-skinny``); the tracking server or store
is whatever ``MLFLOW_TRACKING_URI`` (and ``MLFLOW_REGISTRY_URI``) name: a server, or a local
SQLite file. :func:`load_mlflow_model` resolves the URI through MLflow's client, downloads the
model's artifacts, and loads the flavor edgepack converts: ``onnx`` (the ``.onnx`` file, through
:func:`edgepack.packager._sources.load_model`), or ``sklearn``/``lightgbm``/``xgboost`` through
MLflow's own loader, which unpickles and therefore needs ``--trust-pickle`` just like a joblib
file. The model's signature gives the input columns' names (used where the model has none) and
types (a reference column of the wrong kind is an error naming it).

After the build, :func:`record_build` writes back to the run what was shipped: per profile a tag
with the bundle's sha256, its precision and parity, and one JSON artifact
``edgepack/NAME-VERSION.json`` with the whole record; a registered model version gets the same
tags. Recording failures are logged, never fatal: the bundles are already written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from edgepack._files import sha256_file
from edgepack.packager._sources import SourceModel, load_model
from edgepack.packager.exceptions import (
    ModelLoadError,
    ReferenceDataError,
    UnsupportedModelError,
    UntrustedPickleError,
    short_error,
)

__all__ = ["MlflowModel", "check_signature_types", "load_mlflow_model", "record_build"]

log = logging.getLogger(__name__)

_PICKLED_FLAVORS = ("sklearn", "lightgbm", "xgboost")
_NUMERIC_TYPES = frozenset({"double", "float", "long", "integer", "boolean"})


@dataclass(frozen=True)
class MlflowModel:
    """A model loaded from MLflow, with what its signature and run say."""

    source: SourceModel
    uri: str
    flavor: str
    run_id: str | None
    registered: tuple[str, str] | None = None  # (name, version) for models:/ URIs
    columns: list[str] | None = None
    column_types: dict[str, str] = field(default_factory=dict)


def _mlflow() -> Any:
    try:
        import mlflow
    except ImportError as e:
        raise UnsupportedModelError(
            "building from an MLflow URI needs MLflow's client: pip install 'edgepack[mlflow]'"
        ) from e
    return mlflow


def _resolve(client: Any, uri: str) -> tuple[str | None, tuple[str, str] | None]:
    """The run id behind ``uri`` and, for ``models:/``, the registered (name, version)."""
    if uri.startswith("runs:/"):
        run_id = uri.removeprefix("runs:/").split("/", 1)[0]
        return run_id or None, None
    rest = uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    else:
        name, _, number = rest.partition("/")
        if not number.isdigit():
            raise ModelLoadError(
                f"{uri}: give a registered model as models:/NAME/VERSION or models:/NAME@ALIAS"
            )
        version = client.get_model_version(name, number)
    return version.run_id, (name, str(version.version))


def _digest(directory: Path) -> str:
    """sha256 over every artifact file (relative path and bytes), in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def load_mlflow_model(uri: str, *, trust_pickle: bool = False) -> MlflowModel:
    """Load the model at an MLflow ``models:/`` or ``runs:/`` URI.

    Raises:
        UnsupportedModelError: MLflow's client is not installed, or no flavor edgepack converts.
        UntrustedPickleError: a pickled flavor without ``trust_pickle``.
        ModelLoadError: the URI does not resolve or the artifacts cannot be loaded.
    """
    mlflow = _mlflow()
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    try:
        run_id, registered = _resolve(MlflowClient(), uri)
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=tempfile.mkdtemp(prefix="edgepack-mlflow-")
            )
        )
        info = Model.load(str(local / "MLmodel"))
    except Exception as e:
        raise ModelLoadError(f"cannot load {uri} from MLflow: {short_error(e)}") from e
    flavors = info.flavors
    columns, types = None, {}
    if info.signature is not None and info.signature.inputs is not None:
        schema = info.signature.inputs
        if schema.has_input_names():
            columns = [str(n) for n in schema.input_names()]
            types = {
                str(spec.name): str(getattr(spec.type, "name", spec.type))
                for spec in schema.inputs
            }
    digest = _digest(local)
    if "onnx" in flavors:
        path = local / flavors["onnx"].get("data", "model.onnx")
        loaded = load_model(path)
        source = SourceModel(path, loaded.obj, digest, "onnx")
        flavor = "onnx"
    else:
        flavor = next((f for f in _PICKLED_FLAVORS if f in flavors), "")
        if not flavor:
            raise UnsupportedModelError(
                f"{uri} has flavors {', '.join(sorted(flavors))}; edgepack converts onnx, "
                "sklearn, lightgbm and xgboost models"
            )
        if not trust_pickle:
            raise UntrustedPickleError(
                f"{uri} is a pickled {flavor} model, and loading a pickle runs any code inside "
                "it; pass --trust-pickle only for a model your own pipeline logged"
            )
        try:
            obj = getattr(mlflow, flavor).load_model(str(local))
        except Exception as e:
            raise ModelLoadError(f"cannot load {uri} ({flavor}): {short_error(e)}") from e
        source = SourceModel(local / "MLmodel", obj, digest, "pickle")
    return MlflowModel(source, uri, flavor, run_id, registered, columns, types)


def check_signature_types(frame: pd.DataFrame, column_types: dict[str, str]) -> None:
    """Refuse a reference column whose kind (number or string) contradicts the signature."""
    for column, kind in column_types.items():
        if column not in frame.columns:
            continue
        numeric = pd.api.types.is_numeric_dtype(frame[column])
        if kind in _NUMERIC_TYPES and not numeric:
            raise ReferenceDataError(
                f"reference column {column!r} holds text, but the model's MLflow signature says "
                f"{kind}"
            )
        if kind == "string" and numeric:
            raise ReferenceDataError(
                f"reference column {column!r} holds numbers, but the model's MLflow signature "
                "says string"
            )


def record_build(model: MlflowModel, name: str, version: int, results: Sequence[Any]) -> None:
    """Write what was shipped back to the model's run (and registered version): best effort."""
    if model.run_id is None:
        return
    from mlflow.tracking import MlflowClient

    record: dict[str, Any] = {"name": name, "version": version, "source": model.uri, "bundles": {}}
    tags: dict[str, str] = {}
    for r in results:
        if not r.ok or r.bundle is None:
            record["bundles"][r.profile] = {"ok": False, "error": r.error}
            continue
        sha = sha256_file(r.bundle)
        record["bundles"][r.profile] = {
            "ok": True,
            "bundle": r.bundle.name,
            "sha256": sha,
            "precision": r.precision,
            "candidate": r.chosen,
            "parity": r.parity.metrics if r.parity else None,
        }
        tags[f"edgepack.{r.profile}.sha256"] = sha
        tags[f"edgepack.{r.profile}.precision"] = f"{r.precision} ({r.chosen})"
        tags[f"edgepack.{r.profile}.parity"] = r.parity.summary() if r.parity else ""
    try:
        client = MlflowClient()
        for key, value in tags.items():
            client.set_tag(model.run_id, key, value)
        client.log_dict(
            model.run_id,
            json.loads(json.dumps(record, default=str)),
            f"edgepack/{name}-{version}.json",
        )
        if model.registered is not None:
            for key, value in tags.items():
                client.set_model_version_tag(*model.registered, key, value)
    except Exception as e:  # noqa: BLE001 - the bundles exist; recording is a courtesy
        log.warning("could not record the build in MLflow run %s: %s", model.run_id, e)
