"""The install path is bounded in time and memory, installs only what it verified, and checks a
deploy against its bundle (issue #9, install-path items).

Real parts throughout: bundles the packager built (or forged and re-signed from them), the real
``edgepack-agent`` CLI in a child process whose peak RSS is measured by the kernel
(``RUSAGE_CHILDREN``), a real ONNX graph that loops 2**62 times, a real loopback HTTP server on a
full tmpfs. Each test sets up one fault and checks the error, that the previous version still
serves, and that nothing is left behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import bundle_forge as forge
import pytest
from conftest import KeyPair, write_agent_config
from test_probe import looping_model

from edgepack.agent._config import load_config
from edgepack.agent._download import HttpFetcher
from edgepack.agent._health_check import checks_left_running
from edgepack.agent._lifecycle import Lifecycle
from edgepack.agent.exceptions import ArchiveError, BundleError, HealthCheckError, StorageError
from edgepack.fleet._bundle_server import BundleServer
from edgepack.formats.bundle import MANIFEST_FILE, MODEL_FILE, SIGNATURE_FILE
from edgepack.formats.keys import load_private_key
from edgepack.formats.modelsig import sign_digests

AGENT = Path(sys.executable).parent / "edgepack-agent"
MIB = 1024**2
RSS_LIMIT_MIB = 256
# Runs ARGS, then prints the peak RSS (KiB) of the largest process it waited for, itself included.
PEAK_RSS = (
    "import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(done.returncode)"
)


def make_device(root: Path, keys: KeyPair, extra: str = "") -> Path:
    write_agent_config(root, keys, extra=f"[limits]\nprobation_period = 0\n{extra}")
    return root


def lifecycle(work: Path, **kwargs: object) -> Lifecycle:
    return Lifecycle(load_config(work / "agent.toml"), **kwargs)  # type: ignore[arg-type]


def state(work: Path) -> dict:
    return json.loads((work / "state" / "state.json").read_text())


def leftovers(work: Path) -> list[str]:
    root = work / "state"
    found = [str(p) for d in ("incoming", "staging") for p in (root / d).iterdir()]
    return found + ([str(root / "journal.json")] if (root / "journal.json").exists() else [])


def install_peak_rss(work: Path, bundle: Path) -> tuple[subprocess.CompletedProcess, float]:
    """``edgepack-agent install BUNDLE`` in a child; its result and peak RSS in MiB."""
    done = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(AGENT), "--config", str(work / "agent.toml"),
         "install", str(bundle)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    *output, peak = done.stdout.splitlines()
    done.stdout = "\n".join(output)
    return done, int(peak) / 1024


class Zeros(io.RawIOBase):
    """``size`` zero bytes, read in pieces (a member never held in memory)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def write_archive(
    path: Path, top: str, files: dict[str, bytes], big: dict[str, int], *, gz: bool
) -> Path:
    """A tar (gzipped if ``gz``) of ``top/`` with ``files``, then ``big`` members of zeros."""
    options: dict = {"mode": "w:gz", "compresslevel": 1} if gz else {"mode": "w"}
    with tarfile.open(path, **options) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mode = len(data), 0o644
            archive.addfile(info, io.BytesIO(data))
        for name, size in big.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mode = size, 0o644
            archive.addfile(info, io.BufferedReader(Zeros(size), 1 << 20))
    return path


@pytest.fixture
def v1_device(tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path]) -> Path:
    work = make_device(tmp_path / "device", keys)
    outcome = lifecycle(work).install(str(iris_bundles["v1"]))
    assert outcome.result == "installed", outcome.error
    return work


# --- bounded memory -----------------------------------------------------------------------------


def test_a_compression_bomb_is_refused_at_its_limit_in_little_memory(
    v1_device: Path, iris_bundles: dict[str, Path], tmp_path: Path
) -> None:
    """Two members of 400 MiB of zeros in a 1.7 MB gzip: refused by the inflation-ratio limit
    before the first is written, the install's peak RSS far below 256 MiB."""
    top, files = forge.unpack(iris_bundles["v2"])
    bomb = write_archive(
        tmp_path / "bomb.edgepack", top, files, {"a.bin": 400 * MIB, "b.bin": 400 * MIB}, gz=True
    )
    assert bomb.stat().st_size < 4 * MIB
    before = state(v1_device)
    done, peak = install_peak_rss(v1_device, bomb)
    assert done.returncode == 1, done.stderr
    assert "inflates" in done.stderr
    assert "a compression bomb; refusing" in done.stderr
    assert peak < RSS_LIMIT_MIB, f"peak RSS {peak:.0f} MiB"
    print(f"bomb: {bomb.stat().st_size} bytes -> refused, install peak RSS {peak:.0f} MiB")
    assert state(v1_device) == before
    assert leftovers(v1_device) == []


def test_a_large_unsigned_member_is_streamed_to_disk_not_memory(
    v1_device: Path, iris_bundles: dict[str, Path], tmp_path: Path
) -> None:
    """300 MiB that passes every archive limit (a plain tar) is written and hashed as it
    streams; the signature then refuses the unsigned file. The old path read it all twice."""
    top, files = forge.unpack(iris_bundles["v2"])
    big = write_archive(tmp_path / "big.edgepack", top, files, {"padding.bin": 300 * MIB}, gz=False)
    done, peak = install_peak_rss(v1_device, big)
    assert done.returncode == 1
    assert "extra file 'padding.bin' is not covered" in done.stderr, done.stderr
    assert peak < RSS_LIMIT_MIB, f"peak RSS {peak:.0f} MiB"
    print(f"unsigned 300 MiB member: refused, install peak RSS {peak:.0f} MiB")
    assert leftovers(v1_device) == []
    assert state(v1_device)["models"]["iris"]["active"] == 1


def test_a_legit_large_bundle_installs_in_little_memory(
    v1_device: Path, iris_bundles: dict[str, Path], keys: KeyPair, tmp_path: Path
) -> None:
    """A validly signed v2 carrying 300 MiB of data installs, health check included."""
    top, files = forge.unpack(iris_bundles["v2"])
    size = 300 * MIB
    digests = {n: hashlib.sha256(d).hexdigest() for n, d in files.items() if n != SIGNATURE_FILE}
    zeros = hashlib.sha256()
    for _ in range(size // MIB):
        zeros.update(bytes(MIB))
    digests["data/padding.bin"] = zeros.hexdigest()
    signed = {**files, SIGNATURE_FILE: sign_digests(digests, load_private_key(
        keys.private.read_bytes()), model_name=top)}  # fmt: skip
    bundle = write_archive(
        tmp_path / "large.edgepack", top, signed, {"data/padding.bin": size}, gz=False
    )
    done, peak = install_peak_rss(v1_device, bundle)
    assert (done.returncode, done.stdout) == (0, "installed: iris v2 (was v1)"), done.stderr
    assert peak < RSS_LIMIT_MIB, f"peak RSS {peak:.0f} MiB"
    print(f"signed 300 MiB bundle: installed, install peak RSS {peak:.0f} MiB")
    installed = v1_device / "state" / "models" / "iris" / "2" / "data" / "padding.bin"
    assert installed.stat().st_size == size
    assert leftovers(v1_device) == []


# --- only what was verified is installed --------------------------------------------------------


def test_a_bundle_swapped_after_verification_is_not_what_gets_installed(
    v1_device: Path, iris_bundles: dict[str, Path]
) -> None:
    """The fetched copy is replaced by another validly signed bundle (v3) the moment
    verification ends: v2, the bytes that were verified, is installed and recorded."""
    swapped: list[str] = []

    def swap(entry) -> None:  # type: ignore[no-untyped-def]
        if entry.state == "staging" and not swapped:
            shutil.copyfile(iris_bundles["v3"], entry.incoming)
            swapped.append(entry.incoming)

    outcome = lifecycle(v1_device).install(str(iris_bundles["v2"]), on_state=swap)
    assert swapped
    assert (outcome.result, outcome.version) == ("installed", 2), outcome.error
    model = state(v1_device)["models"]["iris"]
    assert (model["active"], model["previous"]) == (2, 1)
    assert model["bundle_sha256"] == hashlib.sha256(iris_bundles["v2"].read_bytes()).hexdigest()
    _, v2 = forge.unpack(iris_bundles["v2"])
    installed = v1_device / "state" / "models" / "iris" / "2"
    assert (installed / MANIFEST_FILE).read_bytes() == v2[MANIFEST_FILE]
    assert (installed / MODEL_FILE).read_bytes() == v2[MODEL_FILE]
    assert not (v1_device / "state" / "models" / "iris" / "3").exists()
    assert leftovers(v1_device) == []


# --- a deploy is checked against its bundle -----------------------------------------------------


@pytest.mark.parametrize(
    ("model", "version", "says"),
    [
        ("iris", 4, "the deploy names iris v4, but its bundle is iris v2"),
        ("wine", 2, "the deploy names wine v2, but its bundle is iris v2"),
    ],
)
def test_a_deploy_whose_bundle_is_another_version_is_refused(
    model: str, version: int, says: str, v1_device: Path, iris_bundles: dict[str, Path]
) -> None:
    before = state(v1_device)
    outcome = lifecycle(v1_device).install(str(iris_bundles["v2"]), model=model, version=version)
    assert outcome.result == "rejected"  # the job reports REJECTED with this reason
    assert isinstance(outcome.error, BundleError)
    assert says in str(outcome.error)
    assert outcome.trace == ["fetching", "verifying", "failed"]
    assert state(v1_device) == before
    assert leftovers(v1_device) == []
    right = lifecycle(v1_device).install(str(iris_bundles["v2"]), model="iris", version=2)
    assert right.result == "installed"


# --- bounded time: the health check -------------------------------------------------------------


@pytest.fixture(scope="module")
def looping_bundle(
    tmp_path_factory: pytest.TempPathFactory, iris_bundles: dict[str, Path], keys: KeyPair
) -> Path:
    """A validly signed iris v9 whose model loops 2**62 times."""
    out = tmp_path_factory.mktemp("looping")
    return forge.resign(
        iris_bundles["v2"], keys.private, out, version=9, replace={MODEL_FILE: looping_model()}
    )


@pytest.mark.parametrize("in_child", [False, True], ids=["in-process", "in-child"])
def test_a_model_that_loops_fails_its_health_check_at_the_deadline_and_rolls_back(
    tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path], looping_bundle: Path,
    in_child: bool,
) -> None:  # fmt: skip
    child = f"health_check_in_child = {str(in_child).lower()}\n"
    work = make_device(tmp_path / "device", keys, "health_check_timeout = 3\n" + child)
    assert lifecycle(work).install(str(iris_bundles["v1"])).ok
    outcome = lifecycle(work).install(str(looping_bundle))
    assert (outcome.result, outcome.version) == ("rolled-back", 9)
    assert isinstance(outcome.error, HealthCheckError)
    assert "did not finish its health check within 3 s" in str(outcome.error)
    assert state(work)["models"]["iris"]["active"] == 1
    assert not (work / "state" / "models" / "iris" / "9").exists()
    assert leftovers(work) == []
    # in the agent: onnxruntime was told to stop (RunOptions.terminate), so the loop ended and
    # no check is left running in the background
    assert checks_left_running() == 0


def test_recovery_after_a_crash_in_the_health_check_of_a_looping_model_does_not_hang(
    tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path], looping_bundle: Path
) -> None:
    work = make_device(tmp_path / "device", keys, "health_check_timeout = 3\n")
    assert lifecycle(work).install(str(iris_bundles["v1"])).ok
    env = {**os.environ, "EDGEPACK_FAULT_KILL_AT": "health_check"}
    killed = subprocess.run(
        [str(AGENT), "--config", str(work / "agent.toml"), "install", str(looping_bundle)],
        capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    outcome = lifecycle(work).recover()
    assert outcome is not None
    assert outcome.result == "rolled-back"
    assert "within 3 s" in str(outcome.error)
    assert state(work)["models"]["iris"]["active"] == 1


def test_a_model_that_crashes_onnxruntime_natively_in_a_child_check_rolls_back(
    tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    work = make_device(tmp_path / "device", keys, "health_check_in_child = true\n")
    assert lifecycle(work).install(str(iris_bundles["v1"])).ok
    monkeypatch.setenv("EDGEPACK_FAULT_PROBE_SIGNAL", "SIGSEGV")
    outcome = lifecycle(work).install(str(iris_bundles["v2"]))
    assert outcome.result == "rolled-back"
    assert "was killed by signal SIGSEGV" in str(outcome.error)
    assert state(work)["models"]["iris"]["active"] == 1
    assert leftovers(work) == []


def test_a_model_that_crashes_onnxruntime_natively_in_the_agent_is_rolled_back_by_the_journal(
    v1_device: Path, iris_bundles: dict[str, Path]
) -> None:
    """In-process, a native crash in the check kills the process every time; each restart
    resumes the journaled health check, and the crash-loop limit (3) rolls the install back."""
    env = {**os.environ, "EDGEPACK_FAULT_PROBE_SIGNAL": "SIGSEGV"}
    config = ["--config", str(v1_device / "agent.toml")]
    for command in (["install", str(iris_bundles["v2"])], ["recover"], ["recover"]):
        crashed = subprocess.run(
            [str(AGENT), *config, *command],
            capture_output=True, text=True, timeout=120, check=False, env=env,
        )  # fmt: skip
        assert crashed.returncode == -signal.SIGSEGV, crashed.stderr
        assert json.loads((v1_device / "state" / "journal.json").read_text())["state"] == (
            "health_check"
        )
        assert state(v1_device)["models"]["iris"]["active"] == 1
    outcome = lifecycle(v1_device).recover()  # the fourth start: no more attempts
    assert outcome is not None
    assert (outcome.result, str(outcome.error)) == (
        "rolled-back",
        "interrupted 3 times in state health_check",
    )
    assert state(v1_device)["models"]["iris"]["active"] == 1
    assert not (v1_device / "state" / "models" / "iris" / "2").exists()
    assert leftovers(v1_device) == []


# --- a full disk during the download ------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs (needs root); unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_the_download_keeps_the_previous_version(
    tiny_disk: Path, keys: KeyPair, iris_bundles: dict[str, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    work = make_device(tiny_disk / "device", keys)
    assert lifecycle(work).install(str(iris_bundles["v1"])).ok
    dist = tmp_path / "dist"
    dist.mkdir()
    bundle = Path(shutil.copy(iris_bundles["v2"], dist))
    server = BundleServer(dist, port=0).start()
    fetcher = HttpFetcher(load_config(work / "agent.toml").download)
    try:
        page = os.statvfs(tiny_disk).f_bsize
        # the journal and the sidecar fit, the journal, the sidecar and the bundle do not
        pages = math.ceil(bundle.stat().st_size / page)
        (tiny_disk / "filler").write_bytes(bytes((os.statvfs(tiny_disk).f_bavail - pages) * page))
        before = (work / "state" / "state.json").read_bytes()
        outcome = lifecycle(work, fetcher=fetcher).install(
            f"{server.url}/{bundle.name}",
            expected_sha256=hashlib.sha256(bundle.read_bytes()).hexdigest(),
            expected_size=bundle.stat().st_size,
        )
    finally:
        fetcher.close()
        server.stop()
    assert outcome.result == "rejected"
    assert isinstance(outcome.error, StorageError)
    assert "cannot write the download" in str(outcome.error)
    assert "the disk is full: free space on this filesystem and retry" in str(outcome.error)
    assert outcome.trace == ["fetching", "failed"]
    assert (work / "state" / "state.json").read_bytes() == before
    assert leftovers(work) == []
    (tiny_disk / "filler").unlink()
    assert lifecycle(work).install(str(iris_bundles["v2"])).result == "installed"


def test_an_archive_limit_names_the_limit(v1_device: Path, tmp_path: Path) -> None:
    """A manifest above its cap is refused before it is parsed."""
    top = "iris-2-x86_64-cpu"
    path = write_archive(tmp_path / "fat.edgepack", top, {}, {MANIFEST_FILE: 2 * MIB}, gz=True)
    outcome = lifecycle(v1_device).install(str(path))
    assert outcome.result == "rejected"
    assert isinstance(outcome.error, ArchiveError)
    assert "manifest.json is 2097152 bytes, above its limit of 1048576" in str(outcome.error)
    assert leftovers(v1_device) == []
