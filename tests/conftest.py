"""Fixtures shared by the whole suite: real keys and a small trained model with its data."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgepack.formats.keys import generate_private_key, private_key_pem, public_key_pem

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        default=False,
        help="run soaks and fault loops with ten times their CI iteration counts",
    )


@pytest.fixture(scope="session")
def long_factor(request: pytest.FixtureRequest) -> int:
    """How many times the CI iteration count a soak runs: 10 with ``--long``, else 1."""
    return 10 if request.config.getoption("--long") else 1


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path


def _write_pair(directory: Path, stem: str) -> KeyPair:
    directory.mkdir(parents=True, exist_ok=True)
    key = generate_private_key()
    private, public = directory / f"{stem}.key", directory / f"{stem}.pub"
    private.write_bytes(private_key_pem(key))
    os.chmod(private, 0o600)
    public.write_bytes(public_key_pem(key))
    return KeyPair(private, public)


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    """The build server's ECDSA P-256 signing key pair."""
    return _write_pair(tmp_path_factory.mktemp("keys"), "signing")


@pytest.fixture(scope="session")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    """A second, unrelated key pair (an attacker's, or another team's)."""
    return _write_pair(tmp_path_factory.mktemp("other-keys"), "other")


@pytest.fixture(scope="session")
def iris_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A random forest trained on iris, saved with joblib, and its reference CSV."""
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier

    directory = tmp_path_factory.mktemp("iris")
    x, y = load_iris(return_X_y=True, as_frame=True)
    model = RandomForestClassifier(n_estimators=10, random_state=0).fit(x, y)
    joblib.dump(model, directory / "model.joblib")
    x.to_csv(directory / "reference.csv", index=False)
    return directory / "model.joblib", directory / "reference.csv"


@pytest.fixture(scope="session")
def iris_bundles(
    tmp_path_factory: pytest.TempPathFactory, keys: KeyPair, iris_model: tuple[Path, Path]
) -> dict[str, Path]:
    """Real bundles of the iris model: versions 1, 2, 3 for x86_64-cpu, and v2 for arm64-cpu.

    Keys: ``"v1"``, ``"v2"``, ``"v3"`` and ``"arm64-v2"``. Signed with :func:`keys`.
    """
    from edgepack.packager._build import BuildRequest, build

    out = tmp_path_factory.mktemp("bundles")
    model, reference = iris_model
    found: dict[str, Path] = {}
    for version in (1, 2, 3):
        profiles = ("x86_64-cpu", "arm64-cpu") if version == 2 else ("x86_64-cpu",)
        results = build(
            BuildRequest(
                model=model,
                name="iris",
                version=version,
                profiles=profiles,
                reference=reference,
                key=keys.private,
                out_dir=out,
                trust_pickle=True,
            )
        )
        for result in results:
            assert result.ok, result.error
            assert result.bundle is not None
            prefix = "" if result.profile == "x86_64-cpu" else "arm64-"
            found[f"{prefix}v{version}"] = result.bundle
    return found


def write_agent_config(
    directory: Path, keys: KeyPair, *, profile: str = "x86_64-cpu", port: int = 0, extra: str = ""
) -> Path:
    """An agent.toml for a test device whose state lives in ``directory / "state"``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "agent.toml"
    path.write_text(
        f'device_id = "test-device"\nprofile = "{profile}"\nstate_dir = "state"\n'
        f'trusted_keys = ["{keys.public}"]\n[server]\nport = {port}\n{extra}'
    )
    return path
