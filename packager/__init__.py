"""edgepack packager: builds signed per-device bundles on a build server.

The front door for build scripts (``edgepack build`` is the same thing on the command line)::

    from edgepack.packager import BuildRequest, build

    results = build(BuildRequest(model=Path("model.joblib"), name="churn", version=7,
                                 profiles=("x86_64-cpu", "arm64-cpu"), reference=Path("train.csv"),
                                 key=Path("keys/signing.key"), out_dir=Path("dist"),
                                 trust_pickle=True))

Errors are in :mod:`edgepack.packager.exceptions`; everything else is private (``_*`` modules).
Names load lazily: onnx and scikit-learn are imported when a build starts, not on import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgepack._lazy import lazy_exports

if TYPE_CHECKING:
    from edgepack.packager._build import BuildRequest, ProfileResult, build
    from edgepack.packager._profiles import Profile, load_profiles

__all__ = ["BuildRequest", "Profile", "ProfileResult", "build", "load_profiles"]

_HOMES = {
    "BuildRequest": "edgepack.packager._build",
    "ProfileResult": "edgepack.packager._build",
    "build": "edgepack.packager._build",
    "Profile": "edgepack.packager._profiles",
    "load_profiles": "edgepack.packager._profiles",
}

__getattr__ = lazy_exports("edgepack.packager", _HOMES)
