"""Forge bundles from a real one: tampered, hostile, or validly signed but lying.

The lifecycle tests start from bundles the packager really built and change one thing: a member
of the archive (:func:`repack` with extra :func:`member` entries), one byte of a file, or the
recorded golden outputs of a bundle that is then signed again with the build key (:func:`resign`),
so the signature is good and only the health check can catch the lie.
"""

from __future__ import annotations

import dataclasses
import io
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from edgepack.formats.bundle import (
    GOLDEN_FILE,
    MANIFEST_FILE,
    SIGNATURE_FILE,
    read_archive,
    write_bundle,
)
from edgepack.formats.keys import load_private_key
from edgepack.formats.manifest import parse_manifest

__all__ = ["Member", "golden", "member", "repack", "resign", "unpack", "wrong_golden"]

Member = tuple[tarfile.TarInfo, bytes | None]


def unpack(bundle: Path) -> tuple[str, dict[str, bytes]]:
    """The top-level directory and the files of a real bundle (through the agent's reader)."""
    return read_archive(bundle.read_bytes())


def golden(files: Mapping[str, bytes]) -> dict[str, np.ndarray]:
    """The arrays of a bundle's golden.npz (``input.NAME`` and ``output.NAME``)."""
    with np.load(io.BytesIO(files[GOLDEN_FILE]), allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def member(
    name: str,
    data: bytes = b"",
    *,
    kind: bytes = tarfile.REGTYPE,
    linkname: str = "",
    size: int | None = None,
) -> Member:
    """One tar entry; ``kind`` is a tarfile type (SYMTYPE, LNKTYPE, CHRTYPE, ...)."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, 0o644
    if kind == tarfile.CHRTYPE:
        info.devmajor, info.devminor = 1, 3  # what /dev/null is
    info.size = len(data) if kind == tarfile.REGTYPE and size is None else (size or 0)
    return info, data if kind == tarfile.REGTYPE else None


def repack(top: str, files: Mapping[str, bytes], extra: Iterable[Member] = ()) -> bytes:
    """A tar.gz of ``top/`` with ``files`` (in order), then the ``extra`` entries as given."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT) as archive:
        root = tarfile.TarInfo(top)
        root.type, root.mode = tarfile.DIRTYPE, 0o755
        archive.addfile(root)
        entries = [member(f"{top}/{name}", data) for name, data in files.items()]
        for info, data in [*entries, *extra]:
            archive.addfile(info, None if data is None else io.BytesIO(data))
    return raw.getvalue()


def wrong_golden(files: Mapping[str, bytes], output: str) -> bytes:
    """golden.npz with the recorded value of ``output`` changed so that no healthy model
    reproduces it: probabilities shifted by 0.5, labels moved to the next class."""
    arrays = golden(files)
    want = arrays[f"output.{output}"]
    arrays[f"output.{output}"] = (want + 1) % 3 if want.dtype.kind in "iu" else want + 0.5
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def resign(
    bundle: Path,
    key: Path,
    out_dir: Path,
    *,
    version: int,
    replace: Mapping[str, bytes] | None = None,
) -> Path:
    """Rebuild ``bundle`` as ``version`` with some files replaced, signed with ``key``."""
    _, files = unpack(bundle)
    manifest = dataclasses.replace(parse_manifest(files[MANIFEST_FILE]), version=version)
    content = {k: v for k, v in files.items() if k not in (MANIFEST_FILE, SIGNATURE_FILE)}
    content.update(replace or {})
    return write_bundle(out_dir, manifest, content, load_private_key(key.read_bytes()))
