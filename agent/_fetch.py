"""Bringing a bundle to the device: the fetcher interface, local copies, and their cleanup.

The lifecycle's FETCHING state calls a :class:`Fetcher`. :class:`LocalFetcher` copies a file
(offline and air-gapped installs); :class:`edgepack.agent._download.HttpFetcher` downloads with
resume. Both write the bundle to a path under ``incoming/`` that the lifecycle discards when the
operation ends (:func:`discard_fetched`).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Protocol

from edgepack._files import sha256_file, storage_error
from edgepack.agent.exceptions import BundleError, InstallError

__all__ = ["Fetcher", "LocalFetcher", "discard_fetched", "fetched_already"]

log = logging.getLogger("edgepack.agent")


class Fetcher(Protocol):
    """Brings a bundle from ``source`` to the local file ``dest``, at most ``max_bytes`` long."""

    def fetch(
        self,
        source: str,
        dest: Path,
        max_bytes: int,
        *,
        expected_size: int | None = None,
        expected_sha256: str | None = None,
    ) -> None: ...


class LocalFetcher:
    """Copies a bundle from a local path (offline and air-gapped installs)."""

    def fetch(
        self,
        source: str,
        dest: Path,
        max_bytes: int,
        *,
        expected_size: int | None = None,
        expected_sha256: str | None = None,
    ) -> None:
        path = Path(source)
        try:
            size = path.stat().st_size
        except OSError as e:
            raise InstallError(f"cannot read bundle {path}: {e.strerror or e}") from e
        if size > max_bytes:
            raise BundleError(f"bundle {path} is {size} bytes, above the limit of {max_bytes}")
        try:
            shutil.copyfile(path, dest)
            with open(dest, "rb+") as handle:
                os.fsync(handle.fileno())
        except OSError as e:
            dest.unlink(missing_ok=True)
            raise storage_error("copy the bundle to", dest, e) from e


def discard_fetched(incoming: str) -> None:
    """Remove a fetched bundle and any partial download of it.

    Best effort: a leftover that cannot be removed is logged, never an error (the operation
    has already succeeded or failed for its own reasons, which a leftover must not replace).
    """
    path = Path(incoming)
    for leftover in (
        path,
        path.with_name(path.name + ".part"),
        path.with_name(path.name + ".part.json"),
    ):
        try:
            leftover.unlink(missing_ok=True)
        except OSError as e:
            log.warning("cannot remove %s: %s", leftover, e.strerror or e)


def fetched_already(dest: Path, expected_sha256: str | None) -> bool:
    """Whether ``dest`` already holds the bundle with ``expected_sha256`` (a fetch that finished
    before a crash); False when no sha256 is expected.

    Raises:
        StorageError: ``dest`` exists but cannot be read.
    """
    if not expected_sha256 or not dest.is_file():
        return False
    try:
        return sha256_file(dest) == expected_sha256.lower()
    except OSError as e:
        raise storage_error("read the fetched bundle", dest, e) from e
