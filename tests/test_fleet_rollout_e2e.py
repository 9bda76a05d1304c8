"""Staged rollouts end to end: a real mosquitto, 3 real agents and 20 simulated devices.

Real parts only: the broker on a free loopback port, the bundle server over HTTP, three agents
with their own state directories that download, verify, health-check and serve real bundles,
twenty simulated devices (scripts/bench/simdevices.py) that verify every signed command and send
telemetry and drift reports with the figures each test picks per version, the collector writing
to SQLite, and the rollout controller sending signed per-device commands. The collector and the
controller share an injected clock, so a 10-minute soak passes in one step; every other wait is
a bounded poll for a condition.

The agents run profile x86_64-cpu and the simulated devices sim-cpu, so the plan (each stage's
share per profile, at least one device each) puts one real agent in the first stage.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bundle_forge as forge
import pytest
from brokers import Broker, mosquitto
from click.testing import CliRunner
from conftest import REPO, KeyPair, _write_pair, write_agent_config

from edgepack.agent._config import DownloadConfig, load_config
from edgepack.agent._daemon import Agent
from edgepack.agent._download import HttpFetcher
from edgepack.agent._fleet_link import DeviceLink
from edgepack.fleet._broker import BrokerOptions
from edgepack.fleet._bundle_server import BundleServer
from edgepack.fleet._cli import cli
from edgepack.fleet._collector import Collector
from edgepack.fleet._commands import find_bundles
from edgepack.fleet._database import open_store
from edgepack.fleet._rollout import parse_stages
from edgepack.fleet._rollout_controller import (
    BrokerSender,
    RolloutController,
    RolloutSpec,
    start_rollout,
)
from edgepack.fleet.exceptions import LeaseHeldError
from edgepack.formats.keys import load_private_key, load_public_key
from edgepack.formats.messages import TERMINAL, ModelState

sys.path.insert(0, str(REPO / "scripts" / "bench"))
from simdevices import SimFigures, SimFleet

WAIT = 30.0
GROUP = "store-42"
SOAK = 600.0
REAL = ("cam-0", "cam-1", "cam-2")
SIMS = 20


class FakeClock:
    """The collector's and the controller's clock: moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with mosquitto(tmp_path_factory.mktemp("broker")) as running:
        yield running


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    return _write_pair(tmp_path_factory.mktemp("ops"), "ops")


@pytest.fixture(scope="module")
def dist(
    tmp_path_factory: pytest.TempPathFactory, iris_bundles: dict[str, Path], keys: KeyPair
) -> Path:
    """iris v1-v3 as built, v4 (v1 again, good), v5 (golden outputs no model reproduces: fails
    every agent's health check); each also as a sim-cpu bundle for the simulated devices."""
    out = tmp_path_factory.mktemp("dist")
    for name in ("v1", "v2", "v3"):
        shutil.copy(iris_bundles[name], out)
    forge.resign(iris_bundles["v1"], keys.private, out, version=4)
    _, files = forge.unpack(iris_bundles["v1"])
    bad = {"golden.npz": forge.wrong_golden(files, "label")}
    forge.resign(iris_bundles["v1"], keys.private, out, version=5, replace=bad)
    for path in sorted(out.glob("iris-*-x86_64-cpu.edgepack")):
        shutil.copy(path, out / path.name.replace("x86_64-cpu", "sim-cpu"))
    return out


@pytest.fixture(scope="module")
def server(dist: Path) -> Iterator[BundleServer]:
    running = BundleServer(dist, port=0).start()
    yield running
    running.stop()


class RolloutFleet:
    """One test's fleet on its own prefix: 3 agents on v1, 20 simulated devices on v1."""

    def __init__(
        self, root: Path, broker: Broker, keys: KeyPair, ops: KeyPair, server: BundleServer,
        dist: Path, iris_v1: Path, fail: tuple[int, ...],
    ) -> None:  # fmt: skip
        self.root, self.broker, self.ops, self.server, self.dist = root, broker, ops, server, dist
        self.clock = FakeClock()
        self.prefix = f"r{time.monotonic_ns()}/v1"
        self.options = BrokerOptions(host=broker.host, port=broker.port, prefix=self.prefix)
        self.store_path = root / "fleet.db"
        self.store = open_store(self.store_path)
        self.collector = Collector(self.options, self.store, clock=self.clock).start()
        self.agents: dict[str, tuple[Agent, DeviceLink]] = {}
        for name in REAL:
            self.agents[name] = self._agent(name, keys, iris_v1)
        ops_pub = load_public_key(ops.public.read_bytes())
        v1 = {"iris": ModelState(1, None, 1)}
        self.sims = SimFleet(
            broker.host, broker.port, [ops_pub], SIMS, prefix=self.prefix, groups=(GROUP,),
            profile="sim-cpu", models=v1, fail_versions=fail,
        )  # fmt: skip
        self.sims.start().connect_all(WAIT)
        self.names = [*REAL, *(d.name for d in self.sims.devices)]
        for name in self.names:
            self.store.assign(name, [GROUP], self.clock())
        self.poll(lambda: len(self.on_version(1)) == len(self.names), "every device on v1")
        self.key = load_private_key(ops.private.read_bytes())
        self.figures: Callable[[str, str, int], SimFigures | None] = lambda *_: SimFigures()

    def _agent(self, name: str, keys: KeyPair, iris_v1: Path) -> tuple[Agent, DeviceLink]:
        extra = (
            f'[mqtt]\nhost = "{self.broker.host}"\nport = {self.broker.port}\n'
            f'prefix = "{self.prefix}"\ncommand_keys = ["{self.ops.public}"]\nreconnect_max = 2\n'
        )
        path = write_agent_config(self.root / name, keys, extra=extra)
        text = path.read_text().replace(
            'device_id = "test-device"', f'device_id = "{name}"\ngroups = ["{GROUP}"]'
        )
        path.write_text(text.replace("[server]\n", "[server]\nenabled = false\n"))
        config = load_config(path)
        agent = Agent(config, fetcher=HttpFetcher(DownloadConfig(retries=2, backoff_initial=0.05)))
        agent.start(serve_http=False)
        assert agent.install(str(iris_v1)).ok
        assert config.mqtt is not None
        link = DeviceLink(agent, config.mqtt).start()
        assert link.connected.wait(10), f"{name} did not connect"
        return agent, link

    def poll(self, done: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout:.0f} s")
            time.sleep(0.05)

    def on_version(self, version: int) -> set[str]:
        """Devices whose stored state says iris ``version`` is active."""
        return {d.device for d in self.store.devices()
                if (d.models.get("iris") or {}).get("active") == version}  # fmt: skip

    def spec(self, version: int, stages: str, *conditions: str) -> RolloutSpec:
        bundles = find_bundles("iris", version, self.server.url, self.dist)
        return RolloutSpec("iris", version, GROUP, tuple(parse_stages(stages)), bundles,
                           soak=SOAK, conditions=conditions)  # fmt: skip

    def controller(self, holder: str = "ctl-1") -> RolloutController:
        sender = BrokerSender(self.options, self.key)
        return RolloutController(self.store, sender, clock=self.clock, holder=holder)

    def report_round(self) -> None:
        """Every simulated device reports once; wait until the collector stored them all."""
        since = self.clock()
        sent = self.sims.report(self.figures)
        kinds = ("telemetry", "drift")
        self.poll(lambda: sum(len(self.store.events(k, since=since, limit=10_000))
                              for k in kinds) >= sent, "reports stored")  # fmt: skip

    def run(self, controller: RolloutController, rid: str, until: set[str]) -> str:
        """Step until the rollout is in one of ``until``: jobs are waited on (bounded), each
        soak gets a round of reports and then its time passes on the clock."""
        deadline = time.monotonic() + WAIT
        reported = None
        while time.monotonic() < deadline:
            controller.step(rid)
            row = self.store.rollout(rid)
            assert row is not None
            if row.state in until:
                return row.state
            if row.state == "soaking":
                if reported != (row.stage, row.data["soak_from"]):
                    self.report_round()
                    reported = (row.stage, row.data["soak_from"])
                    continue  # judged once with the reports, before the soak is over
                self.clock.advance(SOAK + 1)
            else:
                time.sleep(0.05)
        raise AssertionError(f"rollout {rid} not in {until} within {WAIT:.0f} s")

    def actions(self, rid: str) -> list[str]:
        return [d.action for d in self.store.decisions(rid)]

    def serving(self, name: str) -> int | None:
        agent = self.agents[name][0]
        return next((m.version for m in agent.runtime.models() if m.name == "iris"), None)

    def cli(self, *args: str) -> Any:
        common = ["--broker", self.broker.address, "--prefix", self.prefix,
                  "--store", str(self.store_path)]  # fmt: skip
        return CliRunner().invoke(cli, [*common, *args], obj={"clock": self.clock},
                                  catch_exceptions=False)  # fmt: skip

    def close(self) -> None:
        self.sims.stop()
        for agent, link in self.agents.values():
            link.stop()
            agent.stop()
        self.collector.stop()
        self.store.close()


@pytest.fixture
def make_fleet(
    tmp_path: Path, broker: Broker, keys: KeyPair, ops: KeyPair, server: BundleServer,
    dist: Path, iris_bundles: dict[str, Path],
) -> Iterator[Callable[..., RolloutFleet]]:  # fmt: skip
    made: list[RolloutFleet] = []

    def make(fail: tuple[int, ...] = ()) -> RolloutFleet:
        made.append(RolloutFleet(tmp_path, broker, keys, ops, server, dist, iris_bundles["v1"],
                                 fail))  # fmt: skip
        return made[-1]

    yield make
    for fleet in made:
        fleet.close()


CONDITIONS = ("failed>2%", "p95_latency>1.2x", "drift_share>0.3")


def staged(fleet: RolloutFleet, rid: str) -> dict[int | None, list[str]]:
    found: dict[int | None, list[str]] = {}
    for d in fleet.store.rollout_devices(rid):
        found.setdefault(d.stage, []).append(d.device)
    return found


def test_a_good_version_passes_every_stage_through_pause_resume_and_a_restart(
    make_fleet: Callable[..., RolloutFleet],
) -> None:
    fleet = make_fleet()
    row = start_rollout(fleet.store, fleet.spec(2, "10%,50%,100%", *CONDITIONS), fleet.clock())
    rid = row.rollout_id
    stages = staged(fleet, rid)
    assert sorted(len(v) for v in stages.values()) == [3, 9, 11]  # 1+2, 1+9 (cumulative 2+10)
    assert sum(1 for d in stages[0] if d in REAL) == 1  # each profile is in the first stage
    first = fleet.controller("ctl-1")
    assert fleet.run(first, rid, {"soaking"}) == "soaking"

    live = json.loads(fleet.cli("rollout", "status", rid, "--json").output)
    assert (live["state"], live["stage"], live["figures"]["staged"]) == ("soaking", 1, 3)
    assert [v["condition"] for v in live["figures"]["conditions"]] == list(CONDITIONS)
    assert fleet.cli("rollout", "pause", rid).exit_code == 0
    first.step(rid)
    assert fleet.store.rollout(rid).state == "paused"  # type: ignore[union-attr]
    fleet.clock.advance(SOAK * 2)  # the soak would be over, but a paused rollout waits
    first.step(rid)
    assert fleet.store.rollout(rid).state == "paused"  # type: ignore[union-attr]
    assert fleet.cli("rollout", "resume", rid).exit_code == 0
    first.step(rid)
    resumed = fleet.store.rollout(rid)
    assert resumed is not None
    assert resumed.state == "soaking"
    assert resumed.data["soak_from"] == fleet.clock().isoformat()  # the soak starts again

    # the controller dies without giving its lease back; another is refused until it expires
    second = fleet.controller("ctl-2")
    with pytest.raises(LeaseHeldError, match=r"driven by ctl-1 until .* UTC"):
        second.step(rid)
    fleet.clock.advance(61)
    assert fleet.run(second, rid, {"completed", "aborted"}) == "completed"

    fleet.poll(lambda: fleet.on_version(2) == set(fleet.names), "every device on v2")
    assert all(fleet.serving(name) == 2 for name in REAL)
    actions = fleet.actions(rid)
    assert actions[:5] == ["start", "deploy", "wait", "pause", "resume"]
    assert actions[-1] == "complete"
    assert actions.count("advance") == 2
    assert actions.count("deploy") == 3
    for decision in fleet.store.decisions(rid)[2:]:
        assert decision.figures, decision  # every decision keeps the figures behind it
    last = fleet.store.decisions(rid)[-1].figures
    assert last["failed"] == 0.0
    assert last["jobs"]["succeeded"] == len(fleet.names)
    p95 = next(v for v in last["conditions"] if v["condition"] == "p95_latency>1.2x")
    assert p95["observed"] == pytest.approx(1.0)
    assert not p95["triggered"]
    shown = json.loads(fleet.cli("rollout", "status", rid, "--json").output)
    assert shown["state"] == "completed"
    assert shown["devices"]["on_new_version"] == 23
    listed = json.loads(fleet.cli("rollout", "list", "--json").output)
    assert [r["rollout_id"] for r in listed] == [rid]


def test_a_version_failing_its_health_check_aborts_at_the_first_stage_and_rolls_back(
    make_fleet: Callable[..., RolloutFleet],
) -> None:
    """Driven by the CLI (`rollout start`, its driver loop, soak 0)."""
    fleet = make_fleet()
    done = fleet.cli(
        "rollout", "start", "iris", "--version", "5", "--group", GROUP, "--stages", "10%,100%",
        "--soak", "0s", "--poll", "0.05", "--abort-on", "failed>2%", "--bundles",
        fleet.server.url, "--dist", str(fleet.dist), "--key", str(fleet.ops.private),
    )  # fmt: skip
    assert done.exit_code == 1, done.output  # aborted
    assert "failed>2% triggered" in done.output
    rid = fleet.store.rollouts()[0].rollout_id
    stages = staged(fleet, rid)
    agent = next(d for d in stages[0] if d in REAL)
    sims = [d for d in stages[0] if d not in REAL]
    devices = {d.device: d for d in fleet.store.rollout_devices(rid)}
    (execution,) = fleet.store.executions(devices[agent].deploy_job)
    assert execution.status == "FAILED"
    assert fleet.serving(agent) == 1
    assert "rolling-back" in [h.step for h in fleet.store.history(execution.job_id, agent)]
    for name in sims:  # upgraded, then rolled back by signed rollback commands
        (rollback,) = fleet.store.executions(devices[name].rollback_job)
        assert (rollback.status, rollback.version_before, rollback.version_after) == (
            "SUCCEEDED", 5, 1)  # fmt: skip
    for name in stages[1]:  # the second stage never went out
        assert fleet.store.executions(devices[name].deploy_job) == []
    assert fleet.actions(rid) == ["start", "deploy", "abort", "rollback", "done"]
    abort = fleet.store.decisions(rid)[2]
    assert abort.figures["failed"] == pytest.approx(1 / 3)
    assert abort.figures["jobs"] == {"succeeded": 2, "failed": 1, "timed_out": 0, "pending": 0}
    fleet.poll(lambda: fleet.on_version(1) == set(fleet.names), "every device back on v1")
    shown = fleet.cli("rollout", "status", rid)
    assert shown.exit_code == 0
    assert "aborted" in shown.output
    assert "failed>2% triggered: 33.3% of 3 device(s) staged" in shown.output
    assert fleet.cli("rollout", "status", rid, "--wait").exit_code == 1  # it aborted
    unknown = fleet.cli("rollout", "status", "rollout-nope")
    assert unknown.exit_code == 1
    assert "no rollout 'rollout-nope'" in unknown.output
    assert "already ended (aborted)" in fleet.cli("rollout", "pause", rid).output


@pytest.mark.parametrize(
    ("version", "figures", "fired"),
    [
        (3, lambda _d, _m, v: SimFigures(p95_ms=5.0 if v == 3 else 2.0), "p95_latency>1.2x"),
        (4, lambda _d, _m, v: SimFigures(drift="drift" if v == 4 else "ok"), "drift_share>0.3"),
    ],
    ids=["worse-latency", "drifting"],
)
def test_a_worse_version_aborts_on_its_condition_and_rolls_back(
    make_fleet: Callable[..., RolloutFleet], version: int, figures: Any, fired: str
) -> None:
    fleet = make_fleet()
    fleet.figures = figures
    rid = start_rollout(fleet.store, fleet.spec(version, "10%,50%,100%", *CONDITIONS),
                        fleet.clock()).rollout_id  # fmt: skip
    assert fleet.run(fleet.controller(), rid, {"aborted", "completed"}) == "aborted"
    decisions = fleet.store.decisions(rid)
    abort = next(d for d in decisions if d.action == "abort")
    assert abort.stage == 0
    assert fired in abort.reason
    verdicts = {v["condition"]: v for v in abort.figures["conditions"]}
    assert verdicts[fired]["triggered"]
    assert not verdicts["failed>2%"]["triggered"]
    if version == 3:
        assert verdicts[fired]["observed"] == pytest.approx(2.5)
        assert abort.figures["new"]["p95_latency"] == 5.0
        assert abort.figures["old"]["p95_latency"] == 2.0
    else:
        assert abort.figures["new"]["drift_share"] == 1.0  # the 2 sims of stage 1 drift
        assert abort.figures["old"]["drift_share"] == 0.0
    first = staged(fleet, rid)[0]
    rollback = next(d for d in decisions if d.action == "rollback")
    assert sorted(rollback.figures["devices"]) == sorted(first)  # the agent too: it upgraded
    assert decisions[-1].action == "done"
    assert "3 of 3 device(s) rolled back" in decisions[-1].reason
    fleet.poll(lambda: fleet.on_version(1) == set(fleet.names), "every device back on v1")
    agent = next(d for d in first if d in REAL)
    assert fleet.serving(agent) == 1
    for d in fleet.store.rollout_devices(rid):
        if d.stage != 0:
            assert fleet.store.executions(d.deploy_job) == []
        else:
            assert all(e.status in TERMINAL for e in fleet.store.executions(d.deploy_job))
