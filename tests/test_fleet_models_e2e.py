"""Governance end to end, through a real mosquitto: what a deploy, its outcomes and a rollback
leave in ``edgepack-fleet audit`` and ``edgepack-fleet models``.

The operator uses the CLI (deploy, rollback) against real agents, the bundle server and a
collector writing SQLite (the wiring of tests/test_fleet_e2e.py); the CLI and the collector both
record each command, and the trail must hold it once, with the build, every device's outcome and
an intact chain whose command signatures verify with the operator's key.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from brokers import Broker, mosquitto
from click.testing import CliRunner
from conftest import KeyPair, _write_pair
from test_fleet_e2e import WAIT, Fleet

from edgepack.fleet._bundle_server import BundleServer
from edgepack.fleet._cli import cli
from edgepack.formats.keys import key_id, load_public_key

T0 = dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with mosquitto(tmp_path_factory.mktemp("broker")) as running:
        yield running


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    return _write_pair(tmp_path_factory.mktemp("ops"), "ops")


@pytest.fixture
def fleet(
    tmp_path: Path, broker: Broker, keys: KeyPair, ops: KeyPair, iris_bundles: dict[str, Path]
) -> Iterator[Fleet]:
    server = BundleServer(iris_bundles["v1"].parent, port=0).start()
    running = Fleet(tmp_path, broker, keys, ops, server, iris_bundles["v1"].parent)
    yield running
    running.close()
    server.stop()


def fleet_cli(fleet: Fleet, *args: str) -> Any:
    common = ["--broker", f"{fleet.broker.host}:{fleet.broker.port}", "--prefix", fleet.prefix,
              "--store", str(fleet.root / "fleet.db")]  # fmt: skip
    result = CliRunner().invoke(cli, [*common, *args], obj={"clock": lambda: T0})
    assert result.exit_code == 0, result.output
    return result


def job_of(result: Any) -> str:
    match = re.search(r"job (\S+)", result.output)
    assert match, result.output
    return match[1]


def until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {WAIT} s: {what}")


def test_a_deploy_its_outcomes_and_a_rollback_appear_in_audit_and_models(
    fleet: Fleet, keys: KeyPair, ops: KeyPair
) -> None:
    devices = ["cam-1", "cam-2"]
    for name in devices:
        fleet.device(name)
        fleet.store.assign(name, ["store-42"], T0)
    send = ["--bundles", fleet.server.url, "--dist", str(fleet.dist), "--key", str(ops.private)]
    jobs = []
    for version in (1, 2):
        done = fleet_cli(fleet, "deploy", "iris", "--version", str(version), "--group",
                         "store-42", *send)  # fmt: skip
        jobs.append(job_of(done))
        fleet.wait_for(jobs[-1], devices)
    back = fleet_cli(fleet, "rollback", "iris", "--group", "store-42", "--key", str(ops.private))
    jobs.append(job_of(back))
    rows = fleet.wait_for(jobs[-1], devices)
    assert all((r.version_before, r.version_after) == (2, 1) for r in rows.values())
    until(
        lambda: all(
            d.models.get("iris", {}).get("active") == 1 for d in fleet.store.devices("store-42")
        ),
        "the states after the rollback",
    )

    trail = json.loads(fleet_cli(fleet, "audit", "--model", "iris", "--json").output)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for e in trail:
        by_kind.setdefault(e["kind"], []).append(e)
    signer = key_id(load_public_key(keys.public.read_bytes()))
    operator = key_id(load_public_key(ops.public.read_bytes()))
    assert [(b["version"], b["key_id"]) for b in by_kind["build"]] == [(1, signer), (2, signer)]
    assert by_kind["build"][0]["payload"]["profiles"]["x86_64-cpu"]["parity"]["passed"] is True
    # each command once, though the CLI and the collector both recorded it
    assert [c["payload"]["job_id"] for c in by_kind["command"]] == jobs
    assert {c["key_id"] for c in by_kind["command"]} == {operator}
    outcomes = {(o["payload"]["job_id"], o["device"]) for o in by_kind["outcome"]}
    assert outcomes == {(j, d) for j in jobs for d in devices}
    assert all(o["payload"]["status"] == "SUCCEEDED" for o in by_kind["outcome"])
    one = json.loads(fleet_cli(fleet, "audit", "--device", "cam-2", "--kind", "outcome",
                               "--json").output)  # fmt: skip
    assert [o["payload"]["job_id"] for o in one] == jobs

    verdict = json.loads(fleet_cli(fleet, "audit", "verify", "--json", "--key-file",
                                   str(ops.public)).output)  # fmt: skip
    assert verdict["ok"]
    assert verdict["signatures_checked"] == 3
    assert verdict["head"]["seq"] == len(trail)

    index = {(r["model"], r["version"]): r for r in json.loads(
        fleet_cli(fleet, "models", "--json").output)}  # fmt: skip
    v1, v2 = index[("iris", 1)], index[("iris", 2)]
    assert (v1["state"], v1["devices"], v1["groups"]) == ("active", devices, {"store-42": 2})
    assert v2["state"] == "retired"
    assert v2["devices"] == []
    assert v2["profiles"]["x86_64-cpu"]["signer"] == signer
    assert v2["last_command"]["kind"] == "rollback"  # the rollback away from it
    table = fleet_cli(fleet, "models").output
    assert "iris" in table
    assert "active" in table
    assert "retired" in table
    shown = json.loads(fleet_cli(fleet, "models", "show", "iris", "--json").output)
    kinds = [e["kind"] for e in shown["history"]]
    assert kinds[0] == "build"
    assert kinds.count("command") == 3
    assert kinds[-1] == "outcome"


def test_a_deploy_whose_store_is_missing_or_down_is_still_sent_and_says_so(
    fleet: Fleet, ops: KeyPair, tmp_path: Path
) -> None:
    common = ["--broker", f"{fleet.broker.host}:{fleet.broker.port}", "--prefix", fleet.prefix]
    send = ["deploy", "iris", "--version", "1", "--group", "nobody", "--bundles", fleet.server.url,
            "--dist", str(fleet.dist), "--key", str(ops.private)]  # fmt: skip
    missing = tmp_path / "elsewhere" / "fleet.db"
    stores = [str(missing), "postgresql://u@127.0.0.1:1/fleet?connect_timeout=2"]
    for store, said in zip(stores, ("no store at", "not recorded in the audit trail"), strict=True):
        result = CliRunner().invoke(cli, [*common, "--store", store, *send])
        assert result.exit_code == 0, result.output
        assert said in result.output
        job = job_of(result)
        until(lambda job=job: fleet.store.job(job) is not None, "the collector records it")
    assert not missing.exists()  # a deploy never creates a store
