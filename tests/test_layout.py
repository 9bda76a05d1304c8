"""The house rules of the layout, checked: who may import whom, and what an install puts where.

- Importing every module of a package loads only what that package is allowed to depend on: the
  agent no onnx/skl2onnx/scikit-learn/pandas nor the packager or fleet, and not grpc or protobuf
  either (the gRPC server loads them when ``[grpc]`` is enabled); the shared formats no
  onnxruntime, paho or httpx nor any other edgepack package; the fleet no onnxruntime nor the
  agent; the packager neither the agent nor the fleet.
- A wheel of the project holds only ``edgepack`` import names (nothing generic like ``agent``).
- The ``fleet`` extra, resolved through the extras it names, installs no onnxruntime.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_PROBE = """
import importlib, pkgutil, sys
package = importlib.import_module(sys.argv[1])
for m in pkgutil.walk_packages(package.__path__, sys.argv[1] + "."):
    importlib.import_module(m.name)
names = set()
for n in sys.modules:
    names.add(n.split(".")[0])
    if n.startswith("edgepack."):
        names.add(".".join(n.split(".")[:2]))
print(" ".join(sorted(names)))
"""

# package -> (a module it must have loaded, so the probe really ran; what it must never load)
RULES = {
    "edgepack.agent": (
        "onnxruntime",
        # (not rich/click: httpx imports its optional CLI when they happen to be installed)
        {"onnx", "skl2onnx", "sklearn", "pandas", "torch", "edgepack.packager", "edgepack.fleet",
         "matplotlib", "jinja2", "grpc", "google", "starlette", "uvicorn"},
    ),
    "edgepack.formats": (
        "cryptography",
        {"onnxruntime", "onnx", "paho", "httpx", "sklearn", "pandas", "edgepack.agent",
         "edgepack.packager", "edgepack.fleet"},
    ),
    "edgepack.fleet": (
        "paho",
        {"onnxruntime", "onnx", "sklearn", "edgepack.agent", "edgepack.packager"},
    ),
    "edgepack.packager": ("onnx", {"edgepack.agent", "edgepack.fleet", "paho"}),
}


@pytest.mark.parametrize("package", sorted(RULES))
def test_importing_every_module_of_a_package_loads_only_what_it_may(package: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, package],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=120,
    )
    loaded = set(out.stdout.split())
    witness, forbidden = RULES[package]
    assert package in loaded, out.stdout
    assert witness in loaded, out.stdout
    assert not loaded & forbidden, f"{package} pulls in {sorted(loaded & forbidden)}"


def test_a_wheel_installs_only_edgepack_import_names(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("edgepack-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    code = {t for t in tops if not re.fullmatch(r"edgepack-[\w.]+\.(dist-info|data)", t)}
    assert code == {"edgepack"}, sorted(tops)
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("edgepack/formats/bundle.py", "edgepack/agent/_lifecycle.py",
                   "edgepack/packager/_build.py", "edgepack/fleet/_collector.py"):
        assert module in names
    assert "edgepack/fleet/templates/report.html.j2" in names  # package data: the report's page
    assert "edgepack/agent/grpc_predict_v2.proto" in names  # the gRPC service, for protoc users


def _requirements(extra: str, extras: dict[str, list[str]], seen: set[str]) -> set[str]:
    names: set[str] = set()
    for requirement in extras[extra]:
        name = re.split(r"[\s\[<>=;!~]", requirement, maxsplit=1)[0].lower()
        if name == "edgepack":
            for inner in re.search(r"\[(.*?)\]", requirement).group(1).split(","):  # type: ignore[union-attr]
                if inner not in seen:
                    seen.add(inner)
                    names |= _requirements(inner.strip(), extras, seen)
        else:
            names.add(name)
    return names


def test_the_fleet_extra_installs_no_onnxruntime_and_the_agent_extra_no_build_tools() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    fleet = _requirements("fleet", extras, set())
    agent = _requirements("agent", extras, set())
    assert "paho-mqtt" in fleet, sorted(fleet)
    assert "onnxruntime" not in fleet, sorted(fleet)
    assert "onnxruntime" in agent
    assert not agent & {"onnx", "skl2onnx", "scikit-learn", "pandas", "rich", "click"}, agent


FRONT_DOORS = {
    "edgepack.agent": {"Agent", "AgentConfig", "Outcome", "load_config"},
    "edgepack.packager": {"BuildRequest", "Profile", "ProfileResult", "build", "load_profiles"},
    "edgepack.fleet": {"BrokerOptions", "Collector", "FleetStore", "find_bundles", "open_store",
                       "publish_command", "write_report"},
    "edgepack.formats": {"BUNDLE_SUFFIX", "Manifest", "key_id", "load_private_key",
                         "load_public_key", "open_bundle", "parse_manifest", "read_archive",
                         "verify_bundle_file"},
}

_FRONT_DOOR_PROBE = """
import importlib, sys
package = importlib.import_module(sys.argv[1])
light = "onnxruntime" not in sys.modules and "onnx" not in sys.modules
names = sorted(package.__all__)
for name in names:
    getattr(package, name)
print(int(light), " ".join(names))
"""


@pytest.mark.parametrize("package", sorted(FRONT_DOORS))
def test_each_package_has_a_small_front_door_that_loads_lazily(package: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _FRONT_DOOR_PROBE, package],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=120,
    )
    light, *names = out.stdout.split()
    assert set(names) == FRONT_DOORS[package]
    assert light == "1", f"importing {package} alone loaded onnx/onnxruntime"


def test_the_daemon_loads_no_second_openssl_nor_asyncio_before_a_feature_needs_them() -> None:
    """What `edgepack-agent run` imports with no fleet link and no gRPC: not asyncio or ssl
    (7 MiB), email or http.client (they load ssl), hashlib's libcrypto beside cryptography's
    (3.5 MiB); paho and httpx load with the fleet link or a download."""
    probe = (
        "import sys, edgepack.agent._cli, edgepack.agent._daemon, edgepack.agent._http_server\n"
        "print(' '.join(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True,
        timeout=120,
    )  # fmt: skip
    loaded = set(out.stdout.split())
    assert "onnxruntime" in loaded
    heavy = {"asyncio", "ssl", "_ssl", "email", "http.client", "_hashlib", "paho", "httpx"}
    assert not loaded & heavy, sorted(loaded & heavy)
