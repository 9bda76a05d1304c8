"""Verify and unpack a fetched bundle in one streaming pass, in bounded memory.

The lifecycle's VERIFYING state (edgepack.agent._lifecycle) calls :func:`unpack_verified`: the
fetched archive is read once, through :func:`edgepack.formats.bundle.iter_members` (allow-list,
size, count and inflation-ratio limits), and every member is written into a fresh private
directory under ``staging/`` while it is hashed. Only then is ``model.sig`` checked against those
digests (:func:`edgepack.formats.modelsig.verify_digests`, no I/O) and the manifest parsed; the
lifecycle then checks the deploy's expectations, compatibility and version, and STAGING renames
the directory into ``models/NAME/VERSION``. So:

* memory stays at a chunk or two plus the manifest and the signature (both capped here): a bomb
  is refused once it passes a limit, having cost at most that much disk in ``staging/``;
* what gets installed is exactly the bytes that were hashed and verified: a bundle replaced on
  disk after this pass is never read again (the bundle's own sha256 is taken from the same pass).

:func:`verify_installed` re-checks an installed version directory the same way (streamed hashes,
then the signature) whenever it is loaded (edgepack.agent._session.open_installed: the health
check, the runtime), keeping in memory only the files it is asked for (``model.onnx``).
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric import ec

from edgepack._digest import sha256
from edgepack._files import fsync_dir, storage_error
from edgepack.agent.exceptions import BundleError, StorageError
from edgepack.formats.bundle import (
    MANIFEST_FILE,
    REQUIRED_FILES,
    SIGNATURE_FILE,
    ArchiveLimits,
    iter_members,
)
from edgepack.formats.exceptions import ArchiveError, ManifestError, SignatureError
from edgepack.formats.manifest import Manifest, parse_manifest
from edgepack.formats.modelsig import MAX_SIGNATURE_BYTES, verify_digests

__all__ = ["MAX_MANIFEST_BYTES", "Unpacked", "unpack_verified", "verify_installed"]

MAX_MANIFEST_BYTES = 1024**2
_CHUNK = 1 << 20
_KEPT = {MANIFEST_FILE: MAX_MANIFEST_BYTES, SIGNATURE_FILE: MAX_SIGNATURE_BYTES}


@dataclass(frozen=True)
class Unpacked:
    """A bundle whose files are on disk in ``directory``, signed by a trusted key."""

    manifest: Manifest
    bundle_sha256: str  # of the archive bytes that were read, the ones now on disk
    directory: Path


class _Hashing(io.RawIOBase):
    """Hashes every byte read from ``raw`` (the archive itself, for its sha256)."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.sha = sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(len(buffer))
        buffer[: len(data)] = data
        self.sha.update(data)
        return len(data)

    def drain(self) -> str:
        """Hash what the archive reader left unread (padding, the gzip trailer); the digest."""
        while self.read(_CHUNK):  # through readinto: hashed
            pass
        return self.sha.hexdigest()


def unpack_verified(
    bundle: Path,
    directory: Path,
    keys: Sequence[ec.EllipticCurvePublicKey],
    limits: ArchiveLimits,
    *,
    expected_sha256: str | None = None,
) -> Unpacked:
    """Stream ``bundle`` into the new ``directory``, then verify what was written.

    Args:
        bundle: the fetched archive.
        directory: where its files go; must not exist (its parent must). Removed on failure.
        keys: the trusted bundle-signing keys.
        limits: the archive bounds (``[limits]`` of agent.toml).
        expected_sha256: the archive's sha256 as the job named it, if any.

    Returns:
        The parsed manifest, the archive's sha256 and ``directory``.

    Raises:
        ArchiveError: see :func:`~edgepack.formats.bundle.iter_members`; or a manifest or
            signature above its cap.
        BundleError: not the expected sha256.
        SignatureError: no ``model.sig``, or it does not verify against the written files.
        ManifestError: the signed manifest is malformed, or a required file is missing.
        StorageError: the bundle cannot be read or the files cannot be written (disk full).
    """
    try:
        size = bundle.stat().st_size
    except OSError as e:
        raise storage_error("read the fetched bundle", bundle, e) from e
    if size > limits.max_archive_bytes:
        raise ArchiveError(f"bundle is {size} bytes, above the limit of {limits.max_archive_bytes}")
    try:
        directory.mkdir(mode=0o700)
    except OSError as e:
        raise storage_error("write the bundle's files to", directory, e) from e
    try:
        digests, kept, sha256 = _stream(bundle, directory, limits)
        if expected_sha256 and sha256 != expected_sha256.lower():
            raise BundleError(
                f"bundle sha256 {sha256} does not match the expected {expected_sha256}; it was "
                "corrupted or replaced in transit"
            )
        signature = kept.get(SIGNATURE_FILE)
        if signature is None:
            raise SignatureError(
                f"bundle has no {SIGNATURE_FILE}; it is unsigned and cannot be trusted"
            )
        verify_digests(
            {name: d for name, d in digests.items() if name != SIGNATURE_FILE}, signature, keys
        )
        missing = [name for name in REQUIRED_FILES if name not in digests]
        if missing:
            raise ManifestError(f"bundle is missing {', '.join(missing)}")
        manifest = parse_manifest(kept[MANIFEST_FILE])
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return Unpacked(manifest, sha256, directory)


def _stream(
    bundle: Path, directory: Path, limits: ArchiveLimits
) -> tuple[dict[str, str], dict[str, bytes], str]:
    """Write every member under ``directory``; (digests, small kept members, archive sha256)."""
    digests: dict[str, str] = {}
    kept: dict[str, bytes] = {}
    written: set[Path] = {directory}
    try:
        with open(bundle, "rb") as raw:
            hashing = _Hashing(raw)
            for member in iter_members(hashing, limits):  # type: ignore[arg-type]
                cap = _KEPT.get(member.name)
                if cap is not None and member.size > cap:
                    raise ArchiveError(
                        f"{member.name} is {member.size} bytes, above its limit of {cap}"
                    )
                path = directory / member.name
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                written.add(path.parent)
                sha = sha256()
                small = bytearray() if cap is not None else None
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out:
                    for chunk in member.chunks():
                        sha.update(chunk)
                        out.write(chunk)
                        if small is not None:
                            small += chunk
                    out.flush()
                    os.fsync(out.fileno())
                digests[member.name] = sha.hexdigest()
                if small is not None:
                    kept[member.name] = bytes(small)
            archive_sha256 = hashing.drain()
        for parent in sorted(written, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(parent)
    except OSError as e:
        raise storage_error("write the bundle's files to", directory, e) from e
    return digests, kept, archive_sha256


def verify_installed(
    directory: Path,
    keys: Sequence[ec.EllipticCurvePublicKey],
    name: str,
    version: int,
    keep: Collection[str] = (),
) -> tuple[Manifest, dict[str, bytes]]:
    """Check that an installed version's files are still exactly what was signed, streaming:
    each file is read once, and only the manifest, the signature and the files in ``keep`` are
    held in memory (so what is then used of them is exactly what was verified).

    Args:
        directory: ``models/NAME/VERSION``.
        keys: the trusted bundle-signing keys.
        name, version: what the directory must hold.
        keep: files to return the verified bytes of (``model.onnx`` to load it).

    Returns:
        Its manifest, and the bytes of the files in ``keep`` that are there.

    Raises:
        StorageError: the files cannot be read, are incomplete, or are another version's.
        SignatureError: a file changed, appeared or went missing since signing.
        ManifestError: the manifest does not parse.
    """
    digests: dict[str, str] = {}
    kept: dict[str, bytes] = {}
    try:
        files = sorted(p for p in directory.rglob("*") if p.is_file())
        for path in files:
            rel = path.relative_to(directory).as_posix()
            if rel in _KEPT and path.stat().st_size > _KEPT[rel]:
                raise StorageError(f"{path} is larger than any bundle's; reinstall {name}")
            sha = sha256()
            held = bytearray() if rel in _KEPT or rel in keep else None
            with open(path, "rb") as handle:
                while chunk := handle.read(_CHUNK):
                    sha.update(chunk)
                    if held is not None:
                        held += chunk
            digests[rel] = sha.hexdigest()
            if held is not None:
                kept[rel] = bytes(held)
    except OSError as e:
        raise storage_error("read", directory, e) from e
    if MANIFEST_FILE not in digests:
        raise StorageError(f"{directory} is incomplete; reinstall {name}")
    signature = kept.get(SIGNATURE_FILE, b"")
    verify_digests({k: v for k, v in digests.items() if k != SIGNATURE_FILE}, signature, keys)
    manifest = parse_manifest(kept[MANIFEST_FILE])
    if (manifest.name, manifest.version) != (name, version):
        raise StorageError(
            f"{directory} holds {manifest.name} v{manifest.version}, not {name} v{version}; "
            f"reinstall {name}"
        )
    return manifest, {k: v for k, v in kept.items() if k in keep}
