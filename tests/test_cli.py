"""The ``edgepack`` command, run as a subprocess the way an operator or a CI job runs it.

One real build (iris, two profiles) per module feeds the build/verify/inspect checks. Every bad
input is one lie in a fresh directory: the command must exit non-zero, say why in one ``error:``
line on stderr (no traceback), and leave the directory exactly as it was (no bundle, no partial
file, no report).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from edgepack.formats.keys import load_private_key, load_public_key, public_key_pem
from edgepack.packager._profiles import DEFAULT_PROFILE_DIR

EDGEPACK = Path(sys.executable).parent / "edgepack"
TRACEBACK = "Traceback (most recent call last)"
PROFILES = ("x86_64-cpu", "arm64-cpu")
NAME, VERSION = "iris", 3
SHIPPED_IDS = sorted(p.stem for p in DEFAULT_PROFILE_DIR.glob("*.toml"))


def edgepack(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EDGEPACK), *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its content (None for directories)."""
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def error_text(result: subprocess.CompletedProcess[str]) -> str:
    """The one ``error:`` line of stderr, unwrapped; fails if stderr holds anything else."""
    assert TRACEBACK not in result.stdout + result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    assert lines[0].startswith("error:"), result.stderr
    # rich wraps at 160 columns: a wrapped line is nearly full, a second message line is not.
    assert all(len(line) > 100 for line in lines[:-1]), f"more than one line:\n{result.stderr}"
    return re.sub(r"\s+", " ", " ".join(line.strip() for line in lines))


def manifest_of(bundle: Path) -> dict[str, Any]:
    with tarfile.open(bundle) as archive:
        [member] = [m for m in archive.getmembers() if m.name.endswith("/manifest.json")]
        handle = archive.extractfile(member)
        assert handle is not None
        return json.loads(handle.read())


def human(n: int) -> str:
    """A size as the summary table shows it."""
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.1f} MiB"


# --- one real build ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Built:
    result: subprocess.CompletedProcess[str]
    out: Path
    bundles: dict[str, Path]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, iris_model: tuple[Path, Path], keys) -> Built:
    model, reference = iris_model
    work = tmp_path_factory.mktemp("cli-build")
    profile_args = [arg for pid in PROFILES for arg in ("--profile", pid)]
    result = edgepack(
        "build", model, "--name", NAME, "--version", VERSION, *profile_args,
        "--reference", reference, "--key", keys.private, "--out", "dist", "--trust-pickle",
        cwd=work,
    )  # fmt: skip
    bundles = {pid: work / "dist" / f"{NAME}-{VERSION}-{pid}.edgepack" for pid in PROFILES}
    return Built(result, work / "dist", bundles)


def test_build_prints_summary_and_writes_one_bundle_per_profile(built: Built) -> None:
    assert built.result.returncode == 0, built.result.stderr
    assert TRACEBACK not in built.result.stdout + built.result.stderr
    log = built.out / f"{NAME}-{VERSION}.build.log"  # library warnings go here, not the terminal
    assert sorted(built.out.iterdir()) == sorted([*built.bundles.values(), log])  # no .part
    assert "Warning" not in built.result.stderr
    assert "whole build" in built.result.stdout
    header = next(line for line in built.result.stdout.splitlines() if "profile" in line)
    for column in ("profile", "precision", "size", "parity"):
        assert column in header
    for pid, bundle in built.bundles.items():
        manifest = manifest_of(bundle)
        assert (manifest["name"], manifest["version"], manifest["profile"]) == (NAME, VERSION, pid)
        [row] = [line for line in built.result.stdout.splitlines() if f" {pid} " in line]
        cells = [cell.strip() for cell in row.strip("│ ").split("│")]
        [chosen] = [c["name"] for c in manifest["candidates"] if c["chosen"]]
        assert cells[:3] == [
            pid, f"{manifest['precision']} ({chosen})", human(bundle.stat().st_size)
        ]  # fmt: skip
        assert cells[3].startswith("ok ")
        assert f"{manifest['parity']['metrics']['label_agreement']:.2%}" in cells[3]
        assert cells[-1] == bundle.name


@pytest.mark.parametrize("profile", PROFILES)
def test_verify_accepts_the_bundle(built: Built, keys, profile: str) -> None:
    bundle = built.bundles[profile]
    before = bundle.read_bytes()
    result = edgepack("verify", bundle, "--pub", keys.public, cwd=built.out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK ")
    assert f"{NAME} v{VERSION} for {profile}" in result.stdout
    assert bundle.read_bytes() == before


def test_inspect_shows_name_profile_precision_parity(built: Built) -> None:
    bundle = built.bundles["arm64-cpu"]
    manifest = manifest_of(bundle)
    result = edgepack("inspect", bundle, cwd=built.out)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert f"{NAME} v{VERSION}" in rows["model"]
    assert manifest["profile"] in rows["profile"]
    assert manifest["precision"] in rows["precision"]
    parity = manifest["parity"]
    assert ("passed" if parity["passed"] else "FAILED") in rows["parity"]
    assert f'"label_agreement": {parity["metrics"]["label_agreement"]}' in rows["parity"]
    assert "any (dynamic)" in rows["batch"]  # a scikit-learn conversion takes any rows
    # the candidates measured at build time, as a table: one row each, the shipped one marked
    assert "candidates measured at build time" in result.stdout
    for candidate in manifest["candidates"]:
        [row] = [line for line in result.stdout.splitlines() if f"│ {candidate['name']} " in line]
        assert ("shipped" in row) is candidate["chosen"]


def test_build_explain_shows_every_candidate(
    tmp_path: Path, iris_model: tuple[Path, Path], keys
) -> None:
    model, reference = iris_model
    result = edgepack(
        "build", model, "--name", NAME, "--version", VERSION, "--profile", "x86_64-cpu",
        "--reference", reference, "--key", keys.private, "--out", "dist", "--trust-pickle",
        "--explain", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "x86_64-cpu: candidates measured" in result.stdout
    manifest = manifest_of(tmp_path / "dist" / f"{NAME}-{VERSION}-x86_64-cpu.edgepack")
    for candidate in manifest["candidates"]:
        assert f"│ {candidate['name']} " in result.stdout


def test_verify_refuses_a_key_it_does_not_trust(built: Built, other_keys) -> None:
    bundle = built.bundles["x86_64-cpu"]
    before = bundle.read_bytes()
    result = edgepack("verify", bundle, "--pub", other_keys.public, cwd=built.out)
    assert result.returncode == 1
    assert "not among the 1 trusted keys" in error_text(result)
    assert not result.stdout.strip()
    assert bundle.read_bytes() == before


def test_verify_refuses_a_file_that_is_not_a_tar(tmp_path: Path, keys) -> None:
    (tmp_path / "junk.edgepack").write_bytes(b"this is not a tar archive\n" * 40)
    before = snapshot(tmp_path)
    result = edgepack("verify", "junk.edgepack", "--pub", keys.public, cwd=tmp_path)
    assert result.returncode == 1
    assert not result.stdout.strip()
    assert "junk.edgepack: bundle is not a readable tar archive" in error_text(result)
    assert snapshot(tmp_path) == before


# --- keygen and profiles -----------------------------------------------------------------------


def test_keygen_writes_a_private_key_only_its_owner_can_read(tmp_path: Path) -> None:
    result = edgepack("keygen", "--out", "keys", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    private, public = tmp_path / "keys" / "signing.key", tmp_path / "keys" / "signing.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = load_private_key(private.read_bytes())
    load_public_key(public.read_bytes())
    assert public.read_bytes() == public_key_pem(key)


def test_keygen_does_not_overwrite_an_existing_key(tmp_path: Path) -> None:
    assert edgepack("keygen", "--out", "keys", cwd=tmp_path).returncode == 0
    before = snapshot(tmp_path)

    result = edgepack("keygen", "--out", "keys", cwd=tmp_path)
    assert result.returncode != 0
    text = error_text(result)
    assert "already exists" in text
    assert "--force" in text
    assert snapshot(tmp_path) == before

    assert edgepack("keygen", "--out", "keys", "--force", cwd=tmp_path).returncode == 0
    private = tmp_path / "keys" / "signing.key"
    assert private.read_bytes() != before["keys/signing.key"]
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_profiles_lists_every_shipped_profile(tmp_path: Path) -> None:
    result = edgepack("profiles", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    first_cells = {
        line.split("│")[1].strip() for line in result.stdout.splitlines() if line.startswith("│")
    }
    assert len(SHIPPED_IDS) == 4
    assert first_cells - {""} == set(SHIPPED_IDS)


# --- bad inputs: one lie each ------------------------------------------------------------------


@dataclass(frozen=True)
class Work:
    """A directory holding a copy of the iris model and its reference rows; commands run in it."""

    path: Path
    keys: Any

    def build(
        self,
        model: str = "model.joblib",
        *,
        reference: str = "reference.csv",
        key: str | Path | None = None,
        profile: str = "x86_64-cpu",
        name: str = NAME,
        version: str = "1",
        trust_pickle: bool = True,
        extra: tuple[str, ...] = (),
    ) -> list[str]:
        return [
            "build", model, "--name", name, "--version", version, "--profile", profile,
            "--reference", reference, "--key", str(key or self.keys.private), "--out", "dist",
            *(["--trust-pickle"] if trust_pickle else []), *extra,
        ]  # fmt: skip

    def write(self, name: str, data: bytes) -> str:
        (self.path / name).write_bytes(data)
        return name


def _pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _joblib(work: Work, name: str, obj: object) -> str:
    import joblib

    joblib.dump(obj, work.path / name)
    return name


def missing_model(w: Work) -> tuple[list[str], list[str]]:
    return w.build("absent.onnx"), ["cannot read model absent.onnx"]


def random_onnx(w: Work) -> tuple[list[str], list[str]]:
    w.write("random.onnx", random.Random(0).randbytes(512))
    return w.build("random.onnx"), ["random.onnx is not a valid ONNX model"]


def garbage_joblib(w: Work) -> tuple[list[str], list[str]]:
    w.write("garbage.joblib", b"this is not a joblib file\n" * 20)
    return w.build("garbage.joblib"), ["cannot load garbage.joblib"]


def unsupported_estimator(w: Work) -> tuple[list[str], list[str]]:
    from sklearn.datasets import load_iris
    from sklearn.kernel_approximation import Nystroem
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    x, y = load_iris(return_X_y=True, as_frame=True)
    pipeline = make_pipeline(Nystroem(n_components=5, random_state=0), LogisticRegression())
    model = _joblib(w, "nystroem.joblib", pipeline.fit(x, y))
    return w.build(model), ["skl2onnx has no converter for Nystroem", "supported are"]


def not_a_model(w: Work) -> tuple[list[str], list[str]]:
    model = _joblib(w, "weights.joblib", {"weights": [1.0, 2.0]})
    return w.build(model), ["cannot convert a builtins.dict"]


def unknown_profile(w: Work) -> tuple[list[str], list[str]]:
    return w.build(profile="no-such-device"), ["'no-such-device'", ", ".join(SHIPPED_IDS)]


def malformed_profile(w: Work) -> tuple[list[str], list[str]]:
    text = (DEFAULT_PROFILE_DIR / "x86_64-cpu.toml").read_text(encoding="utf-8")
    text = re.sub(r"^id = .*$", 'id = "broken"', text, count=1, flags=re.M)
    text, n = re.subn(r'^weight_type = "int8"', 'weight_type = "int4"', text, flags=re.M)
    assert n == 1
    (w.path / "profiles").mkdir()
    w.write("profiles/broken.toml", text.encode())
    args = w.build(profile="broken", extra=("--profile-dir", "profiles"))
    return args, ["profiles/broken.toml", "weight_type must be one of int8, uint8, got 'int4'"]


def pickle_without_trust(w: Work) -> tuple[list[str], list[str]]:
    return w.build(trust_pickle=False), [
        "model.joblib is a pickle",
        "runs any code",
        "--trust-pickle",
    ]


def csv_missing_column(w: Work) -> tuple[list[str], list[str]]:
    import pandas as pd

    frame = pd.read_csv(w.path / "reference.csv")
    dropped = frame.columns[-1]
    frame.drop(columns=[dropped]).to_csv(w.path / "three.csv", index=False)
    return w.build(reference="three.csv"), [f"input column(s) '{dropped}'"]


def npy_too_many_columns(w: Work) -> tuple[list[str], list[str]]:
    import numpy as np
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier

    x, y = load_iris(return_X_y=True)
    model = _joblib(w, "numpy.joblib", RandomForestClassifier(n_estimators=3).fit(x, y))
    wide = np.hstack([x, x[:, :1]])
    np.save(w.path / "wide.npy", wide)
    return w.build(model, reference="wide.npy"), [
        f"takes {x.shape[1]} features",
        f"has {wide.shape[1]} columns",
    ]


def ed25519_key(w: Work) -> tuple[list[str], list[str]]:
    key = w.write("ed25519.pem", _pem(ed25519.Ed25519PrivateKey.generate()))
    return w.build(key=key), ["ed25519.pem: Ed25519 keys are not supported"]


def rsa_key(w: Work) -> tuple[list[str], list[str]]:
    key = w.write("rsa.pem", _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    return w.build(key=key), ["rsa.pem: RSA keys are not supported"]


def public_key_as_signing_key(w: Work) -> tuple[list[str], list[str]]:
    key = w.write("signing.pub", w.keys.public.read_bytes())
    return w.build(key=key), ["signing.pub: this is a public key"]


def missing_key(w: Work) -> tuple[list[str], list[str]]:
    return w.build(key="absent.key"), ["cannot read signing key absent.key"]


def negative_version(w: Work) -> tuple[list[str], list[str]]:
    return w.build(version="-1"), ["--version"]


def path_in_model_name(w: Work) -> tuple[list[str], list[str]]:
    return w.build(name="../evil"), ["model name '../evil'"]


BAD_INPUTS: list[Any] = [
    missing_model,
    random_onnx,
    garbage_joblib,
    unsupported_estimator,
    not_a_model,
    unknown_profile,
    malformed_profile,
    pickle_without_trust,
    csv_missing_column,
    npy_too_many_columns,
    ed25519_key,
    rsa_key,
    public_key_as_signing_key,
    missing_key,
    negative_version,
    path_in_model_name,
]


@pytest.fixture
def work(tmp_path: Path, iris_model: tuple[Path, Path], keys) -> Work:
    model, reference = iris_model
    shutil.copy(model, tmp_path / "model.joblib")
    shutil.copy(reference, tmp_path / "reference.csv")
    return Work(tmp_path, keys)


@pytest.mark.parametrize("lie", BAD_INPUTS, ids=lambda f: f.__name__)
def test_build_refuses_bad_input_and_writes_nothing(
    work: Work, lie: Callable[[Work], tuple[list[str], list[str]]]
) -> None:
    args, phrases = lie(work)
    before = snapshot(work.path)
    result = edgepack(*args, cwd=work.path)
    assert result.returncode != 0
    assert not result.stdout.strip()
    text = error_text(result)
    for phrase in phrases:
        assert phrase in text
    assert snapshot(work.path) == before


def test_negative_version_is_refused_before_any_work(work: Work) -> None:
    before = snapshot(work.path)
    result = edgepack(*work.build(version="-1"), cwd=work.path)
    assert result.returncode == 2
    assert TRACEBACK not in result.stdout + result.stderr
    assert "--version must be a non-negative integer" in error_text(result)
    assert snapshot(work.path) == before


def test_malformed_profile_error_names_the_table(work: Work) -> None:
    args, _ = malformed_profile(work)
    result = edgepack(*args, cwd=work.path)
    assert result.returncode != 0
    assert "[quantization].weight_type" in error_text(result)


def test_error_for_a_path_with_brackets_is_one_clean_line(work: Work) -> None:
    before = snapshot(work.path)
    result = edgepack(*work.build("odd[/]name.onnx"), cwd=work.path)
    assert result.returncode == 1
    assert "cannot read model odd[/]name.onnx" in error_text(result)
    assert snapshot(work.path) == before
