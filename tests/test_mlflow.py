"""MLflow as a source and a record, against a real local tracking store and model registry
(SQLite, no server; issue #10 item 6).

A model trained without feature names is logged with a signature and registered; ``build`` of
``models:/iris/1`` and of ``runs:/RUN/model`` takes the column names from the signature, and
writes back to the run (and the registered version) what was shipped: the bundle's sha256, its
precision and parity, and a JSON record artifact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sklearn import datasets

from edgepack._files import sha256_file
from edgepack.packager._build import BuildRequest, build
from edgepack.packager._precision import Timing
from edgepack.packager.exceptions import ReferenceDataError, UntrustedPickleError

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("sqlalchemy")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tracking store + registry in one SQLite file, with one registered iris forest."""
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.ensemble import RandomForestClassifier

    root = tmp_path_factory.mktemp("mlflow")
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    patch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{root / 'mlflow.db'}")
    x, y = datasets.load_iris(return_X_y=True, as_frame=True)
    x.columns = ["sl", "sw", "pl", "pw"]
    model = RandomForestClassifier(n_estimators=10, random_state=0).fit(x.to_numpy(), y)
    experiment = mlflow.create_experiment("edgepack", artifact_location=str(root / "artifacts"))
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.sklearn.log_model(
            model,
            name="model",
            signature=infer_signature(x, y),
            registered_model_name="iris",
            serialization_format="cloudpickle",
        )
    reference = root / "reference.csv"
    x[["pw", "pl", "sw", "sl"]].to_csv(reference, index=False)  # another order: by name
    yield {"run_id": run.info.run_id, "reference": reference, "root": root, "model": model, "x": x}
    patch.undo()


def _build(store: Any, uri: str, tmp_path: Path, keys: Any, **kw: Any) -> Any:
    return build(
        BuildRequest(
            model=uri,
            name="iris",
            version=1,
            profiles=("x86_64-cpu",),
            reference=kw.pop("reference", store["reference"]),
            key=keys.private,
            out_dir=tmp_path,
            trust_pickle=kw.pop("trust_pickle", True),
            timing=Timing(0.02, 2),
        )
    )


def test_registered_model_builds_and_the_run_records_what_shipped(
    store: Any, tmp_path: Path, keys: Any
) -> None:
    from mlflow.tracking import MlflowClient

    [result] = _build(store, "models:/iris/1", tmp_path, keys)
    assert result.ok, result.error
    assert result.parity is not None
    assert result.parity.metrics["label_agreement"] == 1.0
    client = MlflowClient()
    tags = client.get_run(store["run_id"]).data.tags
    assert result.bundle is not None
    assert tags["edgepack.x86_64-cpu.sha256"] == sha256_file(result.bundle)
    assert tags["edgepack.x86_64-cpu.precision"].startswith(result.precision or "?")
    assert "labels 100.00%" in tags["edgepack.x86_64-cpu.parity"]
    version_tags = client.get_model_version("iris", "1").tags
    assert version_tags["edgepack.x86_64-cpu.sha256"] == sha256_file(result.bundle)
    record = client.download_artifacts(store["run_id"], "edgepack/iris-1.json", str(tmp_path))
    bundles = json.loads(Path(record).read_text())["bundles"]
    assert bundles["x86_64-cpu"]["sha256"] == sha256_file(result.bundle)


def test_run_uri_builds_with_the_signature_columns(store: Any, tmp_path: Path, keys: Any) -> None:
    from edgepack.formats.bundle import MANIFEST_FILE, ArchiveLimits, read_archive

    [result] = _build(store, f"runs:/{store['run_id']}/model", tmp_path, keys)
    assert result.ok, result.error
    assert result.bundle is not None
    files = read_archive(result.bundle.read_bytes(), ArchiveLimits())[1]
    manifest = json.loads(files[MANIFEST_FILE])
    assert manifest["inputs"][0]["columns"] == ["sl", "sw", "pl", "pw"]
    assert manifest["source"]["mlflow"]["run_id"] == store["run_id"]


def test_a_pickled_flavor_needs_trust(store: Any, tmp_path: Path, keys: Any) -> None:
    with pytest.raises(UntrustedPickleError, match="--trust-pickle"):
        _build(store, "models:/iris/1", tmp_path, keys, trust_pickle=False)


def test_a_reference_column_of_the_wrong_type_is_named(
    store: Any, tmp_path: Path, keys: Any
) -> None:
    bad = store["x"].astype(object)
    bad["pl"] = "text"
    path = tmp_path / "bad.csv"
    bad.to_csv(path, index=False)
    with pytest.raises(ReferenceDataError, match=r"'pl' holds text.*signature says double"):
        _build(store, "models:/iris/1", tmp_path, keys, reference=path)
