"""SIGKILL soak of upgrades, failed upgrades and rollbacks (issue #9 item 6), with a fixed seed.

Each iteration picks an operation (install the next version, install a validly signed version
whose health check fails, or roll back) and a random kill point (``EDGEPACK_FAULT_KILL_AT`` or
``_AFTER`` in one of the states that operation passes through), runs the real ``edgepack-agent``
CLI in a child that SIGKILLs itself there, recovers, and checks the device: exactly one active
version, the expected one; only the active and the previous version on disk, each still exactly
what was signed; no journal, nothing in incoming/ or staging/. A real daemon start at the end
serves the active version. 30 iterations in CI; ``--long`` runs 300.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import bundle_forge as forge
from conftest import KeyPair, write_agent_config

from edgepack.agent._config import load_config
from edgepack.agent._daemon import Agent
from edgepack.agent._lifecycle import Lifecycle
from edgepack.agent._unpack import verify_installed
from edgepack.formats.keys import load_public_key

AGENT = Path(sys.executable).parent / "edgepack-agent"
SEED = 20240909
ITERATIONS = 30
HOOKS = ("EDGEPACK_FAULT_KILL_AT", "EDGEPACK_FAULT_KILL_AFTER")
STATES = {
    "install": ("fetching", "verifying", "staging", "health_check", "committing", "cleanup"),
    "bad-install": ("fetching", "verifying", "staging", "health_check", "rolling_back"),
    "rollback": ("health_check", "committing", "cleanup"),
}


def test_sigkill_soak_leaves_a_consistent_device(
    tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path], long_factor: int
) -> None:
    work = tmp_path / "device"
    write_agent_config(work, keys, extra="[limits]\nprobation_period = 0\n")
    config = load_config(work / "agent.toml")
    trusted = [load_public_key(keys.public.read_bytes())]
    assert Lifecycle(config).install(str(iris_bundles["v1"])).ok
    active, previous, next_version = 1, None, 2
    golden = forge.unpack(iris_bundles["v2"])[1]
    rng = random.Random(SEED)
    kills = 0
    for iteration in range(ITERATIONS * long_factor):
        op = rng.choice(["install", "install", "bad-install"] + (["rollback"] if previous else []))
        hook, state = rng.choice(HOOKS), rng.choice(STATES[op])
        if op == "rollback":
            args: list[str] = ["rollback", "iris"]
        else:
            replace = (
                {"golden.npz": forge.wrong_golden(golden, "label")} if op == "bad-install" else None
            )
            bundle = forge.resign(
                iris_bundles["v2"], keys.private, tmp_path / "bundles" / str(next_version),
                version=next_version, replace=replace,
            )  # fmt: skip
            args = ["install", str(bundle)]
        done = subprocess.run(
            [str(AGENT), "--config", str(work / "agent.toml"), *args],
            capture_output=True, text=True, timeout=120, check=False,
            env={**os.environ, hook: state},
        )  # fmt: skip
        what = f"iteration {iteration}: {op} killed by {hook}={state}"
        assert done.returncode == -9, f"{what}: {done.returncode} {done.stderr}"
        kills += 1
        outcome = Lifecycle(config).recover()  # what the daemon does on its next start
        assert outcome is not None, what
        if op == "install":
            assert outcome.result == "installed", f"{what}: {outcome.error}"
            active, previous, next_version = next_version, active, next_version + 1
        elif op == "bad-install":
            assert outcome.result == "rolled-back", f"{what}: {outcome.error}"
            next_version += 1  # never committed, but used: the next one is fresh anyway
        else:
            assert outcome.result == "rolled-back-to", f"{what}: {outcome.error}"
            active, previous = previous, None
        check(work, trusted, active, previous, what)
    with Agent(config).start(serve_http=False) as agent:
        assert agent.recovered is None
        assert agent.runtime.get("iris").version == active
    print(f"soak: {ITERATIONS * long_factor} iterations, {kills} SIGKILLs, ends at v{active}")


def check(work: Path, trusted: list, active: int, previous: int | None, what: str) -> None:
    state = work / "state"
    assert not (state / "journal.json").exists(), what
    assert [p.name for d in ("incoming", "staging") for p in (state / d).iterdir()] == [], what
    model = json.loads((state / "state.json").read_text())["models"]["iris"]
    assert (model["active"], model["previous"]) == (active, previous), what
    retained = {v for v in (active, previous) if v is not None}
    assert {int(p.name) for p in (state / "models" / "iris").iterdir()} == retained, what
    for version in retained:
        verify_installed(state / "models" / "iris" / str(version), trusted, "iris", version)
