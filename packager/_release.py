"""A signed version never changes: compare a new build with the bundle already in its place.

``NAME-VERSION-PROFILE.edgepack`` names one release. Devices, caches and fleet records treat a
version as immutable, so before :func:`edgepack.packager._build.build` writes a bundle it asks
:func:`existing_release` what lies there:

* nothing: write it;
* a bundle with the same *content*: leave it untouched (its bytes, signature included, stay what
  they were), and report the rebuild as unchanged;
* a bundle with different content: refuse with :class:`~edgepack.packager.exceptions.ReleaseError`
  naming what differs, unless the caller passed ``force`` (``--force``).

Content is every file but the signature, with the manifest's build-time figures left out: the
build time (``created``) and each precision candidate's measured latency, speed-up and verdict,
which vary from run to run on the same inputs. Everything else (the model bytes, drift
reference, golden samples, the chosen precision, parity) must match. The comparison does no I/O
besides reading the existing file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgepack.formats.bundle import MANIFEST_FILE, SIGNATURE_FILE, ArchiveLimits, read_archive
from edgepack.formats.exceptions import EdgepackError

__all__ = ["content_of", "differences", "existing_release"]

_VOLATILE_TOP = ("created",)
_VOLATILE_CANDIDATE = ("latency_ms", "speedup", "verdict")


def content_of(files: Mapping[str, bytes]) -> dict[str, Any]:
    """What identifies a release: files but the signature, the manifest without timings."""
    out: dict[str, Any] = {}
    for name, data in files.items():
        if name == SIGNATURE_FILE:
            continue
        if name == MANIFEST_FILE:
            manifest = json.loads(data)
            for key in _VOLATILE_TOP:
                manifest.pop(key, None)
            for candidate in manifest.get("candidates") or []:
                for key in _VOLATILE_CANDIDATE:
                    candidate.pop(key, None)
            out[name] = manifest
        else:
            out[name] = data
    return out


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Human names of what differs between two :func:`content_of` results."""
    found = []
    for name in sorted(set(old) | set(new)):
        if name not in old or name not in new:
            found.append(f"{name} {'added' if name in new else 'removed'}")
        elif name == MANIFEST_FILE:
            keys = sorted(
                k for k in set(old[name]) | set(new[name]) if old[name].get(k) != new[name].get(k)
            )
            if keys:
                found.append(f"manifest fields {', '.join(keys)}")
        elif old[name] != new[name]:
            found.append(name)
    return found


def existing_release(path: Path, files: Mapping[str, bytes]) -> dict[str, Any] | None:
    """What lies at ``path`` compared with a new build's ``files``.

    Returns:
        ``None`` if nothing is there; else ``{"same": bool, "differences": [...],
        "manifest": <the existing manifest as a dict>}``.
    """
    if not path.exists():
        return None
    try:
        _, old_files = read_archive(path.read_bytes(), ArchiveLimits())
        old = content_of(old_files)
    except (OSError, EdgepackError, ValueError) as e:
        return {
            "same": False,
            "differences": [f"the existing file is unreadable ({e})"],
            "manifest": {},
        }
    diff = differences(old, content_of(files))
    return {"same": not diff, "differences": diff, "manifest": old.get(MANIFEST_FILE, {})}


def previous_choice(path: Path) -> str | None:
    """The precision candidate the bundle at ``path`` shipped, if it records one."""
    if not path.exists():
        return None
    try:
        _, files = read_archive(path.read_bytes(), ArchiveLimits())
        manifest = json.loads(files[MANIFEST_FILE])
    except (OSError, EdgepackError, ValueError, KeyError):
        return None
    chosen = [c.get("name") for c in manifest.get("candidates") or [] if c.get("chosen")]
    return str(chosen[0]) if chosen else None
