"""The device side stays light: importing every agent module loads no build-side library."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

FORBIDDEN = ("onnx", "skl2onnx", "sklearn", "packager", "fleet", "pandas", "torch")

_PROBE = """
import importlib, pkgutil, sys
import agent
for m in pkgutil.walk_packages(agent.__path__, "agent."):
    importlib.import_module(m.name)
print(" ".join(sorted({n.split(".")[0] for n in sys.modules})))
"""


def test_importing_every_agent_module_loads_no_build_side_library() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True, text=True, check=True
    )
    loaded = set(out.stdout.split())
    assert "agent" in loaded
    assert "cryptography" in loaded  # the probe really imported the signing code
    assert not loaded & set(FORBIDDEN), f"agent pulls in {sorted(loaded & set(FORBIDDEN))}"
