"""Errors of the shared formats: the input is bad or hostile, and nothing was done with it.

Every reader in :mod:`edgepack.formats` takes bytes and either returns a validated object or
raises one of these; the message names the field or file that is wrong. The tree extends
:mod:`edgepack.errors`::

    EdgepackError
    ├── StorageError             a local file cannot be read or written (edgepack.errors)
    ├── BundleError              the bundle (or its archive) is bad or hostile: do not install it
    │   ├── ArchiveError         unsafe or corrupt tar: link, device, '..', absolute path, too big
    │   ├── ManifestError        manifest.json is missing, malformed or inconsistent
    │   ├── SignatureError       model.sig missing or invalid, a file not covered, an untrusted key
    │   └── ReferenceFormatError reference.json is malformed or of an unknown format version
    ├── MessageError             an MQTT payload or topic is malformed, oversized, nested too
    │   │                        deeply, or of a newer schema
    │   └── CommandError         a fleet command is refused: unsigned, untrusted, expired,
    │                            replayed, for another device; the message is the reason
    │                            reported as REJECTED
    └── KeyFormatError           a key file cannot be used (unreadable, not ECDSA, wrong kind)
"""

from __future__ import annotations

from edgepack.errors import EdgepackError, StorageError

__all__ = [
    "ArchiveError",
    "BundleError",
    "CommandError",
    "EdgepackError",
    "KeyFormatError",
    "ManifestError",
    "MessageError",
    "ReferenceFormatError",
    "SignatureError",
    "StorageError",
]


class BundleError(EdgepackError):
    """The bundle cannot be trusted or used. Nothing has been installed from it."""


class ArchiveError(BundleError):
    """The bundle's tar archive is corrupt or contains something not allowed."""


class ManifestError(BundleError):
    """The bundle's manifest.json is missing, not valid JSON, or does not match the schema."""


class SignatureError(BundleError):
    """The signature does not verify: wrong key, changed or extra or missing file, bad format."""


class ReferenceFormatError(BundleError):
    """The bundle's reference.json (drift statistics) is malformed or of an unknown version."""


class KeyFormatError(EdgepackError):
    """A key file cannot be used: not PEM, not an ECDSA key, or a private key where a public one
    is expected (or the reverse)."""


class MessageError(EdgepackError):
    """An MQTT message is malformed: not JSON, too large or deep, a wrong field, a newer schema."""


class CommandError(MessageError):
    """A fleet command was refused; the message is the reason reported with REJECTED."""
