"""The ``.edgepack`` bundle: layout, safe archive reading, and the one verification path.

A bundle is a gzip-compressed tar of one directory, ``NAME-VERSION-PROFILE/``, holding::

    manifest.json    what the model is and what it was built for   (edgepack.formats.manifest)
    model.onnx       the model, optimized for the profile
    reference.json   reference statistics for drift detection
    golden.npz       a few inputs with their expected outputs, for the health check
    model.sig        OpenSSF model-signing v1.0 signature over all the files above
    (edgepack.formats.modelsig)

The packager writes bundles with :func:`write_bundle`. Everyone who reads one (``edgepack
verify``, ``edgepack inspect``, the agent) goes through :func:`read_archive`, which applies its own
allow-list rather than ``tarfile``'s defaults: regular files and directories only, no absolute
paths, no ``..``, no duplicates, one top-level directory, bounded sizes, and extended headers (GNU
long names, PAX) refused above a small bound *before* ``tarfile`` reads them into memory; sparse
files refused outright. :func:`open_bundle` then
checks the signature against trusted keys *before* anything is parsed, and only then parses the
manifest. Both work on bytes in memory; :func:`verify_bundle_file` is the thin I/O wrapper.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, BinaryIO, ClassVar, NoReturn

from cryptography.hazmat.primitives.asymmetric import ec

from edgepack._files import storage_error, write_bytes_atomic
from edgepack.formats.exceptions import ArchiveError, ManifestError, SignatureError
from edgepack.formats.manifest import Manifest, parse_manifest
from edgepack.formats.modelsig import SIGNATURE_FILE, VerifiedSignature, sign_files, verify_files

_CHUNK = 1 << 20
_RATIO_FLOOR = 64 * 1024**2

__all__ = [
    "BUNDLE_SUFFIX",
    "GOLDEN_FILE",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "QUALITY_FILE",
    "REFERENCE_FILE",
    "REQUIRED_FILES",
    "SIGNATURE_FILE",
    "ArchiveLimits",
    "Member",
    "VerifiedBundle",
    "bundle_filename",
    "iter_members",
    "open_bundle",
    "read_archive",
    "verify_bundle_file",
    "write_bundle",
]

BUNDLE_SUFFIX = ".edgepack"
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
REFERENCE_FILE = "reference.json"
GOLDEN_FILE = "golden.npz"
QUALITY_FILE = "quality.json"  # optional: only when the build had the ground truth (--target)
REQUIRED_FILES = (MANIFEST_FILE, MODEL_FILE, REFERENCE_FILE, GOLDEN_FILE, SIGNATURE_FILE)


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds applied while reading an archive, before any content is trusted."""

    max_archive_bytes: int = 2 * 1024**3
    max_member_bytes: int = 1024**3
    max_total_bytes: int = 2 * 1024**3
    max_members: int = 64
    # uncompressed bytes per compressed byte, checked once a bundle unpacks past 64 MiB
    max_ratio: float = 200.0
    # one GNU long-name/long-link or PAX header (a long name needs a few hundred bytes); at most
    # two such headers per allowed member
    max_header_bytes: int = 64 * 1024


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signature verified with a trusted key and whose manifest parsed."""

    manifest: Manifest
    files: Mapping[str, bytes]
    signature: VerifiedSignature
    top: str


def bundle_filename(name: str, version: int, profile: str) -> str:
    """The file name the packager gives a bundle: ``NAME-VERSION-PROFILE.edgepack``."""
    return f"{name}-{version}-{profile}{BUNDLE_SUFFIX}"


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"a symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"a hard link (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return "a device node"
    if member.isfifo():
        return "a FIFO"
    return f"an entry of tar type {member.type!r}"


def _safe_parts(name: str) -> tuple[str, ...]:
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        raise ArchiveError(f"archive member {name!r} has an absolute or malformed path; refusing")
    parts = tuple(p for p in PurePosixPath(name).parts if p != ".")
    if not parts:
        raise ArchiveError(
            f"archive member {name!r} is the archive root; a bundle holds one named directory"
        )
    if any(p == ".." for p in parts):
        raise ArchiveError(f"archive member {name!r} escapes the bundle directory ('..'); refusing")
    return parts


@dataclass(frozen=True)
class Member:
    """One regular file of an archive being streamed: the bundle's top-level directory, the
    file's path inside it, and its size; :meth:`chunks` reads its content, once, in pieces."""

    top: str
    name: str
    size: int
    _handle: IO[bytes]
    _meter: _Counting
    _max_ratio: float

    def chunks(self, chunk_size: int = _CHUNK) -> Iterator[bytes]:
        """The member's bytes, at most ``chunk_size`` at a time.

        Raises:
            ArchiveError: the archive ends before the member does.
        """
        left = self.size
        try:
            while left > 0:
                piece = self._handle.read(min(chunk_size, left))
                if not piece:
                    raise ArchiveError(f"archive member {self.name!r} is truncated")
                left -= len(piece)
                self._meter.produced += len(piece)
                self._meter.check_ratio(self._max_ratio)
                yield piece
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise ArchiveError(f"bundle is not a readable tar archive: {e}") from e

    def read(self) -> bytes:
        """The whole content (for small members: the manifest, the signature)."""
        return b"".join(self.chunks())


class _Counting(io.RawIOBase):
    """Counts the compressed bytes read from a stream and the bytes they inflated to, for the
    inflation-ratio limit."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.count = 0
        self.produced = 0  # member bytes handed out so far

    def check_ratio(self, max_ratio: float) -> None:
        """Raises ArchiveError once what was inflated passes the floor and ``max_ratio``."""
        if self.produced > _RATIO_FLOOR and self.produced > max_ratio * max(self.count, 1):
            raise ArchiveError(
                f"bundle inflates {self.produced / max(self.count, 1):.0f}-fold (more than "
                f"{max_ratio:.0f}-fold): a compression bomb; refusing"
            )

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(len(buffer))
        buffer[: len(data)] = data
        self.count += len(data)
        return len(data)


# tarfile reads an extended header's whole declared size into memory (``_proc_gnulong``,
# ``_proc_pax``) while it looks for the member the header describes, before iter_members sees
# anything; a 600 MiB long name in a 2.7 MB gzip cost 1.2 GB of RSS. The hook below runs before
# that read. ``TarInfo._proc_member`` is tarfile's documented subclass entry point ("can be
# overridden in a subclass"); it, the GNU/PAX dispatch it does and the three
# ``_proc_gnusparse_*`` methods that ``_proc_pax`` calls on the header's TarInfo are the same in
# CPython 3.10 to 3.13 (read in 3.10.13, 3.11.7, 3.12.1 and 3.13.0; only the arguments of
# ``_proc_gnusparse_00`` changed, hence ``*args``). tests/test_bundle_security.py fails if a
# later tarfile stops calling them.
_EXTENDED_HEADERS = {
    tarfile.GNUTYPE_LONGNAME: "a GNU long-name header",
    tarfile.GNUTYPE_LONGLINK: "a GNU long-link header",
    tarfile.XHDTYPE: "a PAX extended header",
    tarfile.XGLTYPE: "a PAX global header",
    tarfile.SOLARIS_XHDTYPE: "a Solaris extended header",
}


class _HeaderRefused(tarfile.HeaderError):
    """Raised inside tarfile; not one of the HeaderError kinds ``TarFile.next`` swallows."""


class _HeaderGuard:
    """What one archive's headers may cost, and the first refusal (tarfile re-wraps our
    exception in ReadError when it comes from a header after another, so the message is kept
    here for iter_members)."""

    def __init__(self, limits: ArchiveLimits) -> None:
        self.max_bytes = limits.max_header_bytes
        self.max_count = 2 * limits.max_members
        self.count = 0
        self.refusal: str | None = None

    def refuse(self, message: str) -> NoReturn:
        self.refusal = self.refusal or message
        raise _HeaderRefused(message)


class _GuardedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses oversized or too many extended headers before tarfile reads them,
    and sparse members (GNU type ``S``, PAX ``GNU.sparse.*``), which bundles never contain."""

    guard: ClassVar[_HeaderGuard]

    @classmethod
    def bound(cls, guard: _HeaderGuard) -> type[_GuardedTarInfo]:
        """A subclass for one archive: ``tarfile.open(tarinfo=...)`` takes a class."""
        return type("_GuardedTarInfo", (cls,), {"guard": guard})

    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type == tarfile.GNUTYPE_SPARSE:
            self._refuse_sparse(self)
        kind = _EXTENDED_HEADERS.get(self.type)
        if kind is not None:
            guard = self.guard
            guard.count += 1
            if self.size > guard.max_bytes:
                guard.refuse(
                    f"archive member {self.name!r} is {kind} of {self.size} bytes, above the "
                    f"limit of {guard.max_bytes} bytes for an extended header; refusing"
                )
            if guard.count > guard.max_count:
                guard.refuse(
                    f"archive has more than {guard.max_count} extended headers (at "
                    f"{self.name!r}); refusing"
                )
        result: tarfile.TarInfo = super()._proc_member(archive)  # type: ignore[misc]
        return result

    def _refuse_sparse(self, member: tarfile.TarInfo) -> NoReturn:
        self.guard.refuse(
            f"archive member {member.name!r} is a sparse file; bundles never contain sparse "
            "files; refusing"
        )

    # _proc_pax calls these on the header's TarInfo with the member's as the first argument.
    def _proc_gnusparse_00(self, member: tarfile.TarInfo, *args: object) -> NoReturn:
        self._refuse_sparse(member)

    def _proc_gnusparse_01(self, member: tarfile.TarInfo, *args: object) -> NoReturn:
        self._refuse_sparse(member)

    def _proc_gnusparse_10(self, member: tarfile.TarInfo, *args: object) -> NoReturn:
        self._refuse_sparse(member)


def iter_members(stream: BinaryIO, limits: ArchiveLimits | None = None) -> Iterator[Member]:
    """Stream a bundle archive under a strict allow-list, one regular file at a time.

    Nothing is held in memory beyond one chunk: the caller reads each :class:`Member`'s
    :meth:`~Member.chunks` (hashing and writing them as they pass) before asking for the next.
    A member that is never read is skipped. Sizes are checked against ``limits`` before a
    member's content is read, and the bytes inflated so far against the compressed bytes
    consumed (``max_ratio``) as each chunk passes (declared sizes alone would also refuse a large
    incompressible member), so a compression bomb is refused as soon as it passes a limit.

    Args:
        stream: the archive (gzip-compressed or plain tar), positioned at its start.
        limits: size, count and ratio bounds; the defaults suit models up to 1 GiB.

    Yields:
        The regular files, in archive order.

    Raises:
        ArchiveError: not a tar archive, or a member that is a link, device, FIFO, has an
            absolute or ``..`` path, appears twice, lies outside the single top-level directory,
            is sparse, or breaks a size, count, ratio or extended-header limit.
    """
    limits = limits or ArchiveLimits()
    counted = _Counting(stream)
    buffered = io.BufferedReader(counted, buffer_size=_CHUNK)
    seen: set[tuple[str, ...]] = set()
    top: str | None = None
    total = 0
    guard = _HeaderGuard(limits)
    try:
        gzipped = buffered.peek(2)[:2] == b"\x1f\x8b"  # gzip or plain tar, nothing else
        with tarfile.open(
            fileobj=buffered,
            mode="r|gz" if gzipped else "r|",
            tarinfo=_GuardedTarInfo.bound(guard),
        ) as archive:
            for count, member in enumerate(archive, start=1):
                if count > limits.max_members:
                    raise ArchiveError(f"bundle has more than {limits.max_members} entries")
                parts = _safe_parts(member.name)
                if parts in seen:
                    raise ArchiveError(f"archive member {member.name!r} appears twice; refusing")
                seen.add(parts)
                if top is None:
                    top = parts[0]
                elif parts[0] != top:
                    raise ArchiveError(
                        f"archive member {member.name!r} is outside the bundle directory {top!r}"
                    )
                if member.isdir():
                    continue
                if not member.isfile():
                    raise ArchiveError(
                        f"archive member {member.name!r} is {_member_kind(member)}; bundles may "
                        "only contain regular files and directories"
                    )
                if member.issparse():  # pragma: no cover - the guard refuses them first
                    raise ArchiveError(f"archive member {member.name!r} is a sparse file")
                if len(parts) < 2:
                    raise ArchiveError(f"archive member {member.name!r} is not inside a directory")
                if member.size > limits.max_member_bytes:
                    raise ArchiveError(
                        f"archive member {member.name!r} is {member.size} bytes, above the "
                        f"per-file limit of {limits.max_member_bytes}"
                    )
                total += member.size
                if total > limits.max_total_bytes:
                    raise ArchiveError(
                        f"bundle unpacks to more than {limits.max_total_bytes} bytes; refusing"
                    )
                counted.check_ratio(limits.max_ratio)
                handle = archive.extractfile(member)
                if handle is None:  # pragma: no cover - isfile() members always have data
                    raise ArchiveError(f"archive member {member.name!r} has no data")
                yield Member(
                    top, "/".join(parts[1:]), member.size, handle, counted, limits.max_ratio
                )
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        if guard.refusal is not None:
            raise ArchiveError(guard.refusal) from e
        raise ArchiveError(f"bundle is not a readable tar archive: {e}") from e
    if top is None:
        raise ArchiveError("bundle archive is empty")


def read_archive(data: bytes, limits: ArchiveLimits | None = None) -> tuple[str, dict[str, bytes]]:
    """Read a bundle archive into memory under the allow-list of :func:`iter_members`.

    For small bundles and tools (``edgepack inspect``); the agent streams instead.

    Args:
        data: the archive's bytes (gzip-compressed or plain tar).
        limits: size and count bounds; the defaults suit models up to 1 GiB.

    Returns:
        The top-level directory name and a mapping of relative POSIX path to file content.

    Raises:
        ArchiveError: see :func:`iter_members`; also an archive above ``max_archive_bytes``.
    """
    limits = limits or ArchiveLimits()
    if len(data) > limits.max_archive_bytes:
        raise ArchiveError(
            f"bundle is {len(data)} bytes, above the limit of {limits.max_archive_bytes}"
        )
    top = ""
    files: dict[str, bytes] = {}
    for member in iter_members(io.BytesIO(data), limits):
        top = member.top
        files[member.name] = member.read()
    return top, files


def open_bundle(
    data: bytes,
    trusted_keys: Sequence[ec.EllipticCurvePublicKey],
    limits: ArchiveLimits | None = None,
) -> VerifiedBundle:
    """Verify a bundle's bytes and parse its manifest. No I/O.

    The signature is checked before anything in the bundle is parsed: every file must be covered,
    none may be missing or changed, and one of ``trusted_keys`` must have signed.

    Raises:
        ArchiveError: see :func:`read_archive`.
        SignatureError: no ``model.sig``, or it does not verify (the message says why).
        ManifestError: the signed manifest is malformed, or a required file is missing.
    """
    top, files = read_archive(data, limits)
    signature = files.get(SIGNATURE_FILE)
    if signature is None:
        raise SignatureError(
            f"bundle has no {SIGNATURE_FILE}; it is unsigned and cannot be trusted"
        )
    content = {name: blob for name, blob in files.items() if name != SIGNATURE_FILE}
    verified = verify_files(content, signature, trusted_keys)
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise ManifestError(f"bundle is missing {', '.join(missing)}")
    manifest = parse_manifest(files[MANIFEST_FILE])
    return VerifiedBundle(manifest=manifest, files=files, signature=verified, top=top)


def verify_bundle_file(
    path: Path,
    trusted_keys: Sequence[ec.EllipticCurvePublicKey],
    limits: ArchiveLimits | None = None,
) -> VerifiedBundle:
    """Read ``path`` (size-checked first) and :func:`open_bundle` it."""
    limits = limits or ArchiveLimits()
    try:
        size = path.stat().st_size
        if size > limits.max_archive_bytes:
            raise ArchiveError(
                f"{path}: {size} bytes is above the limit of {limits.max_archive_bytes}"
            )
        data = path.read_bytes()
    except OSError as e:
        raise ArchiveError(f"cannot read bundle {path}: {e.strerror or e}") from e
    return open_bundle(data, trusted_keys, limits)


def _tar_bytes(top: str, files: Mapping[str, bytes]) -> bytes:
    """A deterministic tar.gz: sorted names, fixed owner, modes and times."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        root = tarfile.TarInfo(top)
        root.type, root.mode, root.mtime = tarfile.DIRTYPE, 0o755, 0
        archive.addfile(root)
        for name in sorted(files):
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mode, info.mtime = len(files[name]), 0o644, 0
            archive.addfile(info, io.BytesIO(files[name]))
    return gzip.compress(raw.getvalue(), compresslevel=6, mtime=0)


def write_bundle(
    out_dir: Path,
    manifest: Manifest,
    files: Mapping[str, bytes],
    key: ec.EllipticCurvePrivateKey,
) -> Path:
    """Sign ``files`` plus the manifest and write ``NAME-VERSION-PROFILE.edgepack`` atomically.

    Args:
        out_dir: where the bundle goes (created if missing).
        manifest: the bundle's manifest; written as ``manifest.json``.
        files: the other files of the bundle (``model.onnx``, ``reference.json``, ``golden.npz``).
        key: the ECDSA signing key.

    Returns:
        The bundle's path. A partly written bundle is never left under its final name.

    Raises:
        StorageError: ``out_dir`` cannot be created or the bundle cannot be written there.
    """
    content = dict(files)
    content[MANIFEST_FILE] = manifest.to_json()
    if SIGNATURE_FILE in content:
        raise ValueError(f"{SIGNATURE_FILE} is written by write_bundle itself")
    top = manifest.bundle_stem
    content[SIGNATURE_FILE] = sign_files(content, key, model_name=top)
    data = _tar_bytes(top, content)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise storage_error("create", out_dir, e) from e
    final = out_dir / bundle_filename(manifest.name, manifest.version, manifest.profile)
    write_bytes_atomic(final, data)  # temp file, fsync, rename, fsync the directory
    return final
