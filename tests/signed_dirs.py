"""Signing and verifying a model *directory*, as the ``model_signing`` CLI does: for the tests.

edgepack signs and verifies bundles from their files' bytes or streamed digests
(:mod:`edgepack.formats.modelsig`); these helpers walk a directory on disk so the tests can put
the real ``model_signing`` CLI and edgepack side by side on the same directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from edgepack._files import sha256_file
from edgepack.formats.exceptions import SignatureError
from edgepack.formats.modelsig import (
    MAX_SIGNATURE_BYTES,
    SIGNATURE_FILE,
    VerifiedSignature,
    sign_digests,
    verify_digests,
)

__all__ = ["sign_directory", "verify_directory"]


def _walk(root: Path, prefix: str = "") -> Iterator[tuple[str, Path]]:
    """Yield (relative POSIX name, path) for every regular file; refuse anything else."""
    with os.scandir(root) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            name = prefix + entry.name
            if entry.is_symlink():
                raise SignatureError(f"{name!r} is a symbolic link; a model may not contain links")
            if entry.is_dir(follow_symlinks=False):
                yield from _walk(Path(entry.path), name + "/")
            elif entry.is_file(follow_symlinks=False):
                if name != SIGNATURE_FILE:
                    yield name, Path(entry.path)
            else:
                raise SignatureError(f"{name!r} is not a regular file or directory")


def _digest_tree(path: Path) -> dict[str, str]:
    if path.is_symlink() or not path.is_dir():
        raise SignatureError(f"{path} is not a directory (or is a symbolic link)")
    return {name: sha256_file(p) for name, p in _walk(path)}


def sign_directory(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    """Sign every file under ``path``; write and return ``path/model.sig`` (replacing any).

    Files are hashed as they are read, not loaded whole. The subject is named as
    ``model_signing`` names it: the directory's base name.

    Raises:
        SignatureError: the directory holds a symlink or a special file.
        ValueError: it holds a top-level ``.git*`` entry, which ``model_signing`` would skip.
        OSError: reading or writing failed.
    """
    digests = _digest_tree(path)
    name = path.name if path.name not in ("", "..") else path.resolve().name
    out = path / SIGNATURE_FILE
    out.write_bytes(sign_digests(digests, key, name))
    return out


def verify_directory(
    path: Path, trusted_keys: Sequence[ec.EllipticCurvePublicKey]
) -> VerifiedSignature:
    """Verify ``path/model.sig`` against every file under ``path``, streaming the hashes.

    Raises:
        SignatureError: model.sig is missing or invalid, the directory holds a symlink or a
            special file, or a file is extra, missing or modified.
        OSError: reading failed.
    """
    sig_path = path / SIGNATURE_FILE
    if sig_path.is_symlink() or not sig_path.is_file():
        raise SignatureError(f"{sig_path} is missing or not a regular file")
    if sig_path.stat().st_size > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"model.sig is larger than {MAX_SIGNATURE_BYTES} bytes")
    return verify_digests(_digest_tree(path), sig_path.read_bytes(), trusted_keys)
