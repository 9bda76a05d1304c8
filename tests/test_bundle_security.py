"""Attacks on a bundle: tampered files, hostile archives, and signed bundles that still lie.

One real bundle is built per module. Each test sets up one lie in a fresh copy and checks both
the error and that nothing was written. Tampering is checked three ways: the OpenSSF
``model_signing`` CLI on the unpacked directory, :func:`edgepack.formats.modelsig.verify_directory`
on it, and ``edgepack verify`` on the directory packed again into a ``.edgepack``.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from conftest import write_agent_config
from cryptography.hazmat.primitives.asymmetric import ec

from edgepack.agent.exceptions import ArchiveError, BundleError, ManifestError, SignatureError
from edgepack.formats.bundle import (
    GOLDEN_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    REFERENCE_FILE,
    SIGNATURE_FILE,
    ArchiveLimits,
    open_bundle,
    read_archive,
    write_bundle,
)
from edgepack.formats.keys import key_id, load_private_key, load_public_key
from edgepack.formats.manifest import parse_manifest
from edgepack.formats.modelsig import sign_files
from edgepack.packager._build import BuildRequest, build
from tests.signed_dirs import sign_directory, verify_directory

BIN = Path(sys.executable).parent
TRACEBACK = "Traceback (most recent call last)"
MIB = 1024**2


def run(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=120, check=False
    )


def model_signing_verify(top: Path, pub: Path) -> subprocess.CompletedProcess[str]:
    return run(BIN / "model_signing", "verify", "key", "--signature", top / SIGNATURE_FILE,
               "--public_key", pub, top)  # fmt: skip


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def pack(top: str, files: Mapping[str, bytes]) -> bytes:
    """A plain tar.gz of ``top/`` holding ``files``, made with tarfile."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as archive:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def files_of(top: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in top.iterdir()}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, iris_model: tuple[Path, Path], keys) -> Path:
    model, reference = iris_model
    request = BuildRequest(
        model=model, name="iris", version=1, profiles=("x86_64-cpu",), reference=reference,
        key=keys.private, out_dir=tmp_path_factory.mktemp("bundle"), trust_pickle=True,
    )  # fmt: skip
    [result] = build(request)
    assert result.ok, result.error
    assert result.bundle is not None
    return result.bundle


@pytest.fixture
def unpacked(bundle: Path, tmp_path: Path) -> Path:
    """A fresh extraction of the bundle; returns its one top-level directory."""
    with tarfile.open(bundle) as archive:
        archive.extractall(tmp_path / "unpacked", filter="data")
    [top] = (tmp_path / "unpacked").iterdir()
    return top


@pytest.fixture(scope="module")
def trusted(keys) -> list[ec.EllipticCurvePublicKey]:
    return [load_public_key(keys.public.read_bytes())]


# --- the signature, checked by model_signing, verify_directory and `edgepack verify` -----------


def test_unmodified_bundle_verifies_everywhere(unpacked: Path, tmp_path: Path, keys, trusted):
    result = model_signing_verify(unpacked, keys.public)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Verification succeeded" in result.stdout
    assert set(verify_directory(unpacked, trusted).files) == set(files_of(unpacked)) - {
        SIGNATURE_FILE
    }
    # The repacking the attacks below use must not break a good bundle by itself.
    repacked = tmp_path / "repacked.edgepack"
    repacked.write_bytes(pack(unpacked.name, files_of(unpacked)))
    result = run(BIN / "edgepack", "verify", repacked, "--pub", keys.public)
    assert result.returncode == 0, result.stderr


def flip_byte(name: str) -> Callable[[Path, Any], tuple[str, tuple[str, ...]]]:
    def lie(top: Path, _other: Any) -> tuple[str, tuple[str, str]]:
        data = bytearray((top / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (top / name).write_bytes(data)
        # model_signing prints a Python list repr: its quoting varies, so match the parts.
        return f"'{name}' was modified after signing", ("Hash mismatch for", name)

    lie.__name__ = f"flip_byte_in_{name}"
    return lie


def add_file(top: Path, _other: Any) -> tuple[str, tuple[str, str]]:
    (top / "payload.py").write_bytes(b"import os\n")
    return "extra file 'payload.py' is not covered", ("Extra files found", "payload.py")


def sign_with_another_key(top: Path, other: Any) -> tuple[str, tuple[str, str]]:
    key = load_private_key(other.private.read_bytes())
    sign_directory(top, key)
    return f"signed by key {key_id(key)}, which is not among", ("Key mismatch", "public key")


TAMPERING = [
    *(flip_byte(n) for n in (MANIFEST_FILE, MODEL_FILE, REFERENCE_FILE, GOLDEN_FILE)),
    add_file,
    sign_with_another_key,
]


@pytest.mark.parametrize("lie", TAMPERING, ids=lambda f: f.__name__)
def test_tampered_bundle_fails_every_verifier(
    lie: Callable[[Path, Any], tuple[str, tuple[str, ...]]],
    unpacked: Path,
    tmp_path: Path,
    keys,
    other_keys,
    trusted,
) -> None:
    ours, theirs = lie(unpacked, other_keys)
    before = snapshot(unpacked)

    result = model_signing_verify(unpacked, keys.public)
    assert result.returncode != 0
    for phrase in theirs:
        assert phrase in result.stdout + result.stderr

    with pytest.raises(SignatureError) as caught:
        verify_directory(unpacked, trusted)
    assert ours in str(caught.value)

    repacked = tmp_path / "repacked.edgepack"
    repacked.write_bytes(pack(unpacked.name, files_of(unpacked)))
    result = run(BIN / "edgepack", "verify", repacked, "--pub", keys.public)
    assert result.returncode == 1
    assert TRACEBACK not in result.stderr
    assert ours in " ".join(result.stderr.split())
    assert snapshot(unpacked) == before


# --- hostile archives: read_archive and open_bundle refuse them, in memory ---------------------


def entry(
    name: str, data: bytes | None = b"x", kind: bytes = tarfile.REGTYPE, link: str = ""
) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE and data is not None else 0
    return info, data if kind == tarfile.REGTYPE else None


def tar_gz(*entries: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as archive:
        for info, data in entries:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return raw.getvalue()


def header(name: str, kind: bytes, size: int, data: bytes = b"") -> bytes:
    """One raw tar header declaring ``size`` bytes, then ``data`` padded to a block."""
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    return info.tobuf(format=tarfile.GNU_FORMAT) + data + bytes(-len(data) % tarfile.BLOCKSIZE)


def with_headers(*headers: bytes) -> bytes:
    """Raw ``headers`` in front of an ordinary archive holding ``b/model.onnx``, gzipped."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        info, data = entry("b/model.onnx")
        archive.addfile(info, io.BytesIO(data or b""))
    return gzip.compress(b"".join(headers) + raw.getvalue())


def sparse_pax(pax: dict[str, str], data: bytes = b"") -> bytes:
    """A PAX archive whose one member carries GNU sparse keys (``GNU.sparse.*``)."""
    info = tarfile.TarInfo("b/model.onnx")
    info.size, info.pax_headers = len(data), pax
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT) as archive:
        archive.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def truncated_gzip(_tmp: Path) -> bytes:
    whole = tar_gz(entry("b/model.onnx", random.Random(0).randbytes(64 * 1024)))
    return whole[: len(whole) // 2]


DEFAULT = ArchiveLimits()

# Each: archive bytes (given the watched tmp dir), limits, what the message must say. Paths and
# link targets point into the watched dir, so an extraction would show up there.
HOSTILE = [
    pytest.param(
        lambda t: tar_gz(entry("b/model.onnx", kind=tarfile.SYMTYPE, link=str(t / "x"))),
        DEFAULT, "is a symbolic link", id="symlink",
    ),
    pytest.param(
        lambda t: tar_gz(entry("b/a"), entry("b/model.onnx", kind=tarfile.LNKTYPE, link="b/a")),
        DEFAULT, "is a hard link", id="hardlink",
    ),
    pytest.param(
        lambda t: tar_gz(entry("b/../../escaped")), DEFAULT, r"escapes .*'\.\.'", id="dotdot"
    ),
    pytest.param(
        lambda t: tar_gz(entry(str(t / "absolute"))), DEFAULT, "absolute", id="absolute"
    ),
    pytest.param(
        lambda t: tar_gz(entry("b/null", kind=tarfile.CHRTYPE)),
        DEFAULT, "is a device node", id="device",
    ),
    pytest.param(
        lambda t: tar_gz(entry("b/pipe", kind=tarfile.FIFOTYPE)), DEFAULT, "is a FIFO", id="fifo"
    ),
    pytest.param(
        lambda t: tar_gz(entry("b/model.onnx", b"good"), entry("b/model.onnx", b"evil")),
        DEFAULT, "appears twice", id="duplicate",
    ),
    pytest.param(
        lambda t: tar_gz(entry("b/model.onnx", b"x" * 65)),
        ArchiveLimits(max_member_bytes=64), "above the per-file limit of 64", id="oversized",
    ),
    pytest.param(
        lambda t: tar_gz(entry("b/a", b"x" * 40), entry("b/b", b"x" * 40)),
        ArchiveLimits(max_total_bytes=64), "more than 64 bytes", id="too_big_in_total",
    ),
    pytest.param(
        lambda t: tar_gz(*(entry(f"b/{i}") for i in range(5))),
        ArchiveLimits(max_members=4), "more than 4 entries", id="too_many_members",
    ),
    pytest.param(
        lambda t: tar_gz(entry("b/model.onnx"), entry("c/model.onnx")),
        DEFAULT, "outside the bundle directory 'b'", id="outside_top_dir",
    ),
    pytest.param(lambda t: tar_gz(), DEFAULT, "empty", id="empty"),
    pytest.param(
        lambda t: b"this is not a tar archive\n" * 40,
        DEFAULT, "not a readable tar archive", id="not_a_tar",
    ),
    pytest.param(truncated_gzip, DEFAULT, "not a readable tar archive", id="truncated_gzip"),
    # extended headers are refused before tarfile reads them: only the headers are here
    pytest.param(
        lambda t: with_headers(header("././@LongLink", tarfile.GNUTYPE_LONGNAME, 600 * MIB)),
        DEFAULT, "'././@LongLink' is a GNU long-name header of 629145600 bytes, above the limit "
        "of 65536 bytes", id="huge_long_name",
    ),
    pytest.param(
        lambda t: with_headers(header("././@LongLink", tarfile.GNUTYPE_LONGLINK, 600 * MIB)),
        DEFAULT, "is a GNU long-link header of 629145600 bytes, above the limit",
        id="huge_long_link",
    ),
    pytest.param(
        lambda t: with_headers(header("PaxHeader", tarfile.XHDTYPE, 300 * MIB)),
        DEFAULT, "'PaxHeader' is a PAX extended header of 314572800 bytes, above the limit of "
        "65536", id="huge_pax",
    ),
    pytest.param(
        lambda t: with_headers(header("GlobalHead", tarfile.XGLTYPE, 300 * MIB)),
        DEFAULT, "is a PAX global header of 314572800 bytes", id="huge_pax_global",
    ),
    pytest.param(  # behind a legit header, where tarfile re-wraps the error: same message
        lambda t: with_headers(header("PaxHeader", tarfile.XHDTYPE, 20, b"20 comment=hello!!\n"),
                               header("././@LongLink", tarfile.GNUTYPE_LONGNAME, 70_000)),
        DEFAULT, "is a GNU long-name header of 70000 bytes, above the limit", id="huge_behind_pax",
    ),
    pytest.param(
        lambda t: with_headers(*(header("././@LongLink", tarfile.GNUTYPE_LONGNAME, 4, b"b/x\0")
                                 for _ in range(20))),
        ArchiveLimits(max_members=4), "more than 8 extended headers", id="too_many_headers",
    ),
    pytest.param(
        lambda t: with_headers(header("b/model.onnx", tarfile.GNUTYPE_SPARSE, 0)),
        DEFAULT, "'b/model.onnx' is a sparse file", id="sparse_gnu",
    ),
    pytest.param(
        lambda t: sparse_pax({"GNU.sparse.size": "4", "GNU.sparse.offset": "0",
                              "GNU.sparse.numbytes": "1"}, b"x"),
        DEFAULT, "is a sparse file", id="sparse_pax_0.0",
    ),
    pytest.param(
        lambda t: sparse_pax({"GNU.sparse.map": "0,1", "GNU.sparse.size": "4"}, b"x"),
        DEFAULT, "is a sparse file", id="sparse_pax_0.1",
    ),
    pytest.param(  # a map that claims 10**12 entries: tarfile would read it number by number
        lambda t: sparse_pax({"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                              "GNU.sparse.realsize": "4"}, b"1000000000000\n" + b"1\n" * 400),
        DEFAULT, "is a sparse file", id="sparse_pax_1.0",
    ),
]  # fmt: skip

READERS = {
    "read_archive": lambda data, keys, limits: read_archive(data, limits),
    "open_bundle": open_bundle,
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize(("make", "limits", "message"), HOSTILE)
def test_hostile_archive_is_refused_and_nothing_is_written(
    make: Callable[[Path], bytes],
    limits: ArchiveLimits,
    message: str,
    reader: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    trusted,
) -> None:
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    data = make(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ArchiveError, match=message) as caught:
        READERS[reader](data, trusted, limits)
    assert isinstance(caught.value, BundleError)
    assert snapshot(tmp_path) == before


# Runs ARGS, then prints the peak RSS (KiB) of the largest process it waited for.
PEAK_RSS = (
    "import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(done.returncode)"
)


def install_peak_rss(
    tmp_path: Path, keys, bundle: Path
) -> tuple[subprocess.CompletedProcess, float]:
    """``edgepack-agent install BUNDLE`` on a fresh device, in a child; result, peak RSS in MiB."""
    work = tmp_path / "device"
    write_agent_config(work, keys)
    done = run(sys.executable, "-c", PEAK_RSS, BIN / "edgepack-agent", "--config",
               work / "agent.toml", "install", bundle)  # fmt: skip
    *output, peak = done.stdout.splitlines()
    done.stdout = "\n".join(output)
    return done, int(peak) / 1024


def zeros_after(head: bytes, size: int, tail: bytes) -> bytes:
    """gzip of ``head``, ``size`` zero bytes and ``tail``, compressed a MiB at a time."""
    z = zlib.compressobj(1, zlib.DEFLATED, 31)
    out = [z.compress(head)]
    for start in range(0, size, MIB):
        out.append(z.compress(bytes(min(MIB, size - start))))
    return b"".join([*out, z.compress(tail), z.flush()])


@pytest.mark.parametrize(
    ("kind", "size", "what"),
    [(tarfile.GNUTYPE_LONGNAME, 600 * MIB, "GNU long-name"),
     (tarfile.XHDTYPE, 300 * MIB, "PAX extended")],
    ids=["long_name_600MiB", "pax_300MiB"],
)  # fmt: skip
def test_a_huge_extended_header_is_refused_before_it_is_read(
    kind: bytes, size: int, what: str, bundle: Path, tmp_path: Path, keys
) -> None:
    """A real bundle behind one extended header holding ``size`` zero bytes (a 3 MB gzip):
    tarfile read it all before our limits (1.2 GB peak for 600 MiB, and a 300 MB PAX header
    installed); now refused at its header, the install's RSS grows by under 64 MiB."""
    info = tarfile.TarInfo("././@LongLink" if kind == tarfile.GNUTYPE_LONGNAME else "PaxHeader")
    info.type, info.size = kind, size
    forged = tmp_path / "forged.edgepack"
    forged.write_bytes(zeros_after(info.tobuf(format=tarfile.GNU_FORMAT), size,
                                   gzip.decompress(bundle.read_bytes())))  # fmt: skip
    assert forged.stat().st_size < 4 * MIB
    (tmp_path / "junk.edgepack").write_bytes(b"not a bundle\n" * 40)
    baseline, base_peak = install_peak_rss(tmp_path / "baseline", keys, tmp_path / "junk.edgepack")
    assert "not a readable tar archive" in baseline.stderr, baseline.stderr
    done, peak = install_peak_rss(tmp_path, keys, forged)
    assert done.returncode == 1, done.stderr
    assert f"is a {what} header of {size} bytes, above the limit of 65536" in done.stderr
    assert TRACEBACK not in done.stderr
    assert peak - base_peak < 64, f"peak RSS {peak:.0f} MiB against {base_peak:.0f} MiB"
    print(f"{what} header of {size} bytes: refused, RSS {base_peak:.0f} -> {peak:.0f} MiB")
    state = tmp_path / "device" / "state"
    assert [p for p in state.rglob("*") if p.is_file() and p.name != "lock"] == []


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
def test_a_legit_long_name_still_reads(fmt: int) -> None:
    """A name of 150 characters needs a long-name or PAX header of a few hundred bytes."""
    name = "n" * 150
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz", format=fmt) as archive:
        info = tarfile.TarInfo(f"b/{name}")
        info.size = 5
        archive.addfile(info, io.BytesIO(b"hello"))
        info = tarfile.TarInfo("b/model.onnx")
        info.size = 1
        archive.addfile(info, io.BytesIO(b"x"))
    assert read_archive(raw.getvalue()) == ("b", {name: b"hello", "model.onnx": b"x"})


def test_tarfile_still_has_the_hooks_the_header_guard_overrides() -> None:
    """formats.bundle overrides private TarInfo methods (read in CPython 3.10 to 3.13); the
    huge_* and sparse_* cases above fail if tarfile stops calling them."""
    for hook in ("_proc_member", "_proc_gnulong", "_proc_pax", "_proc_sparse",
                 "_proc_gnusparse_00", "_proc_gnusparse_01", "_proc_gnusparse_10"):  # fmt: skip
        assert callable(getattr(tarfile.TarInfo, hook, None)), hook

# --- signed bundles that still lie --------------------------------------------------------------


def test_bundle_without_model_sig_is_unsigned(unpacked: Path, trusted) -> None:
    files = files_of(unpacked)
    del files[SIGNATURE_FILE]
    with pytest.raises(SignatureError, match="unsigned"):
        open_bundle(pack(unpacked.name, files), trusted)


def test_validly_signed_bundle_without_golden_samples(
    unpacked: Path, tmp_path: Path, keys, trusted
) -> None:
    manifest = parse_manifest((unpacked / MANIFEST_FILE).read_bytes())
    files = {n: (unpacked / n).read_bytes() for n in (MODEL_FILE, REFERENCE_FILE)}
    path = write_bundle(
        tmp_path / "out", manifest, files, load_private_key(keys.private.read_bytes())
    )
    # The signature is good (a SignatureError would come first); the bundle is still incomplete.
    with pytest.raises(ManifestError, match=GOLDEN_FILE):
        open_bundle(path.read_bytes(), trusted)


def test_validly_signed_manifest_from_a_newer_format(unpacked: Path, keys, trusted) -> None:
    files = files_of(unpacked)
    del files[SIGNATURE_FILE]
    manifest = json.loads(files[MANIFEST_FILE])
    manifest["format_version"] = 99
    files[MANIFEST_FILE] = json.dumps(manifest).encode()
    key = load_private_key(keys.private.read_bytes())
    files[SIGNATURE_FILE] = sign_files(files, key, model_name=unpacked.name)
    with pytest.raises(ManifestError, match=r"version 99 .* upgrade edgepack"):
        open_bundle(pack(unpacked.name, files), trusted)
