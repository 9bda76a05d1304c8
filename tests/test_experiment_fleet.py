"""Experiments end to end: the experiment CLI, mosquitto, real agents, the collector's store.

Three agents in group store-42 serve iris v1 (deployed through the broker). ``edgepack-fleet
experiment start --mode shadow`` makes each install v2 (the same forest) beside it; requests
served on the devices are shadowed, the devices' telemetry reaches the collector, and ``experiment
status --json`` shows 100 % agreement on every device and fleet-wide with the request counts
driven here. A split then answers a share of requests with v2 and the table and the HTML report
compare the variants; ``promote`` makes v2 active everywhere (v1 retained); an experiment command
to a device with no model installed is refused, the others unaffected.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from brokers import Broker, mosquitto
from click.testing import CliRunner
from conftest import KeyPair, _write_pair
from test_fleet_e2e import Fleet

from edgepack.agent._daemon import Agent
from edgepack.fleet._bundle_server import BundleServer
from edgepack.fleet._cli import cli
from edgepack.fleet._report import build_report

WAIT = 30.0
DEVICES = ("cam-0", "cam-1", "cam-2")


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


def until(condition: Any, what: str) -> Any:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def cli_run(fleet: Fleet, *args: str, code: int = 0) -> str:
    common = ["--broker", fleet.broker.address, "--prefix", fleet.prefix]
    common += ["--store", str(fleet.root / "fleet.db")]
    result = CliRunner().invoke(cli, [*common, *args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


def job_of(output: str) -> str:
    lines = [line for line in output.splitlines() if ": job " in line]
    return lines[0].rsplit("job ", 1)[1].strip()


def serve(agent: Agent, requests: int, seed: int, caller: str | None = None) -> list[int]:
    """``requests`` single-row inferences in-process; the versions that answered."""
    rng = np.random.default_rng(seed)
    versions = []
    for _ in range(requests):
        row = rng.uniform([4.3, 2.0, 1.0, 0.1], [7.9, 4.4, 6.9, 2.5], (1, 4)).astype(np.float32)
        served = agent.runtime.route("iris", None, caller)
        agent.runtime.run(served, {"input": row})
        versions.append(served.version)
    return versions


def report_now(agents: list[Agent], drained: bool = True) -> None:
    """Each device sends a telemetry report now (once its shadow queue is empty)."""
    for agent in agents:
        experiment = agent.experiments.get("iris")
        if drained and experiment is not None and experiment.shadow:
            until(lambda e=experiment: e.queued() == 0, "the shadow queue to drain")
            time.sleep(0.05)  # the request taken off the queue last is counted
        agent.monitor.tick(force_report=True)


def status_json(fleet: Fleet) -> list[dict[str, Any]]:
    return json.loads(cli_run(fleet, "experiment", "status", "iris", "--json"))


def test_shadow_then_split_then_promote_through_the_cli(fleet: Fleet) -> None:
    agents = [fleet.device(name) for name in DEVICES]
    fleet.wait_for(fleet.send("deploy", {"group": "store-42"}, version=1), list(DEVICES))
    key = str(fleet.ops.private)
    where = ["--group", "store-42", "--key", key]
    bundles = ["--bundles", fleet.server.url, "--dist", str(fleet.dist)]

    # shadow: every request also runs on v2, off the request path
    out = cli_run(
        fleet, "experiment", "start", "iris", "--version", "2", "--mode", "shadow",
        "--sample", "100%", *bundles, *where,
    )  # fmt: skip
    rows = fleet.wait_for(job_of(out), list(DEVICES))
    assert {r.status for r in rows.values()} == {"SUCCEEDED"}
    assert all(agent.experiments.get("iris") is not None for agent in agents)
    counts = {name: 40 + 10 * i for i, name in enumerate(DEVICES)}
    for agent, name in zip(agents, DEVICES, strict=True):
        assert set(serve(agent, counts[name], seed=len(name))) == {1}
    report_now(agents)

    def shadowed() -> list[dict[str, Any]] | None:
        rows = status_json(fleet)
        fleet_row = [r for r in rows if r["device"] == "(fleet)"]
        done = fleet_row and fleet_row[0]["shadow"]["compared"] == sum(counts.values())
        return rows if done else None

    rows = until(shadowed, "the shadow figures in the store")
    for row in rows:
        assert row["mode"] == "shadow"
        assert row["running"]
        assert (row["active_version"], row["candidate_version"]) == (1, 2)
        assert row["shadow"]["agreement"] == 1.0
        assert row["shadow"]["mean_abs_error"] == 0.0
        assert row["shadow"]["dropped"] == 0
        want = sum(counts.values()) if row["device"] == "(fleet)" else counts[row["device"]]
        assert row["active"]["requests"] == want
        assert row["active"]["errors"] == 0
        assert row["shadow"]["compared"] == want
        assert row["shadow"]["p50_ms"] is not None
    table = cli_run(fleet, "experiment", "list")
    assert "shadow 100.0%" in table
    assert "100.0%" in table
    assert "(fleet)" in table

    # split: a quarter of the callers answered by v2, the same callers every time
    out = cli_run(
        fleet, "experiment", "start", "iris", "--version", "2", "--mode", "split",
        "--share", "25%", *bundles, *where,
    )  # fmt: skip
    fleet.wait_for(job_of(out), list(DEVICES))
    until(lambda: all(a.experiments.get("iris").split for a in agents), "the split")  # type: ignore[union-attr]
    served = {1: 0, 2: 0}
    for agent in agents:
        for caller in range(60):
            versions = serve(agent, 3, seed=caller, caller=f"user-{caller}")
            assert len(set(versions)) == 1  # sticky
            served[versions[0]] += 3
    report_now(agents)

    def split() -> list[dict[str, Any]] | None:
        rows = status_json(fleet)
        fleet_row = [r for r in rows if r["device"] == "(fleet)"]
        seen = fleet_row and fleet_row[0]["candidate"]["requests"] + fleet_row[0]["active"][
            "requests"
        ] == sum(served.values())
        return rows if seen else None

    (fleet_row,) = [r for r in until(split, "the split figures") if r["device"] == "(fleet)"]
    assert fleet_row["mode"] == "split"
    assert fleet_row["share"] == 0.25
    assert fleet_row["candidate"]["requests"] == served[2] > 0
    assert fleet_row["active"]["requests"] == served[1] > 0
    page = build_report(fleet.store, "iris")
    assert 'id="experiments"' in page
    assert "split 25%" in page

    # promote: v2 becomes active through each device's journaled install, v1 retained
    elsewhere = cli_run(fleet, "experiment", "promote", "iris", "--group", "store-7",
                        "--key", key, code=1)  # fmt: skip
    assert "no experiment on iris for group store-7" in elsewhere  # not store-42's candidate
    out = cli_run(fleet, "experiment", "promote", "iris", *where)
    rows = fleet.wait_for(job_of(out), list(DEVICES))
    assert {(r.status, r.version_after) for r in rows.values()} == {("SUCCEEDED", 2)}
    for agent in agents:
        model = agent.lifecycle.store.load().models["iris"]
        assert (model.active, model.previous, model.candidate) == (2, 1, None)
        assert agent.experiments.get("iris") is None
        assert agent.runtime.get("iris").version == 2
    report_now(agents, drained=False)
    until(lambda: all(not r["running"] for r in status_json(fleet)), "the experiment to end")


def test_a_device_without_the_model_refuses_an_experiment(fleet: Fleet) -> None:
    fleet.device("cam-new")
    out = cli_run(
        fleet, "experiment", "start", "iris", "--version", "2", "--mode", "split",
        "--share", "10%", "--bundles", fleet.server.url, "--dist", str(fleet.dist),
        "--device", "cam-new", "--key", str(fleet.ops.private),
    )  # fmt: skip
    row = fleet.wait_for(job_of(out), ["cam-new"])["cam-new"]
    assert row.status == "REJECTED"
    assert "deploy one first" in (row.reason or "")
    # and the CLI's own checks: a share is a share, a split needs one
    bad = cli_run(
        fleet, "experiment", "start", "iris", "--version", "2", "--mode", "split",
        "--share", "150%", "--bundles", fleet.server.url, "--device", "cam-new",
        "--key", str(fleet.ops.private), code=2,
    )  # fmt: skip
    assert "at most 100%" in bad
    mixed = cli_run(
        fleet, "experiment", "start", "iris", "--version", "2", "--mode", "split",
        "--share", "10%", "--sample", "50%", "--bundles", fleet.server.url,
        "--device", "cam-new", "--key", str(fleet.ops.private), code=2,
    )  # fmt: skip
    assert "--sample is for a shadow" in mixed
    none = cli_run(fleet, "experiment", "status", "iris", "--json")
    assert json.loads(none) == []  # started, nothing reported yet
    unknown = cli_run(fleet, "experiment", "status", "churn", code=1)
    assert "no experiment on churn is recorded" in unknown
