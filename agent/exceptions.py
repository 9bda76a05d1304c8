"""Every error the agent and the shared bundle format raise.

All of them derive from :class:`EdgepackError`, so a caller can catch one family. They are
grouped by whose fault the failure is, and each message says what went wrong and what to do::

    EdgepackError
    ├── BundleError              the bundle (or its archive) is bad or hostile: do not install it
    │   ├── ArchiveError         unsafe or corrupt tar: link, device, '..', absolute path, too big
    │   ├── ManifestError        manifest.json is missing, malformed or inconsistent
    │   ├── SignatureError       model.sig missing or invalid, a file not covered, an untrusted key
    │   └── IncompatibleBundleError  built for another profile, arch or onnxruntime
    └── KeyFormatError           a key file cannot be used (unreadable, not ECDSA, wrong kind)

Misuse by the calling program raises the ordinary ``ValueError``/``TypeError``/``RuntimeError``.
"""

from __future__ import annotations

__all__ = [
    "ArchiveError",
    "BundleError",
    "EdgepackError",
    "IncompatibleBundleError",
    "KeyFormatError",
    "ManifestError",
    "SignatureError",
]


class EdgepackError(Exception):
    """Base of every edgepack error; its message is meant for the operator."""


class BundleError(EdgepackError):
    """The bundle cannot be trusted or used. Nothing has been installed from it."""


class ArchiveError(BundleError):
    """The bundle's tar archive is corrupt or contains something not allowed."""


class ManifestError(BundleError):
    """The bundle's manifest.json is missing, not valid JSON, or does not match the schema."""


class SignatureError(BundleError):
    """The signature does not verify: wrong key, changed or extra or missing file, bad format."""


class IncompatibleBundleError(BundleError):
    """The bundle was built for another device profile or runtime than this one."""


class KeyFormatError(EdgepackError):
    """A key file cannot be used: not PEM, not an ECDSA key, or a private key where a public one
    is expected (or the reverse)."""
