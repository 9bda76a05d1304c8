"""Files, durably: atomic writes, a file's sha256, and storage errors an operator can act on.

The only way edgepack changes anything on disk that must survive a crash: every write goes to a
temporary file in the same directory, is flushed and fsynced, then renamed over the target, and
the directory is fsynced so the rename itself survives a power cut. A reader therefore sees the
old content or the new, never a mixture. :func:`atomic_file` is that sequence around a stream the
caller writes; :func:`write_bytes_atomic` and :func:`write_json_atomic` use it for whole
contents (state files, journals, bundles). Errors become :class:`~edgepack.errors.StorageError`
with a message that says what to do (a full disk gets its own advice).

Hashing a file is here too (:func:`sha256_file`, and :func:`sha256_stream` for an open file or a
hash to continue), read in chunks so a large bundle is never loaded whole.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from edgepack._digest import Sha256, sha256
from edgepack.errors import StorageError

__all__ = [
    "atomic_file",
    "fsync_dir",
    "read_json",
    "sha256_file",
    "sha256_stream",
    "storage_error",
    "write_bytes_atomic",
    "write_json_atomic",
]

_CHUNK = 1 << 20


def storage_error(action: str, path: Path, error: OSError) -> StorageError:
    """A StorageError that says what failed and what to do (full disk gets its own advice)."""
    if error.errno == errno.ENOSPC:
        hint = "the disk is full: free space on this filesystem and retry"
    elif error.errno in (errno.EACCES, errno.EPERM):
        hint = "permission denied: run the agent as the user that owns the state directory"
    elif error.errno == errno.EROFS:
        hint = "the filesystem is read-only"
    else:
        hint = error.strerror or str(error)
    return StorageError(f"cannot {action} {path}: {hint}")


def fsync_dir(path: Path) -> None:
    """fsync a directory so renames and creations inside it are durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path, mode: int = 0o600) -> Iterator[BinaryIO]:
    """Write ``path`` atomically and durably through the binary stream this yields.

    The stream is a temporary file next to ``path``; when the ``with`` block ends normally it is
    flushed, fsynced, given ``mode`` and renamed over ``path``, and the directory is fsynced. If
    the block raises, the temporary file is removed and ``path`` keeps its old content.

    Args:
        path: the file to replace (its directory must exist).
        mode: its permission bits (private by default).

    Yields:
        The stream to write the new content to.

    Raises:
        StorageError: creating, writing (in the block too) or renaming failed.
    """
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    except OSError as e:
        raise storage_error("write", path, e) from e
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably (:func:`atomic_file`).

    Raises:
        StorageError: the write failed (the old content, if any, is untouched).
    """
    with atomic_file(path, mode) as handle:
        handle.write(data)


def write_json_atomic(path: Path, data: Any) -> None:
    """:func:`write_bytes_atomic` of canonical JSON."""
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    """Read a JSON file written by :func:`write_json_atomic`; ``None`` if it does not exist.

    Raises:
        StorageError: unreadable or not JSON (a corrupt state file is reported, never guessed at).
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise storage_error("read", path, e) from e
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StorageError(f"{path} is corrupt ({e}); move it aside and reinstall the model") from e


def sha256_stream(handle: BinaryIO, digest: Sha256 | None = None) -> Sha256:
    """Hash what is left in ``handle``, read in 1 MiB chunks.

    Args:
        handle: a binary file open for reading.
        digest: a SHA-256 to continue (edgepack._digest; a new one when ``None``).

    Returns:
        The hash object, to ``update()`` further or read with ``hexdigest()``.

    Raises:
        OSError: reading failed (callers turn it into their own error).
    """
    if digest is None:
        digest = sha256()
    while chunk := handle.read(_CHUNK):
        digest.update(chunk)
    return digest


def sha256_file(path: Path | str) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB chunks (never loaded whole).

    Raises:
        OSError: the file cannot be read (callers turn it into their own error).
    """
    with open(path, "rb") as handle:
        return sha256_stream(handle).hexdigest()
