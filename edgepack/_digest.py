"""SHA-256 through the OpenSSL that ``cryptography`` already loaded, with hashlib's interface.

Every side hashes bundles, files and keys; the device also verifies signatures, so
``cryptography`` is in its process anyway. :mod:`hashlib` would load the Python build's own
libcrypto beside it (3.5 MiB of RSS on a device, for the same SHA-256), so the hashing here goes
through ``cryptography``'s. Same speed (OpenSSL's, with the CPU's SHA instructions), same
results, and the interface the callers used from hashlib: ``update``, ``digest``,
``hexdigest``, ``copy``.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes

__all__ = ["Sha256", "sha256"]


class Sha256:
    """A running SHA-256 (what ``hashlib.sha256()`` returns, for what edgepack uses of it)."""

    __slots__ = ("_hash",)
    name = "sha256"
    digest_size = 32

    def __init__(self, data: bytes = b"", *, _hash: hashes.Hash | None = None) -> None:
        self._hash = _hash if _hash is not None else hashes.Hash(hashes.SHA256())
        if data:
            self._hash.update(data)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._hash.update(data)

    def copy(self) -> Sha256:
        return Sha256(_hash=self._hash.copy())

    def digest(self) -> bytes:
        return self._hash.copy().finalize()  # the running hash goes on, as hashlib's does

    def hexdigest(self) -> str:
        return self.digest().hex()


def sha256(data: bytes = b"") -> Sha256:
    """A new SHA-256, fed ``data``."""
    return Sha256(data)
