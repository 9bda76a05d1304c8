"""Every error the agent raises, grouped by whose fault the failure is.

All of them derive from :class:`EdgepackError`, so a caller can catch one family; the errors of
the shared formats (:mod:`edgepack.formats.exceptions`) are re-exported here. Each message says
what went wrong and what to do::

    EdgepackError
    ├── BundleError              the bundle (or its archive) is bad or hostile: do not install it
    │   ├── ArchiveError         unsafe or corrupt tar: link, device, '..', absolute path, too big
    │   ├── ManifestError        manifest.json is missing, malformed or inconsistent
    │   ├── SignatureError       model.sig missing or invalid, a file not covered, an untrusted key
    │   ├── ReferenceFormatError reference.json is malformed or of an unknown version
    │   ├── IncompatibleBundleError  built for another profile, arch or onnxruntime
    │   └── VersionError         not newer than what is installed (downgrades are refused)
    ├── InstallError             the device could not install or switch a model; old one kept
    │   ├── HealthCheckError     the new model failed its golden-sample check: rolled back
    │   └── NotInstalledError    no such model, or no retained version to roll back to
    ├── StorageError             the state directory cannot be written (full disk, permissions)
    ├── ConfigError              agent.toml is missing, malformed, or names missing keys/paths
    ├── MessageError             an MQTT message is malformed, oversized, or of a newer schema
    │   └── CommandError         a fleet command is unsigned, untrusted, expired, replayed, or
    │                            for another device: the device reports it REJECTED
    ├── DownloadError            a bundle could not be downloaded (after retries)
    ├── RequestError             an inference request is malformed (HTTP 400)
    │   └── ModelNotFoundError   no such model or version is being served (HTTP 404)
    ├── InferenceError           the model failed while computing an answer (HTTP 500)
    └── KeyFormatError           a key file cannot be used (unreadable, not ECDSA, wrong kind)

Misuse by the calling program raises the ordinary ``ValueError``/``TypeError``/``RuntimeError``.
"""

from __future__ import annotations

from edgepack.formats.exceptions import (
    ArchiveError,
    BundleError,
    CommandError,
    EdgepackError,
    KeyFormatError,
    ManifestError,
    MessageError,
    ReferenceFormatError,
    SignatureError,
    StorageError,
)

__all__ = [
    "ArchiveError",
    "BundleError",
    "CommandError",
    "ConfigError",
    "DownloadError",
    "EdgepackError",
    "HealthCheckError",
    "IncompatibleBundleError",
    "InferenceError",
    "InstallError",
    "KeyFormatError",
    "ManifestError",
    "MessageError",
    "ModelNotFoundError",
    "NotInstalledError",
    "ReferenceFormatError",
    "RequestError",
    "SignatureError",
    "StorageError",
    "VersionError",
]


class IncompatibleBundleError(BundleError):
    """The bundle was built for another device profile or runtime than this one."""


class VersionError(BundleError):
    """The bundle's version is not above the highest version of that model ever committed here."""


class InstallError(EdgepackError):
    """An install, rollback or retire could not complete; the previously active model is kept."""


class HealthCheckError(InstallError):
    """The new model did not reproduce its golden outputs on this device; it was rolled back."""


class NotInstalledError(InstallError):
    """The model is not installed, or has no retained previous version to roll back to."""


class ConfigError(EdgepackError):
    """The agent's configuration file is missing or wrong; the message names the field."""


class RequestError(EdgepackError):
    """An inference request is malformed: the message says which input and what is wrong."""

    status = 400


class ModelNotFoundError(RequestError):
    """No model (or no such version of it) is being served."""

    status = 404


class InferenceError(EdgepackError):
    """The model failed while computing an answer (onnxruntime raised); the request was valid."""

    status = 500


class DownloadError(EdgepackError):
    """A bundle download failed after its retries: server down, wrong size or hash, timeout."""
