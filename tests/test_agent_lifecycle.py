"""The agent's update lifecycle on real bundles: install, upgrade, rollback, retire, and attacks.

Bundles are the packager's (``iris_bundles``) or forged from them (``bundle_forge``). Devices are
prepared once per module with the real ``edgepack-agent`` CLI and copied for each test, so every
test starts from a committed state and checks what it left on disk. Attack tests set up one lie
each and check both the error and that nothing local changed. Crashes are real: the agent runs in
a subprocess that SIGKILLs itself in a chosen state (``EDGEPACK_FAULT_KILL_AT``/``_AFTER``), and
``edgepack-agent recover`` (or ``Agent.start``) must leave a consistent device every time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bundle_forge as forge
import numpy as np
import pytest
from conftest import KeyPair, write_agent_config
from cryptography.hazmat.primitives.asymmetric import ec

from edgepack.agent._config import load_config
from edgepack.agent._daemon import Agent
from edgepack.agent._journal import Journal, JournalEntry
from edgepack.agent._lifecycle import Lifecycle
from edgepack.agent._state import Store
from edgepack.agent.exceptions import (
    ArchiveError,
    HealthCheckError,
    IncompatibleBundleError,
    InstallError,
    ModelNotFoundError,
    NotInstalledError,
    SignatureError,
    StorageError,
    VersionError,
)
from edgepack.formats.bundle import MODEL_FILE, SIGNATURE_FILE
from edgepack.formats.keys import load_public_key
from tests.signed_dirs import verify_directory

AGENT = Path(sys.executable).parent / "edgepack-agent"
TRACEBACK = "Traceback (most recent call last)"
HOOKS = ("EDGEPACK_FAULT_KILL_AT", "EDGEPACK_FAULT_KILL_AFTER")
INSTALL_STATES = ("fetching", "verifying", "staging", "health_check", "committing", "cleanup")
KILLED = -signal.SIGKILL


# --- helpers ----------------------------------------------------------------------------------


def cli(
    work: Path, *args: object, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``edgepack-agent --config WORK/agent.toml ARGS`` in a fresh process."""
    return subprocess.run(
        [str(AGENT), "--config", str(work / "agent.toml"), *map(str, args)],
        capture_output=True, text=True, timeout=60, check=False, env={**os.environ, **(env or {})},
    )  # fmt: skip


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line on stderr (no traceback, nothing else)."""
    assert TRACEBACK not in result.stdout + result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), result.stderr
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its content (None for directories)."""
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def versions(work: Path) -> set[int]:
    """The version directories present under models/iris."""
    directory = work / "state" / "models" / "iris"
    return {int(p.name) for p in directory.iterdir()} if directory.exists() else set()


def committed(work: Path) -> dict[str, Any]:
    return json.loads((work / "state" / "state.json").read_text())


def leftovers(work: Path) -> list[str]:
    """Whatever is in incoming/ and staging/, and the journal if there is one."""
    state = work / "state"
    found = [str(p) for d in ("incoming", "staging") for p in (state / d).iterdir()]
    return found + ([str(state / "journal.json")] if (state / "journal.json").exists() else [])


def device(prepared: Path, tmp_path: Path) -> Path:
    """A private copy of a prepared device directory (agent.toml + state/)."""
    return Path(shutil.copytree(prepared, tmp_path / "device", symlinks=True))


def serve(work: Path) -> Agent:
    """An in-process agent on ``work``; use as a context manager so it stops."""
    return Agent(load_config(work / "agent.toml")).start(serve_http=False)


@dataclasses.dataclass(frozen=True)
class Rows:
    """The golden inputs of the iris bundles and the labels the build recorded for them."""

    inputs: np.ndarray
    labels: np.ndarray


def assert_serves(agent: Agent, version: int, rows: Rows) -> None:
    """``agent`` serves iris ``version`` and it gives the labels recorded at build time."""
    out = agent.infer("iris", {"input": rows.inputs}, version=version)
    np.testing.assert_array_equal(out["label"], rows.labels)
    assert agent.runtime.get("iris").version == version


def assert_consistent(
    work: Path, trusted: list[ec.EllipticCurvePublicKey], rows: Rows, *, active: int | None,
    previous: int | None,
) -> None:  # fmt: skip
    """What a device must look like once no operation is in flight."""
    assert leftovers(work) == []
    model = committed(work)["models"]["iris"]
    assert (model["active"], model["previous"]) == (active, previous)
    retained = {v for v in (active, previous) if v is not None}
    assert versions(work) == retained
    for version in retained:
        verify_directory(work / "state" / "models" / "iris" / str(version), trusted)
    with serve(work) as agent:  # a restart: nothing left to recover, the active version serves
        assert agent.recovered is None
        if active is None:
            with pytest.raises(ModelNotFoundError):
                agent.infer("iris", {"input": rows.inputs})
        else:
            assert_serves(agent, active, rows)


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trusted(keys: KeyPair) -> list[ec.EllipticCurvePublicKey]:
    return [load_public_key(keys.public.read_bytes())]


@pytest.fixture(scope="module")
def rows(iris_bundles: dict[str, Path]) -> Rows:
    arrays = forge.golden(forge.unpack(iris_bundles["v1"])[1])
    return Rows(arrays["input.input"], arrays["output.label"])


@pytest.fixture(scope="module")
def limit(iris_bundles: dict[str, Path]) -> int:
    """A per-file limit the real bundles fit under twice over (for the oversized member)."""
    return 2 * max(
        len(b) for v in ("v1", "v2", "v3") for b in forge.unpack(iris_bundles[v])[1].values()
    )


@pytest.fixture(scope="module")
def prepared(
    tmp_path_factory: pytest.TempPathFactory,
    iris_bundles: dict[str, Path],
    keys: KeyPair,
    limit: int,
) -> dict[str, Path]:
    """Device directories made once with the CLI: "empty", "v1" (v1 installed), "v2" (then v2)."""
    root = tmp_path_factory.mktemp("prepared")
    empty = root / "empty"
    # No probation here: these devices are restarted many times on purpose (tests/test_probation.py)
    extra = f"[limits]\nmax_file_bytes = {limit}\nprobation_period = 0\n"
    write_agent_config(empty, keys, extra=extra)
    out = {"empty": empty}
    for version, start in (("v1", "empty"), ("v2", "v1")):
        out[version] = Path(shutil.copytree(out[start], root / version))
        result = cli(out[version], "install", iris_bundles[version])
        assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def forged(
    tmp_path_factory: pytest.TempPathFactory, iris_bundles: dict[str, Path], keys: KeyPair
) -> dict[str, Path]:
    """Validly signed bundles whose golden.npz records wrong outputs (v9): "bad-label",
    "bad-probabilities"."""
    out = tmp_path_factory.mktemp("forged")
    files = forge.unpack(iris_bundles["v2"])[1]
    return {
        f"bad-{output}": forge.resign(
            iris_bundles["v2"],
            keys.private,
            out / output,
            version=9,
            replace={"golden.npz": forge.wrong_golden(files, output)},
        )
        for output in ("label", "probabilities")
    }


# --- install, upgrade, downgrade, rollback, retire --------------------------------------------


def test_install_then_upgrades_keep_active_and_previous_only(
    prepared, iris_bundles, rows, tmp_path
):
    work = device(prepared["empty"], tmp_path)
    with serve(work) as agent:
        with pytest.raises(ModelNotFoundError):
            agent.infer("iris", {"input": rows.inputs})
        for version, previous, kept in ((1, None, {1}), (2, 1, {1, 2}), (3, 2, {2, 3})):
            outcome = agent.install(str(iris_bundles[f"v{version}"]))
            assert (outcome.result, outcome.version, outcome.from_version) == (
                "installed", version, previous,
            )  # fmt: skip
            assert outcome.error is None
            assert_serves(agent, version, rows)
            model = committed(work)["models"]["iris"]
            assert (model["active"], model["previous"], model["highest"]) == (
                version, previous, version,
            )  # fmt: skip
            assert versions(work) == kept
            assert leftovers(work) == []
    history = committed(work)["history"]
    assert [(h["action"], h["version"], h["result"]) for h in history] == [
        ("install", v, "installed") for v in (1, 2, 3)
    ]


def test_downgrade_is_refused_and_changes_nothing(prepared, iris_bundles, rows, tmp_path):
    work = device(prepared["v2"], tmp_path)
    before = snapshot(work)
    with serve(work) as agent:
        outcome = agent.install(str(iris_bundles["v1"]))
        assert outcome.result == "rejected"
        assert isinstance(outcome.error, VersionError)
        assert "iris v1 is not newer than v2, the highest version installed here" in str(
            outcome.error
        )
        assert_serves(agent, 2, rows)
    assert snapshot(work) == before


def test_reinstalling_the_active_version_is_a_no_op(prepared, iris_bundles, rows, tmp_path):
    work = device(prepared["v2"], tmp_path)
    before = snapshot(work)
    with serve(work) as agent:
        outcome = agent.install(str(iris_bundles["v2"]))
        assert (outcome.result, outcome.error) == ("already-active", None)
        assert outcome.trace == ["fetching", "verifying", "cleanup", "done"]
        assert_serves(agent, 2, rows)
    assert snapshot(work) == before


def test_rollback_returns_to_previous_and_the_highest_version_stays_refused(
    prepared, iris_bundles, rows, trusted, tmp_path
):
    work = device(prepared["v2"], tmp_path)
    with serve(work) as agent:
        outcome = agent.rollback("iris")
        assert (outcome.result, outcome.version, outcome.from_version) == ("rolled-back-to", 1, 2)
        assert_serves(agent, 1, rows)
        again = agent.install(str(iris_bundles["v2"]))
        assert again.result == "rejected"
        assert isinstance(again.error, VersionError)
        assert "not newer than v2" in str(again.error)
        with pytest.raises(NotInstalledError, match="no retained previous version"):
            agent.rollback("iris")
        with pytest.raises(NotInstalledError, match="not installed"):
            agent.rollback("wine")
        assert_serves(agent, 1, rows)
    assert committed(work)["models"]["iris"]["highest"] == 2
    assert committed(work)["history"][-1]["result"] == "rolled-back-to"
    assert_consistent(work, trusted, rows, active=1, previous=None)
    newer = cli(work, "install", iris_bundles["v3"])  # a version above the highest still installs
    assert newer.returncode == 0, newer.stderr
    assert_consistent(work, trusted, rows, active=3, previous=1)


def test_retire_stops_serving_removes_files_and_remembers_the_highest(
    prepared, iris_bundles, rows, trusted, tmp_path
):
    work = device(prepared["v2"], tmp_path)
    with serve(work) as agent:
        outcome = agent.retire("iris")
        assert (outcome.result, outcome.error) == ("retired", None)
        with pytest.raises(ModelNotFoundError, match="not served"):
            agent.infer("iris", {"input": rows.inputs})
        assert not (work / "state" / "models" / "iris").exists()
        model = committed(work)["models"]["iris"]
        assert (model["active"], model["previous"], model["highest"]) == (None, None, 2)
        with pytest.raises(NotInstalledError):
            agent.retire("iris")
        for older in ("v1", "v2"):
            refused = agent.install(str(iris_bundles[older]))
            assert refused.result == "rejected"
            assert isinstance(refused.error, VersionError)
        newer = agent.install(str(iris_bundles["v3"]))
        assert (newer.result, newer.from_version) == ("installed", None)
        assert_serves(agent, 3, rows)
    assert_consistent(work, trusted, rows, active=3, previous=None)


# --- bundles that must be refused, with the old model still serving and nothing changed -------


@pytest.fixture(scope="module")
def lies(
    tmp_path_factory: pytest.TempPathFactory,
    iris_bundles: dict[str, Path],
    other_keys: KeyPair,
    limit: int,
) -> dict[str, tuple[Path, type[Exception], str]]:
    """One bad v2 bundle per lie: its path, the error it must cause, and what the message says."""
    out = tmp_path_factory.mktemp("lies")
    top, files = forge.unpack(iris_bundles["v2"])
    flipped = bytearray(files[MODEL_FILE])
    flipped[len(flipped) // 2] ^= 0x01
    unsigned = {k: v for k, v in files.items() if k != SIGNATURE_FILE}
    archives: dict[str, tuple[bytes, type[Exception], str]] = {
        "tampered-file": (forge.repack(top, {**files, MODEL_FILE: bytes(flipped)}),
                          SignatureError, "'model.onnx' was modified after signing"),
        "extra-file": (forge.repack(top, {**files, "notes.txt": b"unsigned\n"}),
                       SignatureError, "extra file 'notes.txt' is not covered"),
        "unsigned": (forge.repack(top, unsigned), SignatureError, "unsigned"),
        "symlink": (forge.repack(top, files, [forge.member(
            f"{top}/evil", kind=tarfile.SYMTYPE, linkname="/etc/passwd")]),
            ArchiveError, "is a symbolic link (to '/etc/passwd')"),
        "hardlink": (forge.repack(top, files, [forge.member(
            f"{top}/evil", kind=tarfile.LNKTYPE, linkname=f"{top}/{MODEL_FILE}")]),
            ArchiveError, "is a hard link"),
        "dotdot-path": (forge.repack(top, files, [forge.member(f"{top}/../../evil.txt", b"x")]),
                        ArchiveError, "escapes the bundle directory ('..')"),
        "absolute-path": (forge.repack(top, files, [forge.member("/tmp/evil.txt", b"x")]),
                          ArchiveError, "'/tmp/evil.txt' has an absolute or malformed path"),
        "device-node": (forge.repack(top, files, [forge.member(
            f"{top}/null", kind=tarfile.CHRTYPE)]), ArchiveError, "is a device node"),
        "duplicate-entry": (forge.repack(top, files, [forge.member(f"{top}/{MODEL_FILE}", b"x")]),
                            ArchiveError, "appears twice"),
        "oversized-member": (forge.repack(top, files, [forge.member(
            f"{top}/padding.bin", bytes(limit + 1))]), ArchiveError, f"per-file limit of {limit}"),
    }  # fmt: skip
    found: dict[str, tuple[Path, type[Exception], str]] = {}
    for name, (data, error, says) in archives.items():
        path = out / f"{name}.edgepack"
        path.write_bytes(data)
        found[name] = (path, error, says)
    found["wrong-key"] = (
        forge.resign(iris_bundles["v2"], other_keys.private, out / "other", version=2),
        SignatureError,
        "which is not among the 1 trusted keys",
    )
    found["wrong-profile"] = (
        iris_bundles["arm64-v2"],
        IncompatibleBundleError,
        "built for profile 'arm64-cpu', but this device is 'x86_64-cpu'",
    )
    return found


LIES = [
    "wrong-key", "tampered-file", "extra-file", "unsigned", "wrong-profile", "symlink",
    "hardlink", "dotdot-path", "absolute-path", "device-node", "duplicate-entry",
    "oversized-member",
]  # fmt: skip


@pytest.mark.parametrize("lie", LIES)
def test_bad_bundle_is_rejected_and_nothing_changes(lie, lies, prepared, rows, tmp_path):
    bundle, error, says = lies[lie]
    work = device(prepared["v1"], tmp_path)
    before = snapshot(work.parent)
    with serve(work) as agent:
        outcome = agent.install(str(bundle))
        assert outcome.result == "rejected"
        assert type(outcome.error) is error, outcome.error
        assert says in str(outcome.error)
        assert outcome.trace == ["fetching", "verifying", "failed"]
        assert_serves(agent, 1, rows)
    assert snapshot(work.parent) == before  # state.json byte for byte, no new directory anywhere
    assert leftovers(work) == []


def test_bundle_for_another_cpu_is_rejected(prepared, iris_bundles, keys, tmp_path):
    """Right profile name, wrong machine: an arm64 bundle on an x86_64 device called arm64-cpu."""
    if os.uname().machine != "x86_64":
        pytest.skip("the check needs an x86_64 host")
    work = tmp_path / "arm"
    write_agent_config(work, keys, profile="arm64-cpu")
    with serve(work) as agent:
        outcome = agent.install(str(iris_bundles["arm64-v2"]))
    assert outcome.result == "rejected"
    assert isinstance(outcome.error, IncompatibleBundleError)
    assert "targets aarch64 CPUs, this device is x86_64" in str(outcome.error)
    assert not (work / "state" / "state.json").exists()  # nothing was ever committed
    assert versions(work) == set()
    assert leftovers(work) == []


def test_expected_sha256_mismatch_is_rejected(prepared, iris_bundles, rows, tmp_path):
    work = device(prepared["v1"], tmp_path)
    before = snapshot(work)
    wrong = "0" * 64
    with serve(work) as agent:
        outcome = agent.install(str(iris_bundles["v2"]), expected_sha256=wrong)
        assert outcome.result == "rejected"
        assert f"does not match the expected {wrong}" in str(outcome.error)
        assert_serves(agent, 1, rows)
    assert snapshot(work) == before


# --- a signed bundle that fails its health check rolls back on its own ------------------------


@pytest.mark.parametrize("output", ["label", "probabilities"])
def test_golden_mismatch_rolls_back_automatically(
    output, forged, prepared, iris_bundles, rows, trusted, tmp_path
):
    work = device(prepared["v1"], tmp_path)
    with serve(work) as agent:
        outcome = agent.install(str(forged[f"bad-{output}"]))
        assert (outcome.result, outcome.version, outcome.from_version) == ("rolled-back", 9, 1)
        assert isinstance(outcome.error, HealthCheckError)
        assert f"iris v9 failed its health check: output {output!r}" in str(outcome.error)
        assert outcome.trace == [
            "fetching", "verifying", "staging", "health_check", "rolling_back", "failed",
        ]  # fmt: skip
        assert_serves(agent, 1, rows)
        with pytest.raises(ModelNotFoundError, match="iris v9 is not served"):
            agent.infer("iris", {"input": rows.inputs}, version=9)
    event = committed(work)["history"][-1]
    assert (event["action"], event["version"], event["result"]) == ("install", 9, "rolled-back")
    assert event["reason"] == str(outcome.error)
    assert committed(work)["models"]["iris"]["highest"] == 1  # never committed: no guard raised
    assert_consistent(work, trusted, rows, active=1, previous=None)
    fixed = cli(work, "install", iris_bundles["v2"])
    assert (fixed.returncode, fixed.stdout) == (0, "installed: iris v2 (was v1)\n")


# --- SIGKILL in every state, then a restart ---------------------------------------------------


def kill(work: Path, hook: str, state: str, *args: object) -> dict[str, str]:
    """Run ``edgepack-agent ARGS`` with the fault hook; check it died with the journal in
    ``state``. Returns the environment, for a recovery run with the hook still set."""
    env = {hook: state}
    result = cli(work, *args, env=env)
    assert result.returncode == KILLED, result.stdout + result.stderr
    entry = Journal(work / "state" / "journal.json").read()
    assert entry is not None
    assert (entry.state, entry.attempts) == (state, 1)
    return env


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("state", INSTALL_STATES)
def test_install_killed_in_any_state_is_finished_by_recover(
    state, hook, prepared, iris_bundles, rows, trusted, tmp_path
):
    work = device(prepared["v1"], tmp_path)
    env = kill(work, hook, state, "install", iris_bundles["v2"])
    recovered = cli(work, "recover", env=env)  # the hook fires on the first attempt only
    assert (recovered.returncode, recovered.stdout) == (0, "installed: iris v2 (was v1)\n")
    assert_consistent(work, trusted, rows, active=2, previous=1)
    assert [h["version"] for h in committed(work)["history"]] == [1, 2]  # committed exactly once


def test_agent_start_recovers_an_interrupted_install(
    prepared, iris_bundles, rows, trusted, tmp_path
):
    work = device(prepared["v1"], tmp_path)
    kill(work, "EDGEPACK_FAULT_KILL_AFTER", "staging", "install", iris_bundles["v2"])
    assert versions(work) == {1, 2}  # staged, not committed
    assert committed(work)["models"]["iris"]["active"] == 1
    with serve(work) as agent:
        assert agent.recovered is not None
        assert (agent.recovered.result, agent.recovered.version) == ("installed", 2)
        assert agent.recovered.trace == ["staging", "health_check", "committing", "cleanup", "done"]
        assert_serves(agent, 2, rows)
    assert_consistent(work, trusted, rows, active=2, previous=1)


def test_pending_operation_blocks_another_until_recovered(prepared, iris_bundles, tmp_path):
    work = device(prepared["v1"], tmp_path)
    kill(work, "EDGEPACK_FAULT_KILL_AT", "health_check", "install", iris_bundles["v2"])
    status = cli(work, "status")
    assert "pending: install of iris interrupted in health_check" in status.stdout
    lifecycle = Lifecycle(load_config(work / "agent.toml"))
    with pytest.raises(InstallError, match="an interrupted operation is pending"):
        lifecycle.install(str(iris_bundles["v3"]))
    # The CLI recovers first, then installs.
    result = cli(work, "install", iris_bundles["v3"])
    assert result.returncode == 0
    assert result.stdout == (
        "recovered an interrupted install: installed: iris v2 (was v1)\n"
        "installed: iris v3 (was v2)\n"
    )


@pytest.mark.parametrize(
    ("hook", "state"),
    [
        ("EDGEPACK_FAULT_KILL_AT", "staging"),
        ("EDGEPACK_FAULT_KILL_AFTER", "staging"),
        ("EDGEPACK_FAULT_KILL_AT", "health_check"),
        ("EDGEPACK_FAULT_KILL_AFTER", "health_check"),
        ("EDGEPACK_FAULT_KILL_AT", "rolling_back"),
        ("EDGEPACK_FAULT_KILL_AFTER", "rolling_back"),
    ],
)
def test_failing_install_killed_still_rolls_back(
    hook, state, forged, prepared, rows, trusted, tmp_path
):
    work = device(prepared["v1"], tmp_path)
    env = kill(work, hook, state, "install", forged["bad-probabilities"])
    recovered = cli(work, "recover", env=env)
    assert_consistent(work, trusted, rows, active=1, previous=None)
    assert committed(work)["models"]["iris"]["highest"] == 1
    events = [h for h in committed(work)["history"] if h["version"] == 9]
    assert [h["result"] for h in events] == ["rolled-back"]
    assert "output 'probabilities' differs" in (events[0]["reason"] or "")
    assert recovered.returncode == 1  # the install failed, whichever process finished it
    assert error_line(recovered).startswith(
        "error: rolled-back: iris v9: iris v9 failed its health"
    )


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("state", ["health_check", "committing", "cleanup"])
def test_rollback_killed_in_any_state_is_finished_by_recover(
    state, hook, prepared, rows, trusted, tmp_path
):
    work = device(prepared["v2"], tmp_path)
    env = kill(work, hook, state, "rollback", "iris")
    recovered = cli(work, "recover", env=env)
    assert (recovered.returncode, recovered.stdout) == (0, "rolled-back-to: iris v1 (was v2)\n")
    assert_consistent(work, trusted, rows, active=1, previous=None)
    assert [h["result"] for h in committed(work)["history"]].count("rolled-back-to") == 1


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("state", ["committing", "cleanup"])
def test_retire_killed_in_any_state_is_finished_by_recover(
    state, hook, prepared, rows, trusted, tmp_path
):
    work = device(prepared["v2"], tmp_path)
    env = kill(work, hook, state, "retire", "iris")
    recovered = cli(work, "recover", env=env)
    assert recovered.returncode == 0, recovered.stderr
    assert recovered.stdout.startswith("retired: iris")
    assert not (work / "state" / "models" / "iris").exists()
    assert_consistent(work, trusted, rows, active=None, previous=None)
    assert committed(work)["models"]["iris"]["highest"] == 2
    assert [h["result"] for h in committed(work)["history"]].count("retired") == 1


def test_retire_prints_the_retired_version(prepared, tmp_path):
    work = device(prepared["v2"], tmp_path)
    result = cli(work, "retire", "iris")
    assert result.returncode == 0, result.stderr
    assert "None" not in result.stdout
    assert "v2" in result.stdout


# --- crash loops: the attempt counter -----------------------------------------------------------


def interrupted(work: Path, attempts: int, *args: object, state: str = "health_check") -> None:
    """Kill ``edgepack-agent ARGS`` at ``state``, then make the journal say it has been
    interrupted ``attempts`` times (what repeated real crashes leave behind)."""
    kill(work, "EDGEPACK_FAULT_KILL_AT", state, *args)
    journal = Journal(work / "state" / "journal.json")
    entry = journal.read()
    assert entry is not None
    journal.write(dataclasses.replace(entry, attempts=attempts))


@pytest.mark.parametrize(
    ("attempts", "result", "active"), [(2, "installed", 2), (3, "rolled-back", 1)]
)
def test_install_interrupted_too_often_rolls_back(
    attempts, result, active, prepared, iris_bundles, rows, trusted, tmp_path
):
    work = device(prepared["v1"], tmp_path)
    interrupted(work, attempts, "install", iris_bundles["v2"])
    journaled: list[JournalEntry | None] = []
    lifecycle = Lifecycle(load_config(work / "agent.toml"))
    outcome = lifecycle.recover(
        on_state=lambda _: journaled.append(Journal(work / "state" / "journal.json").read())
    )
    assert outcome is not None
    assert outcome.result == result
    # The new attempt count is saved before the resumed state acts.
    assert journaled[0] is not None
    assert journaled[0].attempts == attempts + 1
    if result == "rolled-back":
        assert outcome.trace == ["rolling_back", "failed"]
        assert isinstance(outcome.error, InstallError)
        assert str(outcome.error) == "interrupted 3 times in state health_check"
        assert committed(work)["history"][-1]["reason"] == str(outcome.error)
        assert_consistent(work, trusted, rows, active=1, previous=None)
    else:
        assert outcome.error is None
        assert_consistent(work, trusted, rows, active=2, previous=1)


def test_rollback_interrupted_too_often_is_abandoned(prepared, rows, trusted, tmp_path):
    work = device(prepared["v2"], tmp_path)
    interrupted(work, 3, "rollback", "iris")
    before = committed(work)
    outcome = Lifecycle(load_config(work / "agent.toml")).recover()
    assert outcome is not None
    assert outcome.result == "rejected"
    assert "rollback of iris abandoned after 3 interrupted attempts" in str(outcome.error)
    assert committed(work) == before
    assert_consistent(work, trusted, rows, active=2, previous=1)


def test_committed_retire_interrupted_too_often_still_ends_retired(
    prepared, rows, trusted, tmp_path
):
    work = device(prepared["v2"], tmp_path)
    interrupted(work, 3, "retire", "iris", state="cleanup")
    assert committed(work)["models"]["iris"]["active"] is None  # the retire is committed
    outcome = Lifecycle(load_config(work / "agent.toml")).recover()
    assert outcome is not None
    assert_consistent(work, trusted, rows, active=None, previous=None)
    assert outcome.result == "retired"


@pytest.mark.parametrize("state", ["committing", "cleanup"])
def test_committed_install_interrupted_too_often_still_ends_installed(
    state, prepared, iris_bundles, rows, trusted, tmp_path
):
    work = device(prepared["v1"], tmp_path)
    kill(work, "EDGEPACK_FAULT_KILL_AFTER", state, "install", iris_bundles["v2"])
    journal = Journal(work / "state" / "journal.json")
    entry = journal.read()
    assert entry is not None
    journal.write(dataclasses.replace(entry, attempts=3))
    outcome = Lifecycle(load_config(work / "agent.toml")).recover()
    assert outcome is not None
    assert outcome.result == "installed"
    assert outcome.error is None
    assert_consistent(work, trusted, rows, active=2, previous=1)


def test_a_model_corrupted_at_rest_does_not_stop_the_others(
    prepared, iris_model, keys, rows, tmp_path
):
    from edgepack.packager._build import BuildRequest, build

    model, reference = iris_model
    [other] = build(
        BuildRequest(
            model=model,
            name="other",
            version=1,
            profiles=["x86_64-cpu"],
            reference=reference,
            key=keys.private,
            out_dir=tmp_path / "dist",
            trust_pickle=True,
        )
    )
    assert other.bundle is not None
    work = device(prepared["v1"], tmp_path)
    config = load_config(work / "agent.toml")
    with Agent(config).start(serve_http=False) as agent:
        assert agent.install(str(other.bundle)).ok
    # damage one model's installed file behind the agent's back, then restart the agent
    model_file = work / "state" / "models" / "iris" / "1" / MODEL_FILE
    model_file.write_bytes(model_file.read_bytes() + b"\0")
    with Agent(config).start(serve_http=False) as agent:
        status = agent.status()["models"]
        assert status["iris"]["serving"] is None
        assert "modified after signing" in status["iris"]["not_served_because"]
        with pytest.raises(ModelNotFoundError):
            agent.infer("iris", {"input": rows.inputs[:1]})
        assert status["other"]["serving"] == 1
        out = agent.infer("other", {"input": rows.inputs})
        np.testing.assert_array_equal(out["label"], rows.labels)  # same model, other name


# --- the CLI ------------------------------------------------------------------------------------


def test_status_table_and_json(prepared, tmp_path):
    work = device(prepared["v2"], tmp_path)
    table = cli(work, "status")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == "device test-device (profile x86_64-cpu)"
    assert lines[1].split()[:4] == ["model", "active", "previous", "highest"]
    data = json.loads(cli(work, "status", "--json").stdout)
    iris = data["models"]["iris"]
    assert lines[3].split() == ["iris", "2", "1", "2", iris["installed_at"]]
    assert "recent events:" in table.stdout
    assert (iris["active"], iris["previous"], iris["highest"]) == (2, 1, 2)
    assert data["pending"] is None
    assert [h["version"] for h in data["history"]] == [1, 2]


def test_install_of_a_missing_file_is_one_error_line(prepared, tmp_path):
    work = device(prepared["v1"], tmp_path)
    before = snapshot(work)
    missing = tmp_path / "nowhere" / "iris-2-x86_64-cpu.edgepack"
    result = cli(work, "install", missing)
    assert result.returncode == 1
    line = error_line(result)
    assert str(missing) in line
    assert "No such file" in line
    assert snapshot(work) == before


BAD_CONFIGS = {
    "missing-device-id": ('profile = "x86_64-cpu"\nstate_dir = "state"\ntrusted_keys = ["{pub}"]\n',
                          "missing required field 'device_id'"),
    "unknown-top-key": ('device_id = "d"\nprofile = "x86_64-cpu"\nstate_dir = "state"\n'
                        'trusted_keys = ["{pub}"]\ncolour = "red"\n', "unknown key 'colour'"),
    "unknown-limit": ('device_id = "d"\nprofile = "x86_64-cpu"\nstate_dir = "state"\n'
                      'trusted_keys = ["{pub}"]\n[limits]\nmax_widgets = 3\n',
                      "unknown key [limits].max_widgets"),
    "missing-key-file": ('device_id = "d"\nprofile = "x86_64-cpu"\nstate_dir = "state"\n'
                         'trusted_keys = ["missing.pub"]\n', "missing.pub cannot be read"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
@pytest.mark.parametrize("command", ["status", "recover"])
def test_bad_config_exits_2_naming_the_field(case, command, keys, tmp_path):
    text, says = BAD_CONFIGS[case]
    (tmp_path / "agent.toml").write_text(text.format(pub=keys.public))
    result = cli(tmp_path, command)
    assert result.returncode == 2
    line = error_line(result)
    assert str(tmp_path / "agent.toml") in line
    assert says in line
    assert not (tmp_path / "state").exists()


def test_lock_serializes_lifecycle_operations(prepared, iris_bundles, tmp_path):
    work = device(prepared["v1"], tmp_path)
    store = Store(work / "state")
    with store.lock():
        with (
            pytest.raises(InstallError, match="another edgepack-agent operation holds"),
            Store(work / "state").lock(timeout=0.2),
        ):
            pass
        waiting = subprocess.Popen(
            [str(AGENT), "--config", str(work / "agent.toml"), "install", str(iris_bundles["v2"])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(1.5)
        assert waiting.poll() is None  # blocked on the lock, not failed
        assert committed(work)["models"]["iris"]["active"] == 1
    out, err = waiting.communicate(timeout=30)
    assert (waiting.returncode, out) == (0, "installed: iris v2 (was v1)\n"), err


# --- a full disk ------------------------------------------------------------------------------


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


@pytest.mark.parametrize(
    ("free", "result", "says"),
    [
        pytest.param(lambda b: 0, "rejected", "journal.json", id="no-room-for-the-journal"),
        pytest.param(lambda b: b, "rejected", "cannot copy the bundle",
                     id="no-room-for-the-bundle"),
        pytest.param(lambda b: b + 1, "rejected", "journal.json", id="no-room-after-the-fetch"),
        pytest.param(lambda b: b + 3, "rejected", "cannot write the bundle's files",
                     id="no-room-for-the-files"),
    ],
)  # fmt: skip
def test_full_disk_is_a_clear_error_and_loses_nothing(
    free, result, says, tiny_disk, prepared, iris_bundles, rows, trusted
):
    """``free`` gives the free pages from the fetched bundle's page count ``b``. The journal
    takes a page (two while it is replaced), the bundle ``b`` more, the extracted files several:
    so the disk fills at the first journal write, the copy, the next journal write, or staging."""
    work = Path(shutil.copytree(prepared["v1"], tiny_disk / "device"))
    page = os.statvfs(tiny_disk).f_bsize
    pages = free(math.ceil(iris_bundles["v2"].stat().st_size / page))
    with serve(work) as agent:
        available = os.statvfs(tiny_disk).f_bavail
        (tiny_disk / "filler").write_bytes(bytes((available - pages) * page))
        assert os.statvfs(tiny_disk).f_bavail == pages
        state_before = (work / "state" / "state.json").read_bytes()
        outcome = agent.install(str(iris_bundles["v2"]))
        got, error = outcome.result, outcome.error
        assert isinstance(error, StorageError)
        assert says in str(error)
        assert "the disk is full: free space on this filesystem and retry" in str(error)
        assert_serves(agent, 1, rows)
        assert agent.status()["pending"] is None
        assert leftovers(work) == []
        assert got == result
    if result != "rolled-back":
        assert (work / "state" / "state.json").read_bytes() == state_before
    (tiny_disk / "filler").unlink()
    assert_consistent(work, trusted, rows, active=1, previous=None)
    if result == "rolled-back":
        event = committed(work)["history"][-1]
        assert (event["version"], event["result"]) == (2, "rolled-back")
        assert "disk is full" in event["reason"]


def test_full_disk_through_the_cli_blames_the_storage_not_the_bundle(
    tiny_disk, prepared, iris_bundles
):
    """A StorageError is not a refused bundle: the CLI says the device's storage failed, exits 1,
    and leaves nothing behind."""
    work = Path(shutil.copytree(prepared["v1"], tiny_disk / "device"))
    page = os.statvfs(tiny_disk).f_bsize
    pages = math.ceil(iris_bundles["v2"].stat().st_size / page)  # the journal fits, the copy not
    (tiny_disk / "filler").write_bytes(bytes((os.statvfs(tiny_disk).f_bavail - pages) * page))
    before = snapshot(work)
    result = cli(work, "install", iris_bundles["v2"])
    assert result.returncode == 1
    line = error_line(result)
    assert line.startswith(
        "error: install failed on this device's storage: bundle: cannot copy the bundle to "
    ), line
    assert line.endswith("the disk is full: free space on this filesystem and retry"), line
    assert snapshot(work) == before
